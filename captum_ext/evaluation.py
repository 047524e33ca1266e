"""Evaluation engine: every method on a model, every metric, with bootstrap intervals.

:func:`evaluate` runs the attribution methods of :mod:`captum_ext.registry` (plus two
class-agnostic baselines and any custom maps) on a held-out set of the procedural benchmark
(:mod:`captum_ext.data`) and scores them with :mod:`captum_ext.metrics`:

* images (``shapes``): one map per present class of every image (a two-object image gives two
  maps); pointing game, relevance mass and rank accuracy against that class's mask, sparsity,
  class-discrimination ``D`` on two-object images, RISE deletion / insertion AUC for the class,
  and the Pearson correlation with TAM's map (the CDAM paper's comparison);
* text (``text_rationales``): ERASER comprehensiveness and sufficiency (AOPC) and token AUPRC
  against the planted rationale, for the target ``label``.

Localisation, sparsity, ``D`` and the correlation are computed on the model's patch grid by
default (``resolution="grid"``): token maps are used as they are, pixel maps (baselines, custom
maps) are average-pooled over each patch, and a patch belongs to a class's mask when it holds
any pixel of the object. On the patch-aligned layout this is the exact token ground truth;
at pixel resolution a perfect token map could not exceed the share of its patch the object
covers. RISE always runs at pixel resolution on the upsampled maps.

Every value is aggregated into its mean and a percentile bootstrap 95 % interval (Efron &
Tibshirani 1993) that resamples *images* (a cluster bootstrap: the two maps of a two-object
image are not independent), with a fixed seed.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from captum_ext.adapters import adapter_for
from captum_ext.data import ShapesBatch, TextBatch, shapes, text_rationales
from captum_ext.data.text import SPECIAL_TOKENS
from captum_ext.errors import UnsupportedModelError
from captum_ext.metrics import (
    METRICS,
    comprehensiveness,
    deletion_auc,
    discrimination_score,
    insertion_auc,
    pearson,
    pointing_game,
    relevance_mass_accuracy,
    relevance_rank_accuracy,
    sparsity,
    sufficiency,
    token_auprc,
)
from captum_ext.registry import METHODS, make_method

__all__ = [
    "BASELINES",
    "DEFAULT_SEED",
    "IMAGE_METRICS",
    "TEXT_METRICS",
    "EvalResult",
    "MapFn",
    "bootstrap_ci",
    "centre_gaussian_map",
    "evaluate",
    "random_map",
]

DEFAULT_SEED = 20261122
"""Seed of the held-out evaluation data; never used to train the zoo models."""

IMAGE_METRICS: tuple[str, ...] = (
    "pointing_game",
    "relevance_mass_accuracy",
    "relevance_rank_accuracy",
    "sparsity",
    "discrimination_score",
    "deletion_auc",
    "insertion_auc",
    "pearson_tam",
)
"""Metrics computed for image models, in table order."""

TEXT_METRICS: tuple[str, ...] = ("comprehensiveness", "sufficiency", "token_auprc")
"""Metrics computed for text models, in table order."""

_SHORT = {
    "pointing_game": "pointing",
    "relevance_mass_accuracy": "mass acc.",
    "relevance_rank_accuracy": "rank acc.",
    "sparsity": "sparsity",
    "discrimination_score": "D",
    "deletion_auc": "deletion",
    "insertion_auc": "insertion",
    "pearson_tam": "r(TAM)",
    "comprehensiveness": "comp.",
    "sufficiency": "suff.",
    "token_auprc": "AUPRC",
}

MapFn = Callable[[Tensor, Tensor], Tensor]
"""``fn(inputs, targets) -> maps``: images ``(B, C, H, W)`` and targets ``(B,)`` give maps
``(B, 1, H, W)`` / ``(B, H, W)``; text ``input_ids (B, T)`` give ``(B, T)``."""


# ----------------------------------------------------------------------------------------------
# Baselines
# ----------------------------------------------------------------------------------------------


def random_map(inputs: Tensor, seed: int = 0) -> Tensor:
    """Uniform noise in ``[0, 1)``: the chance level of every metric (class-agnostic).

    Drawn on the CPU from a generator seeded with ``seed``, so the map is the same on every
    device; every example of the batch gets its own noise.

    Args:
        inputs: Images ``(B, C, H, W)`` or token ids ``(B, T)``.
        seed: Seed of the noise.

    Returns:
        ``(B, 1, H, W)`` for images, ``(B, T)`` for token ids, float32 on ``inputs.device``.
    """
    g = torch.Generator().manual_seed(seed)
    shape = (inputs.shape[0], 1, *inputs.shape[-2:]) if inputs.dim() == 4 else inputs.shape[:2]
    return torch.rand(tuple(shape), generator=g).to(inputs.device)


def centre_gaussian_map(images: Tensor, sigma: float = 0.25) -> Tensor:
    """A fixed Gaussian bump at the image centre: the "objects are central" prior.

    ``exp(-((y - 1/2)^2 + (x - 1/2)^2) / (2 sigma^2))`` at the pixel centres, with ``y`` and
    ``x`` in units of the image height and width. Class-agnostic and input-agnostic.

    Args:
        images: Images ``(B, C, H, W)`` (only the shape and device are used).
        sigma: Standard deviation as a fraction of the image side.

    Returns:
        ``(B, 1, H, W)`` float32 on ``images.device``.
    """
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    b, _, h, w = images.shape
    y = (2 * torch.arange(h, dtype=torch.float32) + 1 - h) / (2 * h)  # exactly symmetric
    x = (2 * torch.arange(w, dtype=torch.float32) + 1 - w) / (2 * w)
    g = torch.exp(-(y[:, None] ** 2 + x[None, :] ** 2) / (2 * sigma**2))
    return g.expand(b, 1, h, w).to(images.device)


BASELINES: dict[str, str] = {
    "random": "uniform noise",
    "centre-gaussian": "centred Gaussian (sigma = 0.25 of the side)",
}
"""The baseline maps every evaluation adds (name -> description); both class-agnostic."""

_LABELS = {"random": "random", "centre-gaussian": "centre Gaussian"}


# ----------------------------------------------------------------------------------------------
# Bootstrap
# ----------------------------------------------------------------------------------------------


def bootstrap_ci(
    values: Any,
    groups: Any = None,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> tuple[float, float, float]:
    """Mean and percentile bootstrap interval of ``values``, resampling whole groups.

    Groups (e.g. the image a value belongs to) are drawn with replacement; each resample's
    statistic is the mean over all values of the drawn groups. Without ``groups`` every value is
    its own group (the ordinary bootstrap). NaN values are dropped first.

    Args:
        values: ``(N,)`` numbers.
        groups: ``(N,)`` group ids, or ``None``.
        n_boot: Number of resamples; ``0`` gives a NaN interval.
        seed: Seed of the resampling (NumPy ``default_rng``).
        alpha: ``1 - alpha`` is the coverage of the interval.

    Returns:
        ``(mean, lo, hi)``; all NaN when no value is finite.
    """
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    g = np.arange(v.size) if groups is None else np.asarray(groups).reshape(-1)
    if g.shape != v.shape:
        raise ValueError(f"groups: expected shape {v.shape} (as values), got {g.shape}")
    keep = ~np.isnan(v)
    v, g = v[keep], g[keep]
    if v.size == 0:
        return math.nan, math.nan, math.nan
    mean = float(v.mean())
    if n_boot <= 0:
        return mean, math.nan, math.nan
    if float(np.ptp(v)) == 0.0:
        return mean, mean, mean
    _, inv = np.unique(g, return_inverse=True)
    sums = np.bincount(inv, weights=v)
    counts = np.bincount(inv).astype(np.float64)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, sums.size, size=(n_boot, sums.size))
    stats = sums[idx].sum(axis=1) / counts[idx].sum(axis=1)
    lo, hi = np.percentile(stats, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return mean, float(lo), float(hi)


# ----------------------------------------------------------------------------------------------
# Result
# ----------------------------------------------------------------------------------------------


def _direction(metric: str) -> bool | None:
    info = METRICS.get(metric)
    return None if info is None else info.higher_is_better


def _fmt(x: float) -> str:
    return "nan" if x is None or math.isnan(x) else f"{x:.3f}"


def _nan_to_none(x: Any) -> Any:
    if isinstance(x, float) and math.isnan(x):
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
    """

    rows: list[dict[str, Any]] = field(default_factory=list)
    notes: dict[str, list[str]] = field(default_factory=dict)
    meta: dict[str, dict[str, Any]] = field(default_factory=dict)
    values: dict[tuple[str, str, str], tuple[np.ndarray, np.ndarray]] = field(
        default_factory=dict, repr=False
    )

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
                hib = _direction(m)
                arrow = "" if hib is None else (" ↑" if hib else " ↓")
                head.append(_SHORT.get(m, m) + arrow)
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
        """JSON-ready dict: ``rows``, ``notes``, ``meta`` (NaN written as ``null``)."""
        return _nan_to_none({"rows": self.rows, "notes": self.notes, "meta": self.meta})

    def to_json(self, path: str | Path) -> Path:
        """Writes :meth:`to_dict` to ``path``; returns the path."""
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=1, ensure_ascii=False) + "\n")
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


