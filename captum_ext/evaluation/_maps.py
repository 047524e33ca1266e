"""Maps between resolutions: attribution calls in chunks, patch grid <-> pixels, the model's grid."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from captum_ext.adapters import TransformerAdapter, adapter_for
from captum_ext.attr.base import upsample_nearest
from captum_ext.errors import UnsupportedModelError

__all__ = [
    "MapFn",
    "chunks",
    "method_grids",
    "model_grid",
    "model_patch",
    "pixel_map",
    "to_grid",
    "to_pixels",
    "to_pixels_bilinear",
]

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


def model_patch(model: nn.Module) -> tuple[int, int] | None:
    """The ``(ph, pw)`` pixels of one token of a transformer, ``None`` for any other model.

    With it, :func:`to_pixels` and :func:`to_grid` put token ``(i, j)`` over exactly the pixels
    ``[i * ph, (i + 1) * ph) x [j * pw, (j + 1) * pw)`` of the image, also when the model pads
    an image whose size is not a multiple of the patch (timm ``dynamic_img_pad``: the last
    row and column of tokens then hold fewer image pixels). ``None`` (a CNN, or a model
    without an adapter): the maps are pooled to the benchmark's cells (:func:`model_grid`)
    by adaptive pooling.
    """
    try:
        adapter = adapter_for(model)
    except UnsupportedModelError:
        return None
    if isinstance(adapter, TransformerAdapter) and adapter.modality == "image":
        return tuple(int(p) for p in adapter.patch_size)  # type: ignore[return-value]
    return None


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


def _cells(
    grid: tuple[int, int], size: tuple[int, int], patch: tuple[int, int] | None, fn: str
) -> tuple[int, int]:
    """The ``(ph, pw)`` of a ``grid`` of tokens over an image of ``size``; checked."""
    (h, w), (H, W) = grid, size
    if patch is None:
        if h < 1 or w < 1 or H % h or W % w:
            raise ValueError(
                f"{fn}: a {H}x{W} image is not a whole number of cells of a {h}x{w} grid; "
                "pass patch=(ph, pw), the model's patch size in pixels"
            )
        return H // h, W // w
    ph, pw = (int(v) for v in patch)
    if ph < 1 or pw < 1 or not ((h - 1) * ph < H <= h * ph and (w - 1) * pw < W <= w * pw):
        raise ValueError(
            f"{fn}: a {h}x{w} grid of {ph}x{pw}-pixel patches does not cover a {H}x{W} image "
            "(every token but the last row and column must lie wholly inside it)"
        )
    return ph, pw


def to_grid(
    maps: Tensor,
    grid: tuple[int, int],
    patch: tuple[int, int] | None = None,
    reduce: str = "mean",
) -> Tensor:
    """Pools pixel maps ``(B, [C,] H, W)`` (summed over ``C``) to the grid ``(B, h, w)``.

    Args:
        maps: Pixel maps.
        grid: ``(h, w)``.
        patch: The model's ``(ph, pw)`` (:func:`model_patch`): cell ``(i, j)`` is the mean
            (or max) of the image pixels of token ``(i, j)``, ``[i * ph, (i + 1) * ph) x
            [j * pw, (j + 1) * pw)`` cropped to the image. ``None``: adaptive pooling
            (``F.adaptive_avg_pool2d`` / ``F.adaptive_max_pool2d``), the benchmark's cells of
            a model without tokens.
        reduce: ``"mean"`` or ``"max"``.

    Raises:
        ValueError: ``reduce`` is neither, or the patches do not cover the image.
    """
    if reduce not in ("mean", "max"):
        raise ValueError(f"to_grid: reduce must be 'mean' or 'max', got {reduce!r}")
    m = (maps if maps.dim() == 3 else maps.sum(dim=1))[:, None].float()
    size = (m.shape[-2], m.shape[-1])
    exact = patch is None or (grid[0] * patch[0], grid[1] * patch[1]) == size
    if exact:  # the cells are the adaptive bins: the same numbers as ever
        pool = F.adaptive_avg_pool2d if reduce == "mean" else F.adaptive_max_pool2d
        return pool(m, grid)[:, 0]
    ph, pw = _cells(grid, size, patch, "to_grid")
    pad = (0, grid[1] * pw - size[1], 0, grid[0] * ph - size[0])  # the model pads right/bottom
    if reduce == "max":
        return F.max_pool2d(F.pad(m, pad, value=float("-inf")), (ph, pw))[:, 0]
    total = F.avg_pool2d(F.pad(m, pad), (ph, pw), divisor_override=1)
    count = F.avg_pool2d(F.pad(torch.ones_like(m[:1]), pad), (ph, pw), divisor_override=1)
    return (total / count)[:, 0]


def to_pixels(grids: Tensor, size: tuple[int, int], patch: tuple[int, int] | None = None) -> Tensor:
    """Nearest upsampling of ``(B, h, w)`` token maps to ``(B, H, W)``, as the methods do.

    Token ``(i, j)`` covers exactly the pixels ``[i * ph, (i + 1) * ph) x [j * pw,
    (j + 1) * pw)``, cropped to the image (the methods' own ``output="input"``,
    :func:`captum_ext.attr.base.upsample_nearest`).

    Args:
        grids: Token maps ``(B, h, w)``.
        size: The image's ``(H, W)``.
        patch: The model's ``(ph, pw)`` (:func:`model_patch`); ``None``: ``(H / h, W / w)``,
            which must then be whole numbers.

    Raises:
        ValueError: ``patch=None`` and the image is not a whole number of cells, or the
            patches do not cover the image.
    """
    ph, pw = _cells(tuple(grids.shape[-2:]), tuple(size), patch, "to_pixels")
    up = upsample_nearest(grids[:, None], ph, pw)[:, 0]
    return up[..., : size[0], : size[1]]


def to_pixels_bilinear(
    grids: Tensor, size: tuple[int, int], patch: tuple[int, int] | None = None
) -> Tensor:
    """Bilinear upsampling of ``(B, h, w)`` token maps to ``(B, H, W)``.

    The grid is upsampled to ``(h * ph, w * pw)`` with ``align_corners=False`` (the value of
    token ``(i, j)`` sits at the centre of its patch, pixel ``((i + 0.5) ph - 0.5,
    (j + 0.5) pw - 0.5)``, and the image's borders repeat the outer tokens), then cropped to
    the image, as :func:`to_pixels` crops.

    Args:
        grids: Token maps ``(B, h, w)``.
        size: The image's ``(H, W)``.
        patch: The model's ``(ph, pw)`` (:func:`model_patch`); ``None``: ``(H / h, W / w)``.

    Raises:
        ValueError: As :func:`to_pixels`.
    """
    h, w = grids.shape[-2:]
    ph, pw = _cells((h, w), tuple(size), patch, "to_pixels_bilinear")
    g = grids[:, None] if grids.is_floating_point() else grids[:, None].float()
    up = F.interpolate(g, size=(h * ph, w * pw), mode="bilinear", align_corners=False)
    return up[:, 0, : size[0], : size[1]]


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
