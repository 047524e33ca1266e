"""Class-discrimination metric for pairs of explanations (two classes, two objects)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ._common import as_masks, register_metric, resolve_map

__all__ = ["discrimination_score"]


def _half_score(r: Tensor, own: Tensor, other: Tensor) -> Tensor:
    """``D_c - 1/2`` for one class: ``(P - Q) / (2 (P + Q))``, ``0`` where ``P + Q == 0``."""
    rp = r.clamp(min=0)
    p = (rp * (own & ~other)).sum(dim=(1, 2))
    q = (rp * (other & ~own)).sum(dim=(1, 2))
    den = p + q
    return torch.where(den > 0, (p - q) / (2 * den), torch.zeros_like(den))


@register_metric(
    "discrimination_score",
    higher_is_better=True,
    category="discrimination",
    reference="captum_ext convention (relevance mass of Arras et al. 2022 on class-exclusive "
    "regions); 0.5 = class-agnostic, 1 = perfectly class-discriminative",
)
def discrimination_score(
    attr_a: Any,
    attr_b: Any,
    mask_a: Any,
    mask_b: Any,
    *,
    inputs: Tensor | None = None,
    target_a: Any = None,
    target_b: Any = None,
    attribute_kwargs: dict[str, Any] | None = None,
) -> Tensor:
    """Class-discrimination score of a pair of explanations.

    For an image that contains an object of class ``a`` (mask ``M_a``) and one of class ``b``
    (mask ``M_b``), with ``R_a`` the explanation for class ``a`` and ``R_b`` the one for
    class ``b``::

        D_a = R_a+(M_a \\ M_b) / (R_a+(M_a \\ M_b) + R_a+(M_b \\ M_a))
        D_b = R_b+(M_b \\ M_a) / (R_b+(M_b \\ M_a) + R_b+(M_a \\ M_b))
        D   = (D_a + D_b) / 2

    where ``R+(M)`` is the sum of the positive relevance inside region ``M``. Overlapping
    pixels (``M_a & M_b``) belong to neither region. ``D = 1`` when each map puts all its
    positive mass on its own object, ``D = 0`` when each points at the other object, and any
    class-agnostic method (``R_a == R_b``) scores **exactly** ``0.5`` because
    ``D_a + D_b = 1`` by construction (the value is computed as
    ``1/2 + ((D_a - 1/2) + (D_b - 1/2)) / 2`` so that this holds bit-exactly in floating point).

    If a denominator is zero (no positive mass on either exclusive region) that class scores
    ``0.5``: the map discriminates nothing.

    Args:
        attr_a: Map for class ``a`` ``(B, H, W)`` / ``(B, 1, H, W)`` / ``(B, C, H, W)``, or a
            Captum ``Attribution`` object (computed with ``target=target_a``).
        attr_b: Map for class ``b``, or an ``Attribution`` object (``target=target_b``).
        mask_a: Bool masks ``(B, H, W)`` of the class-``a`` objects.
        mask_b: Bool masks ``(B, H, W)`` of the class-``b`` objects.
        inputs: Model inputs, only for the ``Attribution`` path.
        target_a: Class ``a`` index (int or ``(B,)``) for the ``Attribution`` path.
        target_b: Class ``b`` index for the ``Attribution`` path.
        attribute_kwargs: Extra keyword arguments for ``.attribute``.

    Returns:
        ``(B,)`` float64 in ``[0, 1]``.
    """
    ra = resolve_map(attr_a, inputs, target_a, attribute_kwargs, name="attr_a").double()
    rb = resolve_map(
        attr_b, inputs, target_b, attribute_kwargs, name="attr_b", batch_size=ra.shape[0]
    ).double()
    if rb.shape != ra.shape:
        raise ValueError(
            f"attr_b: expected shape {tuple(ra.shape)} (as attr_a), got {tuple(rb.shape)}"
        )
    ma = as_masks(mask_a, ra.shape, name="mask_a").to(ra.device)
    mb = as_masks(mask_b, ra.shape, name="mask_b").to(ra.device)
    return 0.5 + (_half_score(ra, ma, mb) + _half_score(rb, mb, ma)) / 2
