"""Where the shipped zoo entries live, and which there are (no torch, no timm: the command's
``--help`` lists them)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

__all__ = ["WEIGHTS_DIR", "record_names"]

WEIGHTS_DIR: Path = Path(str(resources.files("captum_ext.zoo") / "weights"))
"""Folder of the shipped ``<name>.safetensors`` and ``<name>.json`` files."""


def record_names(folder: Path = WEIGHTS_DIR) -> list[str]:
    """Names with both a JSON record and a safetensors file in ``folder``, sorted."""
    if not folder.is_dir():
        return []
    return sorted(p.stem for p in folder.glob("*.json") if p.with_suffix(".safetensors").is_file())
