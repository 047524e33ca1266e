"""What the ``captum-ext`` subcommands share: user errors, options, devices, the output
folder, JSON, method names and the metrics run. The figures are drawn by
:mod:`captum_ext.viz`, the home of the colour convention.

Every subcommand checks what it can before it writes anything, computes, and only then
writes its files into a temporary folder beside the output folder, which is moved into
place at the end (:func:`staged_output`): an error leaves no half-written output behind.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

__all__ = [
    "ZOO_MODELS",
    "CLIError",
    "HelpFormatter",
    "OutMode",
    "Terminated",
    "add_chunk_size",
    "add_device",
    "add_quiet",
    "as_flags",
    "build_methods",
    "check_image_file",
    "check_methods",
    "check_out_dir",
    "count",
    "first_line",
    "is_main_process",
    "model_kind",
    "model_record",
    "open_dataset",
    "refuse_unsupported",
    "resolve_device",
    "run_metrics",
    "split_trained",
    "staged_output",
    "write_json",
    "zoo_models_text",
]


class CLIError(Exception):
    """A mistake in what the user asked for; the command prints one line and exits with 2."""


def first_line(err: BaseException) -> str:
    """The first non-empty line of an exception's message (or its type name)."""
    for line in str(err).splitlines():
        if line.strip():
            return line.strip()
    return type(err).__name__


_FLAGS = {
    "overwrite=True": "--overwrite",
    "weights=FILE": "--weights FILE",
    "(model_kwargs)": "(--model-kwargs)",
}
"""Python arguments named in library messages, and the options that set them here."""


def as_flags(line: str, out: Path | None = None) -> str:
    """A library message with the Python arguments it names spelled as this command's options.

    Args:
        line: The message (one line).
        out: The output folder the command passed as ``out=`` (``out=OUT`` becomes
            ``--out OUT``).
    """
    if out is not None:
        line = line.replace(f"out={out}", f"--out {out}")
    for argument, flag in _FLAGS.items():
        line = line.replace(argument, flag)
    return line


