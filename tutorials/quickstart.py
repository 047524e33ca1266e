"""Quick start: explain a tiny vision transformer with CDAM and the attention map.

Runs offline on CPU in seconds and writes ``quickstart.png``. It trains a small
timm ViT for a few hundred steps on a toy task — the class is whether a bright
square is red or green — so that the maps have something to
show, then explains both classes of one image.

    python tutorials/quickstart.py [--out quickstart.png]
"""

from __future__ import annotations

import argparse

import timm
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from captum_ext import CDAM, AttentionMap
from captum_ext.viz import figure_grid


def toy_batch(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (n, 3, 32, 32): noise plus one 8x8 square, red (label 0) or green (label 1)."""
    x = torch.rand(n, 3, 32, 32, generator=gen) * 0.3
    y = torch.randint(0, 2, (n,), generator=gen)
    row = torch.randint(0, 4, (n,), generator=gen) * 8
    col = torch.randint(0, 4, (n,), generator=gen) * 8
    for i in range(n):
        x[i, :, row[i] : row[i] + 8, col[i] : col[i] + 8] = 0.1
        x[i, int(y[i]), row[i] : row[i] + 8, col[i] : col[i] + 8] = 1.0
    return x, y


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="quickstart.png")
    parser.add_argument("--steps", type=int, default=150)
    args = parser.parse_args()

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224",
        img_size=32,
        patch_size=8,
        embed_dim=64,
        depth=2,
        num_heads=2,
        num_classes=2,
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in tqdm(range(args.steps), desc="training a tiny ViT"):
        x, y = toy_batch(64, gen)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()

    x, y = toy_batch(4, gen)
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item()
    cdam = CDAM(model)
    maps = cdam.attribute_targets(x, [0, 1])  # (2 targets, B, 1, 32, 32), one forward pass
    am = AttentionMap(model).attribute(x)
    rows = torch.cat([x, x])
    fig = figure_grid(
        rows,
        {"CDAM": maps.flatten(0, 1), "attention map": torch.cat([am, am])},
        row_labels=[f"target {t}" for t in (0, 1) for _ in range(len(x))],
        signed={"CDAM": True, "attention map": False},
    )
    fig.savefig(args.out, dpi=100)
    print(f"accuracy on 4 fresh images: {acc:.2f}; CDAM and attention maps written to {args.out}")


if __name__ == "__main__":
    main()
