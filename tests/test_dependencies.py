"""Every third-party module that captum_ext imports is declared in ``install_requires``."""

from __future__ import annotations

import ast
import configparser
import importlib.metadata
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "captum_ext"

KNOWN = {"PIL": "pillow", "sklearn": "scikit-learn", "yaml": "pyyaml", "cv2": "opencv-python"}
"""Import name -> distribution, for modules whose distribution is named otherwise (used when
the module is not installed here, so that ``packages_distributions`` cannot tell)."""


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _imported_modules() -> dict[str, list[str]]:
    """Top-level modules imported anywhere in captum_ext (module -> files), stdlib left out."""
    found: dict[str, list[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or top in ("captum_ext", "__future__"):
                    continue
                found.setdefault(top, []).append(str(path.relative_to(ROOT)))
    return found


def _install_requires() -> set[str]:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    lines = cfg["options"]["install_requires"].strip().splitlines()
    return {_normalise(re.split(r"[\s<>=!~;\[]", line.strip(), maxsplit=1)[0]) for line in lines}


def test_every_imported_third_party_module_is_an_install_requirement():
    installed = importlib.metadata.packages_distributions()
    required = _install_requires()
    missing = []
    for module, files in _imported_modules().items():
        dists = installed.get(module) or ([KNOWN[module]] if module in KNOWN else [module])
        if not {_normalise(d) for d in dists} & required:
            missing.append(f"{module} (distribution {', '.join(dists)}; imported by {files[0]})")
    assert not missing, f"not in setup.cfg install_requires: {missing}"


def test_the_scan_finds_the_known_imports():
    modules = _imported_modules()
    assert {"torch", "captum", "numpy", "PIL", "scipy"} <= set(modules)
    assert "os" not in modules and "captum_ext" not in modules
