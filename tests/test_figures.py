"""Figures say what their numbers are and when the model, not the plot, looks beside an object.

- every colour bar of an overlay (``captum-ext explain``) and of the demo's grids is labelled
  with the method's unit (``MethodSpec.unit``, the table "What the numbers mean" of
  ``docs/methods.md``), not "map value";
- the demo's grid flags a row whose model relies on a cell outside the object, with the
  logit drops of removing that cell and the object's own, computed here independently by
  forward passes of the timm ViT with one token left out.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from captum_ext import viz, zoo
from captum_ext.registry import METHODS, REFERENCES, TRAINED

ROOT = Path(__file__).resolve().parents[1]
ALL_SPECS = {**METHODS, **TRAINED, **REFERENCES}

needs_zoo = pytest.mark.skipif(
    "shapes-vit" not in zoo.available(), reason="zoo weights are not installed"
)


def _colour_bar_labels(fig) -> list[str]:
    """The labels of a figure's horizontal colour bars (their x-axis labels), in drawing order
    (insets, as under a grid's columns, included)."""
    found = []
    for ax in fig.axes:
        for a in [ax, *ax.child_axes]:
            if getattr(a, "_colorbar", None) is not None:
                found.append(a.get_xlabel())
    return found


def test_every_method_states_a_unit_and_the_docs_table_names_it():
    text = (ROOT / "docs" / "methods.md").read_text()
    section = text.split("## What the numbers mean", 1)[1].split("\n## ", 1)[0]
    bars = dict(re.findall(r"^\| ([^|]+?) \| `([^`]+)` \|", section, flags=re.M))
    for name, spec in ALL_SPECS.items():
        assert spec.unit and spec.unit != "map value", f"{name} has no unit"
        assert spec.unit in bars.values(), f"docs/methods.md's table lacks {spec.unit!r}"
    assert bars, "the table has a colour-bar column"


@pytest.mark.parametrize("name", sorted(ALL_SPECS))
def test_overlay_colour_bar_is_labelled_with_the_method_unit(name, tmp_path):
    spec = ALL_SPECS[name]
    attr = torch.linspace(-1, 2, 16).reshape(1, 4, 4)
    image = torch.rand(3, 16, 16)
    fig = viz.save_overlay(tmp_path / "o.png", attr, image, spec.signed, spec.label, unit=spec.unit)
    assert _colour_bar_labels(fig) == [spec.unit]
    assert (tmp_path / "o.png").is_file()


@needs_zoo
def test_explain_overlays_are_labelled_with_each_methods_unit(tmp_path, monkeypatch):
    """``captum-ext explain --method all``: every overlay's colour bar names its unit."""
    from captum_ext.cli import main
    from captum_ext.data import shapes

    drawn = []
    original = viz.overlay_figure

    def recording(*args, **kwargs):
        fig = original(*args, **kwargs)
        drawn.append(fig)
        return fig

    monkeypatch.setattr(viz, "overlay_figure", recording)
    batch = shapes(1, 11, min_objects=2)
    path = tmp_path / "shapes.png"
    pixels = (batch.images[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    Image.fromarray(pixels).save(path)
    args = ["--model", "zoo:shapes-vit", "--image", str(path), "--method", "all"]
    assert main(["explain", *args, "--target", "0", "--out", str(tmp_path / "x")]) == 0
    by_label = {}
    for fig in drawn:
        title = fig.axes[0].get_title()
        (spec,) = [s for s in ALL_SPECS.values() if title.split(":")[0].split(" (")[0] == s.label]
        by_label[spec.name] = _colour_bar_labels(fig)
    assert set(by_label) == set(METHODS) | set(TRAINED)  # the zoo ships both fitted to it
    for name, labels in by_label.items():
        assert labels == [ALL_SPECS[name].unit], name


def _logit_without_token(model, x: torch.Tensor, target: int, cell: int) -> float:
    """The target logit of a timm ViT with patch token ``cell`` left out of the sequence."""
    with torch.no_grad():
        t = model.patch_drop(model._pos_embed(model.patch_embed(x)))
        t = model.norm_pre(t)
        if cell >= 0:
            keep = [j for j in range(t.shape[1]) if j != model.num_prefix_tokens + cell]
            t = t[:, keep]
        t = model.norm(model.blocks(t))
        return float(model.forward_head(t)[0, target])


@needs_zoo
def test_demo_grid_says_when_the_model_relies_on_a_cell_beside_the_object():
    """shapes-vit, held-out image #0 (a square): its logit rests on the cell next to it."""
    from captum_ext.cli.demo import DEMO_SEED, image_grid
    from captum_ext.data import SHAPE_CLASSES, shapes

    fig, summary = image_grid("shapes-vit", 4)
    flagged = [row for row in summary["rows"] if "relies_on" in row]
    assert [(r["image"], r["class"]) for r in flagged] == [(0, "square")]

    # the drops, computed here without TokenAblation
    model = zoo.load("shapes-vit")
    data = shapes(1, DEMO_SEED, **zoo.data_kwargs("shapes-vit"))
    x, k = data.images[:1], SHAPE_CLASSES.index("square")
    full = _logit_without_token(model, x, k, -1)
    drops = torch.tensor([full - _logit_without_token(model, x, k, c) for c in range(16)])
    drops = drops.view(4, 4)
    on_square = data.masks[0, k].view(4, 8, 4, 8).any(3).any(1)
    peak = divmod(int(drops.argmax()), 4)
    own = divmod(int(drops.masked_fill(~on_square, -1e9).argmax()), 4)
    assert not on_square[peak] and max(abs(peak[0] - own[0]), abs(peak[1] - own[1])) == 1

    note = flagged[0]["relies_on"]
    assert note["cell"] == list(peak) and note["object_cell"] == list(own)
    assert note["drop"] == pytest.approx(float(drops[peak]), abs=1e-3)
    assert note["object_drop"] == pytest.approx(float(drops[own]), abs=1e-3)
    expected = (
        f"#0 square: the model relies on the neighbouring cell (row {peak[0] + 1}, column "
        f"{peak[1] + 1}), not the square's own: removing it drops the logit by "
        f"{float(drops[peak]):.2f}, removing the square's cell by {float(drops[own]):.2f}"
    )
    texts = [t.get_text() for t in fig.texts]
    assert any(expected in t for t in texts), texts
    labels = [ax.get_ylabel() for ax in fig.axes if ax.get_ylabel()]
    assert sum("outside the object" in label for label in labels) == 1
    assert "outside the object" in labels[0]

    # colour bars under the method columns name each method's unit
    units = {spec.label: spec.unit for spec in ALL_SPECS.values()}
    bars = _colour_bar_labels(fig)
    assert bars == [units[m] for m in summary["methods"]]


def test_figure_grid_caption_lines_and_units():
    images = torch.rand(2, 3, 8, 8)
    maps = {"A": torch.randn(2, 1, 2, 2), "B": torch.rand(2, 1, 2, 2)}
    fig = viz.figure_grid(
        images,
        maps,
        signed={"A": True, "B": False},
        note="first\nsecond line",
        units={"A": "logit drop"},
    )
    assert _colour_bar_labels(fig) == ["logit drop", ""]
    caption = fig.texts[-1].get_text().split("\n")
    assert caption[0].endswith("; first") and caption[1] == "second line"


@pytest.mark.parametrize(
    ("argv", "n"),
    [([], 8), (["--full"], 32), (["--eval-n", "5"], 5), (["--full", "--eval-n", "3"], 3)],
)
def test_demo_metrics_are_on_a_few_examples_unless_full(argv, n):
    from captum_ext.cli import build_parser
    from captum_ext.cli.demo import EVAL_N, FULL_EVAL_N, eval_examples

    assert (EVAL_N, FULL_EVAL_N) == (8, 32)
    assert eval_examples(build_parser().parse_args(["demo", *argv])) == n
