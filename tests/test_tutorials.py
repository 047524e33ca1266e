"""The tutorials run (small settings) and write what they promise; notebooks match their scripts.

The notebook tutorials are jupytext "percent" scripts `tutorials/NN_*.py` rendered to
`tutorials/NN_*.ipynb` (outputs stripped). Each notebook is executed with nbclient in a kernel
of this interpreter, with `CAPTUM_EXT_TUTORIAL_TINY=1` (its tiny settings), and must reach its
final cell, whose assertions print "tutorial N checks passed".
"""

from __future__ import annotations

import ast
import configparser
import importlib.util
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from captum_ext import zoo

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [
    pytest.mark.tutorials,
    pytest.mark.skipif("shapes-vit" not in zoo.available(), reason="zoo weights are not installed"),
]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tutorials" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.e2e
def test_quickstart_writes_a_figure_whose_rows_differ_by_class(tmp_path, capsys):
    out = tmp_path / "qs.png"
    _load("quickstart").main(["--n", "1", "--out", str(out)])
    assert "2 rows" in capsys.readouterr().out
    img = np.asarray(Image.open(out).convert("RGB"), dtype=float)
    assert img.shape[0] > 100 and img.shape[1] > 400
    top, bottom = img[: img.shape[0] // 2], img[img.shape[0] // 2 :]
    assert np.abs(top - bottom).mean() > 1.0  # the two classes' rows are not the same picture


@pytest.mark.e2e
def test_benchmark_your_method_scores_the_custom_map(tmp_path, capsys):
    out = tmp_path / "bym"
    _load("benchmark_your_method").main(["--n", "8", "--bootstrap", "20", "--out", str(out)])
    table = (out / "table.md").read_text()
    assert "InputXGradient" in table and "CDAM" in table and "random" in table
    with Image.open(out / "mass_accuracy.png") as img:
        assert img.size[0] > 300


# --- notebooks: tutorials/NN_*.py (jupytext percent) rendered to tutorials/NN_*.ipynb ----------

NOTEBOOKS = sorted(p.stem for p in (ROOT / "tutorials").glob("[0-9][0-9]_*.py"))
RENDER = "jupytext --to ipynb tutorials/NN_name.py  (or: --to ipynb tutorials/[0-9][0-9]_*.py)"


def _cells(nb) -> list[tuple[str, str]]:
    return [(c.cell_type, c.source.strip()) for c in nb.cells]


def test_there_are_five_notebook_tutorials():
    assert len(NOTEBOOKS) == 5, NOTEBOOKS
    for name in NOTEBOOKS:
        assert (ROOT / "tutorials" / f"{name}.ipynb").is_file(), f"{name}.ipynb missing: {RENDER}"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_in_sync_with_its_script(name):
    jupytext = pytest.importorskip("jupytext", reason="jupytext is in the dev extra")
    import nbformat

    source = jupytext.read(ROOT / "tutorials" / f"{name}.py", fmt="py:percent")
    committed = nbformat.read(ROOT / "tutorials" / f"{name}.ipynb", as_version=4)
    assert _cells(committed) == _cells(source), f"{name}.ipynb differs from {name}.py: {RENDER}"
    assert all(not c.get("outputs") for c in committed.cells if c.cell_type == "code"), (
        f"{name}.ipynb is committed with outputs; render it again: {RENDER}"
    )
    first = source.cells[0].source
    assert "Run time on CPU" in first, f"{name}: the first cell states the CPU run time"


# --- what a notebook shows: no stray reprs, no tqdm warning; instructions name a real extra ----

SHOWN = ("print", "display", "show")  # calls a cell may end on: they print or draw, return None
REPR = re.compile(r"<(Figure|Axes|matplotlib)[ .]|\(<Figure")


def _bare_last_expression(source: str) -> str | None:
    """The cell's last statement when Jupyter would print its value (an expression that is
    not a call of print/display/show and does not end in ``;``), else ``None``."""
    tree = ast.parse(source)
    if not tree.body or not isinstance(tree.body[-1], ast.Expr):
        return None
    if source.rstrip().endswith(";"):
        return None
    value = tree.body[-1].value
    if isinstance(value, ast.Call):
        name = value.func.attr if isinstance(value.func, ast.Attribute) else None
        name = name or (value.func.id if isinstance(value.func, ast.Name) else None)
        if name in SHOWN:
            return None
    return ast.unparse(tree.body[-1])[:80]


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_cells_do_not_end_on_a_value_jupyter_would_print(name):
    """A cell ending on ``visualize_image_attr(...)`` prints ``(<Figure ...>, <Axes ...>)``."""
    import nbformat

    nb = nbformat.read(ROOT / "tutorials" / f"{name}.ipynb", as_version=4)
    bare = [
        (i, found)
        for i, cell in enumerate(nb.cells)
        if cell.cell_type == "code" and (found := _bare_last_expression(cell.source))
    ]
    assert not bare, f"{name}: cells whose value Jupyter prints (end them with ; or _ =): {bare}"


def test_the_repr_check_sees_a_figure_call():
    assert _bare_last_expression("visualization.visualize_image_attr(a, b)")
    assert _bare_last_expression("fig.tight_layout()")
    assert not _bare_last_expression("_ = visualization.visualize_image_attr(a, b)")
    assert not _bare_last_expression("fig.tight_layout();")
    assert not _bare_last_expression("x = 1\nplt.show()")


def _extras() -> dict[str, list[str]]:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    extras = cfg["options.extras_require"]
    return {k: [r.strip() for r in v.strip().splitlines() if r.strip()] for k, v in extras.items()}


def test_tutorial_instructions_name_an_extra_that_installs_jupyter():
    extras = _extras()
    assert "tutorials" in extras, sorted(extras)
    names = {re.split(r"[<>=!~\[ ]", r, maxsplit=1)[0].lower() for r in extras["tutorials"]}
    assert {"jupyterlab", "nbconvert", "ipykernel", "ipywidgets"} <= names, names
    docs = (ROOT / "docs" / "tutorials.md").read_text()
    first_cells = {}
    for name in NOTEBOOKS:
        import nbformat

        nb = nbformat.read(ROOT / "tutorials" / f"{name}.ipynb", as_version=4)
        first_cells[name] = nb.cells[0].source
    for where, text in {"docs/tutorials.md": docs, **first_cells}.items():
        named = set(re.findall(r'pip install -e "\.\[([a-z,]+)\]"', text))
        assert named, f'{where}: no pip install -e ".[EXTRA]" instruction'
        for group in named:
            for extra in group.split(","):
                assert extra in extras, f"{where} names the extra {extra!r}, not in setup.cfg"


def test_a_hidden_progress_bar_never_imports_tqdm_auto():
    """tqdm.auto warns "IProgress not found" in a notebook without ipywidgets."""
    code = (
        "import sys; from captum_ext._scores import progress\n"
        "assert sum(progress(range(3), False)) == 3\n"
        "assert 'tqdm.autonotebook' not in sys.modules, 'tqdm.auto imported'\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


def test_a_shown_progress_bar_is_plain_text_without_ipywidgets(monkeypatch):
    import importlib.util as iu

    from tqdm.std import tqdm as plain

    from captum_ext._scores import progress

    real = iu.find_spec
    monkeypatch.setattr(iu, "find_spec", lambda n, *a: None if n == "ipywidgets" else real(n, *a))
    with progress(range(2), True, file=io.StringIO()) as bar:
        assert type(bar) is plain


@pytest.fixture
def python_kernel(tmp_path, monkeypatch):
    """A ``python3`` kernelspec that runs this interpreter (the venv's), found first."""
    import json

    spec_dir = tmp_path / "jupyter" / "kernels" / "python3"
    spec_dir.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    spec = {"argv": argv, "display_name": "Python 3", "language": "python"}
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("JUPYTER_PLATFORM_DIRS", "1")
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
    monkeypatch.setenv("CAPTUM_EXT_TUTORIAL_TINY", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    path = os.environ.get("PYTHONPATH")
    monkeypatch.setenv("PYTHONPATH", str(ROOT) + (os.pathsep + path if path else ""))
    return "python3"


def _run_notebook(name: str, kernel: str, cwd: Path):
    pytest.importorskip("nbclient", reason="nbclient is in the dev extra")
    pytest.importorskip("ipykernel", reason="ipykernel is in the dev extra")
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(ROOT / "tutorials" / f"{name}.ipynb", as_version=4)
    client = NotebookClient(
        nb, timeout=300, kernel_name=kernel, resources={"metadata": {"path": str(cwd)}}
    )
    client.execute()
    return nb


def _outputs(nb, key: str) -> list[str]:
    """Every output of the executed notebook holding ``key`` (a MIME type or ``"text"``)."""
    found = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if key == "text" and out.get("output_type") == "stream":
                found.append(out.get("text", ""))
            elif key in out.get("data", {}):
                found.append(out["data"][key])
    return found


EXPECTED = {  # what the executed notebook must show besides running its own final asserts
    "01_cdam_vit": ("image/png", 3),
    "02_bert_text": ("text/html", 3),  # the sentence of your own + 2 held-out ones
    "03_trainable_explainers": ("image/png", 1),
    "04_evaluating_methods": ("image/png", 1),
    "05_local_weights": ("text", 1),
}


@pytest.mark.e2e
@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_and_passes_its_checks(name, python_kernel, tmp_path):
    nb = _run_notebook(name, python_kernel, tmp_path)
    text = "".join(_outputs(nb, "text"))
    number = int(name[:2])
    assert f"tutorial {number} checks passed" in text, text[-2000:]
    kind, count = EXPECTED[name]
    assert len(_outputs(nb, kind)) >= count, f"{name}: fewer than {count} {kind} outputs"
    values = [  # a cell's value printed under it (a drawn figure's text alternative is not)
        str(out.get("data", {}).get("text/plain", ""))
        for cell in nb.cells
        for out in cell.get("outputs", [])
        if out.get("output_type") == "execute_result"
    ]
    assert not [v for v in values if REPR.search(v)], f"{name}: a figure's repr is shown: {values}"
    # huggingface_hub imports tqdm.auto, which warns in a kernel without ipywidgets: the
    # tutorials and dev extras install it
    assert "IProgress" not in text and "TqdmWarning" not in text, text[-2000:]