def count(low: int):
    """An argparse ``type`` for integers ``>= low`` (a bad value is a one-line usage error)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    parse.__name__ = "integer"
    return parse


def add_quiet(p: argparse.ArgumentParser) -> None:
    """Adds ``--quiet`` (no progress bars)."""
    p.add_argument(
        "-q", "--quiet", action="store_true", help="no progress bars (they go to stderr)"
    )


ZOO_MODELS = "{zoo_models}"
"""Placeholder in a help text that :class:`HelpFormatter` replaces by the zoo's models."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the layout of descriptions and epilogs, and replaces :data:`ZOO_MODELS` by the
    models of ``captum_ext.zoo`` when the help is shown (not when the parser is built)."""

    def add_text(self, text: str | None) -> None:
        if text and ZOO_MODELS in text:
            text = text.replace(ZOO_MODELS, zoo_models_text())
        super().add_text(text)


def zoo_models_text(indent: int = 14, width: int = 90) -> str:
    """The zoo's model names, grouped by modality, wrapped for a help text whose first
    line has ``indent`` characters before the names (continuation lines are indented so)."""
    import textwrap

    try:
        from captum_ext import zoo

        groups: dict[str, list[str]] = {}
        for name, modality in zoo.catalogue().items():
            groups.setdefault(modality, []).append(name)
    except (ImportError, OSError, ValueError) as err:
        return f"(the zoo cannot be listed: {first_line(err)})"
    if not groups:
        return "(none: this installation has no zoo weights)"
    text = "; ".join(f"{kind}: {', '.join(names)}" for kind, names in groups.items())
    pad = " " * indent
    return textwrap.fill(
        text, width, initial_indent=pad, subsequent_indent=pad, break_on_hyphens=False
    )[indent:]


def add_device(p: argparse.ArgumentParser) -> None:
    """Adds ``--device``."""
    p.add_argument(
        "--device",
        default="cpu",
        metavar="cpu|cuda",
        help="where to run (default: cpu; cuda or cuda:N if available)",
    )


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


OutMode = Literal["merge", "new", "replace"]
"""What to do with an existing output folder: ``"merge"`` (new files replace files of the
same name, others stay), ``"new"`` (refuse a non-empty folder), ``"replace"`` (its content
becomes exactly this run's output)."""


class Terminated(SystemExit):
    """Raised by the SIGTERM handler of :func:`staged_output`, so that its cleanup runs.

    The exit status is ``128 + SIGTERM`` (143), as for a process the signal ended.
    """


def _staging_parent(out: Path) -> Path:
    """The folder the output is staged in: ``out``'s parent, or its nearest existing ancestor."""
    p = out.absolute().parent
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_out_dir(out: Path, mode: OutMode = "merge") -> None:
    """Checks, before anything is computed, that the output can be written to ``out``.

    Creates (and removes at once) a probe folder where :func:`staged_output` will stage the
    files and, if ``out`` exists, in ``out``: a read-only file system, a missing permission,
    ``/proc`` or a parent that is a file are found here and not after the work is done.

    Raises:
        CLIError: ``out`` or its nearest existing ancestor is a file, ``out`` is a non-empty
            folder and ``mode`` is ``"new"``, or a folder cannot be made there.
    """
    try:
        if out.exists() and not out.is_dir():
            raise CLIError(f"--out {out}: exists and is not a folder")
        anchor = _staging_parent(out)
        if not anchor.is_dir():
            raise CLIError(f"--out {out}: {anchor} is a file, not a folder")
        if mode == "new" and out.is_dir() and any(out.iterdir()):
            raise CLIError(
                f"--out {out}: the folder is not empty; pass --overwrite to replace its "
                "content with this run's output, or choose another folder"
            )
        for where in (anchor, out) if out.is_dir() else (anchor,):
            try:
                os.rmdir(tempfile.mkdtemp(prefix=".captum-ext-", dir=where))
            except OSError as err:
                raise CLIError(
                    f"--out {out}: cannot create a folder in {where} "
                    f"({err.strerror or first_line(err)})"
                ) from err
    except OSError as err:  # e.g. a parent that may not be listed
        raise CLIError(f"--out {out}: {err.strerror or first_line(err)}") from err


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[dict[str, bool]]:
    """SIGTERM raises :class:`Terminated` inside the block; the old handler comes back after.

    Setting ``state["defer"]`` holds a SIGTERM back until the block ends (for a move into
    place that must not stop half-way). Only the main thread may install a handler;
    elsewhere the block runs as it is.
    """
    state = {"defer": False, "pending": False}
    if threading.current_thread() is not threading.main_thread():
        yield state
        return

    def handler(signum: int, frame: Any) -> None:
        if state["defer"]:
            state["pending"] = True
        else:
            raise Terminated(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield state
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
    if state["pending"]:
        raise Terminated(128 + signal.SIGTERM)


@contextlib.contextmanager
def staged_output(out: Path, mode: OutMode = "merge") -> Iterator[Path]:
    """A temporary folder to write into; moved to ``out`` when the block succeeds.

    The temporary folder sits beside ``out`` (or in its nearest existing ancestor), so the
    move is a rename. An existing ``out`` is treated as ``mode`` says. If the block raises,
    or SIGTERM arrives (it raises :class:`Terminated` inside the block), the temporary
    folder is removed and ``out`` is neither created nor changed.

    Raises:
        CLIError: From :func:`check_out_dir`, before the block runs.
    """
    check_out_dir(out, mode)
    with _sigterm_raises() as sigterm:
        tmp: Path | None = None
        try:
            tmp = Path(tempfile.mkdtemp(prefix=".captum-ext-", dir=_staging_parent(out)))
            umask = os.umask(0)
            os.umask(umask)
            tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private (0700); make it a normal folder
            yield tmp
            sigterm["defer"] = True
            _move_into_place(tmp, out, mode)
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)


def _move_into_place(tmp: Path, out: Path, mode: OutMode) -> None:
    if not out.exists():
        out.absolute().parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(tmp), str(out))
        return
    if mode == "replace":
        for item in out.iterdir():
            if item.is_dir() and not item.is_symlink():
                shutil.rmtree(item)
            else:
                item.unlink()
    for item in sorted(tmp.rglob("*")):
        if item.is_file():
            dest = out / item.relative_to(tmp)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(item, dest)  # a rename on one file system; replaces dest


def write_json(path: Path, data: Any) -> None:
    """Writes ``data`` as indented strict JSON with a trailing newline.

    Raises:
        CLIError: ``data`` holds NaN, inf or a value JSON cannot hold (named by its key).
    """
    from captum_ext.checkpoint import dumps_json

    try:
        text = dumps_json(data, path, indent=2)
    except ValueError as err:
        raise CLIError(str(err)) from None
    path.write_text(text + "\n")


def check_methods(names: Sequence[str]) -> list[str]:
    """Checks method names against the registry (case-insensitive, ``-`` as ``_``).

    A name may be one of the package's methods (``registry.METHODS``: cdam, tam, ...), a
    Captum reference (``registry.REFERENCES``: gradcam, ig; CNNs) or a trained explainer
    (``registry.TRAINED``: ttame, mhex). ``all`` stands for every name of every group; the
    caller keeps those that apply to the model (:func:`build_methods`).

    Raises:
        CLIError: A name is not registered (the message lists the names by group).
    """
    from captum_ext.registry import METHODS, REFERENCES, TRAINED

    every = [*METHODS, *REFERENCES, *TRAINED]
    out = []
    for name in names:
        if name.lower() == "all":
            out.extend(every)
            continue
        key = name.lower().replace("-", "_")
        key = {k.replace("_", ""): k for k in every}.get(key.replace("_", ""), key)  # t-tame
        if key not in every:
            raise CLIError(
                f"unknown method {name!r}; methods: {', '.join(METHODS)}; Captum references "
                f"(CNNs): {', '.join(REFERENCES)}; trained explainers: {', '.join(TRAINED)}; "
                "or all"
            )
        out.append(key)
    return list(dict.fromkeys(out))


