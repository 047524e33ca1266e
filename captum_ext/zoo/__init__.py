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

Trained explainers built on these models are entries too, listed by :func:`explainers` (not
by :func:`available`, which lists models only): their record names the explainer
(``"explainer": "mhex"``) beside the backbone's architecture, and :func:`load` returns the
explainer object, rebuilt by the loader its module registers with :func:`register_explainer`
(``benchmarks/train_mhex.py`` documents them):

* ``"shapes-cnn-mhex"``, ``"shapes-vit-mhex"``, ``"text-bert-mhex"``: :class:`~captum_ext.MHEX`
  around shapes-cnn, shapes-vit and text-bert, trained with the model.

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
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from captum_ext.checkpoint import load_checkpoint, verify_checkpoint
from captum_ext.errors import CheckpointError
from captum_ext.zoo._build import WEIGHTS_DIR, build_model, record_names

__all__ = [
    "available",
    "check_name",
    "data_kwargs",
    "explainers",
    "info",
    "load",
    "register_explainer",
]

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
ExplainerLoader = Callable[[dict[str, torch.Tensor], dict[str, Any], nn.Module], Any]
"""``loader(tensors, record, backbone) -> explainer``: rebuilds a trained explainer entry."""

_EXPLAINER_LOADERS: dict[str, ExplainerLoader] = {}


def register_explainer(method: str, loader: ExplainerLoader) -> None:
    """Lets :func:`load` rebuild entries whose record says ``"explainer": method``.

    Called by the explainer's own module on import (the zoo sits below the explainers and
    never imports them).

    Args:
        method: The value of the records' ``"explainer"`` key, e.g. ``"mhex"``.
        loader: ``loader(tensors, record, backbone)``: the verified tensors and record of the
            entry and the backbone rebuilt from the record's architecture (float32, untrained).
    """
    _EXPLAINER_LOADERS[method] = loader


def _folder(directory: Directory) -> Path:
    return WEIGHTS_DIR if directory is None else Path(directory)


def _explainer_of(folder: Path, name: str) -> str | None:
    """The record's ``"explainer"`` value (unverified: for listing only), or ``None``."""
    try:
        record = json.loads((folder / f"{name}.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    value = record.get("explainer") if isinstance(record, dict) else None
    return value if isinstance(value, str) else None


def available(directory: Directory = None) -> list[str]:
    """Names of the shipped models, sorted (trained explainers: :func:`explainers`).

    Args:
        directory: Folder of ``<name>.safetensors`` + ``<name>.json`` pairs; default the
            shipped ``captum_ext/zoo/weights``. Listing does not verify the files (reading
            them does).
    """
    folder = _folder(directory)
    return [n for n in record_names(folder) if _explainer_of(folder, n) is None]


def explainers(directory: Directory = None) -> list[str]:
    """Names of the shipped trained explainers (e.g. ``"shapes-cnn-mhex"``), sorted.

    :func:`load` returns them as explainer objects (an :class:`~captum_ext.MHEX`), whose
    ``network`` is the model they were trained into.

    Args:
        directory: Folder of the entries (default: the shipped ones). Not verified here.
    """
    folder = _folder(directory)
    return [n for n in record_names(folder) if _explainer_of(folder, n) is not None]


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
    folder = _folder(directory)
    if name in record_names(folder):
        return
    pair = (folder / f"{name}.safetensors", folder / f"{name}.json")
    if any(p.is_file() for p in pair):
        missing = next(p for p in pair if not p.is_file())
        raise CheckpointError(missing, f"zoo model {name!r}: file missing", _remedy(name))
    shown = ", ".join(repr(n) for n in record_names(folder)) or f"none (no weights in {folder})"
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


def load(name: str, device: str | torch.device = "cpu", *, directory: Directory = None) -> Any:
    """Rebuild a zoo model (or trained explainer) and load its shipped weights, after verifying them.

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
        takes ``input_ids`` and ``attention_mask`` ``(B, T)``. For a trained explainer
        (:func:`explainers`), the explainer object, ready to ``attribute``, built around its
        model (in eval mode, float32, on ``device``).

    Raises:
        ValueError: If ``name`` is not a shipped model.
        CheckpointError: If the entry's files are missing, damaged or inconsistent.
    """
    tensors, record = _verified(name, directory, read_tensors=True)
    model = build_model(record)
    method = record.get("explainer")
    if method is not None:
        loader = _EXPLAINER_LOADERS.get(method)
        if loader is None:
            raise ValueError(
                f"zoo entry {name!r} is a trained {method!r} explainer, and no loader is "
                f"registered for it; import the module that defines it (import captum_ext)."
            )
        explainer = loader(tensors, record, model.eval())
        return explainer.to(device)
    model.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=True)
    return model.to(device).eval()
