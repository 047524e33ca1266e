"""The README's Python examples run as written (offline), except blocks marked to skip.

A block preceded by ``<!-- test: skip -->`` (examples that need your own
checkpoint files) is not run.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
_BLOCK = re.compile(r"(<!-- test: skip -->\s*)?```python\n(.*?)```", re.S)


def _blocks() -> list[tuple[int, str]]:
    text = README.read_text()
    return [
        (text[: m.start()].count("\n") + 1, m.group(2))
        for m in _BLOCK.finditer(text)
        if not m.group(1)
    ]


@pytest.mark.parametrize(
    ("line", "code"), _blocks(), ids=lambda v: str(v) if isinstance(v, int) else ""
)
def test_readme_example_runs(line, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(code, f"README.md:{line}", "exec"), {"__name__": "__readme__"})


def test_readme_has_runnable_examples():
    assert len(_blocks()) >= 4
