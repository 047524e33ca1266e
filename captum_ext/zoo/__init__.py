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
from typing import Any

import torch
from torch import nn

from captum_ext.zoo._build import (
    WEIGHTS_DIR,
    build_model,
    load_weights,
    read_record,
    record_names,
    weights_path,
)

__all__ = ["available", "data_kwargs", "info", "load"]


def available() -> list[str]:
    """Names of the shipped models, sorted."""
    return record_names()


def _check_name(name: str) -> None:
    names = available()
    if name not in names:
        shown = ", ".join(repr(n) for n in names) or "none (no weights found in " + str(WEIGHTS_DIR)
        raise ValueError(
            f"unknown zoo model {name!r}; available: {shown}. "
            "Train missing entries with 'python benchmarks/train_zoo.py --only NAME'."
        )


def info(name: str) -> dict[str, Any]:
    """The recorded metadata of a zoo model.

    Args:
        name: One of :func:`available`.

    Returns:
        A copy of the JSON record: ``family``, ``modality``, ``task`` (``"multilabel"`` for
        images, ``"binary"`` for text), ``classes``, ``library``/``arch``/``model_kwargs``,
        ``data`` (generator and its keyword arguments), ``training`` (seed, steps, optimiser,
        schedule; ``phases`` for the frozen-backbone entry), ``heldout`` (seed, size, metric
        and ``accuracy``), ``params``, ``train_time_s`` and ``command``.

    Raises:
        ValueError: If ``name`` is not a shipped model.
    """
    _check_name(name)
    return read_record(name)


def data_kwargs(name: str) -> dict[str, Any]:
    """Keyword arguments of the data generator the model was trained for.

    For image models these go to :func:`captum_ext.data.shapes`, for text models to
    :func:`captum_ext.data.text_rationales`, in both cases without ``n`` and ``seed``.

    Args:
        name: One of :func:`available`.

    Returns:
        A fresh dict, e.g. ``{"layout": "aligned", "max_objects": 2, "size": 32, ...}``.

    Raises:
        ValueError: If ``name`` is not a shipped model.
    """
    return copy.deepcopy(info(name)["data"]["kwargs"])


def load(name: str, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a zoo model and load its shipped weights.

    The architecture is rebuilt from the JSON record (timm
    ``create_model(arch, pretrained=False, **kwargs)``, or ``BertConfig(**kwargs)`` with
    ``BertForSequenceClassification``) and the weights are read with
    ``safetensors.torch.load_file`` and loaded with ``load_state_dict(strict=True)``; nothing
    is unpickled and nothing is downloaded.

    Args:
        name: One of :func:`available`.
        device: Device of the returned model.

    Returns:
        The model in eval mode, float32, on ``device``. Image models take ``(B, 3, H, W)``
        images in [0, 1] (no normalisation) and return logits ``(B, K)``; the text model
        takes ``input_ids`` and ``attention_mask`` ``(B, T)``.

    Raises:
        ValueError: If ``name`` is not a shipped model.
    """
    record = info(name)
    model = build_model(record)
    load_weights(model, weights_path(name), device="cpu")
    return model.to(device).eval()
