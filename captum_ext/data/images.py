"""Procedural multi-label shape images with exact per-class ground-truth masks.

Every image shows a smooth random-colour background (a bilinear gradient between four random
corner colours) with small uniform pixel noise, and 1 to ``max_objects`` filled shapes of
different classes. Each shape has a random colour drawn from the same distribution for every
class, so colour carries no class information; only the outline tells the classes apart. The
object masks are exactly the painted pixels, which makes the data a ground truth for
class-discriminative attribution maps. Shapes: ``square`` (filled box), ``circle`` (disc),
``triangle`` (apex up) and ``plus`` (thin arms); all four stay distinct at 5 pixels.

Two layouts are supported:

* ``"aligned"``: the image is a grid of ``patch`` x ``patch`` cells (the tokens of a vision
  transformer with that patch size) and every object lies entirely inside one cell, different
  objects in different cells.
* ``"free"``: objects of extent 6 to ``size // 2`` pixels at any position; they may straddle
  patch borders but never overlap (their bounding boxes keep a gap of at least one pixel).

``min_extent`` and ``max_extent`` narrow the extent range, e.g. ``size=96, layout="free",
min_extent=16, max_extent=40`` for objects spanning several tokens of a 12 x 12 grid.

Image ``i`` depends only on ``seed`` and ``i`` (never on ``n``), and everything needed to render
it again (background corners, noise seed, objects) is kept in ``ShapesBatch.params``, so
:func:`render_without` can remove one object and leave every other pixel bit-identical.

Sampling and rasterisation are vectorised over a chunk of images (integer coordinate grids and
inequalities, no per-pixel loops); ``ShapesDataset`` renders whole batches for ``DataLoader``
through ``__getitems__``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = [
    "SHAPE_CLASSES",
    "ImageParams",
    "ShapeObject",
    "ShapesBatch",
    "ShapesDataset",
    "render_without",
    "shapes",
]

SHAPE_CLASSES: tuple[str, ...] = ("square", "circle", "triangle", "plus")
"""Class names; class index ``k`` of labels and masks is ``SHAPE_CLASSES[k]``."""

LAYOUTS: tuple[str, ...] = ("aligned", "free")

_RENDER_BLOCK = 128  # images rendered at once
_CHUNK = 1024  # images per independently seeded chunk; fixed so that shapes(n)[i] ignores n
_MIN_CONTRAST = 0.3  # min over object pixels of max over channels |colour - background|
_UNIFORM_SCALE = 12**0.5  # uniform noise on +-sqrt(3) * noise_std has std noise_std
_MAX_NOISE_STD = 0.1  # keeps the noise bound sqrt(3) * noise_std below _MIN_CONTRAST
_COLOUR_BLOCK = 4  # candidate colours drawn at once
_COLOUR_BLOCKS = 8
_PLACE_BLOCK = 16  # candidate boxes drawn at once in the free layout
_PLACE_BLOCKS = 16
_PLACE_RESTARTS = 100
_FREE_MIN_EXTENT = 6
_ALIGNED_MIN_EXTENT = 5


@dataclass(frozen=True)
class ShapeObject:
    """One filled shape, described by its square bounding box.

    Attributes:
        class_index: Index into ``SHAPE_CLASSES``.
        top: Row of the top-left pixel of the bounding box.
        left: Column of the top-left pixel of the bounding box.
        extent: Side length of the bounding box in pixels.
        colour: RGB fill colour in [0, 1].
    """

    class_index: int
    top: int
    left: int
    extent: int
    colour: tuple[float, float, float]

    @property
    def centre(self) -> tuple[float, float]:
        """Centre of the bounding box as (row, column) in continuous pixel coordinates."""
        return (self.top + self.extent / 2, self.left + self.extent / 2)

    @property
    def scale(self) -> int:
        """Side length of the bounding box in pixels (same as ``extent``)."""
        return self.extent

    @property
    def class_name(self) -> str:
        """Name of the shape class."""
        return SHAPE_CLASSES[self.class_index]


@dataclass(frozen=True)
class ImageParams:
    """Everything needed to render one image again.

    Attributes:
        size: Image height and width in pixels.
        background: The four RGB corner colours of the bilinear background gradient, in the
            order top-left, top-right, bottom-left, bottom-right.
        noise_seed: Entropy of the ``numpy.random.SeedSequence`` of the noise stream (one
            stream per chunk of 1024 images).
        noise_index: Position of this image in its noise stream.
        noise_std: Standard deviation of the uniform pixel noise.
        objects: The drawn shapes, at most one per class.
    """

    size: int
    background: tuple[tuple[float, float, float], ...]
    noise_seed: tuple[int, ...]
    noise_index: int
    noise_std: float
    objects: tuple[ShapeObject, ...]


@dataclass(frozen=True, eq=False)
class ShapesBatch:
    """A batch of shape images with labels and exact per-class masks.

    Attributes:
        images: Images with values in [0, 1], shape (N, 3, H, W), float32.
        labels: Multi-hot class labels, shape (N, K), float32, ``K = len(SHAPE_CLASSES)``.
        masks: Per-class object masks, shape (N, K, H, W), bool; exactly the pixels painted
            with that class's object, all False for absent classes.
        params: Per image, everything needed to render it again.
        seed: The seed the batch was generated from.
        layout: ``"aligned"`` or ``"free"``.
        patch: Patch (grid cell) size the layout refers to.
    """

    images: torch.Tensor
    labels: torch.Tensor
    masks: torch.Tensor
    params: tuple[ImageParams, ...]
    seed: int
    layout: str
    patch: int

    def __len__(self) -> int:
        return self.images.shape[0]

    def without(self, index: int, class_idx: int | str) -> torch.Tensor:
        """Render image ``index`` again without its object of class ``class_idx``.

        See :func:`render_without`.
        """
        return render_without(self, index, class_idx)


# --------------------------------------------------------------------------------------------
# argument checking


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value}")
    return int(value)


def _check_args(
    n: int,
    seed: int,
    layout: str,
    max_objects: int,
    size: int,
    patch: int,
    min_objects: int,
    noise_std: float,
    max_extent: int | None = None,
    min_extent: int | None = None,
) -> None:
    k = len(SHAPE_CLASSES)
    _check_int("n", n, 0)
    _check_int("seed", seed, 0)
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; supported layouts are {LAYOUTS}")
    _check_int("size", size, 1)
    _check_int("patch", patch, 3)
    _check_int("min_objects", min_objects, 1)
    _check_int("max_objects", max_objects, 1)
    if max_objects > k:
        raise ValueError(
            f"max_objects={max_objects} exceeds the number of shape classes ({k}: "
            f"{', '.join(SHAPE_CLASSES)}); every object in an image has a different class, "
            f"so max_objects must lie in 1..{k}"
        )
    if min_objects > max_objects:
        raise ValueError(
            f"min_objects={min_objects} is larger than max_objects={max_objects}; "
            "it must lie in 1..max_objects"
        )
    if not 0.0 <= float(noise_std) <= _MAX_NOISE_STD:
        raise ValueError(
            f"noise_std must lie in [0, {_MAX_NOISE_STD}] so that objects keep their contrast "
            f"with the background, got {noise_std}"
        )
    if layout == "aligned":
        if size % patch != 0:
            raise ValueError(
                f"layout='aligned' needs size divisible by patch, got size={size}, "
                f"patch={patch}; choose e.g. size={(size // patch + 1) * patch} or use "
                "layout='free', which supports any size"
            )
        cells = (size // patch) ** 2
        if max_objects > cells:
            raise ValueError(
                f"layout='aligned' puts each object in its own {patch}x{patch} cell, but a "
                f"{size}x{size} image has only {cells} cells for max_objects={max_objects}"
            )
    elif size // 2 < _FREE_MIN_EXTENT:
        raise ValueError(
            f"layout='free' draws objects of extent {_FREE_MIN_EXTENT}..size//2 and needs "
            f"size >= {2 * _FREE_MIN_EXTENT}, got size={size}"
        )
    if max_extent is not None:
        lo, hi = _extent_range(layout, size, patch)
        if (
            isinstance(max_extent, bool)
            or not isinstance(max_extent, (int, np.integer))
            or not (lo <= max_extent <= hi)
        ):
            raise ValueError(
                f"max_extent must be an integer in {lo}..{hi} for layout={layout!r} "
                f"(size={size}, patch={patch}), got {max_extent!r}"
            )
    if min_extent is not None:
        lo, hi = _extent_range(layout, size, patch)
        top = hi if max_extent is None else int(max_extent)
        if (
            isinstance(min_extent, bool)
            or not isinstance(min_extent, (int, np.integer))
            or not (lo <= min_extent <= top)
        ):
            raise ValueError(
                f"min_extent must be an integer in {lo}..{top} for layout={layout!r} "
                f"(size={size}, patch={patch}, max_extent={max_extent}), got {min_extent!r}"
            )


def _extent_range(layout: str, size: int, patch: int) -> tuple[int, int]:
    """Smallest and largest object extent (bounding-box side) of a layout, by default."""
    if layout == "aligned":
        return min(_ALIGNED_MIN_EXTENT, patch), patch
    return _FREE_MIN_EXTENT, size // 2


# --------------------------------------------------------------------------------------------
# rendering


@functools.lru_cache(maxsize=8)
def _bilinear_weights(size: int) -> np.ndarray:
    """Bilinear corner weights at pixel centres, shape (4, H, W), read-only."""
    t = ((np.arange(size) + 0.5) / size).astype(np.float32)
    v, u = t[:, None], t[None, :]
    weights = np.stack([(1 - v) * (1 - u), (1 - v) * u, v * (1 - u), v * u])
    weights.flags.writeable = False
    return weights


def _background(corners: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Background gradients from corner colours.

    Written as element-wise products and sums so the result for one image does not depend on
    the batch it is computed in.

    Args:
        corners: Corner colours, shape (N, 4, 3).
        weights: Bilinear weights from ``_bilinear_weights``, shape (4, H, W).

    Returns:
        Backgrounds, shape (N, 3, H, W), float32.
    """
    c = corners[:, :, :, None, None]
    return c[:, 0] * weights[0] + c[:, 1] * weights[1] + c[:, 2] * weights[2] + c[:, 3] * weights[3]


