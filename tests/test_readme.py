"""The README and the documentation pages: their Python examples run as written (offline), the
Quick start is the two commands CI runs, and the README stays a one-screen introduction.

Every ```` ```python ```` block of ``README.md`` and ``docs/**/*.md`` runs, except a block
preceded by a ``<!-- test: skip (reason) -->`` comment (examples that need your own checkpoint
files, a GPU or ``torchrun``).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted(p for p in (ROOT / "docs").rglob("*.md") if "_build" not in p.parts)]
_BLOCK = re.compile(r"(<!-- test: skip[^>]*-->\s*)?```python\n(.*?)```", re.S)


def _blocks(path: Path, skipped: bool = False) -> list[tuple[str, str]]:
    text = path.read_text()
    where = path.relative_to(ROOT)
    return [
        (f"{where}:{text[: m.start()].count(chr(10)) + 1}", m.group(2))
        for m in _BLOCK.finditer(text)
        if bool(m.group(1)) == skipped
    ]


EXAMPLES = [block for page in PAGES for block in _blocks(page)]


@pytest.mark.parametrize(("where", "code"), EXAMPLES, ids=[w for w, _ in EXAMPLES])
def test_example_runs(where, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(code, where, "exec"), {"__name__": "__readme__"})


def test_there_are_runnable_examples():
    assert len(_blocks(README)) == 1, "the README has one example"
    assert len(EXAMPLES) >= 10


def test_skipped_examples_say_why():
    for page in PAGES:
        for marker in re.findall(r"<!-- test: skip[^>]*-->", page.read_text()):
            assert re.fullmatch(r"<!-- test: skip \(.+\) -->", marker), f"{page}: {marker}"


def _quick_start() -> list[str]:
    text = README.read_text()
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", section, re.S)]


def test_quick_start_is_two_commands_and_ci_runs_the_second():
    demo, tests = _quick_start()
    assert "\n" not in demo and "\n" not in tests, "each Quick start step is one command"
    assert demo.endswith("captum-ext demo") and "pip install -e ." in demo
    assert tests.endswith("python -m pytest") and 'pip install -e ".[dev]"' in tests
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert tests in ci, ".ci/run must run the README's test command exactly"


def test_readme_is_one_screen_naming_every_method_and_model_family():
    text = README.read_text()
    assert len(text.splitlines()) <= 80
    for name in ("CDAM", "TAM", "relevance propagation", "attention rollout", "attention map"):
        assert name in text, name
    for name in ("T-TAME", "MHEX", "timm", "HuggingFace", "BERT", "CNN", "ResNet", "VGG"):
        assert name in text, name
    for link in re.findall(r"\]\((?!https?://)([^)#]+)", text):
        assert (ROOT / link).exists(), f"README links to a missing file: {link}"


def test_no_history_talk_or_outside_references():
    for page in PAGES:
        text = page.read_text()
        for phrase in ("used to be", "before issue", "DESIGN", "../shared", "no longer"):
            assert phrase not in text, f"{page.relative_to(ROOT)}: {phrase!r}"
