"""Score your own attribution method against the ground truth, next to CDAM and TAM.

Any function ``fn(images, targets) -> maps`` (``(B, 1, H, W)`` or ``(B, H, W)``) can be
evaluated like the built-in methods with ``captum_ext.evaluation.evaluate(...,
extra_maps=...)``: every present class of every held-out image is explained and scored
against its exact mask (pointing game, relevance mass / rank accuracy, sparsity, class
discrimination D on two-object images, RISE deletion / insertion), with random and
centre-Gaussian baselines and bootstrap intervals. Here the "new method" is Captum's
``InputXGradient``; the script writes the markdown table and a bar chart:

    python tutorials/benchmark_your_method.py [--model shapes-vit-plain] [--n 64] [--out DIR]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from captum.attr import InputXGradient

from captum_ext import zoo
from captum_ext.evaluation import evaluate


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="shapes-vit-plain", help="zoo image model")
    parser.add_argument("--n", type=int, default=64, help="held-out images")
    parser.add_argument("--bootstrap", type=int, default=500)
    parser.add_argument("--out", type=Path, default=Path("benchmark-your-method"))
    args = parser.parse_args(argv)

    model = zoo.load(args.model)
    ixg = InputXGradient(model)

    def input_x_gradient(images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = images.detach().requires_grad_()
        return ixg.attribute(x, target=targets).sum(dim=1, keepdim=True).detach()

    result = evaluate(
        args.model,
        methods=["cdam", "tam", "attention_map"],
        n=args.n,
        bootstrap=args.bootstrap,
        extra_maps={"InputXGradient": input_x_gradient},
        show_progress=True,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "table.md").write_text(result.to_markdown())

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = "relevance_mass_accuracy"
    rows = [r for r in result.rows if r["metric"] == metric]
    fig, ax = plt.subplots(figsize=(6, 3))
    means = [r["mean"] for r in rows]
    errs = [[r["mean"] - r["lo"] for r in rows], [r["hi"] - r["mean"] for r in rows]]
    ax.barh([r["label"] for r in rows], means, xerr=errs, color="tab:blue")
    ax.set_xlabel(f"{metric} (mean, 95 % bootstrap interval)")
    ax.set_title(f"{args.model}: {args.n} held-out images")
    fig.tight_layout()
    fig.savefig(args.out / "mass_accuracy.png", dpi=100)
    print(result.to_markdown())
    print(f"wrote {args.out / 'table.md'} and {args.out / 'mass_accuracy.png'}")


if __name__ == "__main__":
    main()
