"""Shared helpers for :mod:`captum_ext.metrics`.

Everything that more than one metric needs lives here, exactly once:

* :func:`resolve_attributions` turns "a tensor OR a Captum ``Attribution`` object" into a
  detached tensor,
* :func:`as_map` / :func:`as_flat` validate and normalise attribution shapes (and reject
  NaN / infinite values),
* :func:`as_masks` validates ground-truth masks,
* :func:`_logits` and :func:`class_scores` turn model outputs into
  logits and probabilities,
* :func:`target_tensor` normalises ``target`` arguments,
* the metric registry (:class:`MetricInfo`, :func:`register_metric`, :func:`metric_info`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import torch
from torch import Tensor

from captum_ext._scores import model_output_to_tensor, select_target, target_indices
from captum_ext._scores import progress as _progress

Score = Literal["softmax", "sigmoid", "logit"]
Category = Literal["localisation", "faithfulness", "complexity", "discrimination", "sanity", "text"]

_T = TypeVar("_T")
_F = TypeVar("_F", bound=Callable[..., Any])


# ----------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MetricInfo:
    """Declarative metadata of one metric (Quantus style).

    Attributes:
        name: Public name of the metric (also the key in :data:`METRICS`).
        fn: The metric function.
        higher_is_better: ``True``/``False`` when the direction is fixed, ``None`` when it
            depends on an argument (e.g. ROAD MoRF vs. LeRF) or on the use (similarities).
        category: One of ``"localisation"``, ``"faithfulness"``, ``"complexity"``,
            ``"discrimination"``, ``"sanity"``, ``"text"``.
        reference: The paper the convention follows.
        note: Free-text remark (e.g. how the direction depends on arguments).
    """

    name: str
    fn: Callable[..., Any]
    higher_is_better: bool | None
    category: Category
    reference: str
    note: str = ""


METRICS: dict[str, MetricInfo] = {}
"""Every metric's :class:`MetricInfo` by name, filled by :func:`register_metric`."""


def register_metric(
    name: str,
    *,
    higher_is_better: bool | None,
    category: Category,
    reference: str,
    note: str = "",
) -> Callable[[_F], _F]:
    """Decorator: record a metric in :data:`METRICS` and attach ``fn.metric_info``."""

    def deco(fn: _F) -> _F:
        info = MetricInfo(name, fn, higher_is_better, category, reference, note)
        if name in METRICS and METRICS[name].fn is not fn:
            raise RuntimeError(f"metric {name!r} registered twice")
        METRICS[name] = info
        fn.metric_info = info  # type: ignore[attr-defined]
        return fn

    return deco


def metric_info(name: str) -> MetricInfo:
    """Return the :class:`MetricInfo` of the metric called ``name``.

    Raises:
        KeyError: If no metric of that name exists (the message lists the known names).
    """
    try:
        return METRICS[name]
    except KeyError:
        raise KeyError(f"unknown metric {name!r}; known metrics: {sorted(METRICS)}") from None


# ----------------------------------------------------------------------------------------------
# Model outputs
# ----------------------------------------------------------------------------------------------


def _logits(out: Any) -> Tensor:
    """The logits ``(B, K)`` of a model output (see :func:`captum_ext._scores.model_output_to_tensor`).

    Raises:
        TypeError: No score tensor in the output.
        ValueError: The scores are not ``(B, K)``.
    """
    logits = model_output_to_tensor(out)
    if logits.dim() != 2:
        raise ValueError(f"model logits must have shape (B, K), got {tuple(logits.shape)}")
    return logits


def class_scores(logits: Tensor, score: str) -> Tensor:
    """Turn logits ``(B, K)`` into per-class scores ``(B, K)``.

    Args:
        logits: Logits ``(B, K)``.
        score: ``"softmax"`` (single-label probabilities), ``"sigmoid"`` (independent
            multi-label probabilities) or ``"logit"`` (raw logits).
    """
    if score == "softmax":
        return logits.softmax(dim=-1)
    if score == "sigmoid":
        return logits.sigmoid()
    if score == "logit":
        return logits
    raise ValueError(f"score must be 'softmax', 'sigmoid' or 'logit', got {score!r}")


def check_score(score: str, allowed: Sequence[str]) -> None:
    """Raise ``ValueError`` unless ``score`` is one of ``allowed``."""
    if score not in allowed:
        raise ValueError(f"score must be one of {tuple(allowed)}, got {score!r}")


def target_tensor(target: Any, batch_size: int, device: torch.device | str) -> Tensor:
    """A ``target`` argument as a ``LongTensor`` ``(B,)`` (see :func:`captum_ext._scores.target_indices`)."""
    return target_indices(target, batch_size, device=device, method="target")


