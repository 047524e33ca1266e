"""The fitting-budget benchmark (``benchmarks/fit_budget.py``): its map statistics against
literal float64 loops, its part A and part B on tiny budgets, and ``--quick`` writing the
report, figure and JSON (slow)."""

from __future__ import annotations

import importlib
import json
import math
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def fb():
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    return importlib.import_module("fit_budget")


def _normalised(values: list[float]) -> list[float]:
    lo, hi = min(values), max(values)
    return [0.0 if hi == lo else (v - lo) / (hi - lo) for v in values]


def _entropy_reference(values: list[float]) -> float:
    if len(values) == 1 or max(values) == min(values):
        return 1.0
    m = _normalised(values)
    total = math.fsum(m)
    return -math.fsum((v / total) * math.log(v / total) for v in m if v > 0) / math.log(len(m))


def _pearson_reference(a: list[float], b: list[float]) -> float:
    ma, mb = math.fsum(a) / len(a), math.fsum(b) / len(b)
    num = math.fsum((x - ma) * (y - mb) for x, y in zip(a, b, strict=True))
    den = math.sqrt(math.fsum((x - ma) ** 2 for x in a) * math.fsum((y - mb) ** 2 for y in b))
    return num / den


def test_map_statistics_match_literal_float64_loops(fb):
    g = torch.Generator().manual_seed(3)
    maps = torch.rand(5, 1, 6, 7, generator=g, dtype=torch.float64) * 4 - 1
    maps[1] = 2.5  # constant map
    maps[2] = 0.0
    maps[2, 0, 3, 4] = 1.0  # one hot pixel
    maps[3] = maps[3] ** 6  # peaked
    masks = torch.rand(5, 6, 7, generator=g) > 0.7
    masks[0, 0, 0] = True
    other = torch.rand(5, 1, 6, 7, generator=g, dtype=torch.float64)
    u, a, om = fb.uniformity(maps), fb.area(maps), fb.object_mass(maps, masks)
    r = fb.pearson(maps, other)
    for i in range(5):
        v = maps[i].flatten().tolist()
        assert u[i].item() == pytest.approx(_entropy_reference(v), abs=1e-12)
        n = _normalised(v)
        flat = max(v) == min(v)
        assert a[i].item() == pytest.approx(1.0 if flat else math.fsum(n) / len(n), abs=1e-12)
        n = [1.0] * len(v) if flat else n
        k = masks[i].flatten().tolist()
        want = math.fsum(x for x, on in zip(n, k, strict=True) if on) / math.fsum(n)
        assert om[i].item() == pytest.approx(want, abs=1e-12)
        if flat:
            assert math.isnan(r[i].item())
        else:
            want = _pearson_reference(v, other[i].flatten().tolist())
            assert r[i].item() == pytest.approx(want, abs=1e-12)
    assert u[1].item() == 1.0 and u[2].item() == pytest.approx(0.0, abs=1e-12)
    assert a[1].item() == 1.0 and om[1].item() == pytest.approx(masks[1].double().mean().item())


def test_budget_epochs_covers_every_image_and_refuses_too_few_steps(fb):
    assert fb.budget_epochs(16, 4, 64) == (4, 4)  # one step per epoch
    assert fb.budget_epochs(1024, 64, 64) == (4, 64)
    assert fb.budget_epochs(100, 10, 64) == (5, 10)  # 2 steps per epoch
    assert fb.budget_epochs(4096, 16, 64) is None  # one epoch already takes 64 steps


def _check_score(row: dict) -> None:
    pg, (lo, hi) = row["pointing_game"], row["ci"]
    assert 0.0 <= pg <= 1.0
    assert math.isnan(lo) or lo - 1e-9 <= pg <= hi + 1e-9
    for key in ("uniformity", "area", "object_mass"):
        assert 0.0 <= row[key] <= 1.0, (key, row)


def test_part_a_on_a_tiny_budget(fb):
    torch.set_num_threads(1)
    out = fb.part_a([16], [1], batch=64, n_eval=6, n_boot=50, models=["shapes-vit"],
                    methods=["ttame", "mhex"], references=True, progress=False)  # fmt: skip
    assert [(f["method"], f["steps"], f["epochs"], f["n_images"]) for f in out["fits"]] == [
        ("ttame", 1, 1, 16),
        ("mhex", 1, 1, 16),
    ]
    n_maps = out["eval"]["maps"]["shapes-vit"]
    assert n_maps == 12  # two objects per image, every present class
    for row in out["fits"] + out["references"]:
        assert row["n_maps"] == n_maps
        _check_score(row)
    kinds = [(r["method"], r["kind"]) for r in out["references"]]
    assert kinds == [("TAM", "no training"), ("ttame", "zoo (full recipe)"),
                     ("mhex", "zoo (full recipe)"), ("constant map", "chance")]  # fmt: skip
    chance = out["references"][-1]
    assert chance["uniformity"] == 1.0 and chance["area"] == 1.0
    # the constant map's pointing game is the share of the image the dilated masks cover
    assert 0.0 < chance["pointing_game"] < 0.5
    md = fb.render_markdown({"meta": {"command": "x", "date": "d", "commit": "c", "machine": "m",
                                      "torch": "t", "threads": 1}, "part_a": out})  # fmt: skip
    assert "T-TAME on shapes-vit" in md and "MHEX on shapes-vit" in md


def test_part_b_on_a_tiny_random_cnn(fb):
    torch.set_num_threads(1)
    out = fb.part_b([(8, 1), (8, 2)], arch="resnet18", num_classes=10, size=32, batch=8,
                    n_heldout=4, threads=(1,), progress=False)  # fmt: skip
    rows = out["rows"]
    assert [(r["method"], r["epochs"], r["steps"]) for r in rows] == [
        ("ttame", 1, 1), ("ttame", 2, 2), ("mhex", 1, 1), ("mhex", 2, 2)
    ]  # fmt: skip
    assert out["largest_budget"] == {"n_images": 8, "epochs": 2}
    for r in rows:
        assert r["s_per_step"] > 0 and r["peak_rss_mb"] > 0
        assert 0.0 <= r["uniformity"] <= 1.0
        assert -1.0 - 1e-9 <= r["pearson_to_init"] <= 1.0 + 1e-9
        if r["epochs"] == 2:
            assert r["pearson_to_largest"] == pytest.approx(1.0)
        if r["method"] == "mhex":
            assert r["agreement_fitted"] * 8 == pytest.approx(round(r["agreement_fitted"] * 8))
            assert 0.0 <= r["agreement_heldout"] <= 1.0
    assert 1 <= out["plain_top1"]["distinct_classes"] <= 10


@pytest.mark.slow
def test_quick_writes_the_report_json_and_figure(fb, tmp_path):
    stem = tmp_path / "fb"
    assert fb.main(["--quick", "--no-progress", "--out", str(stem)]) == 0
    data = json.loads(stem.with_suffix(".json").read_text())
    assert len(data["part_a"]["fits"]) == 16 and data["part_b"]["rows"]
    md = stem.with_suffix(".md").read_text()
    assert "## A." in md and "## B." in md and "random init" in md
    assert stem.with_suffix(".png").stat().st_size > 10_000
    again = tmp_path / "again"
    assert fb.main(["--from-json", str(stem.with_suffix(".json")), "--out", str(again)]) == 0
    assert again.with_suffix(".md").read_text() == md