def _plus_half_width(extent: np.ndarray) -> np.ndarray:
    """Half arm width of the plus sign in doubled pixel units (arm width ``hw + 1`` pixels).

    The value has the parity of ``extent - 1`` so that the arm is centred, and is at most
    ``extent / 4`` so that thin arms stay distinguishable from a filled disc.
    """
    hw = extent // 4
    return np.where((hw - (extent - 1)) % 2 == 0, hw, hw - 1)


def _rasterise(class_index: np.ndarray, extent: np.ndarray, max_extent: int) -> np.ndarray:
    """Shape masks in bounding-box coordinates.

    Args:
        class_index: Class of each object, shape (M,).
        extent: Bounding-box side of each object, shape (M,).
        max_extent: Side of the local grid, at least ``extent.max()``.

    Returns:
        Masks, shape (M, S, S) with ``S = max_extent``; pixel (i, j) is row ``top + i`` and
        column ``left + j`` of the image.
    """
    s = extent[:, None, None]
    idx = np.arange(max_extent)
    i = idx[None, :, None]
    j = idx[None, None, :]
    inside = (i < s) & (j < s)
    a = 2 * i - (s - 1)  # doubled row offset from the box centre
    b = 2 * j - (s - 1)  # doubled column offset from the box centre
    cls = class_index[:, None, None]
    square = inside
    disc = a * a + b * b <= s * s
    triangle = 2 * np.abs(b) <= 2 * i + 3  # apex at the top row, full width at the bottom
    hw = _plus_half_width(extent)[:, None, None]
    plus = (np.abs(a) <= hw) | (np.abs(b) <= hw)
    shape = np.where(cls == 0, square, np.where(cls == 1, disc, np.where(cls == 2, triangle, plus)))
    return inside & shape


