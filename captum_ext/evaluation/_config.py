"""The settings of an evaluation, validated in one place."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch

from captum_ext.registry import METHODS, REFERENCES

from ._baselines import BASELINES
from ._maps import MapFn
from ._table import IMAGE_METRICS, OPTIONAL_METRICS, TEXT_METRICS
from ._trained import TRAINED

__all__ = ["DEFAULT_SEED", "EvalConfig"]

DEFAULT_SEED = 20261122
"""Seed of the held-out evaluation data; never used to train the zoo models."""

_SCORES = ("sigmoid", "softmax", "logit")


def _names(value: Sequence[str] | None) -> tuple[str, ...] | None:
    if value is None:
        return None
    return (value,) if isinstance(value, str) else tuple(value)


@dataclass(frozen=True)
class EvalConfig:
    """How to evaluate: every setting of :func:`~captum_ext.evaluation.evaluate` but the model.

    Build one and reuse it across models, or pass single settings to ``evaluate`` as keywords;
    :meth:`replace` returns a copy with some settings changed. Values are checked when the
    config is made; ``methods`` and ``metrics`` are kept as tuples (a single name is fine) and
    ``extra_maps`` as a read-only mapping.

    Attributes:
        methods: Registry names (:data:`captum_ext.registry.METHODS`, and the Captum
            references of :data:`captum_ext.registry.REFERENCES`, ``"gradcam"`` and ``"ig"``,
            which run only when named); ``None`` = every method of ``METHODS``.
            Methods that do not support a model (e.g. transformer methods on a CNN, the
            references on a transformer) are skipped with a note.
        metrics: Metric names to compute (a subset of :data:`IMAGE_METRICS` +
            :data:`TEXT_METRICS`); ``None`` = all that apply but the slow ones
            (:data:`~captum_ext.evaluation.OPTIONAL_METRICS`: ROAD), which run only when named.
        explainers: Trained explainer kinds (:data:`~captum_ext.evaluation.TRAINED`, e.g.
            ``"ttame"``, ``"mhex"``) evaluated next to the methods where the zoo ships one fitted to
            the evaluated zoo model (``NAME-ttame``, ``NAME-mhex``); ``None`` = every kind,
            ``()`` = none.
        n: Number of held-out images / sequences generated for a zoo model.
        seed: Seed of the held-out data (never used in training) and of the random baseline.
        device: Device of the model and data.
        bootstrap: Bootstrap resamples; ``0`` skips the intervals.
        bootstrap_seed: Seed of the bootstrap resampling.
        resolution: ``"grid"`` (localisation, sparsity, ``D`` and correlation on the model's
            patch grid; see :mod:`captum_ext.evaluation`) or ``"pixel"``. The standard
            pointing game (``pointing_game``) is read in pixels either way.
        steps: Steps of the deletion / insertion curves.
        score: Class score of the RISE curves: ``"sigmoid"`` (multi-label models),
            ``"softmax"`` or ``"logit"``; zoo models whose record says they are not
            multi-label use ``"softmax"``. Text metrics always use softmax probabilities.
        batch_size: Images (or pairs) per attribution call.
        show_progress: tqdm progress bars over models and methods.
        extra_maps: Custom maps by name, ``fn(inputs, targets) -> maps`` (see :data:`MapFn`),
            called on chunks of (image, class) pairs; evaluated like a method.

    Raises:
        ValueError: An unknown method or metric, an ``extra_maps`` name that clashes with a
            method or baseline, or a value out of range.
    """

    methods: Sequence[str] | None = None
    metrics: Sequence[str] | None = None
    explainers: Sequence[str] | None = None
    n: int = 64
    seed: int = DEFAULT_SEED
    device: str | torch.device = "cpu"
    bootstrap: int = 1000
    bootstrap_seed: int = 0
    resolution: str = "grid"
    steps: int = 16
    score: str = "sigmoid"
    batch_size: int = 64
    show_progress: bool = False
    extra_maps: Mapping[str, MapFn] = field(default_factory=dict)

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # the dataclass is frozen: normalise once, here
        set_(self, "methods", _names(self.methods))
        set_(self, "metrics", _names(self.metrics))
        set_(self, "explainers", _names(self.explainers))
        set_(self, "extra_maps", MappingProxyType(dict(self.extra_maps or {})))
        if self.resolution not in ("grid", "pixel"):
            raise ValueError(f"resolution must be 'grid' or 'pixel', got {self.resolution!r}")
        if self.score not in _SCORES:
            raise ValueError(f"score must be one of {_SCORES}, got {self.score!r}")
        for name, least in (("n", 1), ("steps", 1), ("batch_size", 1), ("bootstrap", 0)):
            if getattr(self, name) < least:
                raise ValueError(f"{name} must be >= {least}, got {getattr(self, name)}")
        unknown = [m for m in self.methods or () if m not in METHODS and m not in REFERENCES]
        if unknown:
            raise ValueError(
                f"unknown method(s) {unknown}; available: {', '.join([*METHODS, *REFERENCES])}"
            )
        unknown = [e for e in self.explainers or () if e not in TRAINED]
        if unknown:
            raise ValueError(
                f"unknown trained explainer(s) {unknown}; available: {', '.join(TRAINED)}"
            )
        clash = [
            k
            for k in self.extra_maps
            if k in METHODS or k in REFERENCES or k in BASELINES or k in TRAINED
        ]
        if clash:
            raise ValueError(
                f"extra_maps names {clash} clash with methods or baselines; rename them"
            )
        bad = [m for m in self.metrics or () if m not in IMAGE_METRICS + TEXT_METRICS]
        if bad:
            raise ValueError(
                f"unknown metric(s) {bad}; image metrics: {list(IMAGE_METRICS)}, "
                f"text metrics: {list(TEXT_METRICS)}"
            )

    def replace(self, **changes: Any) -> EvalConfig:
        """A copy with ``changes`` applied (and checked again).

        Raises:
            TypeError: A name that is not a setting.
        """
        names = [f.name for f in dataclasses.fields(self)]
        unknown = sorted(set(changes) - set(names))
        if unknown:
            raise TypeError(f"unknown evaluation setting(s) {unknown}; settings: {names}")
        return dataclasses.replace(self, **changes) if changes else self

    @property
    def method_names(self) -> list[str]:
        """The methods to run: :attr:`methods`, or every registered method."""
        return list(METHODS) if self.methods is None else list(self.methods)

    def wants(self, metric: str) -> bool:
        """Whether ``metric`` is to be computed (where it applies)."""
        if self.metrics is None:
            return metric not in OPTIONAL_METRICS
        return metric in self.metrics