@torch.no_grad()
def forward_logits(
    model: Callable[..., Any], inputs: Tensor, batch_size: int | None = None
) -> Tensor:
    """Run ``model(inputs)`` (in chunks of ``batch_size``) without gradients; return logits."""
    if batch_size is None or inputs.shape[0] <= batch_size:
        return _logits(model(inputs)).detach()
    outs = [_logits(model(chunk)).detach() for chunk in inputs.split(batch_size)]
    return torch.cat(outs)


pick = select_target
"""``scores[i, target[i]]`` for every row ``i``."""


# ----------------------------------------------------------------------------------------------
# Attributions
# ----------------------------------------------------------------------------------------------


def is_attribution_object(obj: Any) -> bool:
    """``True`` for anything with a callable ``.attribute`` method (Captum ``Attribution``)."""
    return not isinstance(obj, Tensor) and callable(getattr(obj, "attribute", None))


def resolve_attributions(
    attributions: Any,
    inputs: Tensor | None = None,
    target: Any = None,
    attribute_kwargs: dict[str, Any] | None = None,
    *,
    name: str = "attributions",
) -> Tensor:
    """Return attributions as a detached tensor.

    Args:
        attributions: A tensor, or a Captum ``Attribution`` object (anything with an
            ``.attribute`` method). In the latter case
            ``attributions.attribute(inputs, target=target, **attribute_kwargs)`` is called.
        inputs: Model inputs; required for the ``Attribution`` path.
        target: Target passed to ``.attribute``.
        attribute_kwargs: Extra keyword arguments for ``.attribute``.
        name: Argument name used in error messages.

    Returns:
        The attribution tensor, detached (shape as produced; see :func:`as_map`).
    """
    if isinstance(attributions, Tensor):
        return attributions.detach()
    if is_attribution_object(attributions):
        if inputs is None:
            raise ValueError(
                f"{name} is an Attribution object, so `inputs` are needed to compute it"
            )
        out = attributions.attribute(inputs, target=target, **(attribute_kwargs or {}))
        if isinstance(out, (tuple, list)):
            if len(out) != 1:
                raise ValueError(
                    f"{name}.attribute returned {len(out)} tensors; only single-input "
                    "attributions are supported"
                )
            out = out[0]
        if not isinstance(out, Tensor):
            raise TypeError(f"{name}.attribute returned {type(out).__name__}, expected a Tensor")
        return out.detach()
    raise TypeError(
        f"{name} must be a Tensor or an object with an `.attribute` method, "
        f"got {type(attributions).__name__}"
    )


def check_finite(t: Tensor, name: str) -> None:
    """Raise ``ValueError`` if ``t`` contains NaN or infinite values."""
    if t.is_floating_point() or t.is_complex():
        nan = torch.isnan(t)
        if bool(nan.any()):
            what = "only NaN" if bool(nan.all()) else f"{int(nan.sum())} NaN value(s)"
            raise ValueError(f"{name} contains {what}; attribution maps must be finite")
        if bool(torch.isinf(t).any()):
            raise ValueError(f"{name} contains infinite values; attribution maps must be finite")


def as_map(
    attributions: Tensor,
    *,
    name: str = "attributions",
    batch_size: int | None = None,
    spatial: tuple[int, int] | None = None,
) -> Tensor:
    """Validate an image attribution map and return it as ``(B, H, W)`` float tensor.

    Accepted shapes: ``(B, H, W)``, ``(B, 1, H, W)`` and ``(B, C, H, W)``; in the last case the
    map is reduced by **summing over channels** (the usual Captum convention for pixel
    attributions). NaN or infinite values raise ``ValueError``.

    Args:
        attributions: The map.
        name: Argument name used in error messages.
        batch_size: If given, the expected ``B``.
        spatial: If given, the expected ``(H, W)``. Maps of a different resolution are
            rejected; upsample them first (e.g. ``captum.attr.LayerAttribution.interpolate``).
    """
    a = attributions
    if not isinstance(a, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(a).__name__}")
    if a.dim() == 4:
        a = a.sum(dim=1)
    elif a.dim() != 3:
        raise ValueError(
            f"{name} must have shape (B, H, W), (B, 1, H, W) or (B, C, H, W), "
            f"got {tuple(attributions.shape)}"
        )
    if not a.is_floating_point():
        a = a.float()
    if batch_size is not None and a.shape[0] != batch_size:
        raise ValueError(f"{name}: expected batch size {batch_size}, got shape {tuple(a.shape)}")
    if spatial is not None and tuple(a.shape[-2:]) != tuple(spatial):
        raise ValueError(
            f"{name}: expected spatial size (H, W) = {tuple(spatial)}, got "
            f"{tuple(a.shape[-2:])} (full shape {tuple(attributions.shape)}); "
            "upsample low-resolution maps first"
        )
    check_finite(a, name)
    return a


