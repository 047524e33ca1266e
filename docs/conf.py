"""Sphinx configuration of the captum_ext documentation.

Build (warnings are errors, as ``tests/test_docs.py`` runs it)::

    python -m sphinx -W --keep-going -b html docs docs/_build/html
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

project = "captum_ext"
author = "captum_ext contributors"
copyright = "captum_ext contributors"

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
    "myst_parser",
]

source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = ["_build"]

# Google-style docstrings (Args:, Returns:, Raises:, Attributes:).
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True  # "Attributes:" as fields of the class, not separate entries

autodoc_default_options = {"show-inheritance": True}
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_class_signature = "mixed"

myst_enable_extensions = ["colon_fence"]
myst_heading_anchors = 3

html_theme = "alabaster"
html_title = "captum_ext"


# --- constants re-exported by a package ---------------------------------------------------
# autodoc reads a constant's docstring (the string literal after it) from the module that
# defines it. For a constant a package re-exports (``.. autodata::
# captum_ext.data.SHAPE_CLASSES``, defined in ``captum_ext/data/images.py``) it finds none
# there and shows the docstring of the value's type (``tuple``, ``dict``); this hook takes the
# docstring from the defining module instead.


def _defining_doc(name: str, obj: object) -> list[str] | None:
    from sphinx.pycode import ModuleAnalyzer

    for modname, module in sorted(sys.modules.items()):
        if not modname.startswith("captum_ext") or getattr(module, name, None) is not obj:
            continue
        try:
            docs = ModuleAnalyzer.for_module(modname).find_attr_docs()
        except Exception:  # a module without source
            continue
        if ("", name) in docs:
            return list(docs[("", name)])
    return None


def _constant_docstring(app, what, name, obj, options, lines):
    if what != "data" or not name.startswith("captum_ext."):
        return
    doc = _defining_doc(name.rsplit(".", 1)[1], obj)
    if doc is not None:
        lines[:] = doc


def setup(app):
    app.connect("autodoc-process-docstring", _constant_docstring)