@functools.lru_cache(maxsize=64)
def _stream_state(noise_seed: tuple[int, ...]) -> dict:
    return np.random.PCG64(np.random.SeedSequence(list(noise_seed))).state


def _noise_bytes(noise_seed: tuple[int, ...], start: int, count: int, size: int) -> np.ndarray:
    """Images ``start .. start + count - 1`` of a noise stream as random bytes, (M, 3, H, W).

    Each image takes a fixed number of 64-bit draws (8 bytes each), so any image can be
    reached by jumping ahead.
    """
    values = 3 * size * size
    draws = -(-values // 8)
    bitgen = np.random.PCG64()
    bitgen.state = _stream_state(noise_seed)
    bitgen.advance(start * draws)
    raw = bitgen.random_raw(count * draws).astype("<u8", copy=False).view(np.uint8)
    return raw.reshape(count, 8 * draws)[:, :values].reshape(count, 3, size, size)


def _noise(params: Sequence[ImageParams], size: int) -> np.ndarray:
    """Uniform pixel noise with standard deviation ``noise_std``, shape (N, 3, H, W), float32.

    Consecutive images of one stream are drawn in one call.
    """
    out = np.zeros((len(params), 3, size, size), dtype=np.float32)
    k = 0
    while k < len(params):
        p, end = params[k], k + 1
        while (
            end < len(params)
            and params[end].noise_seed == p.noise_seed
            and params[end].noise_index == p.noise_index + end - k
        ):
            end += 1
        levels = _noise_bytes(p.noise_seed, p.noise_index, end - k, size)
        std = np.array([q.noise_std for q in params[k:end]], dtype=np.float32)[:, None, None, None]
        # 256 equally spaced levels, centred: a discrete uniform with std ~ noise_std.
        out[k:end] = (levels.astype(np.float32) - np.float32(127.5)) * (
            std * np.float32(_UNIFORM_SCALE / 256)
        )
        k = end
    return out


def _render(params: Sequence[ImageParams], size: int) -> tuple[np.ndarray, np.ndarray]:
    """Render images and masks from their parameters.

    Every operation is element-wise per image, so an image renders bit-identically alone or
    inside any batch.

    Args:
        params: Parameters of the images to render, all of the same ``size``.
        size: Image height and width.

    Returns:
        Images, shape (N, 3, H, W), float32 in [0, 1], and masks, shape (N, K, H, W), bool.
    """
    n, k = len(params), len(SHAPE_CLASSES)
    images = np.empty((n, 3, size, size), dtype=np.float32)
    masks = np.empty((n, k, size, size), dtype=bool)
    for start in range(0, n, _RENDER_BLOCK):  # blocks that stay in cache
        stop = min(n, start + _RENDER_BLOCK)
        _render_block(params[start:stop], size, images[start:stop], masks[start:stop])
    return images, masks


def _render_block(
    params: Sequence[ImageParams], size: int, images: np.ndarray, masks: np.ndarray
) -> None:
    """Render a block of images into ``images`` (N, 3, H, W) and ``masks`` (N, K, H, W)."""
    n = len(params)
    masks[:] = False
    corners = np.array([p.background for p in params], dtype=np.float32).reshape(n, 4, 3)
    noise = _noise(params, size)
    images[:] = _background(corners, _bilinear_weights(size))
    images += noise
    np.clip(images, 0.0, 1.0, out=images)

    objects = [(m, o) for m, p in enumerate(params) for o in p.objects]
    if objects:
        img = np.array([m for m, _ in objects], dtype=np.int64)
        cls = np.array([o.class_index for _, o in objects], dtype=np.int64)
        top = np.array([o.top for _, o in objects], dtype=np.int64)
        left = np.array([o.left for _, o in objects], dtype=np.int64)
        ext = np.array([o.extent for _, o in objects], dtype=np.int64)
        colour = np.array([o.colour for _, o in objects], dtype=np.float32)
        local = _rasterise(cls, ext, int(ext.max()))
        obj, li, lj = np.nonzero(local)
        rows, cols = top[obj] + li, left[obj] + lj
        masks[img[obj], cls[obj], rows, cols] = True
        # Advanced indices separated by a slice put the pixel axis first: shape (P, 3).
        images[img[obj], :, rows, cols] = np.clip(
            colour[obj] + noise[img[obj], :, rows, cols], 0, 1
        )


# --------------------------------------------------------------------------------------------
# sampling (vectorised over a chunk of _CHUNK images)


def _scaled_int(u: np.ndarray, lo: int | np.ndarray, hi: int | np.ndarray) -> np.ndarray:
    """Map uniforms in [0, 1) to integers uniform in ``lo..hi`` (inclusive)."""
    return lo + np.minimum((u * (hi - lo + 1)).astype(np.int64), hi - lo)


def _place_aligned(
    rng: np.random.Generator, count: int, slots: int, size: int, patch: int, lo: int, hi: int
) -> np.ndarray:
    """Bounding boxes, each inside its own ``patch`` x ``patch`` cell.

    Args:
        rng: Random generator.
        count: Number of images.
        slots: Objects per image to place.
        size: Image side in pixels.
        patch: Cell side in pixels.
        lo: Smallest extent.
        hi: Largest extent (at most ``patch``).

    Returns:
        Boxes as (top, left, extent), shape (C, Q, 3).
    """
    grid = size // patch
    cells = grid * grid
    u = rng.random((count, cells + 3 * slots))
    cell = np.argsort(u[:, :cells], axis=1, kind="stable")[:, :slots]
    us, uy, ux = u[:, cells:].reshape(count, slots, 3).transpose(2, 0, 1)
    ext = _scaled_int(us, lo, hi)
    top = (cell // grid) * patch + _scaled_int(uy, 0, patch - ext)
    left = (cell % grid) * patch + _scaled_int(ux, 0, patch - ext)
    return np.stack([top, left, ext], axis=-1)


def _place_free(
    rng: np.random.Generator, counts: np.ndarray, slots: int, size: int, lo: int, hi: int
) -> np.ndarray:
    """Bounding boxes anywhere, with a gap of at least one pixel between boxes of one image.

    Each round draws a block of candidate boxes for the next object of every unfinished image
    and keeps the first that fits; an image that fails ``_PLACE_BLOCKS`` rounds in a row starts
    over.

    Args:
        rng: Random generator.
        counts: Objects per image, shape (C,).
        slots: Largest count.
        size: Image side in pixels.
        lo: Smallest extent.
        hi: Largest extent (at most ``size // 2``).

    Returns:
        Boxes as (top, left, extent), shape (C, Q, 3); unused slots are zero.
    """
    boxes = np.zeros((len(counts), slots, 3), dtype=np.int64)
    placed = np.zeros(len(counts), dtype=np.int64)
    fails = np.zeros(len(counts), dtype=np.int64)
    slot = np.arange(slots)
    for _ in range(_PLACE_RESTARTS * _PLACE_BLOCKS * max(slots, 1)):
        todo = np.flatnonzero(placed < counts)
        if todo.size == 0:
            return boxes
        u = rng.random((todo.size, _PLACE_BLOCK, 3))
        ext = _scaled_int(u[..., 0], lo, hi)
        top = _scaled_int(u[..., 1], 0, size - ext)
        left = _scaled_int(u[..., 2], 0, size - ext)
        old = boxes[todo][:, None]  # (P, 1, Q, 3)
        t, le, s = top[..., None], left[..., None], ext[..., None]  # (P, B, 1)
        ot, ol, os_ = old[..., 0], old[..., 1], old[..., 2]
        apart = (t + s < ot) | (ot + os_ < t) | (le + s < ol) | (ol + os_ < le)
        apart |= slot[None, None, :] >= placed[todo][:, None, None]
        fits = apart.all(axis=2)  # (P, B)
        ok = fits.any(axis=1)
        first = fits.argmax(axis=1)
        img, row = todo[ok], np.flatnonzero(ok)
        boxes[img, placed[img]] = np.stack(
            [top[row, first[ok]], left[row, first[ok]], ext[row, first[ok]]], axis=-1
        )
        placed[img] += 1
        fails[img] = 0
        stuck = todo[~ok]
        fails[stuck] += 1
        restart = stuck[fails[stuck] >= _PLACE_BLOCKS]
        placed[restart] = 0
        fails[restart] = 0
    raise RuntimeError(f"could not place disjoint objects in {size}x{size} images")


def _pick_colours(
    rng: np.random.Generator, corners: np.ndarray, boxes: np.ndarray, size: int
) -> np.ndarray:
    """Random object colours with contrast to every background pixel under their box.

    Colours are uniform on the RGB cube, resampled until, at every pixel of the bounding box,
    some channel differs from the background by at least ``_MIN_CONTRAST``. The test looks at
    the background and the box only, never at the class, so colour carries no class
    information.

    Args:
        rng: Random generator.
        corners: Background corner colours of each object's image, shape (M, 4, 3).
        boxes: Bounding boxes as (top, left, extent), shape (M, 3).
        size: Image side in pixels.

    Returns:
        Colours, shape (M, 3), float64.
    """
    m = len(boxes)
    span = int(boxes[:, 2].max()) if m else 1
    idx = np.arange(span)
    top, left, ext = (boxes[:, k, None] for k in range(3))
    v = ((top + idx + 0.5) / size).astype(np.float32)[:, :, None]  # (M, S, 1)
    u = ((left + idx + 0.5) / size).astype(np.float32)[:, None, :]  # (M, 1, S)
    c = corners.astype(np.float32)[:, :, :, None, None]  # (M, 4, 3, 1, 1)
    wv, wu = v[:, None], u[:, None]
    background = (
        c[:, 0] * ((1 - wv) * (1 - wu))
        + c[:, 1] * ((1 - wv) * wu)
        + c[:, 2] * (wv * (1 - wu))
        + c[:, 3] * (wv * wu)
    )  # (M, 3, S, S)
    outside = ~((idx[None, :, None] < ext[:, :, None]) & (idx[None, None, :] < ext[:, :, None]))
    colours = np.zeros((m, 3))
    todo = np.arange(m)
    for _ in range(_COLOUR_BLOCKS):
        if todo.size == 0:
            return colours
        cand = rng.random((todo.size, _COLOUR_BLOCK, 3))
        bg = background[todo][:, None]  # (P, 1, 3, S, S)
        cf = cand.astype(np.float32)[..., None, None]  # (P, B, 3, 1, 1)
        gap = np.abs(bg[:, :, 0] - cf[:, :, 0])
        gap = np.maximum(gap, np.abs(bg[:, :, 1] - cf[:, :, 1]))
        gap = np.maximum(gap, np.abs(bg[:, :, 2] - cf[:, :, 2]))  # (P, B, S, S)
        gap[np.broadcast_to(outside[todo][:, None], gap.shape)] = np.inf
        fits = gap.min(axis=(2, 3)) >= _MIN_CONTRAST
        ok = fits.any(axis=1)
        first = fits.argmax(axis=1)
        colours[todo[ok]] = cand[np.flatnonzero(ok), first[ok]]
        todo = todo[~ok]
    # Practically unreachable: the corner of the RGB cube opposite the mean background.
    mean = np.where(outside[todo][:, None], np.nan, background[todo]).reshape(todo.size, 3, -1)
    colours[todo] = np.where(np.nanmean(mean, axis=2) > 0.5, 0.0, 1.0)
    return colours


@functools.lru_cache(maxsize=16)
def _sample_chunk(
    seed: int,
    chunk: int,
    layout: str,
    max_objects: int,
    min_objects: int,
    size: int,
    patch: int,
    noise_std: float,
    max_extent: int | None = None,
    min_extent: int | None = None,
) -> tuple[ImageParams, ...]:
    """Sample the parameters of one chunk of ``_CHUNK`` images.

    The whole chunk is always sampled, so image ``i`` of a chunk does not depend on how many
    images are requested.
    """
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, chunk])))
    k, n = len(SHAPE_CLASSES), _CHUNK
    head = rng.random((n, 13 + k))
    corners = head[:, :12].reshape(n, 4, 3)
    counts = _scaled_int(head[:, 12], min_objects, max_objects)
    classes = np.argsort(head[:, 13:], axis=1, kind="stable")[:, :max_objects]
    lo, hi = _extent_range(layout, size, patch)
    if max_extent is not None:
        hi = int(max_extent)
    if min_extent is not None:
        lo = int(min_extent)
    if layout == "aligned":
        boxes = _place_aligned(rng, n, max_objects, size, patch, lo, hi)
    else:
        boxes = _place_free(rng, counts, max_objects, size, lo, hi)
    img, slot = np.nonzero(np.arange(max_objects)[None, :] < counts[:, None])
    colours = _pick_colours(rng, corners[img], boxes[img, slot], size)

    per_image: list[list[ShapeObject]] = [[] for _ in range(n)]
    for i, c, (top, left, ext), (r, g, b) in zip(
        img.tolist(), classes[img, slot].tolist(), boxes[img, slot].tolist(), colours.tolist()
    ):
        per_image[i].append(ShapeObject(c, top, left, ext, (r, g, b)))
    noise_seed = (seed, chunk, 1)
    return tuple(
        ImageParams(
            size=size,
            background=tuple(map(tuple, corners[i].tolist())),
            noise_seed=noise_seed,
            noise_index=i,
            noise_std=float(noise_std),
            objects=tuple(per_image[i]),
        )
        for i in range(n)
    )