# ----------------------------------------------------------------------------------------------
# Maps
# ----------------------------------------------------------------------------------------------


def _chunks(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def _method_grids(
    attr: Any,
    class_agnostic: bool,
    images: Tensor,
    pi: Tensor,
    pc: Tensor,
    batch_size: int,
) -> Tensor:
    """Patch-grid maps ``(Np, h, w)`` of every (image ``pi[j]``, class ``pc[j]``) pair."""
    out: list[Tensor] = []
    if class_agnostic:
        grids = torch.cat(
            [attr.attribute(images[s], output="grid") for s in _chunks(len(images), batch_size)]
        )
        return grids[pi, 0].detach().float()
    if callable(getattr(attr, "attribute_targets", None)):
        # One pass per chunk of images for all classes present in it; pairs are image-major.
        for s in _chunks(len(images), batch_size):
            sel = (pi >= s.start) & (pi < s.stop)
            classes = sorted(set(pc[sel].tolist()))
            maps = attr.attribute_targets(images[s], targets=classes, output="grid")
            row = {c: k for k, c in enumerate(classes)}
            k = torch.tensor([row[c] for c in pc[sel].tolist()], dtype=torch.long)
            out.append(maps[k.to(maps.device), pi[sel].to(maps.device) - s.start, 0])
        return torch.cat(out).detach().float()
    for s in _chunks(len(pi), batch_size):
        x = images[pi[s]]
        out.append(attr.attribute(x, target=pc[s].to(x.device), output="grid")[:, 0])
    return torch.cat(out).detach().float()


def _to_grid(maps: Tensor, grid: tuple[int, int]) -> Tensor:
    """Average-pools pixel maps ``(B, [1,] H, W)`` to the patch grid ``(B, h, w)``."""
    m = maps if maps.dim() == 3 else maps.sum(dim=1)
    return F.adaptive_avg_pool2d(m[:, None].float(), grid)[:, 0]


def _to_pixels(grids: Tensor, size: tuple[int, int]) -> Tensor:
    """Nearest upsampling of ``(B, h, w)`` patch maps to ``(B, H, W)`` (as the methods do)."""
    h, w = grids.shape[-2:]
    ph, pw = -(-size[0] // h), -(-size[1] // w)
    up = grids.repeat_interleave(ph, dim=-2).repeat_interleave(pw, dim=-1)
    return up[..., : size[0], : size[1]]


def _pixel_map(maps: Tensor, size: tuple[int, int], name: str) -> Tensor:
    m = maps.detach()
    if m.dim() == 4:
        m = m.sum(dim=1)
    if m.dim() != 3 or tuple(m.shape[-2:]) != tuple(size):
        raise ValueError(
            f"map {name!r}: expected (B, 1, H, W) or (B, H, W) with (H, W) = {tuple(size)}, "
            f"got {tuple(maps.shape)}"
        )
    return m.float()


# ----------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------


@dataclass
class _Collector:
    """Per-item values of one model, in method and metric order."""

    model: str
    values: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)

    def add(self, method: str, metric: str, vals: Tensor, groups: Tensor) -> None:
        self.values[(method, metric)] = (
            vals.detach().double().cpu().numpy(),
            groups.detach().cpu().numpy(),
        )

    def result(
        self, bootstrap: int, bootstrap_seed: int, notes: list[str], meta: dict[str, Any]
    ) -> EvalResult:
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
                    "higher_is_better": _direction(metric),
                }
            )
            res.values[(self.model, method, metric)] = (v, g)
        return res


