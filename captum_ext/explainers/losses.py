"""Loss terms of the trainable explainers, one small function per term, exactly as published.

T-TAME (Ntrougkas et al., IEEE Access 2024; the TAME loss of Ntrougkas et al., ICIP 2022):

    L = w_ce * CE(f(x * up(a_y)), y) + w_area * area(a) + w_tv * variation(a)

with y the backbone's own top-1 class, ``a`` the sigmoid attention maps and ``up`` bilinear
upsampling to the input size. The defaults reproduce the authors' code (``ce_coeff=1.5``,
``area_loss_coeff=2``, ``smoothness_loss_coeff=0.01``, ``area_loss_power=0.3``, epsilon
``0.0005``, smoothness power 2 with border penalty 0.3).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["area_loss", "ttame_loss", "variation_loss"]


def area_loss(maps: torch.Tensor, power: float = 0.3, eps: float = 5e-4) -> torch.Tensor:
    """Mean of ``(a + eps) ** power`` over every element of ``maps``.

    A power below 1 makes the gradient largest for small values, which pushes the attention
    maps towards few, confident regions. ``eps`` keeps the derivative finite at 0.

    Args:
        maps: Attention maps in ``[0, 1]``, any shape, e.g. ``(B, 1, s, s)``.
        power: Exponent (T-TAME: 0.3); ``power=1`` gives the plain mean without ``eps``.
        eps: Added before the power (T-TAME: 5e-4).

    Returns:
        A scalar.
    """
    if power == 1:
        return maps.mean()
    return (maps + eps).pow(power).mean()


def variation_loss(maps: torch.Tensor, power: float = 2.0, border: float = 0.3) -> torch.Tensor:
    """T-TAME's smoothness ("total variation") term of ``(B, M, h, w)`` maps.

    ``(sum |a[i+1, j] - a[i, j]|^p + sum |a[i, j+1] - a[i, j]|^p + border * sum_edges a^p)
    / (p * B)``: differences of vertically and horizontally adjacent cells, plus a penalty on
    the cells of the four edges (the corner cells count twice, once per edge), summed over all
    maps and normalised by ``p`` times the size of the first axis, as in the authors' code
    (``Arrangement.smoothness_loss``). It is a sum over cells, so it grows with the map size.

    Args:
        maps: ``(B, M, h, w)`` maps.
        power: ``p`` (T-TAME: 2, squared differences).
        border: Weight of the edge penalty (T-TAME: 0.3; 0 switches it off).

    Returns:
        A scalar.
    """
    if maps.dim() != 4:
        raise ValueError(f"variation_loss expects maps (B, M, h, w); got {tuple(maps.shape)}.")
    dh = (maps[:, :, 1:, :] - maps[:, :, :-1, :]).abs().pow(power).sum()
    dw = (maps[:, :, :, 1:] - maps[:, :, :, :-1]).abs().pow(power).sum()
    total = dh + dw
    if border > 0:
        edges = (
            maps[:, :, 0, :].pow(power).sum()
            + maps[:, :, -1, :].pow(power).sum()
            + maps[:, :, :, 0].pow(power).sum()
            + maps[:, :, :, -1].pow(power).sum()
        )
        total = total + border * edges
    return total / (power * maps.shape[0])


def ttame_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    maps: torch.Tensor,
    ce_weight: float = 1.5,
    area_weight: float = 2.0,
    tv_weight: float = 0.01,
    area_power: float = 0.3,
    area_eps: float = 5e-4,
    tv_power: float = 2.0,
    tv_border: float = 0.3,
) -> dict[str, torch.Tensor]:
    """The T-TAME loss and its unweighted terms.

    Args:
        logits: ``(B, K)`` scores of the backbone on the masked inputs.
        targets: ``(B,)`` the backbone's top-1 classes on the clean inputs.
        maps: The attention maps the area and smoothness terms see, ``(B, M, h, w)``
            (T-TAME: ``M = 1``, the map of each image's target class).
        ce_weight, area_weight, tv_weight: The weights (T-TAME: 1.5, 2, 0.01).
        area_power, area_eps: See :func:`area_loss`.
        tv_power, tv_border: See :func:`variation_loss`.

    Returns:
        ``{"loss": weighted sum, "ce": ..., "area": ..., "tv": ...}`` (terms unweighted).
    """
    ce = F.cross_entropy(_at_least_float32(logits), targets)
    maps = _at_least_float32(maps)
    area = area_loss(maps, area_power, area_eps)
    tv = variation_loss(maps, tv_power, tv_border)
    loss = ce_weight * ce + area_weight * area + tv_weight * tv
    return {"loss": loss, "ce": ce, "area": area, "tv": tv}


def _at_least_float32(t: torch.Tensor) -> torch.Tensor:
    """float32 for half-precision tensors (autocast), the tensor itself otherwise."""
    return t.to(torch.promote_types(t.dtype, torch.float32))
