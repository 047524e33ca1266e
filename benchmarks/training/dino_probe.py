"""Quick comparison of DINO recipes for ``shapes-vit-dino``: DINO, then a logistic-regression probe.

    PYTHONPATH=. python benchmarks/training/dino_probe.py --steps 250 [KEY=VALUE ...]
        [--threads 1] [--tag NAME] [--log results.jsonl]

Builds the fine entries' architecture with their initialisation (conv stem, stem whitening;
``train_dino.py``), runs :func:`train_dino.train_dino` for ``--steps`` steps with the
``DINOConfig`` fields given as ``KEY=VALUE`` overriding the script's defaults, then fits a
standardised logistic regression (L-BFGS, 300 iterations, L2 1e-4) on the final class-token
features of 4096 images (seed 13) and reports its exact-set and per-label accuracy on 1024
images of seed 424242. ``--steps 0`` measures the untrained backbone, the bar a recipe must
clear; ``--backbone FILE`` probes a trained backbone instead (the ``--cache`` files of
``train_dino.py``), without training. Besides the probe it reports the linear
decodability (held-out R^2 of least squares from the standardised class-token features) of
the labels and of the background's corner colours, which carry no class information: what
a backbone encodes instead of the shapes. Much cheaper than the full head training of ``train_dino.py`` (no crops, no epochs),
it only ranks recipes; the shipped numbers come from ``train_dino.py``. Prints one JSON line
and appends it to ``--log``. Results: ``benchmarks/results/training.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_dino as td

from captum_ext.data import ShapesDataset, shapes


@torch.no_grad()
def class_tokens(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Final class-token (pre-logit) features ``(N, D)`` of ``images``, 256 at a time."""
    model.eval()
    return torch.cat(
        [
            model.forward_head(model.forward_features(images[i : i + 256]), pre_logits=True)
            for i in range(0, len(images), 256)
        ]
    )


def features(model: torch.nn.Module, seed: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Class-token features ``(n, D)`` and labels ``(n, 4)`` of ``n`` fine images of ``seed``."""
    batch = shapes(n, seed, **td.FINE)
    return class_tokens(model, batch.images), batch.labels


def probe(model: torch.nn.Module, n_train: int = 4096, n_test: int = 1024) -> dict[str, float]:
    """Exact-set and per-label accuracy of a logistic regression on the class-token features."""
    xtr, ytr = features(model, td.PROBE_SEED, n_train)
    xte, yte = features(model, 424242, n_test)
    mu, sd = xtr.mean(0), xtr.std(0) + 1e-6
    xtr, xte = (xtr - mu) / sd, (xte - mu) / sd
    w = torch.zeros(xtr.shape[1], ytr.shape[1], requires_grad=True)
    b = torch.zeros(ytr.shape[1], requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=300)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(xtr @ w + b, ytr) + 1e-4 * (w**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        hit_tr = ((xtr @ w + b) > 0).float() == ytr
        hit_te = ((xte @ w + b) > 0).float() == yte
    return {
        "probe_train": hit_tr.all(1).float().mean().item(),
        "probe_test": hit_te.all(1).float().mean().item(),
        "label_test": hit_te.float().mean().item(),
        "feature_std": (xtr * sd + mu).std(0).mean().item(),
    }


def decodability(model: torch.nn.Module, n: int = 2048, seed: int = td.PROBE_SEED) -> dict:
    """Held-out R^2 (last quarter of ``n`` images) of least squares from the standardised
    class-token features to the multi-hot labels and to the 12 background corner colours."""
    batch = shapes(n, seed, **td.FINE)
    x = class_tokens(model, batch.images)
    fit = n - n // 4
    x = (x - x[:fit].mean(0)) / (x[:fit].std(0) + 1e-6)
    x = torch.cat([x, torch.ones(n, 1)], dim=1)
    background = torch.tensor([sum(p.background, ()) for p in batch.params], dtype=x.dtype)

    def r2(y: torch.Tensor) -> float:
        w = torch.linalg.lstsq(x[:fit], y[:fit]).solution
        res = ((y[fit:] - x[fit:] @ w) ** 2).sum(0)
        return (1 - res / ((y[fit:] - y[fit:].mean(0)) ** 2).sum(0)).mean().item()

    return {"label_r2": r2(batch.labels), "background_r2": r2(background)}


def main(argv: list[str] | None = None) -> dict[str, object]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=250)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tag", default="")
    p.add_argument("--log", type=Path, default=None, help="append the JSON line here")
    p.add_argument("--probe-n", type=int, nargs=2, default=(4096, 1024), metavar=("TRAIN", "TEST"))
    p.add_argument("--backbone", type=Path, default=None, help="probe this trained backbone")
    p.add_argument("--decode-n", type=int, default=2048, help="images for the R^2 columns")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="DINOConfig fields")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        over = td.config_overrides(args.overrides)
    except ValueError as err:
        p.error(str(err))
    cfg = replace(td.DINOConfig(), **over)
    torch.manual_seed(0)
    model = td.new_model()
    t0 = time.perf_counter()
    losses: list[float] = []
    if args.backbone is not None:
        from safetensors.torch import load_file

        model.load_state_dict(load_file(args.backbone))
    elif args.steps:
        data = ShapesDataset(td.TRAIN_N, td.TRAIN_SEED, **td.FINE)
        losses = td.train_dino(model, data, cfg, torch.Generator().manual_seed(0), steps=args.steps)
    seconds = time.perf_counter() - t0
    result: dict[str, object] = {
        "tag": args.tag,
        "steps": 0 if args.backbone is not None else args.steps,
        "backbone": None if args.backbone is None else str(args.backbone),
        "overrides": over,
        "final_loss": sum(losses[-20:]) / max(1, len(losses[-20:])) if losses else None,
        "dino_s": round(seconds, 1),
        **probe(model, *args.probe_n),
        **decodability(model, args.decode_n),
    }
    line = json.dumps(result)
    print(line, flush=True)
    if args.log is not None:
        with args.log.open("a") as f:
            f.write(line + "\n")
    return result


if __name__ == "__main__":
    main()
