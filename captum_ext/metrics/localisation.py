"""Localisation metrics: does the explanation point at the annotated object?

All functions take an attribution map ``(B, H, W)``, ``(B, 1, H, W)`` or ``(B, C, H, W)``
(summed over channels) -- or a Captum ``Attribution`` object together with ``inputs``,
``target`` and ``attribute_kwargs`` -- and boolean ground-truth masks ``(B, H, W)``, and return
one float64 value per example, shape ``(B,)``.

An **empty mask** has no defined answer: every metric here returns ``NaN`` for that example
(use ``torch.nanmean`` to aggregate). An empty batch gives an empty ``(0,)`` result.

**The standard pointing game.** Zhang et al. (2016) count a hit when the map's maximum lies
within 15 pixels of the object at 224-pixel input. ``pointing_game(..., tolerance="standard")``
computes that protocol at any image size: the tolerance scales with the image's shorter side,
:func:`standard_tolerance` ``= round(15 * min(H, W) / 224)`` pixels (2 px at 32 px). The map
and the masks must then be at the input resolution.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ._common import as_masks, check_int, register_metric, resolve_map, stable_order

__all__ = [
    "STANDARD_TOLERANCE_PX",
    "STANDARD_TOLERANCE_SIZE",
    "peak_offset",
    "pointing_game",
    "relevance_mass_accuracy",
    "relevance_rank_accuracy",
    "standard_tolerance",
]

STANDARD_TOLERANCE_PX = 15
"""Zhang et al.'s pointing-game tolerance in pixels, at :data:`STANDARD_TOLERANCE_SIZE`."""

STANDARD_TOLERANCE_SIZE = 224
"""The input size (pixels) at which Zhang et al.'s 15-pixel tolerance is defined."""


def standard_tolerance(image_size: int | Sequence[int]) -> int:
    """Zhang et al.'s pointing-game tolerance scaled to an image size, in whole pixels.

    ``15 * s / 224`` with ``s`` the image's shorter side, rounded to the nearest integer
    (halves round up): 15 px at 224, 30 at 448, 8 at 112, 2 at 32, 0 below 8 px.

    Args:
        image_size: The side ``s`` of a square image, or its ``(H, W)``.

    Raises:
        TypeError, ValueError: Not an integer ``>= 1`` or a pair of them.
    """
    if isinstance(image_size, Sequence) and not isinstance(image_size, str):
        if len(image_size) != 2:
            raise ValueError(f"image_size must be an integer or (H, W), got {image_size!r}")
        side = min(check_int(v, "image_size", 1) for v in image_size)
    else:
        side = check_int(image_size, "image_size", 1)
    # exact rational arithmetic, then round half up (not Python's round-half-even)
    return math.floor(
        (2 * STANDARD_TOLERANCE_PX * side + STANDARD_TOLERANCE_SIZE) / (2 * STANDARD_TOLERANCE_SIZE)
    )


def _disk(radius: int, device: torch.device) -> Tensor:
    r = torch.arange(-radius, radius + 1, device=device, dtype=torch.float64)
    return ((r.view(-1, 1) ** 2 + r.view(1, -1) ** 2) <= radius**2).double()


def dilate(masks: Tensor, tolerance: int) -> Tensor:
    """Dilate bool masks ``(B, H, W)`` by a Euclidean disk of radius ``tolerance`` pixels.

    Raises:
        TypeError, ValueError: ``tolerance`` is not an integer >= 0.
    """
    tolerance = check_int(tolerance, "tolerance", 0)
    if tolerance == 0:
        return masks
    k = _disk(tolerance, masks.device).view(1, 1, 2 * tolerance + 1, 2 * tolerance + 1)
    hit = F.conv2d(masks.unsqueeze(1).double(), k, padding=tolerance)
    return hit[:, 0] > 0.5


