"""MHEX's saliency: the stages' class activation maps, normalised, fused and formatted.

Private to :mod:`captum_ext.explainers.mhex`, whose methods call these functions with the
explainer's settings (``nonneg``, ``fusion``, ``stage_weights``, ``window``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from captum.attr import LayerAttribution
from torch import nn

from captum_ext.adapters.base import ModelAdapter, TransformerAdapter
from captum_ext.attr.base import format_token_map
from captum_ext.explainers._mhex_network import _METHOD

__all__ = [
    "OUTPUTS",
    "OutputKind",
    "box_smooth_1d",
    "box_smooth_2d",
    "fuse",
    "fusion_weights",
    "head_cams",
    "map_saliency",
    "normalised",
    "saliency",
    "target_cams",
    "token_saliency",
    "valid_tokens",
]

OutputKind = Literal["input", "like_input", "grid", "tokens"]
OUTPUTS = ("input", "like_input", "grid", "tokens")
_FLOOR = 1e-3
"""Floor of the normalised stage maps in the geometric fusion (a zero would veto a location)."""


def head_cams(heads: Sequence[nn.Module], features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Every head's class activation maps of its stage's gated features, all classes.

    Args:
        heads: The heads, in stage order.
        features: The gated features ``F'`` of every stage, ``(B, C, h, w)`` or ``(B, N, D)``.

    Returns:
        Per stage ``W_eq F' + b_eq``: ``(B, K, h, w)`` or ``(B, K, N)``.
    """
    return [head.cam(f) for head, f in zip(heads, features, strict=True)]


def target_cams(
    heads: Sequence[nn.Module], features: Sequence[torch.Tensor], idx: torch.Tensor
) -> list[torch.Tensor]:
    """``W_eq[c_b] F'_b + b_eq[c_b]`` of each example's class only: ``(B, h, w)`` / ``(B, N)``.

    Args:
        heads: The heads, in stage order.
        features: The gated features of every stage, ``(B, C, h, w)`` or ``(B, N, D)``.
        idx: The class of every example, ``(B,)`` integers.
    """
    out = []
    for head, f in zip(heads, features, strict=True):
        w, b = head.equivalent()
        i = idx.to(w.device)
        eq = "bc,bchw->bhw" if f.dim() == 4 else "bc,bnc->bn"
        bias = b[i].reshape(-1, *([1] * (f.dim() - 2)))
        out.append(torch.einsum(eq, w[i], f) + bias)
    return out


def valid_tokens(
    adapter: ModelAdapter, x: torch.Tensor, extra: Any, features: torch.Tensor
) -> torch.Tensor | None:
    """``(B, N)`` bool: the tokens that are explained (not prefix, special or padding).

    Args:
        adapter: The model's adapter; ``None`` is returned for a CNN.
        x: The input (``input_ids`` for text).
        extra: The extra model arguments (the attention mask for text).
        features: Tokens ``(B, N, D)`` of a stage (their count and device are used).
    """
    if not isinstance(adapter, TransformerAdapter):
        return None
    f = features
    if adapter.modality == "text":
        return ~adapter.special_tokens(x, extra).to(f.device)
    valid = torch.ones(f.shape[0], f.shape[1], dtype=torch.bool, device=f.device)
    valid[:, : adapter.num_prefix_tokens] = False
    return valid


def fusion_weights(stage_weights: Sequence[float] | None, num_stages: int) -> list[float]:
    """The stages' fusion weights, summing to 1 (``None``: equal)."""
    w = stage_weights or [1.0] * num_stages
    total = sum(w)
    return [v / total for v in w]


def normalised(m: torch.Tensor, dims: tuple[int, ...], nonneg: bool) -> torch.Tensor:
    """``m`` (rectified with ``nonneg``) divided by its maximum magnitude over ``dims``.

    All-zero maps stay zero.
    """
    if nonneg:
        m = m.clamp_min(0)
    scale = m.abs().amax(dim=dims, keepdim=True)
    return m / torch.where(scale > 0, scale, torch.ones_like(scale))


def fuse(
    maps: list[torch.Tensor],
    dims: tuple[int, ...],
    weights: Sequence[float],
    nonneg: bool,
    fusion: str,
) -> torch.Tensor:
    """Normalises every stage's map and fuses them (weighted geometric or arithmetic mean).

    Args:
        maps: One map per stage, all of one shape.
        dims: The dimensions of one example's map (normalised per example).
        weights: The stages' weights, summing to 1 (:func:`fusion_weights`).
        nonneg: Rectify the maps before normalising.
        fusion: ``"geometric"`` (maps floored at ``1e-3``, result in ``[0, 1]``) or ``"mean"``.
    """
    normed = [normalised(m, dims, nonneg) for m in maps]
    if fusion == "mean":
        return sum(w * m for w, m in zip(weights, normed, strict=True))
    logs = sum(w * m.clamp_min(_FLOOR).log() for w, m in zip(weights, normed, strict=True))
    # [_FLOOR, 1] maps to [0, 1]; the clamp removes rounding (exp(log(_FLOOR)) can come out
    # one ulp below _FLOOR), so an all-zero location is exactly 0, never -1e-10.
    return ((logs.exp() - _FLOOR) / (1 - _FLOOR)).clamp(0, 1)


