"""Worker of the MHEX DDP test: ``torchrun --nproc-per-node 2 mhex_ddp_worker.py OUT``.

Also run in one process by the test (``run(out, distributed=False)``), so both sides build the
same model, data and recipe here. The backbone trains too (``train_backbone=True``), so the
BatchNorm layers normalise with the statistics of the global batch. Each process writes its
final network and history to ``OUT/rank-<r>.safetensors`` / ``.json``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from captum_ext import MHEX, TrainingRecipe
from captum_ext.zoo._build import zoo_resnet_s1

RECIPE = dict(epochs=2, batch_size=8, lr=0.05, seed=3)
OPTIONS = dict(train_backbone=True, objective="bce")


def build() -> tuple[MHEX, torch.Tensor, torch.Tensor]:
    """MHEX around a tiny timm ResNet in float64 (seeded init), 24 images, multi-hot labels."""
    torch.manual_seed(0)
    model = zoo_resnet_s1(num_classes=5, channels=(4, 8, 8, 16)).double().eval()
    torch.manual_seed(1)
    explainer = MHEX(model)
    g = torch.Generator().manual_seed(2)
    images = torch.rand(24, 3, 32, 32, generator=g).double()
    labels = (torch.rand(24, 5, generator=g) < 0.4).double()
    return explainer, images, labels


def run(out: Path, distributed: bool | None = None) -> None:
    from safetensors.torch import save_file

    torch.set_num_threads(1)
    explainer, images, labels = build()
    recipe = TrainingRecipe(**RECIPE, show_progress=False, distributed=distributed)
    history = explainer.fit((images, labels), recipe, **OPTIONS)
    rank = int(os.environ.get("RANK", "0"))
    tag = "single" if distributed is False else f"rank-{rank}"
    state = {k: v.contiguous() for k, v in explainer.network.state_dict().items()}
    save_file(state, str(out / f"{tag}.safetensors"))
    (out / f"{tag}.json").write_text(json.dumps({"history": history}))


if __name__ == "__main__":
    run(Path(sys.argv[1]))
