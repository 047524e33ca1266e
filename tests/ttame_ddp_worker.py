"""Worker of the T-TAME DDP test: ``torchrun --nproc-per-node 2 ttame_ddp_worker.py OUT``.

Also run in one process by the test (``run(out, distributed=False)``), so both sides build the
same model, data and recipe here. Each process writes its final mechanism and history to
``OUT/rank-<r>.safetensors`` / ``.json``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import tiny_models
import torch

from captum_ext import TTAME, TrainingRecipe

RECIPE = dict(epochs=2, batch_size=8, lr=0.05, seed=3)


def build() -> tuple[TTAME, torch.Tensor]:
    """A 3-block tiny timm ViT in float64, its T-TAME (seeded init) and 24 images."""
    torch.manual_seed(0)
    model = tiny_models._timm(depth=3).double().eval()
    torch.manual_seed(1)
    explainer = TTAME(model, input_size=32)
    images = torch.rand(24, 3, 32, 32, generator=torch.Generator().manual_seed(2)).double()
    return explainer, images


def run(out: Path, distributed: bool | None = None) -> None:
    from safetensors.torch import save_file

    torch.set_num_threads(1)
    explainer, images = build()
    history = explainer.fit(
        images,
        TrainingRecipe(
            **RECIPE,
            show_progress=False,
            distributed=distributed,
            checkpoint_dir=out / "ckpt" if distributed is None else None,
        ),
    )
    rank = int(os.environ.get("RANK", "0"))  # fit destroyed the process group it created
    tag = "single" if distributed is False else f"rank-{rank}"
    state = {k: v.contiguous() for k, v in explainer.mechanism.state_dict().items()}
    save_file(state, str(out / f"{tag}.safetensors"))
    (out / f"{tag}.json").write_text(json.dumps({"history": history}))


if __name__ == "__main__":
    run(Path(sys.argv[1]))
