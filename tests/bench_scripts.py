"""Import the scripts under ``benchmarks/training/`` in tests (they are not a package)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType

TRAINING = Path(__file__).resolve().parents[1] / "benchmarks" / "training"


def training_script(name: str) -> ModuleType:
    """The module ``benchmarks/training/<name>.py``; ``sys.path`` is restored afterwards."""
    sys.path.insert(0, str(TRAINING))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(TRAINING))
