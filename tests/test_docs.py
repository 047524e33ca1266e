"""The documentation builds: Sphinx, warnings as errors, an API page for every public module.

``docs/`` holds the guide (MyST Markdown) and the API reference (autodoc + napoleon over the
docstrings). The build is what ``python -m sphinx -W --keep-going -b html docs OUT`` does; the
``docs`` and ``dev`` extras install Sphinx and MyST. The Python blocks of the pages run in
``tests/test_readme.py``.
"""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


@pytest.fixture(scope="module")
def html(tmp_path_factory) -> Path:
    pytest.importorskip("sphinx", reason="Sphinx is not installed (pip install -e '.[docs]')")
    pytest.importorskip(
        "myst_parser", reason="myst-parser is not installed (pip install -e '.[docs]')"
    )
    out = tmp_path_factory.mktemp("docs") / "html"
    cmd = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-E", "-q", "-j", "1"]
    result = subprocess.run(
        [*cmd, "-b", "html", str(DOCS), str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg"},
    )
    assert result.returncode == 0, f"Sphinx build failed:\n{result.stderr[-6000:]}"
    return out


def test_docs_build_with_warnings_as_errors(html):
    assert (html / "index.html").is_file()
    for page in DOCS.rglob("*.md"):
        if "_build" not in page.parts:
            rel = page.relative_to(DOCS).with_suffix(".html")
            assert (html / rel).is_file(), f"{page} was not built"


def _api_modules() -> list[str]:
    pages = (DOCS / "api").glob("*.md")
    return sorted({m for p in pages for m in re.findall(r"automodule:: ([\w.]+)", p.read_text())})


def test_every_public_module_has_an_api_page():
    public = {
        f"captum_ext.{p.stem if p.suffix == '.py' else p.name}"
        for p in (ROOT / "captum_ext").iterdir()
        if not p.name.startswith("_")
        and (p.suffix == ".py" or (p.is_dir() and (p / "__init__.py").is_file()))
    }
    missing = public - set(_api_modules())
    assert not missing, f"no page in docs/api/ for {sorted(missing)}"


def test_api_reference_documents_every_public_name(html):
    ids: set[str] = set()
    for page in (html / "api").glob("*.html"):
        ids |= set(re.findall(r'id="(?:module-)?(captum_ext[\w.]*)"', page.read_text()))
    modules = {name: importlib.import_module(name) for name in _api_modules()}
    documented = {
        id(getattr(mod, n))
        for name, mod in modules.items()
        for n in mod.__all__
        if f"{name}.{n}" in ids
    }
    missing = [
        f"{name}.{n}"
        for name, mod in modules.items()
        for n in getattr(mod, "__all__", [])
        if not n.startswith("__")
        and f"{name}.{n}" not in ids
        and id(getattr(mod, n)) not in documented
    ]
    assert not missing, f"public names missing from the API reference: {missing}"
