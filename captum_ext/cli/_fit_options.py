"""The options of ``captum-ext fit``, read from the Python signatures they set.

The flags of ``fit ttame`` and ``fit mhex`` are not written down here: they are the
keyword arguments of ``TTAME.fit`` / ``MHEX.fit`` and the fields of ``TrainingRecipe``,
read with :mod:`ast` from the source files of :mod:`captum_ext.explainers` (their names,
annotations, defaults and docstring ``Args:`` / ``Attributes:`` entries). Parsing the source
imports nothing, so ``captum-ext fit --help`` stays fast (no torch); importing the explainers
to introspect them would not. A test compares what is read here with
``inspect.signature`` / ``dataclasses.fields`` at run time, so the two cannot drift apart.

Only the parameters in :data:`EXCLUDED` are left out (the command sets them itself). Flags
default to ``argparse.SUPPRESS``: an option the user does not give is not passed, and the
Python default applies.
"""

from __future__ import annotations

import argparse
import ast
import functools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["EXCLUDED", "EXPLAINERS", "Option", "add_options", "options", "recipe_defaults"]

EXPLAINERS = {"ttame": ("ttame.py", "TTAME"), "mhex": ("mhex.py", "MHEX")}
"""The subcommand's explainers: source file in ``captum_ext/explainers`` and class name."""

EXCLUDED = {
    "fit": {"self", "data", "recipe", "val_data"},
    "recipe": {"device", "show_progress", "distributed"},
}
"""Parameters that are not flags: ``data`` / ``val_data`` are ``--data`` / ``--val-data``
(folders), ``recipe`` is built from the recipe's flags, ``device`` is ``--device``,
``show_progress`` is ``--quiet`` (off), ``distributed`` is automatic under torchrun."""


@dataclass(frozen=True)
class Option:
    """One flag and the Python parameter it sets.

    Attributes:
        name: The parameter (``ce_weight``); also the argparse ``dest``.
        owner: ``"recipe"`` (a ``TrainingRecipe`` field) or ``"fit"`` (a ``fit`` argument).
        kind: ``"bool"``, ``"int"``, ``"float"``, ``"floats"`` (one or more), ``"choice"``
            or ``"path"``.
        default: The Python default (shown in the help; the flag's own default is
            ``argparse.SUPPRESS``).
        choices: The values of a ``Literal`` (``kind == "choice"``).
        help: The docstring entry, as plain text.
    """

    name: str
    owner: str
    kind: str
    default: Any
    choices: tuple[Any, ...] | None
    help: str

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


def _source(file: str) -> ast.Module:
    import captum_ext  # lazy (PEP 562): no torch; captum_ext.explainers would import it

    return ast.parse((Path(captum_ext.__file__).parent / "explainers" / file).read_text())


def _class(module: ast.Module, name: str) -> ast.ClassDef:
    for node in module.body:
        if isinstance(node, ast.ClassDef) and node.name == name:
            return node
    raise LookupError(f"class {name} not found")


def _aliases(module: ast.Module, seen: frozenset[str] = frozenset()) -> dict[str, ast.expr]:
    """Module-level ``Name = <type>`` assignments, also those of the package's modules it
    imports names from (``from captum_ext.explainers._mhex_network import Objective``)."""
    out: dict[str, ast.expr] = {}
    for node in module.body:
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
            "captum_ext.explainers."
        ):
            file = node.module.rsplit(".", 1)[1] + ".py"
            if file in seen:
                continue
            imported = _aliases(_source(file), seen | {file})
            for a in node.names:
                if a.name in imported:
                    out[a.asname or a.name] = imported[a.name]
    for node in module.body:
        if (
            isinstance(node, ast.Assign)
            and len(node.targets) == 1
            and isinstance(node.targets[0], ast.Name)
        ):
            out[node.targets[0].id] = node.value
    return out


def _members(node: ast.expr, aliases: dict[str, ast.expr]) -> list[ast.expr]:
    """The members of a union annotation (``a | b | None``), aliases resolved."""
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        return _members(node.left, aliases) + _members(node.right, aliases)
    if isinstance(node, ast.Name) and node.id in aliases:
        return _members(aliases[node.id], aliases)
    return [node]


