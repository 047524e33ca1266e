"""Small models trained on the procedural benchmark data, shipped as package data.

The package ships its own trained models, so that examples, tutorials and tests run offline:
each entry is a ``weights/<name>.safetensors`` file plus a ``weights/<name>.json`` record of
the architecture, the data it was trained for, the training recipe, the held-out accuracy and
the command that reproduces it (``benchmarks/training/train_zoo.py``).

Entries (recipes, accuracies and run times: ``benchmarks/results/training.md`` in the
repository):

* ``"shapes-vit"``: a 4-block timm ``VisionTransformer`` (patch 8, width 64) with a
  convolutional stem (arch ``zoo_vit_convstem``) on the aligned layout of
  :func:`captum_ext.data.shapes`, multi-label (sigmoid/BCE).
* ``"shapes-vit-free"``: the same with 6 blocks, on the free layout.
* ``"shapes-vit-linear"``: the CDAM paper's setting: shapes-vit's backbone, frozen, with a
  freshly initialised linear head trained alone on its features.
* ``"shapes-vit-plain"``: a plain patchifying 4-block timm ViT (``vit_tiny`` layout at
  width 64, each token sees exactly its 8 x 8 cell) on the aligned layout with objects of
  at most 7 pixels (``max_extent=7``: no object fills its cell).
* ``"shapes-vit-dino"``: the CDAM paper's setting on the fine benchmark (96 px, patch 8: a
  12 x 12 token grid, free layout, objects of 16 to 40 px): a 4-block conv-stem ViT whose
  backbone was trained self-supervised with DINO (labels unused), then frozen, with a
  linear head trained alone as the CDAM paper trains its head
  (``benchmarks/training/train_dino.py``; held-out exact-set accuracy 0.971).
* ``"shapes-vit-fine"``: its supervised twin: the same architecture, initialisation,
  training images and head recipe, the backbone trained with the labels.
* ``"shapes-cnn"``: a narrow timm ResNet (BasicBlock, one per stage, stride-1 stem; arch
  ``zoo_resnet_s1``) on the aligned layout.
* ``"text-bert"``: a 2-layer, width-64 HuggingFace ``BertForSequenceClassification`` on
  :func:`captum_ext.data.text_rationales` (binary).

Trained explainers (``available(kind="explainer")``; recipes and scores in the same file):
``load`` returns the fitted explainer, its model loaded from the zoo entry its record names
(``backbone_model``):

* ``"shapes-vit-ttame"``: :class:`~captum_ext.TTAME` fitted to ``"shapes-vit"``.
* ``"shapes-cnn-ttame"``: :class:`~captum_ext.TTAME` fitted to ``"shapes-cnn"``.
* ``"shapes-cnn-mhex"``, ``"shapes-vit-mhex"``, ``"text-bert-mhex"``: :class:`~captum_ext.MHEX`
  trained into ``"shapes-cnn"``, ``"shapes-vit"`` and ``"text-bert"``.

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
import importlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from captum_ext.checkpoint import load_checkpoint, read_json, verify_checkpoint
from captum_ext.errors import CheckpointError
from captum_ext.zoo._records import WEIGHTS_DIR, record_names

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = [
    "available",
    "catalogue",
    "check_name",
    "data_kwargs",
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
"""Dotted keys every zoo record of a model must hold."""

EXPLAINER_KEYS = (
    "name",
    "kind",
    "method",
    "backbone_model",
    "classes",
    "data.generator",
    "data.kwargs",
    "training",
    "command",
)
"""Dotted keys every zoo record of a trained explainer (``"kind": "explainer"``) must hold."""

Kind = Literal["model", "explainer", "all"]
ExplainerLoader = Callable[[Path, "nn.Module"], "nn.Module"]
_EXPLAINER_LOADERS: dict[str, ExplainerLoader] = {}


def register_explainer(method: str, loader: ExplainerLoader) -> None:
    """Registers how entries of a trained explainer are rebuilt (called by its module).

    Args:
        method: The ``method`` of the entries' records, e.g. ``"ttame"``.
        loader: ``loader(base_path, model) -> explainer`` (e.g. ``TTAME.load``).
    """
    _EXPLAINER_LOADERS[method] = loader


Directory = str | os.PathLike[str] | None


def _folder(directory: Directory) -> Path:
    return WEIGHTS_DIR if directory is None else Path(directory)


def _kind(folder: Path, name: str) -> str:
    """``"explainer"`` or ``"model"`` as the (not yet verified) JSON says; reading verifies."""
    try:
        record = read_json(folder / f"{name}.json")
    except CheckpointError:  # unreadable, not JSON, NaN / Infinity in it
        return "model"  # reading it reports the damage
    kind = record.get("kind") if isinstance(record, dict) else None
    return "explainer" if kind == "explainer" else "model"


def available(directory: Directory = None, kind: Kind = "model") -> list[str]:
    """Names of the shipped models (or trained explainers), sorted.

    Args:
        directory: Folder of ``<name>.safetensors`` + ``<name>.json`` pairs; default the
            shipped ``captum_ext/zoo/weights``. Listing does not verify the files (reading
            them does).
        kind: ``"model"`` (classifiers), ``"explainer"`` (trained explainers such as
            ``"shapes-vit-ttame"``) or ``"all"``.
    """
    if kind not in ("model", "explainer", "all"):
        raise ValueError(f"kind must be 'model', 'explainer' or 'all'; got {kind!r}")
    folder = _folder(directory)
    names = record_names(folder)
    if kind == "all":
        return names
    return [n for n in names if _kind(folder, n) == kind]


def catalogue(directory: Directory = None) -> dict[str, str]:
    """The modality (``"image"`` or ``"text"``) of every zoo model, by name, sorted.

    As :func:`available`, this reads the JSON records without verifying the weights (and
    imports neither torch nor timm); :func:`info` and :func:`load` verify.

    Args:
        directory: Folder of the entries (default: the shipped ones).
    """
    folder = _folder(directory)
    out: dict[str, str] = {}
    for name in available(directory):
        try:
            record = read_json(folder / f"{name}.json")
        except CheckpointError:
            record = {}
        out[name] = str(record.get("modality", "image")) if isinstance(record, dict) else "image"
    return out


def check_name(name: str, directory: Directory = None, kind: Kind = "model") -> None:
    """Raise unless ``name`` is one of :func:`available` of that ``kind``.

    Args:
        name: A zoo model name (or, with ``kind="explainer"`` or ``"all"``, a trained
            explainer's).
        directory: Folder of the entries (default: the shipped ones).
        kind: ``"model"`` (default: where a model is expected), ``"explainer"`` or ``"all"``.

    Raises:
        ValueError: ``"unknown zoo model 'x'; available: 'shapes-cnn', ..."``, or an entry of
            the other kind (``"zoo entry 'shapes-vit-ttame' is a trained explainer, not a
            model ..."``).
        CheckpointError: If one file of the pair ``<name>.safetensors`` + ``<name>.json`` is
            there and the other is missing (a ``ValueError`` too).
    """
    if name in available(directory, kind):
        return
    folder = _folder(directory)
    if name in available(directory, "all"):
        actual = _kind(folder, name)
        what = {"model": "model", "explainer": "trained explainer"}
        others = ", ".join(repr(n) for n in available(directory, kind)) or "none"
        raise ValueError(
            f"zoo entry {name!r} is a {what[actual]}, not a {what.get(kind, kind)}; "
            f"{kind}s: {others}. zoo.load({name!r}) returns it as what it is."
        )
    pair = (folder / f"{name}.safetensors", folder / f"{name}.json")
    if any(p.is_file() for p in pair):
        missing = next(p for p in pair if not p.is_file())
        raise CheckpointError(missing, f"zoo model {name!r}: file missing", _remedy(name))
    shown = ", ".join(repr(n) for n in available(directory, kind))
    shown = shown or f"none (no weights in {folder})"
    raise ValueError(
        f"unknown zoo model {name!r}; available: {shown}. "
        "Train missing entries with 'python benchmarks/training/train_zoo.py --only NAME'."
    )


def _remedy(name: str) -> str:
    return (
        "reinstall captum_ext to restore the shipped files, or retrain the entry with "
        f"'python benchmarks/training/train_zoo.py --only {name}'"
    )


def _verified(name: str, directory: Directory, read_tensors: bool) -> tuple[Any, dict[str, Any]]:
    """``(tensors or None, record)`` of a verified entry; zoo advice in the error."""
    check_name(name, directory, kind="all")
    base = _folder(directory) / name
    expect: dict[str, Any] = {"name": name}
    require = REQUIRED_KEYS
    if _kind(_folder(directory), name) == "explainer":
        expect["kind"], require = "explainer", EXPLAINER_KEYS
    try:
        if read_tensors:
            return load_checkpoint(base, expect=expect, require=require)
        return None, verify_checkpoint(base, expect=expect, require=require)
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
        takes ``input_ids`` and ``attention_mask`` ``(B, T)``. For a trained explainer
        (``available(kind="explainer")``): the explainer (e.g. a :class:`~captum_ext.TTAME`),
        ready to ``attribute``, around its model loaded from the zoo as above; the
        explainer's checkpoint is verified against that model (class, parameter shapes,
        layers, class count).

    Raises:
        ValueError: If ``name`` is not a shipped model.
        CheckpointError: If the entry's files are missing, damaged or inconsistent.
    """
    if _kind(_folder(directory), name) == "explainer" and name in available(directory, "all"):
        _, record = _verified(name, directory, read_tensors=False)
        # The explainer modules register their loaders when imported (they sit above the zoo).
        importlib.import_module("captum_ext.explainers")
        loader = _EXPLAINER_LOADERS.get(record["method"])
        if loader is None:
            raise ValueError(
                f"zoo entry {name!r} is a {record['method']!r} explainer, which this "
                f"installation cannot build (known: {sorted(_EXPLAINER_LOADERS) or 'none'})"
            )
        backbone = load(record["backbone_model"], device, directory=directory)
        return loader(_folder(directory) / name, backbone).to(device).eval()
    tensors, record = _verified(name, directory, read_tensors=True)
    from captum_ext.zoo._build import build_model  # timm: imported when a model is built

    model = build_model(record)
    model.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=True)
    return model.to(device).eval()