@register_metric(
    "pointing_game",
    higher_is_better=True,
    category="localisation",
    reference="Zhang et al., Top-down Neural Attention by Excitation Backprop, ECCV 2016",
)
def pointing_game(
    attributions: Any,
    masks: Any,
    tolerance: int | str = 0,
    *,
    inputs: Tensor | None = None,
    target: Any = None,
    attribute_kwargs: dict[str, Any] | None = None,
) -> Tensor:
    """Pointing game hit per example (Zhang et al. 2016).

    The maximum of the map is a *hit* when it lies inside the ground-truth mask dilated by
    ``tolerance`` pixels (the dilation is a Euclidean disk of that radius: a hit is a maximum
    within ``tolerance`` pixels of a mask pixel). Zhang et al.'s protocol is
    ``tolerance="standard"``: 15 px at 224-pixel input, scaled to the map's size
    (:func:`standard_tolerance`; 2 px at 32 px), for maps and masks at the input resolution.

    **Ties.** When several pixels share the maximal value the result is the *fraction of the
    tied maxima that lie inside the (dilated) mask* (exact float equality defines a tie). This
    avoids both the leniency of "any tied maximum counts" and the arbitrariness of picking the
    first one. A constant map ties every pixel, so it scores the share of the image the
    dilated mask covers -- exactly the chance level.

    Args:
        attributions: Map ``(B, H, W)`` / ``(B, 1, H, W)`` / ``(B, C, H, W)`` (summed over
            channels), or a Captum ``Attribution`` object.
        masks: Bool masks ``(B, H, W)``.
        tolerance: Dilation radius in pixels, an integer >= 0 (``0``: the maximum must be in
            the mask), or ``"standard"``: :func:`standard_tolerance` of the map's ``(H, W)``.
        inputs: Model inputs, only needed when ``attributions`` is an ``Attribution`` object.
        target: Target class passed to ``.attribute``.
        attribute_kwargs: Extra keyword arguments for ``.attribute``.

    Returns:
        ``(B,)`` float64 in ``[0, 1]``; ``NaN`` where the mask is empty.

    Raises:
        ValueError: On NaN/infinite maps or mismatched shapes.
        TypeError, ValueError: ``tolerance`` is not an integer >= 0 or ``"standard"``.
    """
    if isinstance(tolerance, str) and tolerance != "standard":
        raise ValueError(f"tolerance must be an integer >= 0 or 'standard', got {tolerance!r}")
    a = resolve_map(attributions, inputs, target, attribute_kwargs).double()
    m = as_masks(masks, a.shape)
    if m.device != a.device:
        m = m.to(a.device)
    if isinstance(tolerance, str):  # "standard": Zhang et al.'s 15 px at 224, scaled
        tolerance = standard_tolerance(tuple(a.shape[-2:])) if min(a.shape[-2:]) else 0
    dm = dilate(m, tolerance)
    tied = a == a.amax(dim=(1, 2), keepdim=True)
    hits = (tied & dm).sum(dim=(1, 2)).double() / tied.sum(dim=(1, 2)).double()
    empty = ~m.any(dim=2).any(dim=1)
    return hits.masked_fill(empty, float("nan"))


def peak_offset(
    attributions: Any,
    masks: Any,
    *,
    inputs: Tensor | None = None,
    target: Any = None,
    attribute_kwargs: dict[str, Any] | None = None,
) -> Tensor:
    """Signed offset ``(dx, dy)`` in pixels of the map's peak from the object's centre.

    The peak is the map's maximum; the centre is the mask's centroid (the mean position of its
    pixels). Pixel ``(row i, column j)`` sits at ``x = j``, ``y = i``: ``dx > 0`` means the
    peak lies right of the centre, ``dy > 0`` below it. When several pixels share the maximal
    value (exact float equality) the peak is their mean position, as the pointing game counts
    the tied maxima together. Average over examples for a systematic shift of the maps (a
    mean ``dy`` of ``-3`` means the maps peak 3 px above the objects' centres).

    Not a quality score (no better direction), so not in :data:`METRICS`.

    Args:
        attributions: Map or ``Attribution`` object (see :func:`pointing_game`).
        masks: Bool masks ``(B, H, W)``.
        inputs: Model inputs, only for the ``Attribution`` path.
        target: Target class passed to ``.attribute``.
        attribute_kwargs: Extra keyword arguments for ``.attribute``.

    Returns:
        ``(B, 2)`` float64, columns ``(dx, dy)``; ``NaN`` rows where the mask is empty.
    """
    a = resolve_map(attributions, inputs, target, attribute_kwargs).double()
    m = as_masks(masks, a.shape).to(a.device)
    h, w = a.shape[-2:]
    ys = torch.arange(h, device=a.device, dtype=torch.float64).view(1, -1, 1)
    xs = torch.arange(w, device=a.device, dtype=torch.float64).view(1, 1, -1)

    def centre(sel: Tensor) -> Tensor:
        n = sel.sum(dim=(1, 2)).double()
        cx = (sel * xs).sum(dim=(1, 2)) / n
        cy = (sel * ys).sum(dim=(1, 2)) / n
        return torch.stack([cx, cy], dim=1)

    if a.shape[0] == 0 or h == 0 or w == 0:
        return torch.empty(a.shape[0], 2, dtype=torch.float64, device=a.device)
    tied = a == a.amax(dim=(1, 2), keepdim=True)
    out = centre(tied) - centre(m)
    empty = ~m.flatten(1).any(dim=1)
    return out.masked_fill(empty.view(-1, 1), float("nan"))


