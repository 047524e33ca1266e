"""The package's rooms import only downwards, and hooks are registered only by the hook engine.

Floors, bottom to top (DESIGN.md §1): a module may import from its own room and from rooms
on lower floors, never from a room above. The top-level ``captum_ext/__init__`` (the public
API, which imports the methods) counts as the floor below ``evaluation``.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "captum_ext"

FLOORS: list[set[str]] = [
    {"errors", "_scores", "distributed"},
    {"adapters", "checkpoint", "data", "viz"},
    {"capture", "metrics", "zoo"},
    {"attr", "explainers", "references"},
    {"registry", ""},  # "" = the package's __init__ (public API)
    {"evaluation", "models"},
    {"cli"},
]
FLOOR = {room: i for i, rooms in enumerate(FLOORS) for room in rooms}
SUBMODULES = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir()} - {"__init__"}


def _room(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    if rel.parts == ("__init__.py",):
        return ""
    return rel.parts[0].removesuffix(".py")


def _imported_rooms(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    rooms: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            parts = node.module.split(".")
            if parts[0] != "captum_ext":
                continue
            if len(parts) > 1:
                rooms.add(parts[1])
            else:  # from captum_ext import x: a room when x is a submodule, else the API
                rooms.update(a.name if a.name in SUBMODULES else "" for a in node.names)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "captum_ext":
                    rooms.add(parts[1] if len(parts) > 1 else "")
    return rooms


SOURCES = sorted(PACKAGE.rglob("*.py"))


def test_every_room_has_a_floor():
    rooms = {_room(p) for p in SOURCES}
    assert rooms <= set(FLOOR), f"rooms without a floor in this test: {rooms - set(FLOOR)}"


@pytest.mark.parametrize("path", SOURCES, ids=[str(p.relative_to(PACKAGE)) for p in SOURCES])
def test_imports_point_down(path):
    room = _room(path)
    up = {r for r in _imported_rooms(path) if r != room and r in FLOOR and FLOOR[r] > FLOOR[room]}
    assert not up, f"{path.relative_to(PACKAGE)} ({room or 'API'}) imports from above: {up}"


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _absolute(path: Path, node: ast.ImportFrom) -> str:
    """The module an ``import from`` names, relative imports resolved."""
    if node.level == 0:
        return node.module or ""
    package = ["captum_ext", *path.relative_to(PACKAGE).parent.parts]
    base = package[: len(package) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])


def _private_imports(path: Path) -> list[str]:
    """Private modules and names of other rooms that ``path`` imports (``room._x``, ``_name``).

    A room is a top-level module or subpackage of ``captum_ext``; its own name counts as
    public (``_scores`` is a room), the modules and names inside it that start with ``_`` do
    not. Dunders (``__version__``) are public.
    """
    room = _room(path)
    found = []

    def check(module: str, names: list[str], line: int) -> None:
        parts = module.split(".")
        if parts[0] != "captum_ext":
            return
        other = parts[1] if len(parts) > 1 else ""
        if other == room:
            return
        private = [p for p in parts[2:] if _private(p)]
        if other == "":  # from captum_ext import x: x is a room (public) or a name of the API
            private += [n for n in names if n not in SUBMODULES and _private(n)]
        else:
            private += [n for n in names if _private(n)]
        if private:
            found.append(f"{path.relative_to(PACKAGE)}:{line} imports {module}: {private}")

    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            check(_absolute(path, node), [a.name for a in node.names], node.lineno)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                check(alias.name, [], node.lineno)
    return found


@pytest.mark.parametrize("path", SOURCES, ids=[str(p.relative_to(PACKAGE)) for p in SOURCES])
def test_no_private_imports_from_another_room(path):
    """What one room uses of another is that room's public face, never its ``_private``
    modules or names: move the thing down a floor or make it public in its home module."""
    found = _private_imports(path)
    assert not found, found


def test_hooks_are_registered_only_by_the_hook_engine():
    offenders = []
    for path in SOURCES:
        if path.name == "capture.py":
            continue
        text = path.read_text()
        for call in ("register_forward_hook", "register_forward_pre_hook", ".register_hook("):
            if call in text:
                offenders.append(f"{path.relative_to(PACKAGE)}: {call}")
    assert not offenders, offenders


def _cli_options() -> set[str]:
    """Every ``--option`` of the ``captum-ext`` command and its subcommands."""
    import argparse

    from captum_ext.cli import build_parser

    options: set[str] = set()
    parsers = [build_parser()]
    while parsers:
        parser = parsers.pop()
        for action in parser._actions:
            options.update(o for o in action.option_strings if o.startswith("--"))
            if isinstance(action, argparse._SubParsersAction):
                parsers.extend(action.choices.values())
    return options


def _docstrings(tree: ast.AST) -> set[int]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                found.add(id(body[0].value))
    return found


def test_library_messages_name_arguments_not_command_line_options():
    """Outside ``captum_ext/cli`` strings name Python arguments (``overwrite=True``); the
    command translates them to its options where it reports them."""
    options = _cli_options()
    token = re.compile(r"(?<![\w-])--[a-z][\w-]*")
    offenders = []
    for path in SOURCES:
        if _room(path) == "cli":
            continue
        tree = ast.parse(path.read_text())
        skip = _docstrings(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                if id(node) in skip:
                    continue
                used = set(token.findall(node.value)) & options
                if used:
                    offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno}: {sorted(used)}")
    assert not offenders, offenders
