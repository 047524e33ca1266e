"""Rebuild zoo architectures from their JSON records and read the shipped files.

A record (``weights/<name>.json``) names a ``library`` and an ``arch`` with JSON-only keyword
arguments (``model_kwargs``); the architecture is rebuilt from those alone and the weights are
read with ``safetensors`` (no pickle anywhere):

* ``library="timm"``: ``timm.create_model(arch, pretrained=False, **model_kwargs)``; JSON lists
  are turned back into tuples (e.g. ResNet ``channels``).
* ``library="transformers"``: ``arch`` is ``"BertForSequenceClassification"``, built from
  ``BertConfig(**model_kwargs)``.
"""

from __future__ import annotations

import functools
import json
import os
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "WEIGHTS_DIR",
    "build_model",
    "load_weights",
    "read_record",
    "record_names",
    "weights_path",
]

WEIGHTS_DIR: Path = Path(str(resources.files("captum_ext.zoo") / "weights"))
"""Folder of the shipped ``<name>.safetensors`` and ``<name>.json`` files."""


def record_names(folder: Path = WEIGHTS_DIR) -> list[str]:
    """Names with both a JSON record and a safetensors file in ``folder``, sorted."""
    if not folder.is_dir():
        return []
    return sorted(p.stem for p in folder.glob("*.json") if p.with_suffix(".safetensors").is_file())


@functools.lru_cache(maxsize=32)
def _read_json(path: str, mtime: float) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def read_record(name: str, folder: Path = WEIGHTS_DIR) -> dict[str, Any]:
    """The JSON record of ``name`` as a fresh dict (callers may change it freely)."""
    path = folder / f"{name}.json"
    return json.loads(_read_json(str(path), os.path.getmtime(path)))


def weights_path(name: str, folder: Path = WEIGHTS_DIR) -> Path:
    """Path of the safetensors file of ``name``."""
    return folder / f"{name}.safetensors"


def _tuples(value: Any) -> Any:
    """JSON lists back to tuples, recursively (timm signatures use tuples)."""
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    return value


def build_model(record: dict[str, Any]) -> nn.Module:
    """Build the randomly initialised architecture described by a record.

    Args:
        record: A zoo record with ``library``, ``arch`` and ``model_kwargs``.

    Returns:
        The model in float32 (train mode, untrained weights).

    Raises:
        ValueError: If the library or architecture is not one the zoo knows how to build.
    """
    library, arch = record["library"], record["arch"]
    kwargs = record.get("model_kwargs", {})
    if library == "timm":
        import timm

        return timm.create_model(arch, pretrained=False, **_tuples(kwargs)).float()
    if library == "transformers" and arch == "BertForSequenceClassification":
        from transformers import BertConfig, BertForSequenceClassification

        return BertForSequenceClassification(BertConfig(**kwargs)).float()
    raise ValueError(
        f"cannot build library={library!r}, arch={arch!r}; the zoo builds timm models and "
        "transformers BertForSequenceClassification"
    )


def load_weights(model: nn.Module, path: Path, device: str | torch.device = "cpu") -> nn.Module:
    """Load a safetensors file into ``model`` with ``strict=True`` (never unpickles)."""
    from safetensors.torch import load_file

    state = load_file(str(path), device=str(device))
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return model
