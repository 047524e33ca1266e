"""Datasets a whole-dataset run reads: a folder of images, an ``ImageFolder`` tree, the shapes
benchmark.

Every dataset here is map-style and gives, for example ``i``, ``(image, label, masks)``:
the model input ``(3, H, W)``, the label (an int class index for an ``ImageFolder``, ``-1``
when unknown; a multi-hot ``(K,)`` vector for the shapes benchmark) and the per-class object
masks ``(K, H, W)`` (``None`` where there is no ground truth). :attr:`ids` names every
example (a path relative to the folder, or ``shapes/<i>``), and :meth:`describe` is what the
output index records about the data (so that an output folder is never resumed on other data).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from captum_ext.data import ShapesDataset

__all__ = [
    "IMAGE_SUFFIXES",
    "ChunkBatch",
    "ImageFiles",
    "ShapesSource",
    "image_dataset",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")
"""File suffixes read as images (any case), as ``torchvision``'s ``ImageFolder`` does."""


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES


def _digest(names: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(names).encode()).hexdigest()


class ImageFiles(torch.utils.data.Dataset):
    """The images of a folder: flat (every image in it, sorted) or an ``ImageFolder`` tree.

    A folder whose images all sit in sub-folders is read as torchvision's ``ImageFolder``
    layout: one sub-folder per class, classes in sorted order, label = the class's index in
    ``classes`` (mapped to the model's classes with :meth:`map_classes`). A folder with images
    at its top level is a plain folder: those images, sorted, label ``-1``.

    Args:
        root: The folder.
        transform: A PIL image to the model input ``(3, H, W)``.

    Raises:
        ValueError: ``root`` is not a folder or holds no image (the message names the
            suffixes read); on reading an item, a file PIL cannot read (empty, truncated,
            corrupt; the message names it).
    """

    def __init__(self, root: str | Path, transform: Callable[[Any], Tensor]) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise ValueError(f"dataset {self.root}: not a folder")
        self.transform = transform
        top = sorted(p for p in self.root.iterdir() if _is_image(p))
        self.classes: list[str] = []
        if top:
            self.layout = "folder"
            files, labels = top, [-1] * len(top)
        else:
            self.layout = "imagefolder"
            subdirs = sorted(p for p in self.root.iterdir() if p.is_dir())
            files, labels = [], []
            for d in subdirs:
                images = sorted(p for p in d.rglob("*") if _is_image(p))
                if images:
                    labels += [len(self.classes)] * len(images)
                    files += images
                    self.classes.append(d.name)
        if not files:
            raise ValueError(
                f"dataset {self.root}: no images (read: {', '.join(IMAGE_SUFFIXES)}, at the top "
                "level or one sub-folder per class)"
            )
        self.files = files
        self.labels = labels
        self.ids = [p.relative_to(self.root).as_posix() for p in files]

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[Tensor, int, None]:
        from PIL import Image

        path = self.files[index]
        try:
            with Image.open(path) as img:
                img.load()
                return self.transform(img), self.labels[index], None
        except (OSError, SyntaxError, Image.DecompressionBombError) as err:
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise ValueError(f"dataset image {path}: not an image PIL can read ({reason})") from err

    def map_classes(self, model_classes: Sequence[str]) -> None:
        """Re-labels an ``ImageFolder`` tree with the model's class indices.

        A sub-folder named as a model class (any case) gets that class; otherwise, when
        there are as many sub-folders as model classes, the sorted order is taken
        (torchvision's convention: folder ``k`` is class ``k``).

        Raises:
            ValueError: The folders name classes the model does not have, and their number
                differs from the model's.
        """
        if self.layout != "imagefolder":
            return
        lower = {c.lower(): i for i, c in enumerate(model_classes)}
        if all(c.lower() in lower for c in self.classes):
            index = [lower[c.lower()] for c in self.classes]
        elif len(self.classes) == len(model_classes):
            index = list(range(len(self.classes)))
        else:
            unknown = [c for c in self.classes if c.lower() not in lower][:5]
            raise ValueError(
                f"dataset {self.root}: class folders {unknown} are not classes of the model, "
                f"and there are {len(self.classes)} folders for {len(model_classes)} classes; "
                "name the folders as the model's classes (or one folder per class, in order)"
            )
        self.labels = [index[k] if k >= 0 else k for k in self.labels]
        self.class_index = index

    def describe(self) -> dict[str, Any]:
        """What identifies this data: layout, count, classes and a hash of the file names."""
        return {
            "source": "folder",
            "layout": self.layout,
            "root": str(self.root.resolve()),
            "n": len(self),
            "classes": self.classes,
            "ids_sha256": _digest(self.ids),
        }


