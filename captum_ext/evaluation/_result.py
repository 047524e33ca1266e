"""The result of an evaluation: rows of (model, method, metric) with intervals, and its tables."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from captum_ext.checkpoint import dumps_json

from ._bootstrap import bootstrap_ci
from ._table import direction, short_name

__all__ = ["Collector", "EvalResult"]


def _fmt(x: float) -> str:
    return "nan" if x is None or math.isnan(x) else f"{x:.3f}"


def _nan_to_none(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _nan_to_none(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_nan_to_none(v) for v in x]
    return x


@dataclass
class EvalResult:
    """Aggregated scores of an evaluation.

    Attributes:
        rows: One dict per (model, method, metric): ``model``, ``method`` (registry name,
            baseline or custom name), ``label`` (display name), ``metric``, ``mean``, ``lo``,
            ``hi`` (95 % bootstrap interval), ``n`` (finite values) and ``higher_is_better``
            (``None`` when the direction depends on the use).
        notes: Per model, remarks such as methods that do not support the model.
        meta: Per model, the settings (data, seed, resolution, steps, run time).
        values: ``(model, method, metric) -> (values, groups)``: the per-item values and the
            image each belongs to (kept in memory, not written by :meth:`to_json`).
        shards: Of a whole-dataset run (:func:`~captum_ext.evaluation.evaluate_dataset`), the
            chunks this run ``"computed"`` and those it found complete and ``"reused"``;
            empty otherwise. Not written by :meth:`to_json` (the table does not depend on it).
    """

    rows: list[dict[str, Any]] = field(default_factory=list)
    notes: dict[str, list[str]] = field(default_factory=dict)
    meta: dict[str, dict[str, Any]] = field(default_factory=dict)
    values: dict[tuple[str, str, str], tuple[np.ndarray, np.ndarray]] = field(
        default_factory=dict, repr=False
    )
    shards: dict[str, list[int]] = field(default_factory=dict, repr=False)

    def __add__(self, other: EvalResult) -> EvalResult:
        return EvalResult(
            self.rows + other.rows,
            {**self.notes, **other.notes},
            {**self.meta, **other.meta},
            {**self.values, **other.values},
        )

    @property
    def models(self) -> list[str]:
        """Models in order of appearance."""
        return list(dict.fromkeys(r["model"] for r in self.rows))

    def get(self, model: str, method: str, metric: str) -> dict[str, Any]:
        """The row of ``(model, method, metric)``.

        Raises:
            KeyError: No such row.
        """
        for r in self.rows:
            if (r["model"], r["method"], r["metric"]) == (model, method, metric):
                return r
        raise KeyError(f"no row for model={model!r}, method={method!r}, metric={metric!r}")

    def to_markdown(self) -> str:
        """One table per model: rows are methods, columns metrics, cells ``mean [lo, hi]``.

        The header marks the better direction with an arrow (none where it depends on the
        use, e.g. the correlation with TAM).
        """
        parts: list[str] = []
        for model in self.models:
            rows = [r for r in self.rows if r["model"] == model]
            metrics = list(dict.fromkeys(r["metric"] for r in rows))
            methods = list(dict.fromkeys(r["method"] for r in rows))
            cells = {(r["method"], r["metric"]): r for r in rows}
            labels = {r["method"]: r["label"] for r in rows}
            parts.append(f"### {model}\n")
            meta = self.meta.get(model, {})
            if meta.get("summary"):
                parts.append(meta["summary"] + "\n")
            head = ["method"]
            for m in metrics:
                hib = direction(m)
                arrow = "" if hib is None else (" ↑" if hib else " ↓")
                head.append(short_name(m) + arrow)
            parts.append("| " + " | ".join(head) + " |")
            parts.append("|" + "---|" * len(head))
            for meth in methods:
                line = [labels[meth]]
                for m in metrics:
                    r = cells.get((meth, m))
                    if r is None:
                        line.append("—")
                    elif r["lo"] is None or math.isnan(r["lo"]):
                        line.append(_fmt(r["mean"]))
                    else:
                        line.append(f"{_fmt(r['mean'])} [{_fmt(r['lo'])}, {_fmt(r['hi'])}]")
                parts.append("| " + " | ".join(line) + " |")
            notes = self.notes.get(model, [])
            if notes:
                parts.append("")
                parts.extend(f"- {note}" for note in notes)
            parts.append("")
        return "\n".join(parts)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict: ``rows``, ``notes``, ``meta`` (NaN and inf written as ``null``)."""
        return _nan_to_none({"rows": self.rows, "notes": self.notes, "meta": self.meta})

    def to_json(self, path: str | Path) -> Path:
        """Writes :meth:`to_dict` to ``path``; returns the path."""
        path = Path(path)
        path.write_text(dumps_json(self.to_dict(), path, indent=1) + "\n")
        return path

    def save(self, directory: str | Path) -> tuple[Path, Path]:
        """Writes ``report.md`` and ``report.json`` into ``directory`` (created if needed).

        Returns:
            The two paths.
        """
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        md = d / "report.md"
        md.write_text(self.to_markdown())
        return md, self.to_json(d / "report.json")


@dataclass
class Collector:
    """Per-item values of one model, in method and metric order, until they are aggregated."""

    model: str
    labels: dict[str, str] = field(default_factory=dict)
    values: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    def add(self, method: str, metric: str, vals: Tensor, groups: Tensor) -> None:
        """Records the values of one (method, metric) and the group of each."""
        self.values[(method, metric)] = (
            vals.detach().double().cpu().numpy(),
            groups.detach().cpu().numpy(),
        )

    def has(self, metric: str) -> bool:
        """Whether any method has values of ``metric``."""
        return any(m == metric for _, m in self.values)

    def result(
        self, bootstrap: int, bootstrap_seed: int, notes: list[str], meta: dict[str, Any]
    ) -> EvalResult:
        """Means and bootstrap intervals of every (method, metric), as an :class:`EvalResult`."""
        res = EvalResult(notes={self.model: notes}, meta={self.model: meta})
        for (method, metric), (v, g) in self.values.items():
            mean, lo, hi = bootstrap_ci(v, g, n_boot=bootstrap, seed=bootstrap_seed)
            res.rows.append(
                {
                    "model": self.model,
                    "method": method,
                    "label": self.labels.get(method, method),
                    "metric": metric,
                    "mean": mean,
                    "lo": lo,
                    "hi": hi,
                    "n": int(np.isfinite(v).sum()),
                    "higher_is_better": direction(metric),
                }
            )
            res.values[(self.model, method, metric)] = (v, g)
        return res
