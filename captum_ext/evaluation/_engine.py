"""The evaluation loop: models one after another, maps one after another, the metric table."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from captum_ext._scores import progress
from captum_ext.data import ShapesBatch, TextBatch, shapes, text_rationales
from captum_ext.errors import UnsupportedModelError
from captum_ext.registry import MethodSpec, make_method, method_spec

from ._baselines import BASELINE_LABELS
from ._config import EvalConfig
from ._images import ImageSet
from ._result import Collector, EvalResult
from ._table import _and, missing_notes
from ._text import TextSet
from ._trained import TRAINED, zoo_explainers

__all__ = ["evaluate"]


@dataclass
class _Subject:
    """A model to evaluate, with its held-out data, name, RISE score, known facts and the
    trained explainers fitted to it (``{name: (spec, explainer)}``)."""

    model: nn.Module
    data: Any
    label: str
    score: str
    meta: dict[str, Any]
    explainers: dict[str, tuple[MethodSpec, Any]] = field(default_factory=dict)


def _zoo() -> Any:
    from captum_ext import zoo

    return zoo


def _from_zoo(name: str, data: Any, label: str | None, config: EvalConfig) -> _Subject:
    zoo = _zoo()
    model = zoo.load(name, device=config.device)
    info = dict(zoo.info(name))
    kwargs = dict(zoo.data_kwargs(name))
    meta: dict[str, Any] = {
        "seed": config.seed,
        "data_kwargs": kwargs,
        "family": info.get("family"),
    }
    heldout = info.get("heldout") or {}
    if heldout.get("accuracy") is not None:
        meta["heldout_accuracy"] = heldout["accuracy"]
        meta["heldout"] = {
            "accuracy": heldout["accuracy"],
            "metric": heldout.get("metric", "accuracy"),
            "n": heldout.get("n"),
            "seed": heldout.get("seed"),
            "benchmark": (info.get("data") or {}).get("generator"),
        }
    score = config.score
    if info.get("task") not in (None, "multilabel"):
        score = "softmax"  # single-label zoo model: RISE on class probabilities
    if data is None:
        maker = text_rationales if info.get("modality") == "text" else shapes
        data = maker(config.n, config.seed, **kwargs)
    explainers = zoo_explainers(name, config.explainers, config.device)
    return _Subject(model, data, label or name, score, meta, explainers)


def _subject(target: Any, data: Any, label: str | None, config: EvalConfig) -> _Subject:
    """Loads a zoo name, or checks a module or a ``(module, data)`` pair."""
    if isinstance(target, str):
        return _from_zoo(target, data, label, config)
    model = target
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
    model = model.to(config.device).eval()
    return _Subject(model, data, label or type(model).__name__, config.score, {"seed": config.seed})


def _items(subject: _Subject, config: EvalConfig) -> ImageSet | TextSet:
    data = subject.data
    if isinstance(data, TextBatch) or hasattr(data, "input_ids"):
        return TextSet(subject.model, data, config)
    if hasattr(data, "images") and hasattr(data, "masks"):
        return ImageSet(subject.model, data, config, subject.score)
    raise ValueError(
        f"data must be a ShapesBatch (images, labels, masks) or a TextBatch; "
        f"got {type(data).__name__}"
    )


def _build_methods(
    model: nn.Module, names: Sequence[str], notes: list[str]
) -> list[tuple[str, Any, MethodSpec]]:
    """``(name, attribution, spec)`` of every method (or Captum reference) that supports
    the model."""
    built, skipped, reason = [], [], ""
    for name in names:
        spec = method_spec(name)
        try:
            attr = make_method(name, model)
        except UnsupportedModelError as err:
            skipped.append(spec.label)
            reason = reason or str(err)
            continue
        built.append((name, attr, spec))
    if skipped:
        notes.append(f"Skipped {', '.join(skipped)}: the model is not supported ({reason})")
    return built


def _score(
    items: ImageSet | TextSet,
    label: str,
    config: EvalConfig,
    notes: list[str],
    explainers: dict[str, tuple[MethodSpec, Any]],
) -> tuple[Collector, dict[str, Any]]:
    """Every map of the set (methods, trained explainers, baselines, custom maps) through the
    metric table."""
    table = [m for m in items.table if config.wants(m.name)]
    refs = {m.reference for m in items.table if m.reference}
    methods = sorted(config.method_names, key=lambda m: m not in refs)  # references first
    todo: list[tuple[str, str, Callable[[], Any]]] = [
        (
            name,
            spec.label,
            # references give pixel maps (no patch grid): read like custom maps
            items.extra_map(name, attr.attribute)
            if spec.reference
            else items.method_map(attr, spec.class_agnostic),
        )
        for name, attr, spec in _build_methods(items.model, methods, notes)
    ]
    todo += [
        (n, spec.label, items.trained_map(n, explainer))
        for n, (spec, explainer) in explainers.items()
        if isinstance(items, ImageSet)
    ]
    todo += [(n, BASELINE_LABELS[n], run) for n, run in items.baselines().items()]
    notes.extend(items.baseline_notes)
    todo += [(n, n, items.extra_map(n, fn)) for n, fn in config.extra_maps.items()]
    col = Collector(label, labels={name: shown for name, shown, _ in todo})
    references: dict[str, Tensor] = {}
    for name, _, run in progress(todo, config.show_progress, f"{label}: methods", leave=False):
        context = items.context(name, run(), references)
        if name in refs:
            references[name] = context.maps
        for metric in table:
            out = metric.values(context)
            if out is not None:
                col.add(name, metric.name, *out)
    masks = getattr(items, "masks", None) is not None
    notes.extend(missing_notes(table, col.has, masks))
    notes.extend(_absent_explainers(config, explainers, isinstance(items, ImageSet)))
    return col, items.meta([name for name, _, _ in todo])


def _absent_explainers(
    config: EvalConfig, explainers: dict[str, tuple[MethodSpec, Any]], image: bool
) -> list[str]:
    """A note on the trained explainers named in ``config.explainers`` that were not
    evaluated (none of the default set, which takes those the zoo ships)."""
    named = [TRAINED[k].label for k in config.explainers or ()]
    if not named:
        return []
    if not image:
        return [f"{_and(named)} not evaluated: trained explainers are scored on image models."]
    absent = [TRAINED[k].label for k in config.explainers or () if k not in explainers]
    if not absent:
        return []
    return [f"{_and(absent)} not evaluated: the zoo ships none fitted to this model."]


def benchmark_part(meta: dict[str, Any]) -> str | None:
    """The summary's statement of the zoo's record of the model's held-out accuracy, on the
    zoo's own benchmark (never on other data), or ``None`` when there is no record.

    Example: ``"vit; zoo record: exact-set accuracy 0.996 on 2048 held-out images of its
    shapes benchmark (seed 424242), not measured in this run"``.
    """
    record = meta.get("heldout")
    if not record:
        return None
    metric = "exact-set accuracy" if record.get("metric") == "set_accuracy" else "accuracy"
    generator = record.get("benchmark")
    unit = "sequences" if generator == "text_rationales" else "images"
    count = f"{record['n']} " if record.get("n") else ""
    seed = f" (seed {record['seed']})" if record.get("seed") is not None else ""
    return (
        f"{meta.get('family') or 'model'}; zoo record: {metric} {record['accuracy']:.3f} on "
        f"{count}held-out {unit} of its {generator or 'training'} benchmark{seed}, "
        "not measured in this run"
    )


def _evaluate_one(subject: _Subject, config: EvalConfig) -> EvalResult:
    notes: list[str] = []
    start = time.perf_counter()
    items = _items(subject, config)
    col, m = _score(items, subject.label, config, notes, subject.explainers)
    meta = {**subject.meta, **m, "seconds": round(time.perf_counter() - start, 2)}
    unit = "sequences" if meta["modality"] == "text" else "images"
    b = config.bootstrap
    ci = [f"95 % percentile bootstrap over {unit} ({b} resamples)"] if b else []
    parts = [*meta.pop("summary_parts"), f"seed {config.seed}", *ci]
    record = benchmark_part(meta)
    if record:
        parts.insert(0, record)
    meta["summary"] = "; ".join(parts) + "."
    return col.result(b, config.bootstrap_seed, notes, meta)


def evaluate(
    model_or_name: str | nn.Module | tuple[nn.Module, Any] | Sequence[str],
    methods: Sequence[str] | None = None,
    *,
    config: EvalConfig | None = None,
    data: ShapesBatch | TextBatch | None = None,
    name: str | None = None,
    **settings: Any,
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
        methods: Registry names (:data:`captum_ext.registry.METHODS`, or the Captum references
            ``"gradcam"`` / ``"ig"`` of :data:`captum_ext.registry.REFERENCES`, which explain
            CNNs); ``None`` = those of ``config`` (by default every method of ``METHODS``).
        config: The settings (:class:`EvalConfig`); default ``EvalConfig()``.
        data: A ``ShapesBatch`` (``.images`` ``(N, 3, H, W)``, ``.labels`` ``(N, K)``,
            ``.masks`` ``(N, K, H, W)``) or a ``TextBatch``; overrides the generated set (of
            every model, for a list of names).
        name: Model name in the result (default: the zoo name or the class name); ignored for
            a list of zoo names.
        **settings: Any field of :class:`EvalConfig` (``n``, ``seed``, ``device``,
            ``bootstrap``, ``show_progress``, ``metrics``, ``extra_maps``, ``resolution``,
            ``steps``, ``score``, ``batch_size``, ``bootstrap_seed``), applied over ``config``.

    Returns:
        The :class:`EvalResult`, one table per model.

    Raises:
        ValueError: Unknown method or metric name, a model without data, or data of the
            wrong kind.
        TypeError: An unknown setting, or something that is not a model.
    """
    if methods is not None:
        settings["methods"] = methods
    cfg = (config or EvalConfig()).replace(**settings)
    names = isinstance(model_or_name, list | tuple) and all(
        isinstance(m, str) for m in model_or_name
    )
    jobs = [(m, None) for m in model_or_name] if names else [(model_or_name, name)]
    result = EvalResult()
    for target, label in progress(jobs, cfg.show_progress and names, "models", leave=False):
        result = result + _evaluate_one(_subject(target, data, label, cfg), cfg)
    return result
