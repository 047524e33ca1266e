"""Cost of CDAM and the attention map against a plain forward / forward+backward and peers.

All timings in one run, on one model and one batch, as ratios (DESIGN.md §8):
CDAM target ≤ 0.45 × a forward+backward (the forward pass plus a backward
through the last block only); the attention map ≤ 1.15 × a forward.

    python benchmarks/bench_cdam.py [--model vit_small_patch16_224] [--batch 8] [--ig]

Peers on the same model: Captum ``LayerGradientXActivation`` on
``blocks[-1].norm1`` (the same quantity, computed by Captum's hooks),
pytorch-grad-cam ``GradCAM`` with a token ``reshape_transform``, and with
``--ig`` Captum ``IntegratedGradients`` (50 steps).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import timm
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _timing import median_time, table

from captum_ext import CDAM, AttentionMap


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vit_small_patch16_224")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--ig", action="store_true", help="also time IntegratedGradients (slow)")
    args = p.parse_args()

    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False).to(args.device).eval()
    cfg = model.pretrained_cfg
    x = torch.randn(args.batch, *cfg["input_size"], device=args.device)
    target = torch.arange(args.batch, device=args.device) % model.num_classes

    def forward():
        with torch.no_grad():
            model(x)

    def forward_backward():
        model.zero_grad(set_to_none=True)
        model(x).gather(1, target[:, None]).sum().backward()

    cdam = CDAM(model)
    am = AttentionMap(model)
    rows = [
        ("forward (no grad)", median_time(forward, args.repeats)),
        ("forward + backward", median_time(forward_backward, args.repeats)),
        ("CDAM", median_time(lambda: cdam.attribute(x, target=target), args.repeats)),
        (
            "CDAM, 4 targets (attribute_targets)",
            median_time(
                lambda: cdam.attribute_targets(x, [target, target + 1, target + 2, target + 3]),
                args.repeats,
            ),
        ),
        ("AttentionMap", median_time(lambda: am.attribute(x), args.repeats)),
    ]

    from captum.attr import IntegratedGradients, LayerGradientXActivation

    lgxa = LayerGradientXActivation(model, model.blocks[-1].norm1)
    rows.append(
        (
            "Captum LayerGradientXActivation",
            median_time(lambda: lgxa.attribute(x, target=target).sum(-1), args.repeats),
        )
    )
    try:
        from pytorch_grad_cam import GradCAM
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        h, w = model.patch_embed.grid_size
        p_ = model.num_prefix_tokens

        def reshape(t):
            return t[:, p_:].reshape(t.shape[0], h, w, -1).permute(0, 3, 1, 2)

        cam = GradCAM(model, [model.blocks[-1].norm1], reshape_transform=reshape)
        targets = [ClassifierOutputTarget(int(t)) for t in target]
        rows.append(
            (
                "pytorch-grad-cam GradCAM",
                median_time(lambda: cam(input_tensor=x, targets=targets), args.repeats),
            )
        )
    except ImportError:
        print("pytorch-grad-cam not installed: skipping GradCAM", file=sys.stderr)
    if args.ig:
        ig = IntegratedGradients(model)
        rows.append(
            (
                "Captum IntegratedGradients (50 steps)",
                median_time(
                    lambda: ig.attribute(x, target=target, n_steps=50, internal_batch_size=64),
                    1,
                    0,
                ),
            )
        )
    base = {"forward": rows[0][1], "forward+backward": rows[1][1]}
    print(
        f"model {args.model}, batch {args.batch}, input {tuple(x.shape[1:])}, "
        f"device {args.device}, torch {torch.__version__}, threads {torch.get_num_threads()}"
    )
    print(table(rows, base))


if __name__ == "__main__":
    main()