def _kind(annotation: ast.expr, aliases: dict[str, ast.expr], where: str):
    """``(kind, choices)`` of an annotation; raises for a type the command cannot take."""
    names = []
    choices = None
    for m in _members(annotation, aliases):
        text = ast.unparse(m)
        if text == "None":
            continue
        if isinstance(m, ast.Subscript) and ast.unparse(m.value) in ("Literal", "typing.Literal"):
            elts = m.slice.elts if isinstance(m.slice, ast.Tuple) else [m.slice]
            choices = tuple(ast.literal_eval(e) for e in elts)
            text = "Literal"
        names.append(text)
    kinds = {
        ("bool",): "bool",
        ("int",): "int",
        ("float",): "float",
        ("Literal",): "choice",
        ("Sequence[float]", "float"): "floats",
        ("str", "os.PathLike[str]"): "path",
    }
    kind = kinds.get(tuple(names))
    if kind is None:
        raise TypeError(f"{where}: no command-line form for the type {ast.unparse(annotation)}")
    return kind, choices


def _doc_entries(doc: str | None, section: str) -> dict[str, str]:
    """The entries of a Google-style docstring section (``Args:``), as one line each."""
    entries: dict[str, str] = {}
    lines = (doc or "").splitlines()
    inside, indent, current = False, None, None
    for line in lines:
        stripped = line.strip()
        if stripped == f"{section}:":
            inside, indent, current = True, None, None
            continue
        if not inside:
            continue
        if not stripped:
            continue
        width = len(line) - len(line.lstrip())
        if indent is None:
            indent = width
        if width < indent:  # the next section
            break
        match = re.match(r"(\w+)(?: \([^)]*\))?: ?(.*)", stripped)
        if width == indent and match:
            current = match.group(1)
            entries[current] = match.group(2)
        elif current is not None:
            entries[current] += " " + stripped
    return {k: _plain(v) for k, v in entries.items()}


def _plain(text: str) -> str:
    """Docstring markup as plain text (``x`` -> x, :class:`~a.B` -> B), safe for argparse."""
    text = re.sub(r":\w+:`~?(?:[\w.]*\.)?([^`]+)`", r"\1", text)
    text = re.sub(r"\bNone\b", "unset", text.replace("``", ""))
    return text.replace("%", "%%").strip()


def _default(node: ast.expr | None, where: str) -> Any:
    if node is None:
        raise TypeError(f"{where}: a keyword argument without a default cannot be a flag")
    return ast.literal_eval(node)


@functools.cache
def recipe_defaults() -> dict[str, dict[str, Any]]:
    """Each explainer's ``default_recipe`` (``TrainingRecipe(epochs=8, ...)``) as a dict."""
    out = {}
    for key, (file, cls) in EXPLAINERS.items():
        out[key] = {}
        for node in _class(_source(file), cls).body:
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and node.target.id == "default_recipe"
                and isinstance(node.value, ast.Call)
            ):
                out[key] = {k.arg: ast.literal_eval(k.value) for k in node.value.keywords}
    return out


@functools.cache
def _recipe_options() -> tuple[Option, ...]:
    module = _source("base.py")
    cls = _class(module, "TrainingRecipe")
    docs = _doc_entries(ast.get_docstring(cls), "Attributes")
    aliases = _aliases(module)
    out = []
    for node in cls.body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        name = node.target.id
        if name in EXCLUDED["recipe"]:
            continue
        where = f"TrainingRecipe.{name}"
        kind, choices = _kind(node.annotation, aliases, where)
        out.append(
            Option(name, "recipe", kind, _default(node.value, where), choices, docs.get(name, ""))
        )
    return tuple(out)


@functools.cache
def _fit_options(explainer: str) -> tuple[Option, ...]:
    file, cls_name = EXPLAINERS[explainer]
    module = _source(file)
    aliases = _aliases(module)
    fit = next(
        n
        for n in _class(module, cls_name).body
        if isinstance(n, ast.FunctionDef) and n.name == "fit"
    )
    docs = _doc_entries(ast.get_docstring(fit), "Args")
    a = fit.args
    positional = a.posonlyargs + a.args
    pos_defaults = [None] * (len(positional) - len(a.defaults)) + list(a.defaults)
    params = list(zip(positional, pos_defaults)) + list(zip(a.kwonlyargs, a.kw_defaults))
    out = []
    for arg, default in params:
        if arg.arg in EXCLUDED["fit"]:
            continue
        where = f"{cls_name}.fit({arg.arg})"
        if arg.annotation is None:
            raise TypeError(f"{where}: has no annotation")
        kind, choices = _kind(arg.annotation, aliases, where)
        out.append(
            Option(arg.arg, "fit", kind, _default(default, where), choices, docs.get(arg.arg, ""))
        )
    return tuple(out)


