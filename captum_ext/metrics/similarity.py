"""Per-example similarity of two explanations (used e.g. by sanity checks)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ._common import as_flat, register_metric, resolve_attributions

__all__ = ["pearson", "rankdata", "spearman"]


def _pair(
    attr_a: Any,
    attr_b: Any,
    inputs: Tensor | None,
    target_a: Any,
    target_b: Any,
    attribute_kwargs: dict[str, Any] | None,
) -> tuple[Tensor, Tensor]:
    if target_b is None:
        target_b = target_a
    a = as_flat(
        resolve_attributions(attr_a, inputs, target_a, attribute_kwargs, name="attr_a"),
        name="attr_a",
    ).double()
    b = as_flat(
        resolve_attributions(attr_b, inputs, target_b, attribute_kwargs, name="attr_b"),
        name="attr_b",
    ).double()
    if a.shape != b.shape:
        raise ValueError(
            f"attr_b: expected {tuple(a.shape)} elements per example (as attr_a), "
            f"got {tuple(b.shape)}"
        )
    return a, b.to(a.device)


def _pearson_rows(a: Tensor, b: Tensor) -> Tensor:
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    na = a.norm(dim=1)
    nb = b.norm(dim=1)
    r = (a * b).sum(dim=1) / (na * nb)
    r = r.clamp(-1.0, 1.0)
    return r.masked_fill((na == 0) | (nb == 0), float("nan"))


def rankdata(x: Tensor) -> Tensor:
    """Average ranks (1-based, ties get the mean of their ranks) of each row of ``x`` (B, N).

    Same convention as ``scipy.stats.rankdata(method="average")``; returns float64.
    """
    b, n = x.shape
    sorted_x, idx = torch.sort(x, dim=1, stable=True)
    new_group = torch.ones_like(sorted_x, dtype=torch.bool)
    new_group[:, 1:] = sorted_x[:, 1:] != sorted_x[:, :-1]
    group = new_group.long().cumsum(dim=1) - 1
    pos = torch.arange(1, n + 1, device=x.device, dtype=torch.float64).expand(b, n)
    sums = torch.zeros(b, n, dtype=torch.float64, device=x.device).scatter_add_(1, group, pos)
    counts = torch.zeros(b, n, dtype=torch.float64, device=x.device).scatter_add_(
        1, group, torch.ones_like(pos)
    )
    avg = sums.gather(1, group) / counts.gather(1, group)
    return torch.empty_like(avg).scatter_(1, idx, avg)


@register_metric(
    "pearson",
    higher_is_better=None,
    category="sanity",
    reference="Adebayo et al., Sanity Checks for Saliency Maps, NeurIPS 2018",
    note="similarity: higher means more alike; for randomisation tests lower is better",
)
def pearson(
    attr_a: Any,
    attr_b: Any,
    *,
    inputs: Tensor | None = None,
    target_a: Any = None,
    target_b: Any = None,
    attribute_kwargs: dict[str, Any] | None = None,
) -> Tensor:
    """Per-example Pearson correlation of two flattened maps.

    Args:
        attr_a: First map ``(B, ...)`` (token maps ``(B, P)``, image maps, 4-D maps summed over
            channels) or a Captum ``Attribution`` object.
        attr_b: Second map with the same number of elements per example, or an object.
        inputs: Model inputs, only for the ``Attribution`` path.
        target_a: Target for ``attr_a.attribute``.
        target_b: Target for ``attr_b.attribute`` (defaults to ``target_a``).
        attribute_kwargs: Extra keyword arguments for ``.attribute``.

    Returns:
        ``(B,)`` float64 in ``[-1, 1]``; ``NaN`` where either map is constant.
    """
    a, b = _pair(attr_a, attr_b, inputs, target_a, target_b, attribute_kwargs)
    return _pearson_rows(a, b)


@register_metric(
    "spearman",
    higher_is_better=None,
    category="sanity",
    reference="Adebayo et al., Sanity Checks for Saliency Maps, NeurIPS 2018",
    note="similarity: higher means more alike; for randomisation tests lower is better",
)
def spearman(
    attr_a: Any,
    attr_b: Any,
    *,
    inputs: Tensor | None = None,
    target_a: Any = None,
    target_b: Any = None,
    attribute_kwargs: dict[str, Any] | None = None,
) -> Tensor:
    """Per-example Spearman rank correlation of two flattened maps.

    The Pearson correlation of the average ranks (ties share their mean rank, as in
    ``scipy.stats.spearmanr``). Arguments as in :func:`pearson`.

    Returns:
        ``(B,)`` float64 in ``[-1, 1]``; ``NaN`` where either map is constant.
    """
    a, b = _pair(attr_a, attr_b, inputs, target_a, target_b, attribute_kwargs)
    return _pearson_rows(rankdata(a), rankdata(b))
