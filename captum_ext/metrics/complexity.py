"""Complexity metrics: how concentrated is an explanation?"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ._common import as_flat, check_real, register_metric, resolve_attributions

__all__ = ["sparsity"]


@register_metric(
    "sparsity",
    higher_is_better=True,
    category="complexity",
    reference="Brocki & Chung, Class-Discriminative Attention Maps for Vision Transformers "
    "(CDAM), 2023",
)
def sparsity(
    attributions: Any,
    threshold: float = 0.05,
    *,
    inputs: Tensor | None = None,
    target: Any = None,
    attribute_kwargs: dict[str, Any] | None = None,
) -> Tensor:
    """Share of near-zero relevance values per example (CDAM, Brocki & Chung 2023).

    ``sparsity = #{i : |s_i| < threshold * max_j |s_j|} / N``, computed per example over all
    ``N`` elements of the map. Works on token maps ``(B, P)`` as well as image maps
    ``(B, H, W)`` / ``(B, 1, H, W)``; ``(B, C, H, W)`` maps are summed over channels first.

    Args:
        attributions: Map of any of the shapes above, or a Captum ``Attribution`` object.
        threshold: Fraction of the per-example maximum absolute value below which an element
            counts as "zero", a finite number in ``[0, 1]``. Larger thresholds give larger
            sparsity.
        inputs: Model inputs, only for the ``Attribution`` path.
        target: Target class passed to ``.attribute``.
        attribute_kwargs: Extra keyword arguments for ``.attribute``.

    Returns:
        ``(B,)`` float64 in ``[0, 1)``. An identically-zero map has no scale and gives ``NaN``;
        an empty batch gives ``(0,)``.

    Raises:
        TypeError, ValueError: ``threshold`` is not a finite number in ``[0, 1]``; the map has
            NaN / infinite values or no elements.
    """
    threshold = check_real(threshold, "threshold", 0.0, 1.0)
    a = resolve_attributions(attributions, inputs, target, attribute_kwargs)
    s = as_flat(a).double().abs()
    mx = s.amax(dim=1, keepdim=True)
    out = (s < threshold * mx).double().mean(dim=1)
    return out.masked_fill(mx[:, 0] == 0, float("nan"))
