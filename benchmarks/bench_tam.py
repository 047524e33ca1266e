"""Cost of TAM (batched token ablation) against the one-token-per-forward loop and Captum.

In one run on the same model and batch:
- TAM (``TokenAblation``, ``perturbations_per_eval`` removals per forward);
- the authors' way: one forward per removed token at batch size 1, written
  here as a literal loop that physically deletes the token (timm ViT);
- Captum ``FeatureAblation`` with a patch ``feature_mask`` (pixel occlusion
  to zero at patch granularity: same number of evaluations, different
  perturbation), with the same ``perturbations_per_eval``.

Target (DESIGN.md §8): TAM ≥ 10× faster than the loop.

    python benchmarks/bench_tam.py [--model shapes-vit] [--batch 16] [--ppe 16]

Measured 2026-11-30 on the development machine (CPU, 2 threads shared with other work;
zoo shapes-vit, batch 16, 16 patch tokens): TAM 0.028 s = 10.0× one forward (it runs the
B·N = 256 shortened rows in one pass); the loop 0.21–0.24 s, i.e. TAM 7.0–8.4× faster (4.9× with
one thread); FeatureAblation 1.6–1.9× TAM's time. Max |TAM − loop| = 2.9e-6 (float32). The
loop computes the pixel embedding once per image, as TAM does since it replays the clean
embedding for every shortened copy (before that, TAM recomputed the conv stem for each copy
and was only 3.7× faster). TAM's time equals one forward of the 256 rows, so what remains is
batching efficiency: on 2 CPU threads a width-64 model gains less from batching than on a GPU.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _models import shapes_vit
from _timing import median_time, table

from captum_ext import TokenAblation


def loop_reference(model, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """TAM the slow way: batch 1, one forward per deleted token (timm ViT)."""
    p = model.num_prefix_tokens
    out = []
    with torch.no_grad():
        for b in range(x.shape[0]):
            xb = x[b : b + 1]
            tokens = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(xb))))
            full = model.forward_head(model.norm(model.blocks(tokens)))[0, target[b]]
            scores = []
            for i in range(p, tokens.shape[1]):
                kept = torch.cat([tokens[:, :i], tokens[:, i + 1 :]], dim=1)
                logit = model.forward_head(model.norm(model.blocks(kept)))[0, target[b]]
                scores.append(full - logit)
            out.append(torch.stack(scores))
    return torch.stack(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="shapes-vit")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--ppe", type=int, default=16, help="perturbations_per_eval")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    model, label = shapes_vit(args.model)
    size = model.patch_embed.img_size
    torch.manual_seed(0)
    x = torch.rand(args.batch, 3, *size)
    target = torch.arange(args.batch) % model.num_classes
    tam = TokenAblation(model)

    got = tam.attribute(x, target=target, output="tokens", perturbations_per_eval=args.ppe)
    ref = loop_reference(model, x, target)
    max_err = (got - ref).abs().max().item()

    from captum.attr import FeatureAblation

    h, w = model.patch_embed.grid_size
    ph, pw = model.patch_embed.patch_size
    cells = torch.arange(h * w).reshape(1, 1, h, w)
    fmask = cells.repeat_interleave(ph, 2).repeat_interleave(pw, 3).expand(1, 3, -1, -1)
    fa = FeatureAblation(model)

    def forward():
        with torch.no_grad():
            model(x)

    rows = [
        ("forward (no grad)", median_time(forward, args.repeats)),
        (
            f"TAM (perturbations_per_eval={args.ppe})",
            median_time(
                lambda: tam.attribute(x, target=target, perturbations_per_eval=args.ppe),
                args.repeats,
            ),
        ),
        (
            "loop: batch 1, one token per forward",
            median_time(lambda: loop_reference(model, x, target), args.repeats),
        ),
        (
            f"Captum FeatureAblation, patch mask (ppe={args.ppe})",
            median_time(
                lambda: fa.attribute(
                    x, target=target, feature_mask=fmask, perturbations_per_eval=args.ppe
                ),
                args.repeats,
            ),
        ),
    ]
    tam_t = rows[1][1]
    print(
        f"model {label}, batch {args.batch}, {h * w} patch tokens, torch {torch.__version__}, "
        f"threads {torch.get_num_threads()}; max |TAM - loop| = {max_err:.2e}"
    )
    print(table(rows, {"forward": rows[0][1], "TAM": tam_t}))
    print(f"\nTAM speed-up over the loop: {rows[2][1] / tam_t:.1f}x")


if __name__ == "__main__":
    main()