class ShapesSource(torch.utils.data.Dataset):
    """The shapes benchmark (:class:`captum_ext.data.ShapesDataset`) with ids and a record.

    Args:
        n: Number of images.
        seed: Seed of the images.
        **kwargs: Further :class:`~captum_ext.data.ShapesDataset` arguments (``size``,
            ``layout``, ``patch``...; a zoo model's are ``zoo.data_kwargs(name)``).
    """

    layout = "shapes"

    def __init__(self, n: int, seed: int, **kwargs: Any) -> None:
        self.data = ShapesDataset(n, seed, **kwargs)
        self.kwargs = {"n": n, "seed": seed, **kwargs}
        self.ids = [f"shapes/{i}" for i in range(n)]

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, Tensor]:
        return self.data[index]

    def items(self, indices: Sequence[int]) -> list[tuple[Tensor, Tensor, Tensor]]:
        """Several examples, rendered at once."""
        return self.data.__getitems__(list(indices))

    def describe(self) -> dict[str, Any]:
        """The benchmark's arguments."""
        return {"source": "shapes", **self.kwargs}


@dataclass(frozen=True)
class ChunkBatch:
    """Consecutive examples of a dataset, stacked, as :class:`~._images.ImageSet` reads them.

    Attributes:
        images: ``(n, 3, H, W)``.
        labels: ``(n, K)`` multi-hot (the classes each image is explained for).
        masks: ``(n, K, H, W)`` bool, or ``None`` (no ground truth: the mask metrics are
            left out).
        layout: The shapes layout, or the folder kind.
        patch: Cell size of the shapes benchmark (the grid of models without an adapter).
    """

    images: Tensor
    labels: Tensor
    masks: Tensor | None
    layout: str | None = None
    patch: int = 8

    def __len__(self) -> int:
        return self.images.shape[0]


def load_items(dataset: Any, indices: Sequence[int]) -> list[tuple[Tensor, Any, Any]]:
    """Examples ``indices`` of ``dataset`` (in one call where the dataset renders batches)."""
    if hasattr(dataset, "items"):
        return dataset.items(indices)
    return [dataset[i] for i in indices]


def image_dataset(
    source: str | Path,
    transform: Callable[[Any], Tensor] | None = None,
    *,
    n: int = 64,
    seed: int = 0,
    shapes_kwargs: dict[str, Any] | None = None,
) -> ImageFiles | ShapesSource:
    """The dataset named by ``source``: ``"shapes"`` (the benchmark) or a folder.

    Args:
        source: ``"shapes"``, or a folder of images / an ``ImageFolder`` tree.
        transform: A PIL image to the model input (folders only).
        n: Number of shapes images.
        seed: Seed of the shapes images.
        shapes_kwargs: Further :class:`~captum_ext.data.ShapesDataset` arguments.

    Raises:
        ValueError: A folder that does not exist or holds no image, or a folder without a
            transform.
    """
    if str(source) == "shapes":
        return ShapesSource(n, seed, **(shapes_kwargs or {}))
    if transform is None:
        raise ValueError("an image folder needs the model's transform (PIL image -> tensor)")
    return ImageFiles(source, transform)