def _batch_from_params(
    params: Sequence[ImageParams], size: int, seed: int, layout: str, patch: int
) -> ShapesBatch:
    images, masks = _render(params, size)
    masks_t = torch.from_numpy(masks)
    return ShapesBatch(
        images=torch.from_numpy(images),
        labels=masks_t.any(dim=(2, 3)).to(torch.float32),
        masks=masks_t,
        params=tuple(params),
        seed=seed,
        layout=layout,
        patch=patch,
    )


def shapes(
    n: int,
    seed: int,
    layout: str = "aligned",
    max_objects: int = 2,
    size: int = 32,
    patch: int = 8,
    min_objects: int = 1,
    noise_std: float = 0.03,
    max_extent: int | None = None,
    min_extent: int | None = None,
) -> ShapesBatch:
    """Generate a batch of shape images with exact per-class masks.

    Image ``i`` depends only on ``seed`` and ``i``: ``shapes(m, seed)`` is a prefix of
    ``shapes(n, seed)`` for ``m <= n`` and equals the items of ``ShapesDataset(n, seed)``.

    Args:
        n: Number of images.
        seed: Non-negative integer seed; the global random state is neither used nor changed.
        layout: ``"aligned"`` (each object inside its own ``patch`` x ``patch`` cell, extent 5
            to ``patch`` pixels) or ``"free"`` (extent 6 to ``size // 2`` pixels at any
            position, objects may straddle patch borders).
        max_objects: Largest number of objects per image, at most ``len(SHAPE_CLASSES)``.
        size: Image height and width in pixels.
        patch: Cell size of the aligned layout; ``size`` must be divisible by it there.
        min_objects: Smallest number of objects per image; the count is uniform in
            ``min_objects..max_objects``.
        noise_std: Standard deviation of the per-pixel noise, uniform on
            +-sqrt(3) * noise_std and independent per channel; at most 0.1.
        max_extent: Largest object extent in pixels (default: ``patch`` for the aligned
            layout, ``size // 2`` for the free one). ``patch - 1`` on the aligned layout keeps
            a rim of background inside every cell, so that no object fills its cell (a
            plain patchifying ViT cannot tell a cell-filling square from background).
        min_extent: Smallest object extent in pixels (default: ``min(5, patch)`` for the
            aligned layout, 6 for the free one); at most ``max_extent``. Left at None, every
            image renders exactly as without the argument. E.g. ``size=96, layout="free",
            min_extent=16, max_extent=40``: objects spanning 2 to 5 tokens of a patch-8 ViT.

    Returns:
        The batch; ``images`` (N, 3, H, W), ``labels`` (N, K), ``masks`` (N, K, H, W).

    Raises:
        ValueError: If an argument is out of its supported range.
    """
    _check_args(
        n, seed, layout, max_objects, size, patch, min_objects, noise_std, max_extent, min_extent
    )
    params: list[ImageParams] = []
    for chunk in range(math.ceil(n / _CHUNK)):
        count = min(_CHUNK, n - chunk * _CHUNK)
        chunk_params = _sample_chunk(
            seed,
            chunk,
            layout,
            max_objects,
            min_objects,
            size,
            patch,
            float(noise_std),
            max_extent,
            min_extent,
        )
        params += chunk_params[:count]
    return _batch_from_params(params, size, seed, layout, patch)


