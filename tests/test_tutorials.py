"""The tutorials run (small settings) and write what they promise."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from captum_ext import zoo

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(
    "shapes-vit" not in zoo.available(), reason="zoo weights are not installed"
)


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tutorials" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quickstart_writes_a_figure_whose_rows_differ_by_class(tmp_path, capsys):
    out = tmp_path / "qs.png"
    _load("quickstart").main(["--n", "1", "--out", str(out)])
    assert "2 rows" in capsys.readouterr().out
    img = np.asarray(Image.open(out).convert("RGB"), dtype=float)
    assert img.shape[0] > 100 and img.shape[1] > 400
    top, bottom = img[: img.shape[0] // 2], img[img.shape[0] // 2 :]
    assert np.abs(top - bottom).mean() > 1.0  # the two classes' rows are not the same picture


def test_benchmark_your_method_scores_the_custom_map(tmp_path, capsys):
    out = tmp_path / "bym"
    _load("benchmark_your_method").main(["--n", "8", "--bootstrap", "20", "--out", str(out)])
    table = (out / "table.md").read_text()
    assert "InputXGradient" in table and "CDAM" in table and "random" in table
    with Image.open(out / "mass_accuracy.png") as img:
        assert img.size[0] > 300
