"""Quick start: every method on a trained ViT, for each class of two-object images.

Loads the shipped ``shapes-vit`` (a timm ViT trained on the procedural shapes benchmark),
takes held-out images with two objects, explains both present classes with every method of
the registry, and writes a figure (rows: image x class, with the class's sigmoid score;
columns: input, that class's ground-truth mask, each method over the image, upsampled from
the patch grid bilinearly as pytorch-grad-cam draws it). Colours as every captum_ext figure
(``captum_ext.viz``): green = evidence for the class, red = against, white = 0. Offline,
CPU, a few seconds:

    python tutorials/quickstart.py [--model shapes-vit] [--n 3] [--out quickstart.png]

What to look at: a class-discriminative method (CDAM, TAM, relevance) moves with the row's
class; the attention map and rollout do not (they ignore the target).
"""

from __future__ import annotations

import argparse

import torch

from captum_ext import zoo
from captum_ext.data import SHAPE_CLASSES, shapes
from captum_ext.registry import METHODS, make_method
from captum_ext.viz import figure_grid


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="shapes-vit", help="zoo image model")
    parser.add_argument("--n", type=int, default=3, help="two-object images to explain")
    parser.add_argument("--out", default="quickstart.png")
    args = parser.parse_args(argv)

    model = zoo.load(args.model)
    data = shapes(args.n, seed=2026, min_objects=2, **zoo.data_kwargs(args.model))
    pairs = data.labels.nonzero()  # (image, class) of every present class
    images, classes = data.images[pairs[:, 0]], pairs[:, 1]

    maps = {}  # patch-grid maps (R, 1, h, w); figure_grid upsamples them to the image
    for name, spec in METHODS.items():
        explainer = make_method(name, model)
        maps[spec.label] = explainer.attribute(images, target=classes, output="grid")

    with torch.no_grad():
        probs = torch.sigmoid(model(images)).gather(1, classes[:, None])[:, 0]
    fig = figure_grid(
        images,
        maps,
        row_labels=[
            f"{SHAPE_CLASSES[c]} (sigmoid {p:.2f})" for c, p in zip(classes.tolist(), probs)
        ],
        masks=data.masks[pairs[:, 0], pairs[:, 1]],
        signed={spec.label: spec.signed for spec in METHODS.values()},
        class_agnostic=[spec.label for spec in METHODS.values() if spec.class_agnostic],
        units={spec.label: spec.unit for spec in METHODS.values()},  # colour-bar labels
        overlay=True,
        interpolation="bilinear",
    )
    fig.savefig(args.out, dpi=80)
    print(f"{len(pairs)} rows ({args.n} images x 2 classes), {len(maps)} methods -> {args.out}")


if __name__ == "__main__":
    main()