def _class_index(class_idx: int | str | torch.Tensor) -> int:
    if isinstance(class_idx, torch.Tensor) and class_idx.numel() == 1:
        class_idx = int(class_idx.item())
    if isinstance(class_idx, str):
        if class_idx not in SHAPE_CLASSES:
            raise ValueError(f"unknown shape class {class_idx!r}; classes are {SHAPE_CLASSES}")
        return SHAPE_CLASSES.index(class_idx)
    k = len(SHAPE_CLASSES)
    if isinstance(class_idx, bool) or not isinstance(class_idx, (int, np.integer)):
        raise ValueError(
            f"class_idx must be an int in 0..{k - 1} or a class name, got {class_idx!r}"
        )
    if not 0 <= class_idx < k:
        raise ValueError(f"class_idx must lie in 0..{k - 1} ({SHAPE_CLASSES}), got {class_idx}")
    return int(class_idx)


def render_without(
    batch: ShapesBatch, index: int, class_idx: int | str | torch.Tensor
) -> torch.Tensor:
    """Render image ``index`` of ``batch`` again without its object of class ``class_idx``.

    Background, noise and the other objects are unchanged; the result equals
    ``batch.images[index]`` bit for bit outside the removed object's mask, and differs from it
    at every pixel of that mask.

    Args:
        batch: A batch from :func:`shapes`.
        index: Image index in the batch.
        class_idx: Class index (an int or a one-element tensor) or class name of the object to
            remove.

    Returns:
        The image, shape (3, H, W).

    Raises:
        ValueError: If ``index`` is out of range or the image has no object of that class.
    """
    c = _class_index(class_idx)
    if not -len(batch) <= index < len(batch):
        raise ValueError(f"index {index} is out of range for a batch of {len(batch)} images")
    p = batch.params[index]
    kept = tuple(o for o in p.objects if o.class_index != c)
    if len(kept) == len(p.objects):
        present = ", ".join(o.class_name for o in p.objects)
        raise ValueError(
            f"image {index} has no {SHAPE_CLASSES[c]!r} object to remove; it holds: {present}"
        )
    images, _ = _render([replace(p, objects=kept)], p.size)
    return torch.from_numpy(images[0])