def model_kind(model: Any) -> str:
    """``"cnn"``, ``"transformer"`` or ``"other"`` (no adapter recognises the model)."""
    from captum_ext.adapters import CNNAdapter, adapter_for
    from captum_ext.errors import UnsupportedModelError

    try:
        adapter = adapter_for(model)
    except UnsupportedModelError:
        return "other"
    return "cnn" if isinstance(adapter, CNNAdapter) else "transformer"


def _offered(kind: str) -> str:
    """What a model of ``kind`` gets, for a refusal."""
    from captum_ext.registry import METHODS, REFERENCES, TRAINED

    trained = f"{', '.join(TRAINED)} (trained explainers: the zoo's or --explainer FILE)"
    if kind == "cnn":
        return f"CNNs get {', '.join(REFERENCES)} (Captum references) and {trained}"
    return f"transformers get {', '.join(METHODS)} and {trained}"


def refuse_unsupported(name: str, spec: str, kind: str) -> CLIError:
    """The one-line refusal of method ``name`` on model ``spec`` of ``kind``
    (:func:`model_kind`), naming what such a model gets."""
    from captum_ext.registry import REFERENCES

    if kind == "cnn":
        return CLIError(f"{name} explains transformers, not CNNs ({spec}); {_offered(kind)}")
    if name in REFERENCES:
        return CLIError(
            f"{name} is a Captum reference for CNNs; {spec} is a {kind}: {_offered('transformer')}"
        )
    return CLIError(f"{name} does not explain {spec} (no captum_ext adapter recognises it)")


