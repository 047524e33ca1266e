"""The report excerpt in docs/benchmark.md states the committed report (benchmarks/results)."""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Row labels of the excerpt that name a report label differently.
_LABELS = {"T-TAME (trained, zoo)": "T-TAME", "MHEX (trained, zoo)": "MHEX"}
_METRICS = ("pointing_game", "pointing_game_grid", "discrimination_score")


def test_benchmark_doc_report_excerpt_states_the_committed_report():
    rows = json.loads((ROOT / "benchmarks" / "results" / "report.json").read_text())["rows"]
    means = {(r["model"], r["label"], r["metric"]): r["mean"] for r in rows}
    text = (ROOT / "docs" / "benchmark.md").read_text()
    start = text.index("| method | `shapes-vit` |")
    lines = text[start:].split("\n\n")[0].splitlines()
    models = [c.strip().strip("`") for c in lines[0].strip().strip("|").split("|")][1:]
    checked = 0
    for line in lines[2:]:
        label, *cells = (c.strip() for c in line.strip().strip("|").split(" | "))
        label = _LABELS.get(label, label)
        for model, cell in zip(models, cells, strict=True):
            if cell == "—":
                assert (model, label, "pointing_game") not in means, (model, label)
                continue
            for stated, metric in zip(cell.split(" / "), _METRICS, strict=True):
                mean = means[(model, label, metric)]
                assert abs(float(stated) - mean) <= 0.005 + 1e-9, (model, label, metric, stated)
                checked += 1
    assert checked >= 60
