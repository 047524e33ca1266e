"""Maps between resolutions: attribution calls in chunks, patch grid <-> pixels, the model's grid."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from captum_ext.adapters import TransformerAdapter, adapter_for
from captum_ext.errors import UnsupportedModelError

__all__ = ["MapFn", "chunks", "method_grids", "model_grid", "pixel_map", "to_grid", "to_pixels"]

MapFn = Callable[[Tensor, Tensor], Tensor]
"""``fn(inputs, targets) -> maps``: images ``(B, C, H, W)`` and targets ``(B,)`` give maps
``(B, 1, H, W)`` / ``(B, H, W)``; text ``input_ids (B, T)`` give ``(B, T)``."""


def chunks(n: int, size: int) -> list[slice]:
    """Consecutive slices of at most ``size`` covering ``range(n)``."""
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def model_grid(model: nn.Module, images: Tensor, data: Any) -> tuple[int, int]:
    """The ``(h, w)`` grid on which the maps of ``model`` are compared with the masks.

    The one place that decides it. A transformer gives its adapter's patch grid
    (``adapter_for(model).grid_size(images)``). Any other model (a CNN, whose maps are as
    coarse as the layer they come from, or a model without an adapter) falls back to the
    benchmark's cell size, ``data.patch`` (default 8): its maps come from custom functions,
    trainable explainers or baselines at pixel resolution and are pooled to that grid.

    Args:
        model: The evaluated model.
        images: Images ``(N, C, H, W)``.
        data: The benchmark data (its ``patch`` attribute is read for the fallback).
    """
    try:
        adapter = adapter_for(model)
    except UnsupportedModelError:  # no adapter at all: evaluated through custom maps only
        adapter = None
    if isinstance(adapter, TransformerAdapter):
        return adapter.grid_size(images)
    patch = int(getattr(data, "patch", 8))
    return images.shape[-2] // patch, images.shape[-1] // patch


def method_grids(
    attr: Any,
    class_agnostic: bool,
    images: Tensor,
    pi: Tensor,
    pc: Tensor,
    batch_size: int,
) -> Tensor:
    """Patch-grid maps ``(Np, h, w)`` of every (image ``pi[j]``, class ``pc[j]``) pair.

    Class-agnostic methods run once per image; methods with ``attribute_targets`` explain all
    classes present in a chunk of images in one pass; the others run on chunks of pairs.
    """
    out: list[Tensor] = []
    if class_agnostic:
        grids = torch.cat(
            [attr.attribute(images[s], output="grid") for s in chunks(len(images), batch_size)]
        )
        return grids[pi, 0].detach().float()
    if callable(getattr(attr, "attribute_targets", None)):
        # One pass per chunk of images for all classes present in it; pairs are image-major.
        for s in chunks(len(images), batch_size):
            sel = (pi >= s.start) & (pi < s.stop)
            classes = sorted(set(pc[sel].tolist()))
            maps = attr.attribute_targets(images[s], targets=classes, output="grid")
            row = {c: k for k, c in enumerate(classes)}
            k = torch.tensor(
                [row[c] for c in pc[sel].tolist()], dtype=torch.long, device=maps.device
            )
            out.append(maps[k, pi[sel].to(maps.device) - s.start, 0])
        return torch.cat(out).detach().float()
    for s in chunks(len(pi), batch_size):
        x = images[pi[s]]
        out.append(attr.attribute(x, target=pc[s].to(x.device), output="grid")[:, 0])
    return torch.cat(out).detach().float()


def to_grid(maps: Tensor, grid: tuple[int, int]) -> Tensor:
    """Average-pools pixel maps ``(B, [1,] H, W)`` to the patch grid ``(B, h, w)``."""
    m = maps if maps.dim() == 3 else maps.sum(dim=1)
    return F.adaptive_avg_pool2d(m[:, None].float(), grid)[:, 0]


def to_pixels(grids: Tensor, size: tuple[int, int]) -> Tensor:
    """Nearest upsampling of ``(B, h, w)`` patch maps to ``(B, H, W)`` (as the methods do)."""
    h, w = grids.shape[-2:]
    ph, pw = -(-size[0] // h), -(-size[1] // w)
    up = grids.repeat_interleave(ph, dim=-2).repeat_interleave(pw, dim=-1)
    return up[..., : size[0], : size[1]]


def pixel_map(maps: Tensor, size: tuple[int, int], name: str) -> Tensor:
    """Checks a map ``(B, 1, H, W)`` / ``(B, H, W)`` of the image size; returns ``(B, H, W)``."""
    m = maps.detach()
    if m.dim() == 4:
        m = m.sum(dim=1)
    if m.dim() != 3 or tuple(m.shape[-2:]) != tuple(size):
        raise ValueError(
            f"map {name!r}: expected (B, 1, H, W) or (B, H, W) with (H, W) = {tuple(size)}, "
            f"got {tuple(maps.shape)}"
        )
    return m.float()