def recolour(
    params: Sequence[ImageParams], seed: int
) -> tuple[torch.Tensor, tuple[ImageParams, ...]]:
    """Render images again with their layout kept and every colour and the noise drawn anew.

    Each image keeps its objects' classes, positions and extents (so its labels and masks are
    unchanged) and gets new background corner colours, new object colours (with the same
    contrast rule as :func:`shapes`, so every object stays visible) and a new noise stream.
    Two recolourings of one image share nothing but its geometry: the view pairs of
    self-supervised training on this data, where colour carries no class information.

    Args:
        params: Parameters of the images (``ShapesBatch.params`` or
            ``ShapesDataset.params(i)``), all of the same ``size``.
        seed: Non-negative integer seed of the new colours and noise.

    Returns:
        The images, shape (N, 3, H, W), float32 in [0, 1], and their new parameters.

    Raises:
        ValueError: If ``seed`` is negative or the images differ in size.
    """
    seed = _check_int("seed", seed, 0)
    n = len(params)
    sizes = {p.size for p in params}
    if len(sizes) > 1:
        raise ValueError(f"recolour needs images of one size, got sizes {sorted(sizes)}")
    if n == 0:
        return torch.empty(0, 3, 0, 0), ()
    size = sizes.pop()
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, n, 2])))
    corners = rng.random((n, 4, 3))
    owner = np.array([i for i, p in enumerate(params) for _ in p.objects], dtype=np.int64)
    boxes = np.array(
        [(o.top, o.left, o.extent) for p in params for o in p.objects], dtype=np.int64
    ).reshape(-1, 3)
    colours = _pick_colours(rng, corners[owner], boxes, size).tolist()
    new: list[ImageParams] = []
    k = 0
    for i, p in enumerate(params):
        objects = []
        for o in p.objects:
            objects.append(replace(o, colour=tuple(colours[k])))
            k += 1
        new.append(
            replace(
                p,
                background=tuple(map(tuple, corners[i].tolist())),
                noise_seed=(seed, n, 3),
                noise_index=i,
                objects=tuple(objects),
            )
        )
    images, _ = _render(new, size)
    return torch.from_numpy(images), tuple(new)


