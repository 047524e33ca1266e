"""Worker of the trained explainers' DDP test: ``torchrun --nproc-per-node 2
explainer_ddp_worker.py NAME OUT`` with ``NAME`` ``ttame`` or ``mhex``.

Also run in one process by the test (``run(name, out, distributed=False)``), so both sides
build the same model, data and recipe here. T-TAME trains its mechanism around a 3-block tiny
timm ViT on 24 images; MHEX trains its gates, heads and the backbone (``train_backbone=True``,
so the BatchNorm layers normalise with the statistics of the global batch) of a tiny timm
ResNet on 24 images with multi-hot labels. Each process writes the final trained module and
history to ``OUT/rank-<r>.safetensors`` / ``.json``; under torchrun the epoch checkpoints go
to ``OUT/ckpt``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import tiny_models
import torch
from torch import nn

from captum_ext import MHEX, TTAME, TrainingRecipe
from captum_ext.zoo._build import zoo_resnet_s1

RECIPE = dict(epochs=2, batch_size=8, lr=0.05, seed=3)
OPTIONS = {"ttame": {}, "mhex": {"train_backbone": True, "objective": "bce"}}
"""The method's own fit options."""


def build(name: str) -> tuple[Any, Any, nn.Module]:
    """The float64 explainer (seeded init), its training data and its trained module."""
    g = torch.Generator().manual_seed(2)
    torch.manual_seed(0)
    if name == "ttame":
        model = tiny_models._timm(depth=3).double().eval()
        torch.manual_seed(1)
        explainer = TTAME(model, input_size=32)
        data = torch.rand(24, 3, 32, 32, generator=g).double()
        return explainer, data, explainer.mechanism
    model = zoo_resnet_s1(num_classes=5, channels=(4, 8, 8, 16)).double().eval()
    torch.manual_seed(1)
    explainer = MHEX(model)
    images = torch.rand(24, 3, 32, 32, generator=g).double()
    labels = (torch.rand(24, 5, generator=g) < 0.4).double()
    return explainer, (images, labels), explainer.network


def run(name: str, out: Path, distributed: bool | None = None) -> None:
    from safetensors.torch import save_file

    torch.set_num_threads(1)
    explainer, data, module = build(name)
    recipe = TrainingRecipe(
        **RECIPE,
        show_progress=False,
        distributed=distributed,
        checkpoint_dir=out / "ckpt" if distributed is None else None,
    )
    history = explainer.fit(data, recipe, **OPTIONS[name])
    rank = int(os.environ.get("RANK", "0"))  # fit destroyed the process group it created
    tag = "single" if distributed is False else f"rank-{rank}"
    state = {k: v.contiguous() for k, v in module.state_dict().items()}
    save_file(state, str(out / f"{tag}.safetensors"))
    (out / f"{tag}.json").write_text(json.dumps({"history": history}))


if __name__ == "__main__":
    run(sys.argv[1], Path(sys.argv[2]))