def _progress(items: Sequence[Any], show: bool, desc: str) -> Any:
    if not show:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, leave=False)


def _check_metrics(metrics: Sequence[str] | None, known: Sequence[str]) -> list[str]:
    if metrics is None:
        return list(known)
    wanted = list(metrics)
    bad = [m for m in wanted if m not in IMAGE_METRICS + TEXT_METRICS]
    if bad:
        raise ValueError(
            f"unknown metric(s) {bad}; image metrics: {list(IMAGE_METRICS)}, "
            f"text metrics: {list(TEXT_METRICS)}"
        )
    return [m for m in known if m in wanted]


def _build_methods(
    model: nn.Module, names: Sequence[str], notes: list[str]
) -> list[tuple[str, Any, bool]]:
    built, skipped, reason = [], [], ""
    for name in names:
        try:
            attr = make_method(name, model)
        except UnsupportedModelError as err:
            skipped.append(METHODS[name].label)
            reason = reason or str(err)
            continue
        built.append((name, attr, METHODS[name].class_agnostic))
    if skipped:
        notes.append(f"Skipped {', '.join(skipped)}: the model is not supported ({reason})")
    return built


def _grid_size(model: nn.Module, images: Tensor, data: ShapesBatch) -> tuple[int, int]:
    try:
        return adapter_for(model).grid_size(images)
    except UnsupportedModelError:
        patch = int(getattr(data, "patch", 8))
        return images.shape[-2] // patch, images.shape[-1] // patch