def build_methods(
    names: Sequence[str],
    model: Any,
    spec: str,
    skip_unsupported: bool,
    options: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The attribution objects of the methods and Captum references among ``names``
    (trained explainers are left to the caller).

    Args:
        names: Checked names (:func:`check_methods`).
        model: The model.
        spec: Its ``--model`` spec, for messages.
        skip_unsupported: ``--method all``: a method that does not explain the model is left
            out (the caller reports what was run); else it is refused.
        options: Constructor keywords per name (``{"ig": {"n_steps": 64}}``).

    Raises:
        CLIError: A named method does not explain the model (the message says what it gets).
    """
    from captum_ext.errors import UnsupportedModelError
    from captum_ext.registry import METHODS, REFERENCES, make_method

    out: dict[str, Any] = {}
    for name in names:
        if name not in METHODS and name not in REFERENCES:
            continue
        try:
            out[name] = make_method(name, model, **(options or {}).get(name, {}))
        except UnsupportedModelError as err:
            if not skip_unsupported:
                raise refuse_unsupported(name, spec, model_kind(model)) from err
        except ValueError as err:
            raise CLIError(f"{name} on {spec}: {first_line(err)}") from err
    return out


def split_trained(names: Sequence[str]) -> tuple[list[str], list[str]]:
    """``(methods and references, trained explainers)`` of checked names (:func:`check_methods`),
    as the evaluation takes them (``methods``, ``explainers``)."""
    from captum_ext.registry import TRAINED

    return [m for m in names if m not in TRAINED], [m for m in names if m in TRAINED]


def run_metrics(
    models: Sequence[str],
    methods: Sequence[str] | None,
    n: int,
    seed: int | None,
    bootstrap: int,
    device: str,
    show_progress: bool = False,
) -> tuple[str, dict[str, Any]]:
    """``captum_ext.evaluation.evaluate`` on zoo models (with its baselines).

    Args:
        methods: Checked names (:func:`check_methods`): the methods and Captum references
            among them are evaluated, and the trained explainers among them where the zoo
            ships one fitted to the model; ``None`` = the evaluation's own set (every method,
            every trained explainer the zoo ships).

    Returns:
        ``(markdown, data)``: the result's tables (one per model) and its JSON dict.
    """
    from captum_ext.evaluation import evaluate

    kwargs: dict[str, Any] = {"n": n, "bootstrap": bootstrap, "device": device}
    if methods is not None:
        methods, kwargs["explainers"] = split_trained(methods)
    if seed is not None:
        kwargs["seed"] = seed
    result = evaluate(list(models), methods, show_progress=show_progress, **kwargs)
    return result.to_markdown(), result.to_dict()


# --- whole datasets (``--dataset``), in one process or under torchrun -------------------------

DATASET_HELP = (
    "a whole dataset: 'shapes' (the benchmark), a folder of images, or an ImageFolder tree "
    "(one sub-folder per class); written as resumable shards, one process or torchrun"
)


def add_num_examples(p: argparse.ArgumentParser, help: str) -> None:
    """Adds ``--n`` / ``--num-examples`` (default 64).

    After ``torchrun ... -m captum_ext.cli``, torchrun's own parser rejects ``--n`` as an
    ambiguous prefix of its options, so the long spelling exists for that launch.
    """
    p.add_argument("--n", "--num-examples", dest="n", type=count(1), default=64, help=help)


def add_chunk_size(p: argparse.ArgumentParser) -> None:
    """Adds ``--chunk-size`` (examples per shard of a ``--dataset`` run)."""
    p.add_argument(
        "--chunk-size",
        type=count(1),
        default=256,
        metavar="N",
        help="--dataset: examples per shard file, the unit of resuming (default: %(default)s)",
    )


def is_main_process() -> bool:
    """Rank 0 of a torchrun launch, or a process started without torchrun."""
    return int(os.environ.get("RANK", "0")) == 0


def model_record(spec: str, model: Any) -> dict[str, Any]:
    """What a ``--dataset`` run records about its model: the spec, the class and the sha256
    of its state as stored (:func:`captum_ext.checkpoint.model_fingerprint`, ``exact=True``)."""
    from captum_ext.checkpoint import model_fingerprint

    return {
        "spec": spec,
        "class": type(model).__name__,
        "state_sha256": model_fingerprint(model, exact=True),
    }


def check_image_file(path: Path, flag: str) -> None:
    """Reads an image file once as the commands will (every pixel, to RGB), so that a
    broken or ambiguous file stops the command in one line before any work.

    Args:
        path: The file.
        flag: The option that named it (``"--image"``), for the message.

    Raises:
        CLIError: An empty or unreadable file (a bad checksum or data stream, a
            decompression bomb), or pixels :func:`captum_ext.models.to_rgb` refuses
            (e.g. float values outside [0, 255]); the message names the file.
    """
    from PIL import Image

    from captum_ext.models import to_rgb

    try:
        with Image.open(path) as img:
            img.verify()  # checksums (a PNG's CRCs)
        with Image.open(path) as img:
            img.load()  # every pixel: broken data streams, decompression bombs
            rgb = img
    except Exception as err:  # PIL raises OSError, SyntaxError, DecompressionBombError...
        raise CLIError(f"{flag} {path}: not an image PIL can read ({first_line(err)})") from err
    try:
        to_rgb(rgb)
    except ValueError as err:
        line = first_line(err)
        raise CLIError(f"{flag} {path}: {line.removeprefix(f'{path}: ')}") from err


def open_dataset(source: str, loaded: Any, n: int, seed: int, *, match_classes: bool = True) -> Any:
    """The dataset of ``--dataset`` for a loaded image model.

    ``shapes`` is the benchmark at the model's input size (a zoo model's own data settings);
    a folder is read with the model's transform, and an ``ImageFolder`` tree's classes are
    matched with the model's (unless ``match_classes`` is false: a caller that ignores the
    labels, such as fitting T-TAME, takes any tree).

    Every image of a folder is read once here (:func:`check_image_file`): an empty, broken
    or ambiguous file stops the command, naming the file, before anything is computed or
    written.

    Raises:
        CLIError: Not an image model, a folder that does not exist or holds no image,
            class folders that do not match the model's classes, or an image that cannot
            be read.
    """
    from captum_ext.evaluation import image_dataset

    if loaded.modality != "image":
        raise CLIError(f"--dataset: {loaded.spec} is a text model; --dataset takes images")
    kwargs: dict[str, Any] = {}
    if source == "shapes":
        if loaded.spec.startswith("zoo:"):
            from captum_ext import zoo

            kwargs = dict(zoo.data_kwargs(loaded.spec[4:]))
        elif loaded.input_size is not None:
            kwargs = {"size": int(loaded.input_size[0])}
    elif not Path(source).exists():
        raise CLIError(f"--dataset {source}: no such folder; use 'shapes' or an image folder")
    try:
        data = image_dataset(source, loaded.image_transform, n=n, seed=seed, shapes_kwargs=kwargs)
        if match_classes and hasattr(data, "map_classes"):
            data.map_classes(loaded.class_names)
    except ValueError as err:
        raise CLIError(first_line(err)) from err
    for file in getattr(data, "files", ()):  # a folder: every image, before any work
        check_image_file(file, "--dataset")
    return data
