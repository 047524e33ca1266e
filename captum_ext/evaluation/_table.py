"""The metric table: one entry per evaluation metric, computed from a per-map context.

Every entry names the :data:`captum_ext.metrics.METRICS` function that computes it and how to
call it on one map of one model's held-out set (:class:`MapContext`). Direction and category
come from the registry's :class:`~captum_ext.metrics.MetricInfo`; ``pearson_tam`` is derived
(the registry's ``pearson`` against TAM's map), so its entry states its own direction.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from captum_ext.metrics import (
    METRICS,
    ROAD_TTAME_PERCENTAGES,
    STANDARD_TOLERANCE_PX,
    STANDARD_TOLERANCE_SIZE,
    TTAME_KEEP,
    peak_offset,
)

__all__ = [
    "IMAGE_METRICS",
    "IMAGE_TABLE",
    "NO_MASKS",
    "OPTIONAL_METRICS",
    "POINTING_GRID",
    "POINTING_STANDARD",
    "TEXT_METRICS",
    "TEXT_TABLE",
    "EvalMetric",
    "MapContext",
    "direction",
    "missing_notes",
    "short_name",
]


@dataclass(frozen=True)
class MapContext:
    """What a metric may read about one map of one model's held-out set.

    Attributes:
        name: The method, baseline or custom map.
        maps: The maps at the evaluation resolution: images ``(Np, h, w)`` on the patch grid or
            ``(Np, H, W)`` in pixels, one per (image, class) pair; text ``(N, T)``.
        pixels: Images: the maps ``(Np, H, W)`` in pixels (what RISE perturbs); text: ``maps``.
        point_pixels: Images: the maps in pixels as the pixel-level localisation columns
            (standard pointing game, peak offset) read them: a map given on a vision
            transformer's token grid upsampled bilinearly (``align_corners=False``, token
            centres at patch centres), as T-TAME and Captum's GradCAM upsample their own maps
            and as the literature's pointing-game code upsamples token maps; any other map as
            ``pixels``. Text: ``maps``.
        items: The held-out set as the metrics read it (``ImageSet`` or ``TextSet``: model,
            inputs, targets, masks or rationales, and ``groups``, the image or sequence each
            value belongs to).
        references: Maps of earlier methods that entries compare against, by method name.
    """

    name: str
    maps: Tensor
    pixels: Tensor
    items: Any
    references: Mapping[str, Tensor]
    point_pixels: Tensor | None = None

    def __post_init__(self) -> None:
        if self.point_pixels is None:
            object.__setattr__(self, "point_pixels", self.pixels)


Values = tuple[Tensor, Tensor] | None
"""Per-item values ``(M,)`` and the group (image) of each, or ``None`` when not defined."""


@dataclass(frozen=True)
class EvalMetric:
    """One evaluation metric: a column of the result table.

    Attributes:
        name: Column name in :class:`~captum_ext.evaluation.EvalResult` rows.
        short: Header in the markdown table.
        fn: The :data:`~captum_ext.metrics.METRICS` function that computes it.
        compute: ``compute(fn, context) -> (values, groups) | None``.
        higher_is_better: Better direction; ``None`` when it depends on the use.
        category: Category of the registry entry.
        reference: A method whose maps this metric compares against (evaluated first).
        missing: Why the metric has no value when it was asked for but is defined for no map
            (a reason only, e.g. ``"no image with two objects"``; :func:`missing_notes`
            names the metrics).
        needs_masks: Read against the object masks: not computed on data without them
            (a folder of images), for that reason.
        default: Computed when ``EvalConfig.metrics`` is ``None``; ``False`` for metrics
            too slow for every run (ROAD), which are computed only when named.
    """

    name: str
    short: str
    fn: Callable[..., Tensor]
    compute: Callable[[Callable[..., Tensor], MapContext], Values]
    higher_is_better: bool | None
    category: str
    reference: str | None = None
    missing: str = ""
    needs_masks: bool = False
    default: bool = True

    def values(self, context: MapContext) -> Values:
        """Per-item values of the map in ``context``, or ``None`` where not defined."""
        return self.compute(self.fn, context)


def _registered(
    name: str,
    short: str,
    compute: Callable[..., Values],
    missing: str = "",
    *,
    column: str | None = None,
    higher_is_better: bool | None = None,
    needs_masks: bool = False,
    default: bool = True,
):
    """An entry computed by registry function ``name``; ``column`` names the table column when
    one function gives several (its direction is then given, the registry's being per call)."""
    info = METRICS[name]
    better = info.higher_is_better if column is None else higher_is_better
    return EvalMetric(
        column or name,
        short,
        info.fn,
        compute,
        better,
        info.category,
        missing=missing,
        needs_masks=needs_masks,
        default=default,
    )


# --- how each metric reads a map ---------------------------------------------------------------


def _against_masks(fn: Callable[..., Tensor], c: MapContext) -> Values:
    if getattr(c.items, "masks", None) is None:  # images without ground truth
        return None
    return fn(c.maps, c.items.masks), c.items.groups


def _against_pixel_masks(fn: Callable[..., Tensor], c: MapContext, **kw: Any) -> Tensor | None:
    """``fn`` on the pixel maps as localisation reads them (``point_pixels``) and the pixel
    masks; ``None`` for images without masks."""
    masks = getattr(c.items, "pixel_masks", None)
    return None if masks is None else fn(c.point_pixels, masks, **kw)


def _pointing_standard(fn: Callable[..., Tensor], c: MapContext) -> Values:
    """Zhang et al.'s protocol on the pixel maps and masks: the maximum within 15 px of the
    object at 224 px, scaled to the image (2 px at 32 px; :func:`standard_tolerance`)."""
    hits = _against_pixel_masks(fn, c, tolerance="standard")
    return None if hits is None else (hits, c.items.groups)


def _peak_offset(axis: int) -> Callable[..., Values]:
    """One coordinate (``0``: x, ``1``: y) of the signed offset of the map's peak from the
    mask's centroid, in pixels (:func:`~captum_ext.metrics.peak_offset`)."""

    def compute(fn: Callable[..., Tensor], c: MapContext) -> Values:
        offsets = _against_pixel_masks(fn, c)
        return None if offsets is None else (offsets[:, axis], c.items.groups)

    return compute


def _alone(fn: Callable[..., Tensor], c: MapContext) -> Values:
    return fn(c.maps), c.items.groups


def _two_objects(fn: Callable[..., Tensor], c: MapContext) -> Values:
    a, b = c.items.pair_a, c.items.pair_b
    if not len(a) or c.items.masks is None:
        return None
    return fn(c.maps[a], c.maps[b], c.items.masks[a], c.items.masks[b]), c.items.groups[a]


def _rise(fn: Callable[..., Tensor], c: MapContext) -> Values:
    i = c.items
    kw = dict(target=i.targets, steps=i.steps, score=i.score, batch_size=256)
    return fn(i.model, i.inputs, c.pixels, **kw), i.groups


def _confidence(keep: float) -> Callable[..., Values]:
    """Average drop / increase in confidence with the T-TAME preset, keeping ``keep``.

    Min-max normalised map, soft mask keeping the values at or above the ``1 - keep`` quantile,
    masking in pixel space, in percent (Ntrougkas et al. 2024). The target is the map's class
    and the score the set's (``sigmoid`` for multi-label models): T-TAME's softmax of the
    predicted class assumes one class per image, which a two-object image does not have.
    """

    def compute(fn: Callable[..., Tensor], c: MapContext) -> Values:
        i = c.items
        kw = dict(target=i.targets, keep=keep, score=i.score, percent=True, batch_size=256)
        return fn(i.model, i.inputs, c.pixels, **kw), i.groups

    return compute


def _road(order: str) -> Callable[..., Values]:
    """ROAD with the T-TAME preset: top-1 agreement with the clean prediction, averaged over
    :data:`~captum_ext.metrics.ROAD_TTAME_PERCENTAGES` removed (noisy linear imputation)."""

    def compute(fn: Callable[..., Tensor], c: MapContext) -> Values:
        i = c.items
        kw = dict(order=order, percentages=ROAD_TTAME_PERCENTAGES, score="top1", seed=i.seed)
        return fn(i.model, i.inputs, c.pixels, i.targets, batch_size=256, **kw).mean(1), i.groups

    return compute


def _versus_tam(fn: Callable[..., Tensor], c: MapContext) -> Values:
    tam = c.references.get("tam")
    if tam is None or c.name == "tam":
        return None
    return fn(c.maps, tam), c.items.groups


def _eraser(fn: Callable[..., Tensor], c: MapContext) -> Values:
    i = c.items
    kw = dict(target=i.targets, attention_mask=i.attention_mask, special_mask=i.special)
    return fn(i.model, i.inputs, c.maps, **kw), i.groups


def _against_rationale(fn: Callable[..., Tensor], c: MapContext) -> Values:
    return fn(c.maps, c.items.rationale, c.items.valid), c.items.groups


_PEARSON = METRICS["pearson"]

POINTING_STANDARD = f"pointing ({STANDARD_TOLERANCE_PX} px @{STANDARD_TOLERANCE_SIZE})"
"""Header of ``pointing_game``: Zhang et al.'s protocol, in pixels with the tolerance scaled."""

POINTING_GRID = "pointing (patch grid)"
"""Header of ``pointing_game_grid``: the maximum of the map on the evaluation grid in the
(pooled) mask, no tolerance; with ``resolution="pixel"`` the same at pixel resolution."""

IMAGE_TABLE: tuple[EvalMetric, ...] = (
    _registered("pointing_game", POINTING_STANDARD, _pointing_standard, needs_masks=True),
    _registered(
        "pointing_game",
        POINTING_GRID,
        _against_masks,
        column="pointing_game_grid",
        higher_is_better=True,
        needs_masks=True,
    ),
    _registered("relevance_mass_accuracy", "mass acc.", _against_masks, needs_masks=True),
    _registered("relevance_rank_accuracy", "rank acc.", _against_masks, needs_masks=True),
    *(
        EvalMetric(
            f"peak_d{axis}",
            f"peak d{axis} (px)",
            peak_offset,
            _peak_offset(i),
            higher_is_better=None,  # a signed shift: 0 is best, neither direction
            category="localisation",
            needs_masks=True,
        )
        for i, axis in enumerate("xy")
    ),
    _registered("sparsity", "sparsity", _alone),
    _registered(
        "discrimination_score",
        "D",
        _two_objects,
        "no image with two objects",
        needs_masks=True,
    ),
    _registered("deletion_auc", "deletion", _rise),
    _registered("insertion_auc", "insertion", _rise),
    *(
        _registered(
            fn,
            f"{kind.upper()}{round(keep * 100)}",
            _confidence(keep),
            column=f"{kind}{round(keep * 100)}",
            higher_is_better=kind == "ic",
        )
        for keep in TTAME_KEEP
        for kind, fn in (("ad", "average_drop"), ("ic", "increase_in_confidence"))
    ),
    _registered(
        "road",
        "ROAD MoRF",
        _road("morf"),
        column="road_morf",
        higher_is_better=False,
        default=False,
    ),
    _registered(
        "road",
        "ROAD LeRF",
        _road("lerf"),
        column="road_lerf",
        higher_is_better=True,
        default=False,
    ),
    EvalMetric(
        "pearson_tam",
        "r(TAM)",
        _PEARSON.fn,
        _versus_tam,
        higher_is_better=None,  # agreement with TAM, not a quality in itself
        category=_PEARSON.category,
        reference="tam",
        missing="TAM was not evaluated on this model",
    ),
)
"""Image metrics, in column order."""

TEXT_TABLE: tuple[EvalMetric, ...] = (
    _registered("comprehensiveness", "comp.", _eraser),
    _registered("sufficiency", "suff.", _eraser),
    _registered("token_auprc", "AUPRC", _against_rationale),
)
"""Text metrics, in column order."""

IMAGE_METRICS: tuple[str, ...] = tuple(m.name for m in IMAGE_TABLE)
"""Metrics computed for image models, in table order."""

OPTIONAL_METRICS: tuple[str, ...] = tuple(m.name for m in IMAGE_TABLE if not m.default)
"""Metrics computed only when named in ``EvalConfig.metrics`` (ROAD: one sparse solve per
removal step and map, too slow for every run)."""

TEXT_METRICS: tuple[str, ...] = tuple(m.name for m in TEXT_TABLE)
"""Metrics computed for text models, in table order."""

_BY_NAME = {m.name: m for m in IMAGE_TABLE + TEXT_TABLE}


def direction(metric: str) -> bool | None:
    """Better direction of a metric (``None``: depends on the use, or unknown)."""
    if metric in _BY_NAME:
        return _BY_NAME[metric].higher_is_better
    info = METRICS.get(metric)
    return None if info is None else info.higher_is_better


NO_MASKS = "these images have no object masks"
"""Why the metrics read against the masks (:attr:`EvalMetric.needs_masks`) are missing on data
without ground truth."""


def _and(names: list[str]) -> str:
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


def missing_notes(
    table: Sequence[EvalMetric], computed: Callable[[str], bool], masks: bool
) -> list[str]:
    """One note per reason for the metrics of ``table`` that have no value.

    Metrics missing for the same reason share one line, which names them by their column
    header and gives the reason once (``"pointing (15 px @224), pointing (patch grid), mass
    acc., rank acc. and D not computed: these images have no object masks."``).

    Args:
        table: The metrics that were asked for.
        computed: ``computed(name)``: whether any map has values of the metric.
        masks: Whether the data has object masks (else the mask metrics are missing for that
            reason, whatever their own).
    """
    reasons: dict[str, list[str]] = {}
    for m in table:
        if computed(m.name):
            continue
        reason = NO_MASKS if m.needs_masks and not masks else m.missing
        if reason:
            reasons.setdefault(reason, []).append(m.short)
    return [f"{_and(shorts)} not computed: {reason}." for reason, shorts in reasons.items()]


def short_name(metric: str) -> str:
    """Header of a metric in the markdown tables."""
    return _BY_NAME[metric].short if metric in _BY_NAME else metric