def _evaluate_images(
    model: nn.Module,
    label: str,
    data: ShapesBatch,
    methods: Sequence[str],
    extra_maps: Mapping[str, MapFn],
    metrics: list[str],
    device: str | torch.device,
    *,
    resolution: str,
    steps: int,
    score: str,
    batch_size: int,
    baseline_seed: int,
    show_progress: bool,
    notes: list[str],
) -> tuple[_Collector, dict[str, Any]]:
    images = data.images.to(device)
    labels = torch.as_tensor(data.labels)
    masks = torch.as_tensor(data.masks).bool()
    if labels.dim() != 2 or masks.dim() != 4:
        raise ValueError(
            "image data needs labels (N, K) and masks (N, K, H, W); "
            f"got {tuple(labels.shape)} and {tuple(masks.shape)}"
        )
    size = (images.shape[-2], images.shape[-1])
    pi, pc = torch.nonzero(labels > 0.5, as_tuple=True)  # image-major (image, class) pairs
    pair_masks = masks[pi, pc].to(device)  # (Np, H, W)
    counts = (labels > 0.5).sum(dim=1)
    # Two-object images: positions of the pair (a, b) in the pair list.
    two = torch.nonzero(counts[pi] == 2).squeeze(1)
    ja, jb = two[0::2], two[1::2]
    grid = _grid_size(model, images, data)
    if resolution == "grid":
        eval_masks = F.adaptive_max_pool2d(pair_masks[:, None].float(), grid)[:, 0] > 0
    else:
        eval_masks = pair_masks

    col = _Collector(label)
    names: list[str] = []
    tam_map: Tensor | None = None  # TAM's maps at the evaluation resolution
    methods = list(methods)
    if "tam" in methods:  # TAM first: the reference of the correlation
        methods.remove("tam")
        methods.insert(0, "tam")
    built = _build_methods(model, methods, notes)
    todo: list[tuple[str, Callable[[], tuple[Tensor, Tensor]]]] = []
    for name, attr, agnostic in built:

        def run(attr: Any = attr, agnostic: bool = agnostic) -> tuple[Tensor, Tensor]:
            g = _method_grids(attr, agnostic, images, pi, pc, batch_size).to(device)
            return _to_pixels(g, size), g

        todo.append((name, run))
        col.labels[name] = METHODS[name].label
    baselines = {
        "random": lambda x, t: random_map(x, baseline_seed),
        "centre-gaussian": lambda x, t: centre_gaussian_map(x),
    }
    for name, fn in {**baselines, **dict(extra_maps)}.items():
        if name in baselines:
            # Class-agnostic: one map per image, shared by its classes.
            maps_once = _pixel_map(fn(images, labels.argmax(dim=1).to(device)), size, name)
            todo.append((name, lambda m=maps_once: (m[pi.to(device)], None)))
        else:

            def run_extra(fn: MapFn = fn, name: str = name) -> tuple[Tensor, None]:
                out = [
                    _pixel_map(fn(images[pi[s]], pc[s].to(device)), size, name)
                    for s in _chunks(len(pi), batch_size)
                ]
                return torch.cat(out), None

            todo.append((name, run_extra))
        col.labels[name] = _LABELS.get(name, name)

    groups = pi
    for name, run in _progress(todo, show_progress, f"{label}: methods"):
        px, g = run()
        px = px.to(device)
        em = px
        if resolution == "grid":
            em = g if g is not None else _to_grid(px, grid)
        names.append(name)
        if name == "tam":
            tam_map = em
        if "pointing_game" in metrics:
            col.add(name, "pointing_game", pointing_game(em, eval_masks), groups)
        if "relevance_mass_accuracy" in metrics:
            col.add(
                name, "relevance_mass_accuracy", relevance_mass_accuracy(em, eval_masks), groups
            )
        if "relevance_rank_accuracy" in metrics:
            col.add(
                name, "relevance_rank_accuracy", relevance_rank_accuracy(em, eval_masks), groups
            )
        if "sparsity" in metrics:
            col.add(name, "sparsity", sparsity(em), groups)
        if "discrimination_score" in metrics and len(ja):
            d = discrimination_score(em[ja], em[jb], eval_masks[ja], eval_masks[jb])
            col.add(name, "discrimination_score", d, pi[ja])
        x = images[pi.to(device)]
        t = pc.to(device)
        for metric, fn in (("deletion_auc", deletion_auc), ("insertion_auc", insertion_auc)):
            if metric in metrics:
                auc = fn(model, x, px, target=t, steps=steps, score=score, batch_size=256)
                col.add(name, metric, auc, groups)
        if "pearson_tam" in metrics and tam_map is not None and name != "tam":
            col.add(name, "pearson_tam", pearson(em, tam_map), groups)
    if "pearson_tam" in metrics and tam_map is None:
        notes.append("r(TAM) not computed: TAM was not evaluated on this model.")
    if "discrimination_score" in metrics and not len(ja):
        notes.append("D not computed: no image with two objects.")
    where = f"the {grid[0]}×{grid[1]} patch grid" if resolution == "grid" else "pixel resolution"
    meta = {
        "modality": "image",
        "n_images": len(images),
        "n_pairs": len(pi),
        "n_two_object": len(ja),
        "layout": getattr(data, "layout", None),
        "resolution": resolution,
        "grid": list(grid),
        "steps": steps,
        "score": score,
        "methods": names,
        "summary_parts": [
            f"{len(images)} images ({len(pi)} image–class maps, {len(ja)} two-object images"
            + (f", {data.layout} layout" if getattr(data, "layout", None) else "")
            + ")",
            f"localisation, sparsity, D and r on {where}",
            f"RISE deletion (zero) / insertion (blur) with {steps} steps on {score} scores",
        ],
    }
    return col, meta