class ShapesDataset(Dataset):
    """Map-style dataset of shape images, rendered lazily.

    Item ``i`` equals image ``i`` of ``shapes(n, seed, ...)``. Parameters are sampled per chunk
    of 1024 images on first access and kept (a few hundred bytes per image); pixels are
    rendered on every access, so memory stays small for any ``n``.

    Args:
        n: Number of images.
        seed: Non-negative integer seed.
        layout: ``"aligned"`` or ``"free"``; see :func:`shapes`.
        max_objects: Largest number of objects per image.
        size: Image height and width in pixels.
        patch: Cell size of the aligned layout.
        min_objects: Smallest number of objects per image.
        noise_std: Standard deviation of the pixel noise.
        max_extent: Largest object extent; see :func:`shapes`.
        min_extent: Smallest object extent; see :func:`shapes`.
    """

    def __init__(
        self,
        n: int,
        seed: int,
        layout: str = "aligned",
        max_objects: int = 2,
        size: int = 32,
        patch: int = 8,
        min_objects: int = 1,
        noise_std: float = 0.03,
        max_extent: int | None = None,
        min_extent: int | None = None,
    ) -> None:
        _check_args(
            n,
            seed,
            layout,
            max_objects,
            size,
            patch,
            min_objects,
            noise_std,
            max_extent,
            min_extent,
        )
        self.n, self.seed, self.layout = n, seed, layout
        self.max_objects, self.min_objects = max_objects, min_objects
        self.size, self.patch, self.noise_std = size, patch, noise_std
        self.max_extent, self.min_extent = max_extent, min_extent
        self.classes = SHAPE_CLASSES
        self._chunks: dict[int, tuple[ImageParams, ...]] = {}

    def __len__(self) -> int:
        return self.n

    def params(self, index: int) -> ImageParams:
        """Parameters of image ``index``."""
        if not 0 <= index < self.n:
            raise IndexError(f"index {index} is out of range for a dataset of {self.n} images")
        chunk = index // _CHUNK
        if chunk not in self._chunks:
            self._chunks[chunk] = _sample_chunk(
                self.seed,
                chunk,
                self.layout,
                self.max_objects,
                self.min_objects,
                self.size,
                self.patch,
                float(self.noise_std),
                self.max_extent,
                self.min_extent,
            )
        return self._chunks[chunk][index % _CHUNK]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return image (3, H, W) float32, labels (K,) float32 and masks (K, H, W) bool."""
        return self.__getitems__([index])[0]

    def __getitems__(
        self, indices: Sequence[int]
    ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Render several items at once; ``DataLoader`` uses this to fetch whole batches."""
        params = [self.params(i + self.n if i < 0 else i) for i in indices]
        images, masks = _render(params, self.size)
        labels = masks.any(axis=(2, 3)).astype(np.float32)
        images_t, labels_t, masks_t = map(torch.from_numpy, (images, labels, masks))
        return [(images_t[k], labels_t[k], masks_t[k]) for k in range(len(params))]