def saliency(
    picked: list[torch.Tensor],
    valid: torch.Tensor | None,
    x: torch.Tensor,
    output: OutputKind,
    *,
    adapter: ModelAdapter,
    weights: Sequence[float],
    nonneg: bool,
    fusion: str,
    window: int,
) -> torch.Tensor:
    """The fused saliency of one class per example, in the layout ``output`` asks for.

    Args:
        picked: Each stage's map of the class (:func:`target_cams`).
        valid: The explained tokens (:func:`valid_tokens`); ``None`` for a CNN.
        x: The input.
        output: As in :meth:`captum_ext.explainers.MHEX.attribute`.
        adapter, weights, nonneg, fusion, window: The explainer's adapter and settings.
    """
    if valid is None:
        return map_saliency(picked, x, output, weights=weights, nonneg=nonneg, fusion=fusion)
    return token_saliency(
        picked,
        valid,
        x,
        output,
        adapter=adapter,
        weights=weights,
        nonneg=nonneg,
        fusion=fusion,
        window=window,
    )


def map_saliency(
    picked: list[torch.Tensor],
    x: torch.Tensor,
    output: str,
    *,
    weights: Sequence[float],
    nonneg: bool,
    fusion: str,
) -> torch.Tensor:
    """CNN stages' maps ``(B, h, w)`` upsampled to the finest grid, fused, then formatted."""
    size = max((c.shape[-2:] for c in picked), key=lambda s: s[0] * s[1])
    maps = []
    for c in picked:
        m = c[:, None]
        if tuple(m.shape[-2:]) != tuple(size):
            m = F.interpolate(m, size=tuple(size), mode="bilinear", align_corners=False)
        maps.append(m)
    total = fuse(maps, (1, 2, 3), weights, nonneg, fusion)
    if output == "grid":
        return total
    up = LayerAttribution.interpolate(total, tuple(x.shape[-2:]), interpolate_mode="bilinear")
    if output == "like_input":
        return up.expand(-1, x.shape[1], -1, -1).contiguous()
    return up


def token_saliency(
    picked: list[torch.Tensor],
    valid: torch.Tensor,
    x: torch.Tensor,
    output: str,
    *,
    adapter: ModelAdapter,
    weights: Sequence[float],
    nonneg: bool,
    fusion: str,
    window: int,
) -> torch.Tensor:
    """Transformer stages' token maps ``(B, N)`` fused over the valid tokens, smoothed, formatted."""
    if not isinstance(adapter, TransformerAdapter):
        raise TypeError("MHEX: token maps exist for transformers only.")
    b = picked[0].shape[0]
    total = fuse([c * valid for c in picked], (1,), weights, nonneg, fusion)
    if adapter.modality == "text":
        total = box_smooth_1d(total, valid, window)
    elif window > 1:
        h, gw = adapter.grid_size(x)
        p = adapter.num_prefix_tokens
        grid = box_smooth_2d(total[:, p:].reshape(b, 1, h, gw), window)
        total = torch.cat([total[:, :p], grid.reshape(b, h * gw)], dim=1)
    return format_token_map(total, adapter, x, output, _METHOD).contiguous()


def box_smooth_1d(scores: torch.Tensor, valid: torch.Tensor, window: int) -> torch.Tensor:
    """Moving average of ``scores (B, T)`` over a window of ``window`` valid positions' span.

    Invalid positions (``valid`` false: special tokens, padding) neither contribute nor receive
    a value (they come back as 0); near the ends and gaps the average is over the valid
    positions inside the window.
    """
    if window <= 1:
        return scores * valid
    v = valid.to(scores.dtype)[:, None]
    kernel = scores.new_ones(1, 1, window)
    num = F.conv1d((scores * valid)[:, None], kernel, padding=window // 2)
    den = F.conv1d(v, kernel, padding=window // 2)
    out = num / den.clamp_min(1)
    return out[:, 0, : scores.shape[1]] * valid


def box_smooth_2d(grid: torch.Tensor, window: int) -> torch.Tensor:
    """Mean over a ``window x window`` neighbourhood of ``grid (B, 1, h, w)`` (edges: fewer cells)."""
    if window <= 1:
        return grid
    return F.avg_pool2d(grid, window, stride=1, padding=window // 2, count_include_pad=False)