@register_metric(
    "relevance_mass_accuracy",
    higher_is_better=True,
    category="localisation",
    reference="Arras et al., CLEVR-XAI: A benchmark dataset for the ground truth evaluation "
    "of neural network explanations, Information Fusion 2022",
)
def relevance_mass_accuracy(
    attributions: Any,
    masks: Any,
    positive_only: bool = True,
    *,
    inputs: Tensor | None = None,
    target: Any = None,
    attribute_kwargs: dict[str, Any] | None = None,
) -> Tensor:
    """Relevance mass accuracy (Arras et al. 2022).

    ``R_in / R_total``: the relevance inside the mask divided by the relevance in the whole
    map. With ``positive_only=True`` (the paper's convention) only positive relevance is
    counted, so the value is in ``[0, 1]``; with ``False`` the raw (signed) values are summed,
    which can leave ``[0, 1]``.

    Args:
        attributions: Map or ``Attribution`` object (see :func:`pointing_game`).
        masks: Bool masks ``(B, H, W)``.
        positive_only: Clamp the map at zero before summing.
        inputs: Model inputs, only for the ``Attribution`` path.
        target: Target class passed to ``.attribute``.
        attribute_kwargs: Extra keyword arguments for ``.attribute``.

    Returns:
        ``(B,)`` float64; ``NaN`` where the total relevance is zero or the mask is empty.
    """
    a = resolve_map(attributions, inputs, target, attribute_kwargs).double()
    m = as_masks(masks, a.shape).to(a.device)
    if positive_only:
        a = a.clamp(min=0)
    total = a.sum(dim=(1, 2))
    inside = (a * m).sum(dim=(1, 2))
    out = inside / total
    bad = (total == 0) | ~m.flatten(1).any(dim=1)
    return out.masked_fill(bad, float("nan"))


@register_metric(
    "relevance_rank_accuracy",
    higher_is_better=True,
    category="localisation",
    reference="Arras et al., CLEVR-XAI, Information Fusion 2022",
)
def relevance_rank_accuracy(
    attributions: Any,
    masks: Any,
    *,
    inputs: Tensor | None = None,
    target: Any = None,
    attribute_kwargs: dict[str, Any] | None = None,
) -> Tensor:
    """Relevance rank accuracy (Arras et al. 2022).

    With ``K`` the number of mask pixels, the share of the ``K`` highest-relevance pixels that
    lie inside the mask. Pixels are ranked by their (signed) relevance in descending order with
    a **stable** sort, so ties are broken deterministically by row-major position (the pixel
    that comes first in ``H x W`` raster order ranks higher). A constant map therefore selects
    the first ``K`` pixels in raster order.

    Args:
        attributions: Map or ``Attribution`` object (see :func:`pointing_game`).
        masks: Bool masks ``(B, H, W)``.
        inputs: Model inputs, only for the ``Attribution`` path.
        target: Target class passed to ``.attribute``.
        attribute_kwargs: Extra keyword arguments for ``.attribute``.

    Returns:
        ``(B,)`` float64 in ``[0, 1]``; ``NaN`` where the mask is empty.
    """
    a = resolve_map(attributions, inputs, target, attribute_kwargs)
    m = as_masks(masks, a.shape).to(a.device)
    flat_a = a.flatten(1)
    flat_m = m.flatten(1)
    k = flat_m.sum(dim=1)
    order = stable_order(flat_a, descending=True)
    in_mask_sorted = flat_m.gather(1, order)
    pos = torch.arange(flat_a.shape[1], device=a.device).view(1, -1)
    top = pos < k.view(-1, 1)
    hits = (in_mask_sorted & top).sum(dim=1).double()
    out = hits / k.double()
    return out.masked_fill(k == 0, float("nan"))