def as_flat(attributions: Tensor, *, name: str = "attributions") -> Tensor:
    """Validate an attribution map of any layout and flatten it to ``(B, N)``.

    ``(B, P)`` token maps and ``(B, H, W)`` maps are flattened as they are; 4-D maps
    ``(B, C, H, W)`` are first summed over channels (see :func:`as_map`).
    """
    a = attributions
    if not isinstance(a, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(a).__name__}")
    if a.dim() < 2:
        raise ValueError(f"{name} must have a batch dimension, got shape {tuple(a.shape)}")
    if a.dim() == 4:
        a = a.sum(dim=1)
    if not a.is_floating_point():
        a = a.float()
    check_finite(a, name)
    return a.reshape(a.shape[0], -1)


def as_masks(masks: Any, shape: Sequence[int], *, name: str = "masks") -> Tensor:
    """Validate ground-truth masks and return them as a bool tensor of ``shape`` (B, H, W).

    ``(B, 1, H, W)`` masks are squeezed. Non-bool masks must contain only 0 and 1.
    """
    m = torch.as_tensor(masks)
    if m.dim() == 4 and m.shape[1] == 1:
        m = m[:, 0]
    if tuple(m.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(m.shape)}")
    if m.dtype != torch.bool:
        if not bool(((m == 0) | (m == 1)).all()):
            raise ValueError(f"{name} must be boolean (or contain only 0/1)")
        m = m.bool()
    return m


def resolve_map(
    attributions: Any,
    inputs: Tensor | None,
    target: Any,
    attribute_kwargs: dict[str, Any] | None,
    *,
    name: str = "attributions",
    batch_size: int | None = None,
    spatial: tuple[int, int] | None = None,
) -> Tensor:
    """:func:`resolve_attributions` followed by :func:`as_map`; returns ``(B, H, W)``."""
    a = resolve_attributions(attributions, inputs, target, attribute_kwargs, name=name)
    return as_map(a, name=name, batch_size=batch_size, spatial=spatial)


def check_image_inputs(inputs: Any, name: str = "inputs") -> Tensor:
    """Require a ``(B, C, H, W)`` tensor."""
    if not isinstance(inputs, Tensor) or inputs.dim() != 4:
        shape = tuple(inputs.shape) if isinstance(inputs, Tensor) else type(inputs).__name__
        raise ValueError(f"{name} must be a (B, C, H, W) tensor, got {shape}")
    return inputs


def default_target(
    model: Callable[..., Any], inputs: Tensor, target: Any, batch_size: int | None = None
) -> tuple[Tensor, Tensor]:
    """Clean logits ``(B, K)`` and the target ``(B,)`` (predicted class when ``target`` is None)."""
    logits = forward_logits(model, inputs, batch_size)
    if target is None:
        return logits, logits.argmax(dim=1)
    return logits, target_tensor(target, inputs.shape[0], inputs.device)


# ----------------------------------------------------------------------------------------------
# Misc
# ----------------------------------------------------------------------------------------------


def progress(
    iterable: Iterable[_T], show: bool, desc: str | None = None, total: int | None = None
) -> Iterable[_T]:
    """``iterable`` behind a tqdm bar when ``show`` is true (see :func:`captum_ext._scores.progress`)."""
    return iterable if not show else _progress(iterable, show, desc=desc, total=total)


def stable_order(values: Tensor, descending: bool) -> Tensor:
    """Indices sorting each row of ``values`` (B, N); ties keep row-major (index) order."""
    return torch.sort(values, dim=1, descending=descending, stable=True).indices


def ranks_of(values: Tensor, descending: bool) -> Tensor:
    """Position (0 = first) of every element of each row in the stable sort order."""
    order = stable_order(values, descending)
    ranks = torch.empty_like(order)
    ar = torch.arange(values.shape[1], device=values.device).expand_as(order)
    ranks.scatter_(1, order, ar)
    return ranks


def trapezoid(y: Tensor, x: Tensor) -> Tensor:
    """Trapezoid integral of ``y`` (B, N) over ``x`` (N,) along the last dimension."""
    return torch.trapezoid(y, x.to(y.dtype), dim=-1)
