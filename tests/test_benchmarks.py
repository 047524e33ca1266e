"""The performance suite (``benchmarks/suite.py --quick``) writes every cell, table and plot.

No timed assertions: the checks are that every (model, method) cell of the main table is there
(measured, or skipped with a reason), that the ratios are the seconds divided by the same
cell's forward and forward+backward, that the markdown lists every DESIGN.md §8 target, and
that ``--tam-sizing`` measures every pass sizing in a cell of its own.
"""

from __future__ import annotations

import importlib
import json
import math
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
TARGET_LINES = (
    "CDAM ≤ 0.45× forward+backward",
    "RP ≤ 1.2× forward+backward",
    "rollout ≤ 1.15× forward",
    "attention map ≤ 1.15× forward",
    "TAM never slower than the exact loop",
    "T-TAME ≤ 1.15× forward",
    "MHEX ≤ 1.15× forward",
    "T-TAME ≥ 100× faster than patch Occlusion",
    "≥ 10× faster than IG-50",
)


def _import(name: str):
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    return importlib.import_module(name)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """One ``--quick`` run (zoo models, batch 2, one timed call) into a temporary folder."""
    out = tmp_path_factory.mktemp("suite")
    payload = _import("suite").run(["--quick", "--threads", "1", "--out", str(out)])
    return out, payload


