"""The numbers the docs and README quote equal the committed results they quote.

docs/benchmark.md's report excerpt against benchmarks/results/report.json; docs/cdam_paper.md's
96-px tables and the README's method guide against benchmarks/results/paper_analysis.json.
"""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Row labels of the excerpt that name a report label differently.
_LABELS = {"T-TAME (trained, zoo)": "T-TAME", "MHEX (trained, zoo)": "MHEX"}
_METRICS = ("pointing_game", "pointing_game_grid", "discrimination_score")


def _states(stated: float, mean: float) -> bool:
    """Whether ``stated`` is ``mean`` rounded to two decimals (either way at a tie)."""
    return abs(stated - mean) <= 0.005 + 1e-9


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
                assert _states(float(stated), mean), (model, label, metric, stated)
                checked += 1
    assert checked >= 60


# The stated tables of docs/cdam_paper.md against the committed run they quote.
_DOC_ROWS = {
    "CDAM": "cdam",
    "smooth CDAM (32 samples)": "cdam_smooth",
    "integrated CDAM (32 steps)": "cdam_integrated",
    "concept CDAM (8 examples)": "cdam_concept",
    "TAM": "tam",
    "RP": "relevance",
    "AM": "attention_map",
}
_DOC_COLUMNS = (
    "pointing_game",
    "relevance_mass_accuracy",
    "discrimination_score",
    "deletion_auc",
    "insertion_auc",
)


def _committed_fine_run() -> dict:
    payload = json.loads((ROOT / "benchmarks" / "results" / "paper_analysis.json").read_text())
    return {m["model"]: m for m in payload["models"]}


def _doc_section() -> str:
    text = (ROOT / "docs" / "cdam_paper.md").read_text()
    start = text.index("## Results at 96 px")
    return text[start : text.index("\n## ", start + 1)]


def test_cdam_paper_doc_states_the_committed_96px_metrics():
    runs = _committed_fine_run()
    assert list(runs) == ["shapes-vit-dino", "shapes-vit-fine"]
    rows = {}
    for line in _doc_section().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        if cells and cells[0] in _DOC_ROWS:
            rows[cells[0]] = cells[1:]
    assert set(rows) == set(_DOC_ROWS)
    for label, key in _DOC_ROWS.items():
        assert len(rows[label]) == len(_DOC_COLUMNS), label
        for cell, metric in zip(rows[label], _DOC_COLUMNS, strict=True):
            dino, fine = (float(v.replace("*", "")) for v in cell.split("\\|"))
            for stated, model in ((dino, "shapes-vit-dino"), (fine, "shapes-vit-fine")):
                mean = runs[model]["metrics"][key][metric]["mean"]
                assert _states(stated, mean), (label, metric, model, stated, mean)


def test_cdam_paper_doc_states_the_committed_claim_verdicts():
    runs = _committed_fine_run()
    lines = _doc_section().splitlines()
    head = next(i for i, row in enumerate(lines) if row.startswith("| the paper's claim |"))
    claims = runs["shapes-vit-dino"]["claims"]
    rows = lines[head + 2 : head + 2 + len(claims)]  # the table lists them in the run's order
    for row, claim in zip(rows, claims, strict=True):
        dino, fine = row.strip().strip("|").split(" | ")[1:]
        for cell, model in ((dino, "shapes-vit-dino"), (fine, "shapes-vit-fine")):
            verdict = next(c for c in runs[model]["claims"] if c["key"] == claim["key"])["verdict"]
            assert cell.startswith(f"**{verdict}"), (claim["claim"], model, cell)


def test_readme_method_guide_states_the_committed_96px_pointing():
    runs = _committed_fine_run()

    def pg(model: str, key: str) -> str:
        return f"{runs[f'shapes-vit-{model}']['metrics'][key]['pointing_game']['mean']:.2f}"

    readme = (ROOT / "README.md").read_text()
    for phrase in (
        f"{pg('fine', 'cdam')} at 12 × 12 tokens (TAM {pg('fine', 'tam')})",
        f"a DINO backbone with a linear head ({pg('dino', 'cdam')}, TAM {pg('dino', 'tam')})",
        f"best on the DINO ViT ({pg('dino', 'tam')}), {pg('fine', 'tam')} on its supervised twin",
        f"best at 12 × 12 ({pg('fine', 'relevance')})",
        f"{pg('dino', 'relevance')} on the DINO ViT",
    ):
        assert phrase in readme, phrase
