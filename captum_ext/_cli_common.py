"""Pieces shared by the ``captum-ext`` subcommands: the user-error type, devices, outputs.

Every subcommand checks what it can before it writes anything, computes, and only then
writes its files into a temporary folder beside the output folder, which is moved into
place at the end (:func:`staged_output`): an error leaves no half-written output behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "CLIError",
    "check_out_dir",
    "first_line",
    "resolve_device",
    "staged_output",
    "write_json",
]


class CLIError(Exception):
    """A mistake in what the user asked for; the command prints one line and exits with 2."""


def first_line(err: BaseException) -> str:
    """The first non-empty line of an exception's message (or its type name)."""
    for line in str(err).splitlines():
        if line.strip():
            return line.strip()
    return type(err).__name__


def resolve_device(name: str) -> str:
    """Checks a ``--device`` value (``cpu``, ``cuda`` or ``cuda:N``) against the machine.

    Raises:
        CLIError: The value is malformed, or CUDA was asked for and is not available.
    """
    if name == "cpu":
        return name
    if not re.fullmatch(r"cuda(:\d+)?", name):
        raise CLIError(f"unknown device {name!r}; use cpu, cuda or cuda:N")
    import torch

    if not torch.cuda.is_available():
        raise CLIError(
            f"--device {name} was requested but CUDA is not available on this machine "
            f"(torch {torch.__version__}); use --device cpu"
        )
    index = int(name.split(":")[1]) if ":" in name else 0
    if index >= torch.cuda.device_count():
        raise CLIError(
            f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)"
        )
    return name


def check_out_dir(out: Path) -> None:
    """Raises :class:`CLIError` when ``out`` exists and is not a folder."""
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {out}: exists and is not a folder")


@contextlib.contextmanager
def staged_output(out: Path) -> Iterator[Path]:
    """A temporary folder to write into; moved to ``out`` when the block succeeds.

    The temporary folder sits beside ``out`` when its parent exists (so the move is a
    rename). If ``out`` already exists, the new files replace files of the same name in
    it and other files are kept. If the block raises, the temporary folder is removed
    and ``out`` is neither created nor changed.
    """
    check_out_dir(out)
    parent = out.absolute().parent
    tmp = Path(tempfile.mkdtemp(prefix=".captum-ext-", dir=parent if parent.is_dir() else None))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private (0700); the result is a normal folder
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        if not out.exists():
            parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(tmp), str(out))
            return
        for item in sorted(tmp.rglob("*")):
            if item.is_file():
                dest = out / item.relative_to(tmp)
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.move(item, dest)  # a rename on one file system; replaces dest
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: Path, data: Any) -> None:
    """Writes ``data`` as indented JSON with a trailing newline."""
    path.write_text(json.dumps(data, indent=2) + "\n")