def _special_mask(data: TextBatch, ids: Tensor) -> Tensor:
    vocab = list(getattr(data, "vocab", []))
    special = [vocab.index(t) for t in SPECIAL_TOKENS if t in vocab]
    return torch.isin(ids, torch.tensor(special, dtype=ids.dtype, device=ids.device))


def _evaluate_text(
    model: nn.Module,
    label: str,
    data: TextBatch,
    methods: Sequence[str],
    extra_maps: Mapping[str, MapFn],
    metrics: list[str],
    device: str | torch.device,
    *,
    batch_size: int,
    baseline_seed: int,
    show_progress: bool,
    notes: list[str],
) -> tuple[_Collector, dict[str, Any]]:
    ids = data.input_ids.to(device)
    mask = data.attention_mask.to(device)
    target = data.labels.to(device)
    special = _special_mask(data, ids)
    valid = mask.bool() & ~special
    rationale = data.rationale.to(device)
    col = _Collector(label)
    todo: list[tuple[str, Callable[[], Tensor]]] = []
    for name, attr, _ in _build_methods(model, methods, notes):

        def run(attr: Any = attr) -> Tensor:
            return torch.cat(
                [
                    attr.attribute(ids[s], target=target[s], additional_forward_args=(mask[s],))
                    for s in _chunks(len(ids), batch_size)
                ]
            ).detach()

        todo.append((name, run))
        col.labels[name] = METHODS[name].label
    todo.append(("random", lambda: random_map(ids, baseline_seed)))
    col.labels["random"] = "random"
    for name, fn in extra_maps.items():
        todo.append((name, lambda fn=fn: fn(ids, target).detach()))
        col.labels[name] = name
    notes.append("centre-Gaussian baseline not defined for text; omitted.")
    groups = torch.arange(len(ids))
    for name, run in _progress(todo, show_progress, f"{label}: methods"):
        s = run().float()
        if s.shape != ids.shape:
            raise ValueError(f"map {name!r}: expected {tuple(ids.shape)}, got {tuple(s.shape)}")
        kw = dict(target=target, attention_mask=mask, special_mask=special)
        if "comprehensiveness" in metrics:
            col.add(name, "comprehensiveness", comprehensiveness(model, ids, s, **kw), groups)
        if "sufficiency" in metrics:
            col.add(name, "sufficiency", sufficiency(model, ids, s, **kw), groups)
        if "token_auprc" in metrics:
            col.add(name, "token_auprc", token_auprc(s, rationale, valid), groups)
    meta = {
        "modality": "text",
        "n_images": len(ids),
        "methods": [n for n, _ in todo],
        "summary_parts": [
            f"{len(ids)} sequences, target = label",
            "ERASER AOPC over 1/5/10/20/50 % of the non-special tokens; AUPRC vs. the "
            "planted rationale",
        ],
    }
    return col, meta


