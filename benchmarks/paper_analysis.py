"""The CDAM paper's analysis (Brocki & Chung 2023) on zoo ViTs, next to the paper's values.

For each model, on ``--n`` fresh images of its shapes benchmark (every present class of every
image explained separately, as :func:`captum_ext.evaluation.evaluate` does), on the model's
token grid:

* Pearson correlation over tokens of CDAM, RP (relevance propagation) and AM (attention map)
  with TAM (token ablation), and of CDAM, RP and TAM with AM;
* sign agreement of CDAM with TAM (share of tokens where both have the same sign, among the
  tokens where both are non-zero; also among the tokens both maps count as non-near-zero),
  with the agreement two independent maps with the same shares of positive tokens would have;
* sparsity (share of tokens below 5 % of the map's max |value|) of AM, TAM, RP and CDAM;
* object mass (share of the map's |mass| on the tokens of any object of the image: the
  class-agnostic segmentation the paper credits AM with, and says CDAM inherits);
* the standard pointing game (15 px at 224, token maps upsampled bilinearly), relevance mass
  accuracy, D (two-object images) and RISE deletion / insertion for CDAM, smooth, integrated
  and concept CDAM (concept = mean latent of ``--concept-examples`` single-object images of the
  class, from a separate seed), TAM, RP, AM and the two baselines, through the evaluation's own
  metric table.

Every value is a mean with a 95 % percentile bootstrap interval over images (cluster bootstrap);
each of the paper's claims is checked on a paired bootstrap interval of a difference and
answered ``yes``, ``no`` or ``inconclusive`` (the interval holds 0).

    HF_HUB_OFFLINE=1 python benchmarks/paper_analysis.py [--models NAME ...] [--n 512]
        [--seed S] [--bootstrap 1000] [--quick] [--out benchmarks/results]

Writes ``paper_analysis.json``, ``paper_analysis.md`` and ``paper_analysis.png`` into ``--out``
(``paper_analysis_quick.*`` with ``--quick``); ``--merge A.json B.json`` combines runs of
different models into one (a new model analysed alone, next to a stored run).
:func:`markdown_section` renders a result as the
report section ``benchmarks/report.py --paper-models`` appends.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from captum_ext import CDAM, ConceptCDAM, zoo
from captum_ext.data import SHAPE_CLASSES, shapes
from captum_ext.evaluation import EvalConfig, bootstrap_ci
from captum_ext.evaluation._images import ImageSet
from captum_ext.evaluation._maps import chunks, method_grids, to_grid, to_pixels
from captum_ext.evaluation._result import Collector
from captum_ext.evaluation._table import IMAGE_TABLE
from captum_ext.metrics import pearson, sparsity
from captum_ext.registry import METHODS, make_method

__all__ = [
    "CLAIMS",
    "PAPER",
    "chance_agreement",
    "claims",
    "markdown_section",
    "object_mass",
    "pearson_rows",
    "run",
    "sign_agreement",
    "sparsity_share",
    "without_example",
    "write_outputs",
]

SEED = 20261206
"""Seed of the fresh images (no zoo model was trained or selected on it); the concept
examples use ``seed + 1``."""

SPARSITY_THRESHOLD = 0.05
"""A token is near zero when ``|s| < SPARSITY_THRESHOLD * max |s|`` (of its map)."""

FINE_MODELS = ("shapes-vit-dino", "shapes-vit-fine")
"""The default models, those of them the zoo has (the paper's setting at a fine token grid)."""

FALLBACK_MODELS = ("shapes-vit-linear",)

METRICS = (
    "pointing_game",
    "relevance_mass_accuracy",
    "discrimination_score",
    "deletion_auc",
    "insertion_auc",
)
"""The standard columns, computed by the evaluation's metric table."""

MAP_LABELS = {
    "cdam": "CDAM",
    "cdam_smooth": "smooth CDAM",
    "cdam_integrated": "integrated CDAM",
    "cdam_concept": "concept CDAM",
    "tam": "TAM",
    "relevance": "RP",
    "attention_map": "AM",
    "random": "random",
    "centre-gaussian": "centre Gaussian",
}

PAPER_SOURCE = (
    "Brocki & Chung, *Class-discriminative attention maps for vision transformers*, "
    "arXiv:2312.02364v1 (2023): ImageNet validation images, DINO ViT-S/8 with a linear "
    "head. Values cited secondhand, not re-checked against v1's text (not in the material "
    "searched); not found = not in that material either (docs/cdam_paper.md)."
)

PAPER: dict[str, dict[str, float | None]] = {
    "pearson_tam": {"cdam": 0.44, "relevance": 0.34, "attention_map": 0.10},
    "pearson_am": {"cdam": None, "relevance": None, "tam": None},
    "sign_agreement": {"all": None, "salient": None, "chance": None},
    "sparsity": {"attention_map": 0.54, "tam": 0.66, "relevance": 0.49, "cdam": 0.84},
    "object_mass": {"attention_map": None, "cdam": None},
}
"""The paper's values by quantity and map (``None``: not found in the material searched)."""

ROWS: tuple[tuple[str, str, str], ...] = (
    ("pearson_tam", "cdam", "r(CDAM, TAM)"),
    ("pearson_tam", "relevance", "r(RP, TAM)"),
    ("pearson_tam", "attention_map", "r(AM, TAM)"),
    ("pearson_am", "cdam", "r(CDAM, AM)"),
    ("pearson_am", "relevance", "r(RP, AM)"),
    ("pearson_am", "tam", "r(TAM, AM)"),
    ("sign_agreement", "all", "sign agreement CDAM/TAM (tokens both ≠ 0)"),
    ("sign_agreement", "salient", "sign agreement CDAM/TAM (tokens both ≥ 5 % of max)"),
    ("sign_agreement", "chance", "… chance level (independent signs, same shares)"),
    ("sparsity", "attention_map", "sparsity AM"),
    ("sparsity", "tam", "sparsity TAM"),
    ("sparsity", "relevance", "sparsity RP"),
    ("sparsity", "cdam", "sparsity CDAM"),
    ("object_mass", "attention_map", "object mass AM"),
    ("object_mass", "cdam", "object mass CDAM (absolute values)"),
)
"""The rows of the paper table: (quantity, map, label)."""


# ------------------------------------------------------------------------------ helpers
def _flat(m: Tensor) -> Tensor:
    return m.detach().reshape(m.shape[0], -1).double()


def pearson_rows(a: Tensor, b: Tensor) -> Tensor:
    """Per-map Pearson correlation over tokens (:func:`captum_ext.metrics.pearson`).

    Args:
        a, b: Maps ``(B, ...)`` with the same number of elements per map.

    Returns:
        ``(B,)`` float64 in ``[-1, 1]``; NaN where either map is constant.
    """
    return pearson(_flat(a), _flat(b))


def _kept(m: Tensor, threshold: float) -> Tensor:
    """Tokens that count: non-zero, and ``|m| >= threshold * max|m|`` (none of an all-zero
    map)."""
    s = m.abs()
    return (s > 0) & (s >= threshold * s.amax(dim=1, keepdim=True))


def _check_threshold(threshold: float) -> float:
    if isinstance(threshold, bool) or not (0.0 <= float(threshold) <= 1.0):
        raise ValueError(f"threshold must be a number in [0, 1]; got {threshold!r}")
    return float(threshold)


def sign_agreement(a: Tensor, b: Tensor, threshold: float = 0.0) -> Tensor:
    """Share of tokens where ``sign(a) == sign(b)``, among the tokens both maps count.

    A token counts in a map when it is non-zero and ``|s| >= threshold * max|s|`` of that map
    (``threshold=0``: every non-zero token; 0.05: the tokens :func:`sparsity_share` does not
    call near zero).

    Args:
        a, b: Signed maps ``(B, ...)`` with the same number of elements per map.
        threshold: A number in ``[0, 1]``.

    Returns:
        ``(B,)`` float64 in ``[0, 1]``; NaN where no token counts in both maps.

    Raises:
        ValueError: ``threshold`` out of range, or the maps differ in size.
    """
    threshold = _check_threshold(threshold)
    a, b = _flat(a), _flat(b)
    if a.shape != b.shape:
        raise ValueError(f"maps differ in size: {tuple(a.shape)} and {tuple(b.shape)}")
    both = _kept(a, threshold) & _kept(b, threshold)
    agree = (torch.sign(a) == torch.sign(b)) & both
    n = both.sum(dim=1).double()
    return torch.where(n > 0, agree.sum(dim=1).double() / n.clamp(min=1), torch.nan)


def chance_agreement(a: Tensor, b: Tensor, threshold: float = 0.0) -> Tensor:
    """The sign agreement of two independent maps with the shares of positive tokens of ``a``
    and ``b`` (among the tokens both count, as :func:`sign_agreement`): ``pa pb + (1 - pa)
    (1 - pb)``. Agreement above it is agreement beyond the two maps' sign balance.

    Returns:
        ``(B,)`` float64 in ``[0, 1]``; NaN where no token counts in both maps.
    """
    threshold = _check_threshold(threshold)
    a, b = _flat(a), _flat(b)
    both = _kept(a, threshold) & _kept(b, threshold)
    n = both.sum(dim=1).double()
    pa = ((a > 0) & both).sum(dim=1).double() / n.clamp(min=1)
    pb = ((b > 0) & both).sum(dim=1).double() / n.clamp(min=1)
    return torch.where(n > 0, pa * pb + (1 - pa) * (1 - pb), torch.nan)


def sparsity_share(m: Tensor, threshold: float = SPARSITY_THRESHOLD) -> Tensor:
    """Share of near-zero tokens, ``#{i: |s_i| < threshold * max|s|} / N``, per map
    (:func:`captum_ext.metrics.sparsity`).

    Returns:
        ``(B,)`` float64 in ``[0, 1)``; NaN for an all-zero map.
    """
    return sparsity(_flat(m), threshold)


def object_mass(m: Tensor, objects: Tensor) -> Tensor:
    """Share of the map's absolute mass on the tokens of any object, ``sum_{i in O} |s_i| /
    sum_i |s_i|``.

    Args:
        m: Maps ``(B, ...)``.
        objects: Bool masks of the same shape, true on the tokens holding any object of the
            image (all classes: the class-agnostic segmentation).

    Returns:
        ``(B,)`` float64 in ``[0, 1]``; NaN for an all-zero map.
    """
    s = _flat(m).abs()
    o = objects.reshape(objects.shape[0], -1).to(s.device).bool()
    if o.shape != s.shape:
        raise ValueError(f"objects: expected {tuple(s.shape)} tokens, got {tuple(o.shape)}")
    total = s.sum(dim=1)
    return torch.where(total > 0, (s * o).sum(dim=1) / total.clamp(min=1e-300), torch.nan)


# ------------------------------------------------------------------------------ maps
def _concepts(
    model: nn.Module, kwargs: dict[str, Any], seed: int, k: int, classes: Sequence[int]
) -> tuple[dict[int, Tensor], ConceptCDAM]:
    """Per class, the mean latent of the first ``k`` single-object images of that class."""
    embed = copy.deepcopy(model)
    if not callable(getattr(embed, "reset_classifier", None)):
        raise TypeError("concept CDAM needs a timm model (reset_classifier) for its latent")
    embed.reset_classifier(0)
    cc = ConceptCDAM(embed)
    single = {**kwargs, "max_objects": 1, "min_objects": 1}
    n = max(64, 8 * k)
    while True:
        pool = shapes(n, seed, **single)
        counts = pool.labels.sum(0)
        if all(counts[c] >= k for c in classes) or n >= 65536:
            break
        n *= 2
    out = {}
    for c in classes:
        idx = torch.nonzero(pool.labels[:, c] > 0.5).squeeze(1)[:k]
        if len(idx) < k:
            raise ValueError(f"fewer than {k} single-object images of class {c} in {n}")
        out[c] = cc.concept_from_examples(pool.images[idx])
    return out, cc


def _concept_grids(
    cc: ConceptCDAM, concepts: dict[int, Tensor], items: ImageSet, batch: int
) -> Tensor:
    """Concept-CDAM grids ``(Np, h, w)``: each pair explained for its class's concept."""
    out = torch.empty(len(items.pi), *items.grid)
    for c, concept in concepts.items():
        sel = torch.nonzero(items.pc == c).squeeze(1)
        for s in chunks(len(sel), batch):
            idx = sel[s]
            g = cc.attribute(items.images[items.pi[idx]], concept, output="grid")
            out[idx] = g[:, 0].detach().float().cpu()
    return out


def _grids(
    model: nn.Module,
    items: ImageSet,
    variant_samples: int,
    concept: tuple[Any, dict[int, Tensor]] | None,
    batch: int,
    progress: bool,
) -> tuple[dict[str, Tensor], dict[str, float]]:
    """Token maps ``(Np, h, w)`` of every analysed method, one per (image, class) pair, and
    the seconds each method took."""
    jobs: list[tuple[str, Callable[[], Tensor]]] = []
    for name in ("cdam", "tam", "relevance", "attention_map"):
        spec = METHODS[name]
        attr = make_method(name, model)
        jobs.append(
            (
                name,
                lambda attr=attr, spec=spec: method_grids(
                    attr, spec.class_agnostic, items.images, items.pi, items.pc, batch
                ),
            )
        )
    for variant in ("smooth", "integrated"):
        attr = CDAM(model, variant=variant, n_samples=variant_samples, seed=0)
        jobs.append(
            (
                f"cdam_{variant}",
                lambda attr=attr: method_grids(
                    attr, False, items.images, items.pi, items.pc, batch
                ),
            )
        )
    if concept is not None:
        cc, concepts = concept
        jobs.append(("cdam_concept", lambda: _concept_grids(cc, concepts, items, batch)))
    out: dict[str, Tensor] = {}
    seconds: dict[str, float] = {}
    for name, fn in tqdm(jobs, desc="maps", leave=False, disable=not progress):
        t = time.perf_counter()
        out[name] = fn().detach().float().cpu()
        seconds[name] = round(time.perf_counter() - t, 2)
    return out, seconds


# ------------------------------------------------------------------------------ analysis
def _summary(v: Tensor | np.ndarray, groups: np.ndarray, n_boot: int, seed: int) -> dict:
    arr = np.asarray(v.cpu() if isinstance(v, Tensor) else v, dtype=np.float64)
    mean, lo, hi = bootstrap_ci(arr, groups, n_boot=n_boot, seed=seed)
    return {"mean": mean, "lo": lo, "hi": hi, "n": int(np.isfinite(arr).sum())}


def _object_tokens(items: ImageSet) -> Tensor:
    """Per pair, the tokens holding any object of its image ``(Np, h, w)``."""
    masks = torch.as_tensor(items.data.masks).bool().any(dim=1)  # (N, H, W)
    grid = to_grid(masks.float(), items.grid, items.patch, reduce="max") > 0
    return grid[items.pi]


def analyse_model(
    name: str,
    n: int,
    seed: int,
    bootstrap: int,
    steps: int,
    variant_samples: int,
    concept_examples: int,
    batch: int = 64,
    progress: bool = True,
) -> dict[str, Any]:
    """The analysis of one zoo model (see the module docstring); JSON-ready dict."""
    start = time.perf_counter()
    model = zoo.load(name)
    info = zoo.info(name)
    kwargs = dict(zoo.data_kwargs(name))
    data = shapes(n, seed, **kwargs)
    score = "softmax" if info.get("task") not in (None, "multilabel") else "sigmoid"
    config = EvalConfig(n=n, seed=seed, bootstrap=bootstrap, steps=steps, batch_size=batch)
    items = ImageSet(model, data, config, score)
    present = sorted(set(items.pc.tolist()))
    notes: list[str] = []
    concept = None
    try:
        concepts, cc = _concepts(model, kwargs, seed + 1, concept_examples, present)
        concept = (cc, concepts)
    except (TypeError, ValueError) as err:
        notes.append(f"concept CDAM skipped: {err}")
    grids, seconds = _grids(model, items, variant_samples, concept, batch, progress)
    groups = items.groups.cpu().numpy()
    g = {k: v.reshape(v.shape[0], -1).double() for k, v in grids.items()}
    objects = _object_tokens(items).reshape(len(items.pi), -1).cpu()

    per_pair: dict[str, dict[str, Tensor]] = {
        "pearson_tam": {
            m: pearson_rows(g[m], g["tam"]) for m in ("cdam", "relevance", "attention_map")
        },
        "pearson_am": {
            m: pearson_rows(g[m], g["attention_map"]) for m in ("cdam", "relevance", "tam")
        },
        "sign_agreement": {
            "all": sign_agreement(g["cdam"], g["tam"]),
            "salient": sign_agreement(g["cdam"], g["tam"], SPARSITY_THRESHOLD),
            "chance": chance_agreement(g["cdam"], g["tam"]),
            "chance_salient": chance_agreement(g["cdam"], g["tam"], SPARSITY_THRESHOLD),
        },
        "sparsity": {m: sparsity_share(v) for m, v in g.items()},
        "object_mass": {m: object_mass(v, objects) for m, v in g.items()},
    }
    quantities = {
        q: {m: _summary(v, groups, bootstrap, 0) for m, v in vals.items()}
        for q, vals in per_pair.items()
    }
    diff = {
        "pearson_tam cdam-relevance": per_pair["pearson_tam"]["cdam"]
        - per_pair["pearson_tam"]["relevance"],
        "pearson_tam cdam-attention_map": per_pair["pearson_tam"]["cdam"]
        - per_pair["pearson_tam"]["attention_map"],
        "pearson_am relevance-cdam": per_pair["pearson_am"]["relevance"]
        - per_pair["pearson_am"]["cdam"],
        "pearson_am relevance-tam": per_pair["pearson_am"]["relevance"]
        - per_pair["pearson_am"]["tam"],
        "sign_agreement all-chance": per_pair["sign_agreement"]["all"]
        - per_pair["sign_agreement"]["chance"],
        "sign_agreement salient-chance_salient": per_pair["sign_agreement"]["salient"]
        - per_pair["sign_agreement"]["chance_salient"],
        **{
            f"sparsity cdam-{m}": per_pair["sparsity"]["cdam"] - per_pair["sparsity"][m]
            for m in ("attention_map", "tam", "relevance")
        },
        "object_mass cdam-attention_map": per_pair["object_mass"]["cdam"]
        - per_pair["object_mass"]["attention_map"],
    }
    differences = {k: _summary(v, groups, bootstrap, 0) for k, v in diff.items()}

    # the standard columns, through the evaluation's metric table
    table = [m for m in IMAGE_TABLE if m.name in METRICS]
    col = Collector(name, labels=dict(MAP_LABELS))
    todo: list[tuple[str, Any]] = [
        (m, (to_pixels(grids[m].to(items.device), items.size, items.patch), grids[m]))
        for m in grids
    ]
    todo += [(b, run()) for b, run in items.baselines().items()]
    for m, raw in tqdm(todo, desc=f"{name}: metrics", leave=False, disable=not progress):
        context = items.context(m, raw, {})
        for metric in table:
            out = metric.values(context)
            if out is not None:
                col.add(m, metric.name, *out)
        col.add(m, "sparsity", sparsity_share(context.maps), items.groups)
    res = col.result(bootstrap, 0, [], {})
    metrics: dict[str, dict[str, Any]] = {}
    for r in res.rows:
        metrics.setdefault(r["method"], {})[r["metric"]] = {
            k: r[k] for k in ("mean", "lo", "hi", "n")
        }
    grid = list(items.grid)
    result = {
        "model": name,
        "family": info.get("family"),
        "training": _training_note(info),
        "data_kwargs": kwargs,
        "seed": seed,
        "concept_seed": seed + 1,
        "concept_examples": concept_examples,
        "variant_samples": variant_samples,
        "n_images": len(items.images),
        "n_pairs": len(items.pi),
        "n_two_object": len(items.pair_a),
        "grid": grid,
        "score": score,
        "steps": steps,
        "bootstrap": bootstrap,
        "quantities": quantities,
        "differences": differences,
        "metrics": metrics,
        "map_seconds": seconds,
        "notes": notes,
        "seconds": round(time.perf_counter() - start, 1),
    }
    result["claims"] = claims(result)
    result["example"] = _example(items, grids)
    return result


def _training_note(info: dict[str, Any]) -> str:
    phases = (info.get("training") or {}).get("phases") or []
    if not phases:
        return "trained end to end (supervised)"
    return "; ".join(
        f"{p.get('name')}: {p.get('objective', '?')}, trainable {p.get('trainable', '?')}"
        for p in phases
    )


def _example(items: ImageSet, grids: dict[str, Tensor]) -> dict[str, Any]:
    """The first two-object image's maps (for the figure): its first class's pair."""
    j = int(items.pair_a[0]) if len(items.pair_a) else 0
    return {
        "pair": j,
        "class": SHAPE_CLASSES[int(items.pc[j])],
        "image": items.inputs[j].cpu().permute(1, 2, 0).clamp(0, 1).tolist(),
        "maps": {m: grids[m][j].tolist() for m in grids},
    }


# ------------------------------------------------------------------------------ claims
def _verdict(d: dict[str, Any] | None) -> str:
    """``yes`` if the difference's interval lies above 0, ``no`` below, else inconclusive."""
    if d is None or d.get("lo") is None or d.get("mean") is None:
        return "n/a"
    lo, hi = d["lo"], d["hi"]
    if any(isinstance(x, float) and math.isnan(x) for x in (lo, hi)):
        return "n/a"
    if lo > 0:
        return "yes"
    if hi < 0:
        return "no"
    return "inconclusive"


def _all(verdicts: Sequence[str]) -> str:
    if "no" in verdicts:
        return "no"
    if "n/a" in verdicts:
        return "n/a"
    if "inconclusive" in verdicts:
        return "inconclusive"
    return "yes"


def _fmt(d: dict[str, Any] | None, signed: bool = True) -> str:
    if (
        d is None
        or d.get("mean") is None
        or (isinstance(d["mean"], float) and math.isnan(d["mean"]))
    ):
        return "—"
    f = "{:+.2f}" if signed else "{:.2f}"
    if d.get("lo") is None or (isinstance(d["lo"], float) and math.isnan(d["lo"])):
        return f.format(d["mean"])
    return f"{f.format(d['mean'])} [{f.format(d['lo'])}, {f.format(d['hi'])}]"


CLAIMS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    (
        "tam_cdam_over_rp",
        "CDAM correlates with TAM more than RP does",
        ("pearson_tam cdam-relevance",),
    ),
    (
        "tam_cdam_over_am",
        "CDAM correlates with TAM more than AM does",
        ("pearson_tam cdam-attention_map",),
    ),
    (
        "am_rp_most",
        "of CDAM, RP and TAM, RP correlates most with AM",
        ("pearson_am relevance-cdam", "pearson_am relevance-tam"),
    ),
    (
        "signs_agree",
        "CDAM and TAM agree on signs (beyond the chance level of their sign balance)",
        ("sign_agreement all-chance",),
    ),
    (
        "cdam_sparsest",
        "CDAM is sparser than AM, TAM and RP",
        ("sparsity cdam-attention_map", "sparsity cdam-tam", "sparsity cdam-relevance"),
    ),
    (
        "inherits_segmentation",
        "CDAM inherits AM's object segmentation (CDAM's absolute values put no less of their "
        "mass on the objects than AM)",
        ("object_mass cdam-attention_map",),
    ),
)
"""The paper's claims: (key, statement, the paired differences that must all be > 0)."""


