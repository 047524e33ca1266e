"""One image model's held-out set as the metrics read it, and how its maps are produced."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from captum_ext.metrics import standard_tolerance

from ._baselines import BASELINES, baseline_map
from ._config import EvalConfig
from ._maps import (
    MapFn,
    chunks,
    method_grids,
    model_grid,
    model_patch,
    pixel_map,
    to_grid,
    to_pixels,
    to_pixels_bilinear,
)
from ._table import IMAGE_TABLE, MapContext

__all__ = ["ImageSet", "images_part"]


def images_part(n_images: int, n_pairs: int, n_two: int, layout: str | None) -> str:
    """The summary's first part: how many images, maps and two-object images (and that the
    images are the shapes benchmark's, for its layouts)."""
    bench = " of the shapes benchmark" if layout in ("aligned", "free") else ""
    return (
        f"{n_images} images{bench} ({n_pairs} image–class maps, {n_two} two-object images"
        + (f", {layout} layout" if layout else "")
        + ")"
    )


RawMap = tuple[Tensor, Tensor | None]
"""Pixel maps ``(Np, H, W)`` and, for methods, their patch grids ``(Np, h, w)``."""


class ImageSet:
    """(image, class) pairs of a ``ShapesBatch``: one map per present class of every image.

    Attributes read by the metric table: ``model``, ``inputs`` (the image of each pair,
    ``(Np, C, H, W)``), ``targets`` (its class, ``(Np,)``), ``masks`` (its class's mask at the
    evaluation resolution), ``pixel_masks`` (the same in pixels, ``(Np, H, W)``), ``groups`` (its image), ``pair_a`` / ``pair_b`` (positions of the
    two pairs of each two-object image), ``steps`` and ``score`` (RISE settings).
    """

    modality = "image"
    table = IMAGE_TABLE
    baseline_notes: tuple[str, ...] = ()

    def __init__(self, model: nn.Module, data: Any, config: EvalConfig, score: str) -> None:
        device = config.device
        self.model, self.data, self.device = model, data, device
        self.images = data.images.to(device)
        self.labels = torch.as_tensor(data.labels)
        # masks may be None (images without ground truth): the mask metrics are left out
        masks = None if data.masks is None else torch.as_tensor(data.masks).bool()
        if self.labels.dim() != 2 or (masks is not None and masks.dim() != 4):
            raise ValueError(
                "image data needs labels (N, K) and masks (N, K, H, W) or None; "
                f"got {tuple(self.labels.shape)} and "
                f"{None if masks is None else tuple(masks.shape)}"
            )
        self.size = (self.images.shape[-2], self.images.shape[-1])
        self.pi, self.pc = torch.nonzero(self.labels > 0.5, as_tuple=True)  # image-major pairs
        counts = (self.labels > 0.5).sum(dim=1)
        two = torch.nonzero(counts[self.pi] == 2).squeeze(1)
        self.pair_a, self.pair_b = two[0::2], two[1::2]
        self.grid = model_grid(model, self.images, data)
        self.patch = model_patch(model)  # a transformer's token: its exact pixels
        self.resolution = config.resolution
        self.masks: Tensor | None = None
        self.pixel_masks: Tensor | None = None
        if masks is not None:
            pair_masks = masks[self.pi, self.pc].to(device)  # (Np, H, W)
            self.pixel_masks = pair_masks
            if self.resolution == "grid":
                self.masks = to_grid(pair_masks, self.grid, self.patch, reduce="max") > 0
            else:
                self.masks = pair_masks
        self.inputs = self.images[self.pi.to(device)]
        self.targets = self.pc.to(device)
        self.groups = self.pi
        self.steps, self.score = config.steps, score
        self.seed, self.batch_size = config.seed, config.batch_size
        self.wants = config.wants

    def method_map(self, attr: Any, class_agnostic: bool) -> Callable[[], RawMap]:
        """The maps of an attribution object, computed on the patch grid."""

        def run() -> RawMap:
            g = method_grids(attr, class_agnostic, self.images, self.pi, self.pc, self.batch_size)
            g = g.to(self.device)
            return to_pixels(g, self.size, self.patch), g

        return run

    def trained_map(self, name: str, explainer: Any) -> Callable[[], RawMap]:
        """The maps of a trained explainer (T-TAME, MHEX): its own pixel maps, plus its grid
        maps when they lie on the model's grid (a CNN's map is finer: pooled to it)."""
        pixels = self.extra_map(name, lambda x, t: explainer.attribute(x, target=t, output="input"))

        def run() -> RawMap:
            p, _ = pixels()
            g = explainer.attribute(
                self.images[:1], target=self.pc[:1].to(self.device), output="grid"
            )
            if tuple(g.shape[-2:]) != tuple(self.grid):
                return p, None
            grids = method_grids(explainer, False, self.images, self.pi, self.pc, self.batch_size)
            return p, grids.to(self.device)

        return run

    def baselines(self) -> Mapping[str, Callable[[], RawMap]]:
        """Every baseline: class-agnostic, one map per image shared by its classes."""

        def once(name: str) -> RawMap:
            m = pixel_map(baseline_map(name, self.images, self.seed), self.size, name)
            return m[self.pi.to(self.device)], None

        return {name: lambda name=name: once(name) for name in BASELINES}

    def extra_map(self, name: str, fn: MapFn) -> Callable[[], RawMap]:
        """A custom map, called on chunks of (image, class) pairs."""

        def run() -> RawMap:
            out = [
                pixel_map(fn(self.images[self.pi[s]], self.pc[s].to(self.device)), self.size, name)
                for s in chunks(len(self.pi), self.batch_size)
            ]
            return torch.cat(out), None

        return run

    def context(self, name: str, raw: RawMap, references: Mapping[str, Tensor]) -> MapContext:
        """The context of one map: on the patch grid (pooled pixel maps) or in pixels."""
        pixels, grids = raw
        pixels = pixels.to(self.device)
        maps = pixels
        if self.resolution == "grid":
            maps = grids if grids is not None else to_grid(pixels, self.grid, self.patch)
        point = pixels  # pixel-level localisation: token grids upsampled bilinearly
        if grids is not None and self.patch is not None:
            point = to_pixels_bilinear(grids.to(self.device), self.size, self.patch)
        return MapContext(name, maps, pixels, self, references, point_pixels=point)

    def meta(self, methods: list[str]) -> dict[str, Any]:
        """Settings and sizes of this set (``summary_parts`` become the table's summary)."""
        layout = getattr(self.data, "layout", None)
        grid = self.grid
        where = (
            f"the {grid[0]}×{grid[1]} patch grid"
            if self.resolution == "grid"
            else "pixel resolution"
        )
        n_images, n_pairs, n_two = len(self.images), len(self.pi), len(self.pair_a)
        return {
            "modality": "image",
            "n_images": n_images,
            "n_pairs": n_pairs,
            "n_two_object": n_two,
            "layout": layout,
            "resolution": self.resolution,
            "grid": list(grid),
            "steps": self.steps,
            "score": self.score,
            "methods": methods,
            "summary_parts": [
                images_part(n_images, n_pairs, n_two, layout),
                # no masks (a folder of images): no localisation, no D
                *(
                    [
                        f"pointing (15 px @224): peak within {standard_tolerance(self.size)} "
                        f"px of the object at {min(self.size)} px (Zhang et al.), in pixels"
                    ]
                    if self.masks is not None and self.wants("pointing_game")
                    else []
                ),
                f"{'other localisation, sparsity, D' if self.masks is not None else 'sparsity'} "
                f"and r on {where}",
                f"RISE deletion (zero) / insertion (blur) with {self.steps} steps on "
                f"{self.score} scores",
                *(
                    [
                        "AD / IC in % (T-TAME preset: min-max normalised soft mask keeping "
                        f"100/50/15 % of the map; target = the map's class, {self.score} score)"
                    ]
                    if self.wants("ad100")
                    else []
                ),
                *(
                    [
                        "ROAD MoRF / LeRF: top-1 agreement with the clean prediction, mean "
                        "over 10–90 % removed (noisy linear imputation)"
                    ]
                    if self.wants("road_morf") or self.wants("road_lerf")
                    else []
                ),
            ],
        }