def test_quick_run_writes_json_markdown_and_plots(quick):
    out, payload = quick
    on_disk = json.loads((out / "suite_quick.json").read_text())
    assert on_disk["quick"] is True
    assert len(on_disk["cells"]) == len(payload["cells"])
    for key in (
        "cpu",
        "cores",
        "threads",
        "torch",
        "captum",
        "timm",
        "device",
        "date_utc",
        "git_commit",
        "wall_seconds",
    ):
        assert on_disk["machine"].get(key) not in (None, ""), key
    for name in ("suite_quick_batch.png", "suite_quick_tokens.png", "suite_quick_targets.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n", name
    md = (out / "suite_quick.md").read_text()
    assert "## Targets" in md and "## Main table" in md
    for line in TARGET_LINES:
        assert line in md, line
    assert all(name in md for name in on_disk["plots"])


def test_every_model_method_cell_is_measured_or_skipped_with_a_reason(quick):
    _, payload = quick
    cases = _import("_suite_cases")
    rows = _import("_suite_report").main_rows(payload)
    assert not [c for c in payload["cells"] if "cell_error" in c]
    assert set(rows) == set(cases.ZOO)
    measured = 0
    for model in cases.ZOO:
        family = cases.model_family(model)
        for method, info in cases.METHODS.items():
            row = rows[model][method]
            if "skipped" in row:
                assert row["skipped"].strip(), (model, method)
                assert family not in info.families or method in ("mhex", "ttame", "gradcam")
                continue
            assert "error" not in row, (model, method, row.get("error"))
            assert row["seconds"] > 0 and row["forward_s"] > 0 and row["forward_backward_s"] > 0
            assert math.isclose(row["x_forward"], row["seconds"] / row["forward_s"])
            assert math.isclose(
                row["x_forward_backward"], row["seconds"] / row["forward_backward_s"]
            )
            assert math.isclose(row["seconds_per_example"] * row["batch"], row["seconds"])
            assert row["batch"] == 2 and row["peak_mib"] >= 0
            measured += 1
    # every method of this package ran where it applies, and every Captum peer on every model
    for model, method in [
        ("shapes-vit", "cdam"),
        ("shapes-vit", "tam"),
        ("shapes-vit", "relevance"),
        ("shapes-vit", "rollout"),
        ("shapes-vit", "attention_map"),
        ("shapes-vit", "ttame"),
        ("shapes-vit", "mhex"),
        ("shapes-vit", "tam_loop"),
        ("shapes-cnn", "ttame"),
        ("shapes-cnn", "mhex"),
        ("text-bert", "cdam"),
        ("text-bert", "tam"),
        ("shapes-vit", "relevance_naive"),
        ("text-bert", "relevance_naive"),
        ("shapes-vit", "layer_gxa"),
    ] + [(m, p) for m in cases.ZOO for p in ("ig", "occlusion", "feature_ablation")]:
        assert "seconds" in rows[model][method], (model, method)
    assert measured >= 30


def test_scaling_series_cover_batch_tokens_and_targets(quick):
    _, payload = quick
    by = {}
    for c in payload["cells"]:
        by.setdefault(c["series"], []).append(c)
    assert sorted(c["batch"] for c in by["batch"]) == [1, 2, 4]
    assert len({c["tokens"] for c in by["tokens"]}) == 3
    ks = {m for c in by["targets"] for m in c["methods"]}
    assert {"cdam_targets@1", "cdam_targets@4", "tam_targets@2", "mhex_targets@4"} <= ks
    for c in by["targets"]:
        for r in c["methods"].values():
            assert r["seconds"] > 0
            assert math.isclose(r["x_forward"], r["seconds"] / c["forward_s"])


def test_targets_are_met_or_missed_by_their_bound():
    report = _import("_suite_report")

    def cell(model, method, seconds, fwd, fb, batch=4):
        res = {
            "seconds": seconds,
            "seconds_per_example": seconds / batch,
            "x_forward": seconds / fwd,
            "x_forward_backward": seconds / fb,
        }
        return {
            "model": model,
            "series": "main",
            "batch": batch,
            "forward_s": fwd,
            "forward_backward_s": fb,
            "tokens": 17,
            "methods": {method: res},
        }

    payload = {
        "cells": [
            cell("a", "cdam", 0.3, 1.0, 1.0),
            cell("b", "cdam", 0.6, 1.0, 1.0),
            cell("a", "rollout", 1.2, 1.0, 3.0),
            cell("a", "ig", 12.0, 1.0, 3.0),
            cell("a", "tam", 2.0, 1.0, 3.0),
            cell("a", "tam_loop", 1.0, 1.0, 3.0),
        ]
    }
    got = {(t["target"], t["model"]): t for t in report.targets(payload)}
    assert got[("CDAM ≤ 0.45× forward+backward", "a")]["met"] is True
    assert got[("CDAM ≤ 0.45× forward+backward", "b")]["met"] is False
    assert got[("rollout ≤ 1.15× forward", "a")]["met"] is False
    assert got[("CDAM ≥ 10× faster than IG-50", "a")]["measured"] == pytest.approx(40.0)
    assert got[("TAM ≥ 10× faster than IG-50", "a")]["met"] is False
    loop = got[("TAM never slower than the exact loop (one token per forward)", "a")]
    assert loop["measured"] == pytest.approx(0.5) and loop["met"] is False


def test_tam_sizing_sweep_measures_each_sizing_in_its_own_cell(tmp_path):
    argv = ["--quick", "--no-main", "--no-scaling", "--tam-sizing", "--threads", "1"]
    payload = _import("suite").run([*argv, "--out", str(tmp_path)])
    cases = _import("_suite_cases")
    cells = payload["cells"]
    assert {c["series"] for c in cells} == {"sizing"} and not [
        c for c in cells if "cell_error" in c
    ]
    assert sorted(m for c in cells for m in c["methods"]) == sorted(
        f"tam_sizing@{v}" for v in cases.SIZING
    )
    passes = {}
    for c in cells:
        ((method, r),) = c["methods"].items()  # one sizing per cell: its own process
        assert "error" not in r and r["seconds"] > 0 and r["first_call_s"] > 0
        assert r["peak_mib"] >= 0
        assert math.isclose(r["x_forward"], r["seconds"] / c["forward_s"])
        passes[method.partition("@")[2]] = r["passes"]
    b, n = cells[0]["batch"], cells[0]["tokens"] - 1  # patch tokens (shapes-vit: one CLS)
    assert passes["loop"] == {"ablated_passes": n, "rows_per_pass": [b]}
    assert passes["stacked"] == {"ablated_passes": 1, "rows_per_pass": [b * n]}
    md = (tmp_path / "suite_quick.md").read_text()
    assert "## TAM pass sizing" in md and "default ÷ best of loop and stacked" in md