def claims(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Each of the paper's claims (:data:`CLAIMS`) checked on one model's numbers.

    A claim holds (``"yes"``) when every difference it names has a paired bootstrap interval
    above 0; ``"no"`` when one lies below 0, except for the segmentation claim, which asks
    only that CDAM is not worse: ``"no"`` when its interval lies below 0, ``"yes"`` otherwise;
    ``"inconclusive"`` when an interval holds 0; ``"n/a"`` when a difference is missing.

    Args:
        result: One model's result (``analyse_model``); only ``result["differences"]`` is read:
            ``{name: {"mean", "lo", "hi"}}``.

    Returns:
        ``[{"key", "claim", "verdict", "evidence"}]`` in :data:`CLAIMS` order.
    """
    diffs = result.get("differences") or {}
    out = []
    for key, statement, names in CLAIMS:
        verdicts = [_verdict(diffs.get(n)) for n in names]
        if key == "inherits_segmentation":
            verdicts = ["yes" if v == "inconclusive" else v for v in verdicts]
        evidence = "; ".join(f"{n.replace(' ', ': ')} = {_fmt(diffs.get(n))}" for n in names)
        out.append(
            {"key": key, "claim": statement, "verdict": _all(verdicts), "evidence": evidence}
        )
    return out


# ------------------------------------------------------------------------------ output
def _cell(d: dict[str, Any] | None) -> str:
    if (
        d is None
        or d.get("mean") is None
        or (isinstance(d["mean"], float) and math.isnan(d["mean"]))
    ):
        return "—"
    if d.get("lo") is None or (isinstance(d["lo"], float) and math.isnan(d["lo"])):
        return f"{d['mean']:.3f}"
    return f"{d['mean']:.3f} [{d['lo']:.3f}, {d['hi']:.3f}]"


def _paper_cell(v: float | None) -> str:
    return "not found" if v is None else f"{v:.2f}"


def markdown_section(result: dict[str, Any], level: int = 2) -> str:
    """The analysis as a markdown section (for ``report.md`` and ``paper_analysis.md``).

    Args:
        result: What :func:`run` returns (``{"paper", "models", "run"}``).
        level: Heading level of the section.

    Returns:
        The section: the paper table (quantity, the paper's value, each model), the standard
        metrics of every map, and per model the list "the paper's claim → holds here?",
        generated from the numbers.
    """
    h = "#" * level
    models = result["models"]
    names = [m["model"] for m in models]
    lines = [
        f"{h} The CDAM paper's analysis\n",
        f"Paper: {result.get('paper_source', PAPER_SOURCE)}\n",
    ]
    for m in models:
        grid = "×".join(str(x) for x in m["grid"])
        lines.append(
            f"- `{m['model']}` ({m['training']}): {m['n_images']} fresh images (seed "
            f"{m['seed']}; {m['n_pairs']} image–class maps, {m['n_two_object']} two-object "
            f"images), {grid} tokens, data {m['data_kwargs']}; smooth / integrated CDAM with "
            f"{m['variant_samples']} samples, concept CDAM from {m['concept_examples']} "
            f"single-object images per class (seed {m['concept_seed']}); {m['seconds']:.0f} s."
        )
    lines.append(
        "\nCells: mean [95 % percentile bootstrap interval over images]. r: Pearson correlation "
        "over the tokens of one map (one per image and class). Sign agreement: share of "
        "tokens where CDAM and TAM have the same sign, among those both maps count; chance "
        "level: the agreement of independent signs with the same shares of positive tokens. "
        "Sparsity: share of tokens below 5 % of the map's max |value|. Object mass: share of "
        "|map| on the tokens of any object of the image (class-agnostic segmentation).\n"
    )
    lines.append("| quantity | paper (ImageNet, DINO ViT-S/8) | " + " | ".join(names) + " |")
    lines.append("|---|---|" + "---|" * len(names))
    for q, key, label in ROWS:
        paper = PAPER.get(q, {}).get(key)
        cells = [_cell(m["quantities"].get(q, {}).get(key)) for m in models]
        lines.append(f"| {label} | {_paper_cell(paper)} | " + " | ".join(cells) + " |")
    lines.append("")
    heads = [
        "pointing (15 px @224) ↑",
        "mass acc. ↑",
        "D ↑",
        "deletion ↓",
        "insertion ↑",
        "sparsity",
    ]
    keys = [*METRICS, "sparsity"]
    for m in models:
        lines.append(f"{h}# `{m['model']}`: standard metrics\n")
        lines.append("| map | " + " | ".join(heads) + " |")
        lines.append("|---|" + "---|" * len(heads))
        for meth, vals in m["metrics"].items():
            cells = [_cell(vals.get(k)) for k in keys]
            lines.append(f"| {MAP_LABELS.get(meth, meth)} | " + " | ".join(cells) + " |")
        lines.append("")
        lines.append(
            f"The paper's claims on `{m['model']}` (from the numbers above; a claim "
            "holds when the paired bootstrap interval of each difference lies above 0):\n"
        )
        for c in m["claims"]:
            lines.append(f"- {c['claim']} → **{c['verdict']}** ({c['evidence']})")
        for note in m.get("notes") or []:
            lines.append(f"- note: {note}")
        lines.append("")
    return "\n".join(lines)


def figure(result: dict[str, Any], path: Path) -> Path:
    """Example maps of one image per model (a row each) and the correlations / sparsities next
    to the paper's values. Signed maps (CDAM, TAM): diverging, white = 0, ±max|map| per map;
    non-negative maps (AM, RP): white = 0 to max per map; one colour bar per map."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from captum_ext.viz import cmap_for

    order = (
        "attention_map",
        "tam",
        "relevance",
        "cdam",
        "cdam_smooth",
        "cdam_integrated",
        "cdam_concept",
    )
    models = result["models"]
    n_cols = 1 + max(sum(m in model["example"]["maps"] for m in order) for model in models)
    fig = plt.figure(figsize=(2.0 * n_cols, 2.6 * len(models) + 3.6))
    gs = fig.add_gridspec(
        len(models) + 1, n_cols, height_ratios=[1.0] * len(models) + [1.1], hspace=0.6
    )
    for row, model in enumerate(models):
        ex = model["example"]
        image = ex.get("image")
        if image is None:  # a result read back from JSON: the image is rendered again
            image = _example_image(model)
        ax = fig.add_subplot(gs[row, 0])
        ax.imshow(np.asarray(image), interpolation="nearest")
        ax.set_title(f"{model['model']}\nimage (class {ex['class']})", fontsize=8)
        ax.axis("off")
        panels = [m for m in order if m in ex["maps"]]
        for i, m in enumerate(panels):
            signed = m not in ("attention_map", "relevance")
            a = fig.add_subplot(gs[row, i + 1])
            v = np.asarray(ex["maps"][m])
            lim = float(np.abs(v).max()) or 1.0
            im = a.imshow(
                v,
                cmap=cmap_for(signed),
                vmin=-lim if signed else 0.0,
                vmax=lim,
                interpolation="nearest",
            )
            a.set_title(MAP_LABELS[m], fontsize=8)
            a.axis("off")
            bar = fig.colorbar(im, ax=a, orientation="horizontal", fraction=0.06, pad=0.04)
            bar.ax.tick_params(labelsize=6)
            unit = METHODS[m].unit if m in METHODS else METHODS["cdam"].unit
            if m == "cdam_concept":
                unit = "similarity × activation"
            bar.set_label(unit, fontsize=6)
    # bars: the paper table's r and sparsity rows
    rows = [r for r in ROWS if r[0] in ("pearson_tam", "pearson_am", "sparsity")]
    ax = fig.add_subplot(gs[len(models), :])
    series = [("paper", [PAPER[q].get(k) for q, k, _ in rows], None)]
    series += [
        (
            m["model"],
            [m["quantities"][q][k]["mean"] for q, k, _ in rows],
            [(m["quantities"][q][k]["lo"], m["quantities"][q][k]["hi"]) for q, k, _ in rows],
        )
        for m in result["models"]
    ]
    width = 0.8 / len(series)
    x = np.arange(len(rows))
    for s, (label, vals, ci) in enumerate(series):
        xs = x + (s - (len(series) - 1) / 2) * width
        v = np.array([np.nan if u is None else u for u in vals], dtype=float)
        err = None
        if ci is not None:
            lo = np.array([np.nan if c[0] is None else c[0] for c in ci], dtype=float)
            hi = np.array([np.nan if c[1] is None else c[1] for c in ci], dtype=float)
            err = np.vstack([np.clip(v - lo, 0, None), np.clip(hi - v, 0, None)])
        ax.bar(
            xs,
            v,
            width,
            yerr=err,
            label=label,
            capsize=2,
            hatch="//" if label == "paper" else None,
            color="white" if label == "paper" else None,
            edgecolor="black",
            linewidth=0.5,
        )
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set_xticks(x)
    ax.set_xticklabels([lab for _, _, lab in rows], rotation=20, fontsize=7, ha="right")
    ax.set_ylabel("mean over maps (95 % CI)", fontsize=8)
    ax.legend(fontsize=7, ncol=len(series))
    ax.set_title(
        "correlations and sparsity: paper (hatched; missing = not found) and each model", fontsize=8
    )
    fig.suptitle(
        "Maps of one image per model on its token grid. Signed maps (TAM, CDAM variants): "
        "green = for the class, red = against, white = 0, ±max|map|; AM, RP: white = 0 to "
        "max. One colour bar per map.",
        fontsize=8,
    )
    fig.savefig(path, dpi=130, bbox_inches="tight")
    plt.close(fig)
    return path


def _example_image(model_result: dict[str, Any]) -> list:
    """The example's image ``(H, W, 3)`` rendered again from the model's data settings."""
    m = model_result
    data = shapes(m["n_images"], m["seed"], **m["data_kwargs"])
    pi, _ = torch.nonzero(torch.as_tensor(data.labels) > 0.5, as_tuple=True)
    img = data.images[pi[m["example"]["pair"]]]
    return img.permute(1, 2, 0).clamp(0, 1).tolist()


def _finite(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_finite(v) for v in x]
    return x


def without_example(model_result: dict[str, Any]) -> dict[str, Any]:
    """One model's result without its example maps and image (what ``report.json`` keeps)."""
    return {k: v for k, v in model_result.items() if k != "example"}


def _json_ready(result: dict[str, Any]) -> dict[str, Any]:
    """The result as ``paper_analysis.json`` holds it: the example's maps, not its image."""
    models = [
        {**m, "example": {k: v for k, v in m["example"].items() if k != "image"}}
        if "example" in m
        else m
        for m in result["models"]
    ]
    return _finite({**result, "models": models})


def default_models() -> list[str]:
    """The fine-grid models the zoo has (:data:`FINE_MODELS`), else :data:`FALLBACK_MODELS`."""
    available = zoo.available()
    fine = [m for m in FINE_MODELS if m in available]
    return fine or list(FALLBACK_MODELS)


def run(
    models: Sequence[str] | None = None,
    n: int = 512,
    seed: int = SEED,
    bootstrap: int = 1000,
    steps: int = 16,
    variant_samples: int = 32,
    concept_examples: int = 8,
    progress: bool = True,
) -> dict[str, Any]:
    """The analysis of every model: ``{"paper", "paper_source", "models": [...], "run"}``.

    Raises:
        ValueError: A model that is not in the zoo, or not an image ViT.
    """
    models = list(models) if models else default_models()
    available = zoo.available()
    for m in models:
        if m not in available:
            raise ValueError(f"zoo model {m!r} not found; available: {', '.join(available)}")
        if zoo.info(m).get("family") != "vit":
            raise ValueError(f"{m!r} is not a ViT; the analysis needs AM, TAM and RP (ViTs only)")
    t0 = time.perf_counter()
    out = [
        analyse_model(
            m, n, seed, bootstrap, steps, variant_samples, concept_examples, progress=progress
        )
        for m in tqdm(models, desc="models", disable=not progress)
    ]
    return {
        "paper": PAPER,
        "paper_source": PAPER_SOURCE,
        "models": out,
        "run": {
            "seconds": round(time.perf_counter() - t0, 1),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "machine": platform.machine(),
            "device": "cpu",
        },
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--models",
        nargs="*",
        default=None,
        help=f"zoo names (default: those of {', '.join(FINE_MODELS)} present, else "
        f"{', '.join(FALLBACK_MODELS)})",
    )
    p.add_argument("--n", type=int, default=512, help="fresh images per model")
    p.add_argument("--seed", type=int, default=SEED, help="seed of the fresh images")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples")
    p.add_argument("--steps", type=int, default=16, help="RISE deletion / insertion steps")
    p.add_argument("--samples", type=int, default=32, help="smooth / integrated CDAM samples")
    p.add_argument("--concept-examples", type=int, default=8)
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 16 images, 100 resamples, 8 steps, 4 samples",
    )
    p.add_argument("--out", default="benchmarks/results", help="output folder")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument(
        "--from-json",
        metavar="PATH",
        help="re-render the markdown and figure of a written run (with this script's paper "
        "values and source), without computing",
    )
    p.add_argument(
        "--merge",
        nargs="+",
        metavar="PATH",
        help="combine written runs of different models (same seed and n) into one "
        "paper_analysis.{md,json,png} in --out, without computing",
    )
    args = p.parse_args(argv)
    if args.from_json:
        path = Path(args.from_json)
        result = load_result(path)
        write_outputs(result, path.parent, path.stem)
        return result
    if args.merge:
        try:
            result = merge_results([load_result(Path(f)) for f in args.merge])
        except (OSError, ValueError) as err:
            sys.exit(f"paper_analysis: --merge: {err}")
        write_outputs(result, Path(args.out), "paper_analysis")
        return result
    torch.set_num_threads(args.threads)
    if args.quick:
        args.n, args.bootstrap, args.steps, args.samples = 16, 100, 8, 4
    try:
        result = run(
            args.models,
            args.n,
            args.seed,
            args.bootstrap,
            args.steps,
            args.samples,
            args.concept_examples,
            progress=not args.no_progress,
        )
    except ValueError as err:
        sys.exit(f"paper_analysis: {err}")
    argv_s = " ".join(sys.argv[1:] if argv is None else argv)
    result["run"]["command"] = f"python benchmarks/paper_analysis.py {argv_s}".rstrip()
    stem = "paper_analysis_quick" if args.quick else "paper_analysis"
    write_outputs(result, Path(args.out), stem)
    print(markdown_section(result))
    return result


def load_result(path: Path) -> dict[str, Any]:
    """A written run (``paper_analysis.json``) with this script's paper values and source.

    Raises:
        ValueError: The file is not JSON or lacks the run's ``models`` or ``run``.
    """
    stored = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(stored, dict) or not {"models", "run"} <= stored.keys():
        raise ValueError(f"{path}: no 'models' and 'run' of a paper_analysis.py run")
    return {**stored, "paper": PAPER, "paper_source": PAPER_SOURCE}


def merge_results(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One result from runs of different models: the models in order, the runs' commands
    listed, their times summed.

    Raises:
        ValueError: A model is in more than one run, or the runs differ in seed or images.
    """
    models = [m for r in results for m in r["models"]]
    names = [m["model"] for m in models]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"model(s) {', '.join(twice)} in more than one run")
    setups = {(m["seed"], m["n_images"]) for m in models}
    if len(setups) > 1:
        raise ValueError(f"runs differ in (seed, images): {sorted(setups)}")
    runs = [r["run"] for r in results]
    threads = sorted({str(r["threads"]) for r in runs})
    return {
        "paper": PAPER,
        "paper_source": PAPER_SOURCE,
        "models": models,
        "run": {
            **runs[0],
            "seconds": round(sum(r["seconds"] for r in runs), 1),
            "threads": "/".join(threads),
            "commands": [c for r in runs for c in run_commands(r)],
        },
    }


def run_commands(run: dict[str, Any]) -> list[str]:
    """The command(s) that computed a result (several after :func:`merge_results`)."""
    return list(run.get("commands") or [run["command"]])


def commands_markdown(run: dict[str, Any]) -> str:
    """The run's command(s) as markdown code spans, ``HF_HUB_OFFLINE=1`` set."""
    return " + ".join(f"`HF_HUB_OFFLINE=1 {c}`" for c in run_commands(run))


def write_outputs(result: dict[str, Any], out: Path, stem: str) -> None:
    """Writes ``stem.md``, ``stem.json`` and ``stem.png`` into ``out`` (created if needed)."""
    out.mkdir(parents=True, exist_ok=True)
    header = (
        f"# The CDAM paper's analysis on the zoo's ViTs\n\nCommand: "
        f"{commands_markdown(result['run'])}  \nRun time: {result['run']['seconds']:.0f} s, CPU, "
        f"{result['run']['threads']} thread(s), torch {result['run']['torch']}, "
        f"{result['run']['machine']}. Figure: `{stem}.png`.\n\n"
    )
    (out / f"{stem}.md").write_text(header + markdown_section(result) + "\n")
    text = json.dumps(_json_ready(result), indent=1, ensure_ascii=False, allow_nan=False)
    (out / f"{stem}.json").write_text(text + "\n")
    figure(result, out / f"{stem}.png")


if __name__ == "__main__":
    main()