def _zoo() -> Any:
    from captum_ext import zoo

    return zoo


def evaluate(
    model_or_name: str | nn.Module | tuple[nn.Module, Any] | Sequence[str],
    methods: Sequence[str] | None = None,
    n: int = 64,
    seed: int = DEFAULT_SEED,
    device: str | torch.device = "cpu",
    bootstrap: int = 1000,
    show_progress: bool = False,
    metrics: Sequence[str] | None = None,
    data: ShapesBatch | TextBatch | None = None,
    *,
    extra_maps: Mapping[str, MapFn] | None = None,
    name: str | None = None,
    resolution: str = "grid",
    steps: int = 16,
    score: str = "sigmoid",
    batch_size: int = 64,
    bootstrap_seed: int = 0,
) -> EvalResult:
    """Evaluates attribution methods on a model against the benchmark's ground truth.

    For an image model every method explains every present class of every image of the
    held-out set (``target`` = that class; a two-object image gives two maps), and each map is
    scored against its class's mask. The baselines ``"random"`` (:func:`random_map`) and
    ``"centre-gaussian"`` (:func:`centre_gaussian_map`) are always added; so are
    ``extra_maps``. For a text model every method explains the label of every sequence
    (``random`` is the only baseline). Values are aggregated per (method, metric) into the mean
    and a percentile bootstrap 95 % interval over images (:func:`bootstrap_ci`).

    Image metrics (:data:`IMAGE_METRICS`): pointing game, relevance mass accuracy and relevance
    rank accuracy (Arras et al. 2022) against the class's mask; sparsity (Brocki & Chung 2023);
    class discrimination ``D`` on two-object images (``0.5`` for any class-agnostic map);
    deletion and insertion AUC (Petsiuk et al. 2018) for the class with ``steps`` steps; and
    ``pearson_tam``, the per-map Pearson correlation with TAM's map (when TAM is evaluated).
    Text metrics (:data:`TEXT_METRICS`): ERASER comprehensiveness and sufficiency (AOPC;
    DeYoung et al. 2020), token AUPRC against the planted rationale. Special tokens and padding
    are excluded from all three.

    Args:
        model_or_name: A zoo name (``captum_ext.zoo.available()``), a list of zoo names
            (evaluated one after another), a model (then ``data`` is required), or a
            ``(model, data)`` pair. Image models take ``(B, C, H, W)`` and return ``(B, K)``
            logits; text models are called as ``model(input_ids, attention_mask)``.
        methods: Registry names (:data:`captum_ext.registry.METHODS`); ``None`` = all.
            Methods that do not support the model (e.g. transformer methods on a CNN) are
            skipped with a note.
        n: Number of held-out images / sequences generated for a zoo model.
        seed: Seed of the held-out data (never used in training).
        device: Device of the model and data.
        bootstrap: Bootstrap resamples; ``0`` skips the intervals.
        show_progress: tqdm progress bars over models and methods.
        metrics: Metric names to compute (a subset of :data:`IMAGE_METRICS` +
            :data:`TEXT_METRICS`); ``None`` = all that apply.
        data: A ``ShapesBatch`` (``.images`` ``(N, 3, H, W)``, ``.labels`` ``(N, K)``,
            ``.masks`` ``(N, K, H, W)``) or a ``TextBatch``; overrides the generated set.
        extra_maps: Custom maps by name, ``fn(inputs, targets) -> maps`` (see :data:`MapFn`),
            called on chunks of (image, class) pairs; evaluated like a method.
        name: Model name in the result (default: the zoo name or the class name).
        resolution: ``"grid"`` (localisation, sparsity, ``D`` and correlation on the model's
            patch grid; see the module docstring) or ``"pixel"``.
        steps: Steps of the deletion / insertion curves.
        score: Class score of the RISE curves: ``"sigmoid"`` (multi-label models),
            ``"softmax"`` or ``"logit"``; zoo models whose record says they are not
            multi-label use ``"softmax"``. Text metrics always use softmax probabilities.
        batch_size: Images (or pairs) per attribution call.
        bootstrap_seed: Seed of the bootstrap resampling.

    Returns:
        The :class:`EvalResult`.

    Raises:
        ValueError: Unknown method or metric name, a model without data, or data of the
            wrong kind.
    """
    if isinstance(model_or_name, list | tuple) and all(isinstance(m, str) for m in model_or_name):
        total = EvalResult()
        for m in _progress(list(model_or_name), show_progress, "models"):
            total = total + evaluate(
                m,
                methods,
                n,
                seed,
                device,
                bootstrap,
                show_progress,
                metrics,
                data,
                extra_maps=extra_maps,
                resolution=resolution,
                steps=steps,
                score=score,
                batch_size=batch_size,
                bootstrap_seed=bootstrap_seed,
            )
        return total
    if resolution not in ("grid", "pixel"):
        raise ValueError(f"resolution must be 'grid' or 'pixel', got {resolution!r}")
    if methods is None:
        methods = list(METHODS)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; available: {', '.join(METHODS)}")
    clash = [k for k in (extra_maps or {}) if k in METHODS or k in BASELINES]
    if clash:
        raise ValueError(f"extra_maps names {clash} clash with methods or baselines; rename them")

    meta: dict[str, Any] = {"seed": seed}
    if isinstance(model_or_name, str):
        zoo = _zoo()
        label = name or model_or_name
        model = zoo.load(model_or_name, device=device)
        info = dict(zoo.info(model_or_name))
        kwargs = dict(zoo.data_kwargs(model_or_name))
        meta.update(data_kwargs=kwargs, family=info.get("family"))
        accuracy = (info.get("heldout") or {}).get("accuracy")
        if accuracy is not None:
            meta["heldout_accuracy"] = accuracy
        if info.get("task") not in (None, "multilabel"):
            score = "softmax"  # single-label zoo model: RISE on class probabilities
        if data is None:
            maker = text_rationales if info.get("modality") == "text" else shapes
            data = maker(n, seed, **kwargs)
    else:
        model = model_or_name
        if isinstance(model, tuple):
            model, data = model
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"model_or_name must be a zoo name, a module or a (module, data) pair; "
                f"got {type(model).__name__}"
            )
        if data is None:
            raise ValueError(
                "a model needs held-out data: pass data=shapes(n, seed, ...) or "
                "data=text_rationales(n, seed, ...), or use a zoo name"
            )
        label = name or type(model).__name__
        model = model.to(device).eval()
    notes: list[str] = []
    start = time.perf_counter()
    if isinstance(data, TextBatch) or hasattr(data, "input_ids"):
        mlist = _check_metrics(metrics, TEXT_METRICS)
        col, m = _evaluate_text(
            model,
            label,
            data,
            methods,
            extra_maps or {},
            mlist,
            device,
            batch_size=batch_size,
            baseline_seed=seed,
            show_progress=show_progress,
            notes=notes,
        )
    elif hasattr(data, "images") and hasattr(data, "masks"):
        mlist = _check_metrics(metrics, IMAGE_METRICS)
        col, m = _evaluate_images(
            model,
            label,
            data,
            methods,
            extra_maps or {},
            mlist,
            device,
            resolution=resolution,
            steps=steps,
            score=score,
            batch_size=batch_size,
            baseline_seed=seed,
            show_progress=show_progress,
            notes=notes,
        )
    else:
        raise ValueError(
            f"data must be a ShapesBatch (images, labels, masks) or a TextBatch; "
            f"got {type(data).__name__}"
        )
    meta.update(m)
    meta["seconds"] = round(time.perf_counter() - start, 2)
    unit = "sequences" if meta["modality"] == "text" else "images"
    ci = f"95 % percentile bootstrap over {unit} ({bootstrap} resamples)" if bootstrap else ""
    parts = meta.pop("summary_parts") + [f"seed {seed}"] + ([ci] if ci else [])
    if "heldout_accuracy" in meta:
        parts.insert(
            0, f"{meta.get('family') or 'model'}, held-out accuracy {meta['heldout_accuracy']:.3f}"
        )
    meta["summary"] = "; ".join(parts) + "."
    return col.result(bootstrap, bootstrap_seed, notes, meta)
