"""Small models trained on the procedural benchmark data, shipped as package data.

No pretrained network can be downloaded on the machines this project runs on, so the package
ships its own: each entry is a ``weights/<name>.safetensors`` file plus a ``weights/<name>.json``
record of the architecture, the data it was trained for, the training recipe, the measured
held-out accuracy and the command that reproduces it (``benchmarks/train_zoo.py``).

Entries (``benchmarks/train_zoo.py`` documents recipes, accuracies and run times):

* ``"shapes-vit"``: a 4-block timm ``VisionTransformer`` (patch 8, width 64) with a
  convolutional stem (arch ``zoo_vit_convstem``) on the aligned layout of
  :func:`captum_ext.data.shapes`, multi-label (sigmoid/BCE).
* ``"shapes-vit-free"``: the same with 6 blocks, on the free layout.
* ``"shapes-vit-linear"``: the CDAM paper's setting: shapes-vit's backbone, frozen, with a
  freshly initialised linear head trained alone on its features.
* ``"shapes-vit-plain"``: a plain patchifying 4-block timm ViT (``vit_tiny`` layout at
  width 64, each token sees exactly its 8 x 8 cell) on the aligned layout with objects of
  at most 7 pixels (``max_extent=7``: no object fills its cell).
* ``"shapes-cnn"``: a narrow timm ResNet (BasicBlock, one per stage, stride-1 stem; arch
  ``zoo_resnet_s1``) on the aligned layout.
* ``"text-bert"``: a 2-layer, width-64 HuggingFace ``BertForSequenceClassification`` on
  :func:`captum_ext.data.text_rationales` (binary).

Every read verifies the entry (:mod:`captum_ext.checkpoint`): the sha256 and size of the
weights file, the JSON record against the copy stored inside the weights file (class names,
architecture, data settings, recipe), and the tensor names and shapes the record lists. A
damaged or edited entry raises :class:`~captum_ext.errors.CheckpointError` instead of loading;
nothing is unpickled.

Image models take images in [0, 1] without normalisation. The two architectures named
``zoo_*`` are registered in timm's registry when this package is imported.

Example::

    from captum_ext import CDAM, zoo
    from captum_ext.data import shapes

    model = zoo.load("shapes-vit")
    batch = shapes(8, seed=123, **zoo.data_kwargs("shapes-vit"))
    maps = CDAM(model).attribute(batch.images, target=0)
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from captum_ext.checkpoint import load_checkpoint, verify_checkpoint
from captum_ext.errors import CheckpointError
from captum_ext.zoo._build import WEIGHTS_DIR, build_model, record_names

__all__ = ["available", "check_name", "data_kwargs", "info", "load"]

REQUIRED_KEYS = (
    "name",
    "library",
    "arch",
    "model_kwargs",
    "modality",
    "task",
    "classes",
    "data.generator",
    "data.kwargs",
    "params",
    "heldout.accuracy",
)
"""Dotted keys every zoo record must hold."""

Directory = str | os.PathLike[str] | None


def _folder(directory: Directory) -> Path:
    return WEIGHTS_DIR if directory is None else Path(directory)


def available(directory: Directory = None) -> list[str]:
    """Names of the shipped models, sorted.

    Args:
        directory: Folder of ``<name>.safetensors`` + ``<name>.json`` pairs; default the
            shipped ``captum_ext/zoo/weights``. Listing does not verify the files (reading
            them does).
    """
    return record_names(_folder(directory))


def check_name(name: str, directory: Directory = None) -> None:
    """Raise unless ``name`` is one of :func:`available`.

    Args:
        name: A zoo model name.
        directory: Folder of the entries (default: the shipped ones).

    Raises:
        ValueError: ``"unknown zoo model 'x'; available: 'shapes-cnn', ..."``.
        CheckpointError: If one file of the pair ``<name>.safetensors`` + ``<name>.json`` is
            there and the other is missing (a ``ValueError`` too).
    """
    if name in available(directory):
        return
    folder = _folder(directory)
    pair = (folder / f"{name}.safetensors", folder / f"{name}.json")
    if any(p.is_file() for p in pair):
        missing = next(p for p in pair if not p.is_file())
        raise CheckpointError(missing, f"zoo model {name!r}: file missing", _remedy(name))
    shown = ", ".join(repr(n) for n in available(directory)) or f"none (no weights in {folder})"
    raise ValueError(
        f"unknown zoo model {name!r}; available: {shown}. "
        "Train missing entries with 'python benchmarks/train_zoo.py --only NAME'."
    )


def _remedy(name: str) -> str:
    return (
        "reinstall captum_ext to restore the shipped files, or retrain the entry with "
        f"'python benchmarks/train_zoo.py --only {name}'"
    )


def _verified(name: str, directory: Directory, read_tensors: bool) -> tuple[Any, dict[str, Any]]:
    """``(tensors or None, record)`` of a verified entry; zoo advice in the error."""
    check_name(name, directory)
    base = _folder(directory) / name
    try:
        if read_tensors:
            return load_checkpoint(base, expect={"name": name}, require=REQUIRED_KEYS)
        return None, verify_checkpoint(base, expect={"name": name}, require=REQUIRED_KEYS)
    except CheckpointError as err:
        raise CheckpointError(
            err.path, f"zoo model {name!r}: {err.problem}", _remedy(name)
        ) from err


def info(name: str, *, directory: Directory = None) -> dict[str, Any]:
    """The recorded metadata of a zoo model, verified against its weights file.

    Args:
        name: One of :func:`available`.
        directory: Folder of the entries (default: the shipped ones).

    Returns:
        A copy of the JSON record: ``family``, ``modality``, ``task`` (``"multilabel"`` for
        images, ``"binary"`` for text), ``classes``, ``library``/``arch``/``model_kwargs``,
        ``data`` (generator and its keyword arguments), ``training`` (seed, steps, optimiser,
        schedule; ``phases`` for the frozen-backbone entry), ``heldout`` (seed, size, metric
        and ``accuracy``), ``params``, ``train_time_s``, ``command`` and ``weights`` (file,
        bytes, sha256, tensor dtypes and shapes).

    Raises:
        ValueError: If ``name`` is not a shipped model.
        CheckpointError: If the entry's files are missing, damaged or inconsistent.
    """
    return _verified(name, directory, read_tensors=False)[1]


def data_kwargs(name: str, *, directory: Directory = None) -> dict[str, Any]:
    """Keyword arguments of the data generator the model was trained for.

    For image models these go to :func:`captum_ext.data.shapes`, for text models to
    :func:`captum_ext.data.text_rationales`, in both cases without ``n`` and ``seed``.

    Args:
        name: One of :func:`available`.
        directory: Folder of the entries (default: the shipped ones).

    Returns:
        A fresh dict, e.g. ``{"layout": "aligned", "max_objects": 2, "size": 32, ...}``.

    Raises:
        ValueError: If ``name`` is not a shipped model.
        CheckpointError: If the entry's files are missing, damaged or inconsistent.
    """
    return copy.deepcopy(info(name, directory=directory)["data"]["kwargs"])


def load(
    name: str, device: str | torch.device = "cpu", *, directory: Directory = None
) -> nn.Module:
    """Rebuild a zoo model and load its shipped weights, after verifying them.

    The entry is read once and checked (:func:`captum_ext.checkpoint.load_checkpoint`: size,
    sha256, record against the weights file's own copy, tensor shapes); then the architecture
    is rebuilt from the record (timm ``create_model(arch, pretrained=False, **kwargs)``, or
    ``BertConfig(**kwargs)`` with ``BertForSequenceClassification``) and the verified tensors
    are loaded with ``load_state_dict(strict=True)``. Nothing is unpickled and nothing is
    downloaded.

    Args:
        name: One of :func:`available`.
        device: Device of the returned model.
        directory: Folder of the entries (default: the shipped ones).

    Returns:
        The model in eval mode, float32, on ``device``. Image models take ``(B, 3, H, W)``
        images in [0, 1] (no normalisation) and return logits ``(B, K)``; the text model
        takes ``input_ids`` and ``attention_mask`` ``(B, T)``.

    Raises:
        ValueError: If ``name`` is not a shipped model.
        CheckpointError: If the entry's files are missing, damaged or inconsistent.
    """
    tensors, record = _verified(name, directory, read_tensors=True)
    model = build_model(record)
    model.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=True)
    return model.to(device).eval()
