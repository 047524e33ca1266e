"""Train the T-TAME explainers of the model zoo on the procedural data, on CPU.

    python benchmarks/training/train_ttame.py [--only NAME ...] [--out captum_ext/zoo/weights]

Each entry fits :class:`captum_ext.TTAME` to a zoo model (``zoo.load(backbone)``, frozen) with
the paper's ImageNet recipe unchanged (SGD with Nesterov momentum, weight decay 5e-4 on
weights, one-cycle schedule peaking at lr 1e-3, batch 32, 8 epochs; loss 1.5 CE + 2 area +
0.01 variation), on 4096 unlabelled images of the backbone's own data settings
(``zoo.data_kwargs(backbone)``, data seed 31, which no zoo model was trained on), seeded
(``torch.manual_seed(seed)`` before building the mechanism, ``TrainingRecipe(seed=seed)`` for the data
order; seed 0 for the CNN, 2 for the ViT, selected as ``benchmarks/results/training.md``
records). It is then measured on fresh two-object
images (seed 616161, never used in training or selection) and written with
:meth:`TTAME.save` as ``<name>.safetensors`` + ``<name>.json`` (the mechanism, its config, the
backbone's fingerprint, and a record of data, seed, recipe, per-epoch history, time and the
measurements); ``zoo.load(name)`` rebuilds it
around ``zoo.load(backbone)``.

Pointing game (Zhang et al. 2016, :func:`captum_ext.metrics.pointing_game`, no tolerance),
for every (image, present class) pair, each class explained separately:

* ``grid`` (the score): on the benchmark's 8 x 8-pixel cells, the protocol of
  :mod:`captum_ext.evaluation` (maps average-pooled to the cells, a cell counts as the
  object's when the object covers any pixel of it). ``chance`` is what a constant map scores.
* ``pixels``: the default ``attribute`` output (bilinear upsampling of the T-TAME map) against
  the exact object pixels. The ViT's map has one value per 8 x 8 cell, so even a map that is 1
  exactly on the object's cell scores only ``pixel_ceiling_cell_map`` here (the maximum of the
  upsampled map sits at the cell centre, which thin shapes such as the plus do not cover).

AD/IC with the T-TAME preset (:func:`captum_ext.metrics.average_drop_ttame`) go into the
records too. The ViT entry's ``vit_features`` and seed were chosen on separate selection data
(256 two-object images of seed 515151) among a few seeds, the CNN entry is the first run.

Measured scores, run times and the selection: ``benchmarks/results/training.md`` (each
entry's record holds its own).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.nn.functional as F

from captum_ext import TTAME, TrainingRecipe, zoo
from captum_ext.data import ShapesDataset, shapes
from captum_ext.metrics import average_drop_ttame, pointing_game
from captum_ext.zoo._build import WEIGHTS_DIR

DEFAULT_OUT = WEIGHTS_DIR
DATA_SEED = 31
EVAL_SEED = 616161


@dataclass(frozen=True)
class Entry:
    name: str
    backbone: str
    vit_features: str | None = None
    n_train: int = 4096
    epochs: int = 8
    batch_size: int = 32
    lr: float = 1e-3
    seed: int = 0


ENTRIES = {
    e.name: e
    for e in (
        Entry("shapes-vit-ttame", "shapes-vit", vit_features="plain", seed=2),
        Entry("shapes-cnn-ttame", "shapes-cnn"),
    )
}


def _cells(x: torch.Tensor, patch: int) -> tuple[int, int]:
    return x.shape[-2] // patch, x.shape[-1] // patch


@torch.no_grad()
def measure(explainer: TTAME, kwargs: dict[str, Any], n: int, seed: int) -> dict[str, Any]:
    """Pointing game (grid and pixels) and AD/IC on fresh two-object images."""
    batch = shapes(n, seed, min_objects=2, **kwargs)
    patch = int(kwargs.get("patch", 8))
    grid = _cells(batch.images, patch)
    pg_grid, pg_pix, chance, ceiling = [], [], [], []
    for k in range(batch.labels.shape[1]):
        rows = batch.labels[:, k] > 0.5
        if not rows.any():
            continue
        x, masks = batch.images[rows], batch.masks[rows, k]
        cell_masks = F.adaptive_max_pool2d(masks[:, None].float(), grid)[:, 0] > 0
        small = explainer.attribute(x, target=k, output="grid")
        nearest = F.interpolate(small, size=x.shape[-2:], mode="nearest")
        pg_grid.append(pointing_game(F.adaptive_avg_pool2d(nearest, grid), cell_masks))
        pg_pix.append(pointing_game(explainer.attribute(x, target=k), masks))
        chance.append(cell_masks.float().mean(dim=(1, 2)).double())
        oracle = F.interpolate(
            cell_masks[:, None].float(), size=x.shape[-2:], mode="bilinear", align_corners=False
        )
        ceiling.append(pointing_game(oracle, masks))
    adic = average_drop_ttame(explainer.adapter.model, batch.images, explainer)
    return {
        "score": round(torch.cat(pg_grid).nanmean().item(), 4),
        "grid": round(torch.cat(pg_grid).nanmean().item(), 4),
        "pixels": round(torch.cat(pg_pix).nanmean().item(), 4),
        "chance": round(torch.cat(chance).mean().item(), 4),
        "pixel_ceiling_cell_map": round(torch.cat(ceiling).nanmean().item(), 4),
        "tolerance": 0,
        "protocol": (
            "every (image, present class) pair explained for its class; grid: maps "
            "average-pooled to the data's patch cells vs cells the object touches "
            "(captum_ext.evaluation's grid protocol); pixels: attribute() output vs the "
            "object's pixels"
        ),
        "seed": seed,
        "n_images": n,
        "n_targets": int(sum(len(p) for p in pg_grid)),
        "min_objects": 2,
        "average_drop_ttame": {k: round(v.nanmean().item(), 2) for k, v in adic.items()},
    }


def train_entry(entry: Entry, out: Path, eval_n: int, show_progress: bool) -> dict[str, Any]:
    backbone = zoo.load(entry.backbone)
    kwargs = zoo.data_kwargs(entry.backbone)
    torch.manual_seed(entry.seed)
    explainer = TTAME(backbone, vit_features=entry.vit_features)
    data = ShapesDataset(entry.n_train, DATA_SEED, **kwargs)
    start = time.perf_counter()
    recipe = TrainingRecipe(
        epochs=entry.epochs,
        batch_size=entry.batch_size,
        lr=entry.lr,
        seed=entry.seed,
        show_progress=show_progress,
    )
    history = explainer.fit(data, recipe)
    train_time = time.perf_counter() - start
    explainer.eval()
    measured = measure(explainer, kwargs, eval_n, EVAL_SEED)
    info = zoo.info(entry.backbone)
    record = {
        "name": entry.name,
        "kind": "explainer",
        "backbone_model": entry.backbone,
        "classes": info["classes"],
        "data": {"generator": "shapes", "kwargs": kwargs},
        "training": {
            "seed": entry.seed,
            "data_seeds": [DATA_SEED],
            "n_train": entry.n_train,
            "labels_used": False,
            "recipe": {
                "epochs": entry.epochs,
                "batch_size": entry.batch_size,
                "optimizer": {
                    "name": "SGD",
                    "nesterov": True,
                    "momentum": 0.9,
                    "weight_decay": 5e-4,
                    "no_decay": "biases and BatchNorm parameters",
                },
                "schedule": {"name": "OneCycleLR", "max_lr": entry.lr, "pct_start": 0.3},
                "loss": {"ce": 1.5, "area": 2.0, "variation": 0.01, "maps": "target"},
            },
            "history": [
                {k: round(v, 5) if isinstance(v, float) else v for k, v in h.items()}
                for h in history
            ],
        },
        "pointing_game": {k: v for k, v in measured.items() if k != "average_drop_ttame"},
        "average_drop_ttame": measured["average_drop_ttame"],
        "params": sum(p.numel() for p in explainer.mechanism.parameters()),
        "train_time_s": round(train_time, 1),
        "train_threads": torch.get_num_threads(),
        "command": f"python benchmarks/training/train_ttame.py --only {entry.name}",
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__.split("+")[0],
        },
    }
    paths = explainer.save(out / entry.name, extra=record)
    print(
        f"{entry.name}: {train_time:.0f} s, pointing game grid {measured['grid']:.3f} "
        f"pixels {measured['pixels']:.3f} (chance {measured['chance']:.3f}), "
        f"{paths.weights.stat().st_size / 1e6:.3f} MB -> {paths.weights}",
        flush=True,
    )
    return record


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", nargs="+", choices=list(ENTRIES), help="train these entries only")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    p.add_argument("--eval-n", type=int, default=512, help="fresh two-object images measured")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.out.resolve() != DEFAULT_OUT.resolve():  # backbones are read from the shipped zoo
        print(f"writing to {args.out}; backbones come from {DEFAULT_OUT}", file=sys.stderr)
    for name in args.only or list(ENTRIES):
        train_entry(ENTRIES[name], args.out, args.eval_n, not args.no_progress)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