def options(explainer: str) -> tuple[Option, ...]:
    """The flags of ``captum-ext fit EXPLAINER``: the recipe's, then ``fit``'s own.

    Raises:
        KeyError: ``explainer`` is not one of :data:`EXPLAINERS`.
        TypeError: A parameter whose type has no command-line form (a new option the
            command cannot take yet: the drift test names it).
    """
    return _recipe_options() + _fit_options(explainer)


def _number(kind: type, what: str):
    def parse(text: str):
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None

    parse.__name__ = what
    return parse


def _shown(value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def _help(opt: Option, explainer: str) -> str:
    """The docstring entry, the parameters it names spelled as flags, and the default."""
    names = sorted((o.name for o in options(explainer) if "_" in o.name), key=len, reverse=True)
    text = opt.help or opt.name
    if names:
        text = re.sub(
            r"(?<![\w.-])(" + "|".join(names) + r")\b",
            lambda m: "--" + m.group(1).replace("_", "-"),
            text,
        )
    if opt.owner == "recipe" and opt.default is None and opt.name in recipe_defaults()[explainer]:
        return f"{text} (default for {explainer}: {recipe_defaults()[explainer][opt.name]})"
    if opt.owner == "recipe" and opt.name == "amp":
        return f"{text} (default: on for CUDA, off on CPU)"
    if opt.default is None:
        return f"{text} (default: unset)"
    return f"{text} (default: {_shown(opt.default)})"


def add_options(p: argparse.ArgumentParser, explainer: str) -> None:
    """Adds the recipe's and ``EXPLAINER.fit``'s flags to ``p`` (two argument groups)."""
    groups = {
        "recipe": p.add_argument_group("training (TrainingRecipe)"),
        "fit": p.add_argument_group(f"{EXPLAINERS[explainer][1]}.fit options"),
    }
    for opt in options(explainer):
        g = groups[opt.owner]
        kw: dict[str, Any] = {"dest": opt.name, "default": argparse.SUPPRESS}
        kw["help"] = _help(opt, explainer)
        if opt.kind == "bool":
            g.add_argument(opt.flag, action=argparse.BooleanOptionalAction, **kw)
        elif opt.kind == "int":
            g.add_argument(opt.flag, type=_number(int, "an integer"), metavar="N", **kw)
        elif opt.kind == "float":
            g.add_argument(opt.flag, type=_number(float, "a number"), metavar="X", **kw)
        elif opt.kind == "floats":
            g.add_argument(opt.flag, type=_number(float, "a number"), nargs="+", metavar="X", **kw)
        elif opt.kind == "choice":
            g.add_argument(opt.flag, choices=opt.choices, **kw)
        else:  # path
            g.add_argument(opt.flag, metavar="DIR", **kw)


def chosen(args: argparse.Namespace, explainer: str, owner: str) -> dict[str, Any]:
    """The options of ``owner`` (``"recipe"`` or ``"fit"``) the user gave, as Python values."""
    out = {}
    for opt in options(explainer):
        if opt.owner == owner and hasattr(args, opt.name):
            value = getattr(args, opt.name)
            out[opt.name] = value[0] if opt.kind == "floats" and len(value) == 1 else value
    return out


def to_flags(line: str, explainer: str) -> str:
    """A library message with the parameters it names spelled as this command's flags:
    ``TrainingRecipe: lr must ...`` -> ``--lr must ...``, ``resume=True`` -> ``--resume``,
    ``nesterov=False`` -> ``--no-nesterov``, ``lr=0.1`` -> ``--lr 0.1``."""
    names = {o.name: o for o in options(explainer)}
    line = re.sub(r"^(TrainingRecipe|TTAME\.fit|MHEX\.fit): ", "", line)

    def one(m: re.Match[str]) -> str:
        opt = names[m.group(1)]
        value = m.group(2)
        if value is None:
            return opt.flag
        if value == "True":
            return opt.flag
        if value == "False" and opt.kind == "bool":
            return "--no-" + opt.flag[2:]
        return f"{opt.flag} {value}"

    pattern = r"(?<![\w.-])(" + "|".join(map(re.escape, names)) + r")\b(?:=([\w.+-]+|'[^']*'))?"
    return re.sub(
        pattern,
        lambda m: one(m) if "_" in m.group(1) or m.group(2) or m.start() == 0 else m.group(0),
        line,
    )
