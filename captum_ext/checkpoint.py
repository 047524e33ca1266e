"""Checkpoints: a safetensors file of tensors plus a JSON record, verified on every read.

A checkpoint ``<base>`` is a pair of files written by :func:`save_checkpoint`:

* ``<base>.safetensors``: the tensors, and in the safetensors metadata (a str -> str map
  covered by the file's hash) ``"format": "pt"`` and ``"captum_ext.record"``, the canonical
  JSON of the caller's record.
* ``<base>.json``: the same record, readable, plus a ``"weights"`` section that only the file
  itself cannot hold: ``file``, ``bytes``, ``sha256`` of the safetensors file, a ``dtype``
  summary and ``tensors`` (name -> ``{"dtype", "shape"}``).

Reading (:func:`load_checkpoint`, :func:`verify_checkpoint`) never unpickles and refuses, with
a one-line :class:`~captum_ext.errors.CheckpointError`, a pair in which

* a file is missing or the JSON does not parse;
* the size or sha256 of the safetensors file differs from the record (a flipped byte, a
  replaced file, a hash edited by hand);
* the JSON record differs from the copy inside the safetensors file (an edited class list or
  config; a JSON and a weights file from different saves);
* the tensor names, dtypes or shapes listed in the record differ from the file's;
* a key the caller requires is absent, or a value differs from what the caller expects
  (``expect={"arch": "vgg16", "config.num_classes": 1000}``).

The bytes that were hashed are the bytes deserialised, so nothing can change in between. The
checks catch corruption, edits and mismatched pairs; they are not a signature (whoever rewrites
both files consistently is not detected).

All JSON of the package's files (records, headers, zoo records, shard indexes) goes through
:func:`dumps_json` and :func:`loads_json` / :func:`read_json`: strict JSON, both ways. Python's
``json`` reads and writes ``NaN``, ``Infinity`` and ``-Infinity`` by default, which JSON does not
have; writing refuses a non-finite number in one line naming its key (store ``None``, written
``null``, for a missing number), and reading refuses those constants as damage, like any
other invalid JSON.

Writes are atomic per file (a temporary file in the same folder, flushed, then
``os.replace``): an interrupted save leaves each file either whole and old or whole and new.
The JSON is replaced last, so an interruption between the two leaves a new safetensors file
beside the old record, which reading refuses (hash mismatch) instead of loading.

Example::

    paths = save_checkpoint("runs/ttame", model_tensors, {"arch": "ttame", "num_classes": 4})
    tensors, record = load_checkpoint("runs/ttame", expect={"arch": "ttame"})
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    import torch

from captum_ext.errors import CheckpointError

__all__ = [
    "RECORD_KEY",
    "CheckpointError",
    "CheckpointPaths",
    "checkpoint_paths",
    "dumps_json",
    "load_checkpoint",
    "loads_json",
    "model_fingerprint",
    "read_json",
    "save_checkpoint",
    "verify_checkpoint",
]

RECORD_KEY = "captum_ext.record"
"""Key of the record's canonical JSON in the safetensors metadata."""

_WEIGHTS = "weights"
_STORABLE_NAMES = (
    "float64 float32 float16 bfloat16 float8_e4m3fn float8_e4m3fnuz float8_e5m2 "
    "float8_e5m2fnuz int64 int32 int16 int8 uint64 uint32 uint16 uint8 bool complex64"
)


def _storable_dtypes() -> tuple[torch.dtype, ...]:
    """The dtypes safetensors stores (those this torch has)."""
    import torch

    return tuple(getattr(torch, n) for n in _STORABLE_NAMES.split() if hasattr(torch, n))


_RESAVE = "save the checkpoint again, or restore both files from the same save"
_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}


class CheckpointPaths(NamedTuple):
    """The two files of a checkpoint."""

    weights: Path
    """``<base>.safetensors``: tensors and the record's canonical copy."""
    record: Path
    """``<base>.json``: the readable record with the hash of ``weights``."""


def checkpoint_paths(path: str | os.PathLike[str]) -> CheckpointPaths:
    """The file pair of a checkpoint.

    Args:
        path: The base path, or either file of the pair (a ``.safetensors`` or ``.json``
            suffix is stripped; any other suffix is part of the base name).

    Returns:
        ``CheckpointPaths(<base>.safetensors, <base>.json)``.

    Raises:
        ValueError: ``path`` names no file (``""``, ``"."``, ``"/"``).
    """
    base = Path(path)
    if not base.name:
        raise ValueError(
            f"checkpoint path {str(path)!r} names no checkpoint file; give a base path such "
            "as 'runs/model', or either file of the pair"
        )
    if base.suffix in (".safetensors", ".json"):
        base = base.with_suffix("")
    return CheckpointPaths(
        base.with_name(base.name + ".safetensors"), base.with_name(base.name + ".json")
    )


def model_fingerprint(model: torch.nn.Module, values: bool = True, *, exact: bool = False) -> str:
    """sha256 (hex) of a model's state dict, by one of two recipes.

    * ``exact=False`` (the explainer checkpoints' recipe): the class name, then for every
      state-dict entry its name and shape and, with ``values``, its values on the CPU,
      floating tensors as float32, so that neither the device nor a float32 model cast to
      float64 and back changes it. ``values=False`` is the layout only (T-TAME's
      ``backbone.fingerprint``, MHEX's ``backbone.layout_sha256``); ``values=True`` also
      the weights (MHEX's ``backbone.weights_sha256``).
    * ``exact=True`` (the sharded outputs' recipe, their ``model.state_sha256``): for every
      entry its name, dtype and shape, then its bytes as stored, not cast; the class name is
      not part of it, and a model in another dtype has another fingerprint.

    Args:
        model: The model.
        values: Hash the values too, not only the names and shapes.
        exact: Use the second recipe (needs ``values``).

    Returns:
        64 hexadecimal digits.

    Raises:
        ValueError: ``exact=True`` with ``values=False``.
    """
    state = model.state_dict()
    if exact:
        import torch

        if not values:
            raise ValueError("model_fingerprint(exact=True) hashes the values; pass values=True.")
        h = hashlib.sha256()
        for name, t in state.items():
            t = t.detach().cpu().contiguous()
            h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()
    h = hashlib.sha256(type(model).__name__.encode())
    for name, t in state.items():
        h.update(f"\n{name}:{tuple(t.shape)}".encode())
        if values:
            v = t.detach().to("cpu")
            v = v.float() if v.is_floating_point() else v
            h.update(v.contiguous().numpy().tobytes())
    return h.hexdigest()


def save_checkpoint(
    path: str | os.PathLike[str],
    tensors: Mapping[str, torch.Tensor],
    record: Mapping[str, Any],
) -> CheckpointPaths:
    """Write tensors and their record as a checkpoint pair, atomically per file.

    Tensors are stored as they are (dtype kept), moved to CPU and made contiguous; tensors
    that share memory (tied weights, views of one tensor) are stored as separate copies, each
    with its own values. Dense tensors of the dtypes safetensors stores are accepted (floats
    including bfloat16 and float8, signed and unsigned integers, bool, complex64); anything
    else is refused in one line naming the tensor. The record must be strict JSON (see
    :func:`dumps_json`: str keys, finite numbers, ``None`` for a missing one; tuples become
    lists) and must not hold the ``"weights"`` key, which this function writes. The parent
    folder is created if needed; existing files are replaced.

    Args:
        path: Base path, or either file of the pair (see :func:`checkpoint_paths`).
        tensors: Name -> tensor, e.g. a ``state_dict()``.
        record: Config and metadata, e.g. ``{"arch": ..., "num_classes": ..., "training": ...}``.

    Returns:
        The paths written.

    Raises:
        ValueError: If ``path`` names no file; the record is not a dict, holds ``"weights"``
            or is not strict JSON (the message names the key, e.g. ``history[1].loss is
            nan``); a tensor name is not a string; or a tensor is sparse, nested, quantized,
            on the meta device or of a dtype safetensors does not store.
        TypeError: If a value of ``tensors`` is not a tensor.
    """
    from safetensors.torch import save

    paths = checkpoint_paths(path)
    if not isinstance(record, Mapping):
        raise ValueError(f"a checkpoint record must be a dict; got {type(record).__name__}")
    if _WEIGHTS in record:
        raise ValueError(
            f"record key {_WEIGHTS!r} is written by save_checkpoint (file, size, sha256, "
            "tensor shapes); remove it from the record"
        )
    try:
        canonical = dumps_json(dict(record), paths.record, canonical=True)
    except ValueError as err:
        raise ValueError(f"a checkpoint record must be JSON: {err}") from err
    plain = json.loads(dumps_json(dict(record), paths.record))  # caller's key order, lists
    state = _storable(paths.weights, tensors)
    try:
        data = save(state, metadata={"format": "pt", RECORD_KEY: canonical})
    except (ValueError, RuntimeError, TypeError, KeyError) as err:  # what the checks missed
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ValueError(
            f"{paths.weights}: safetensors cannot store the tensors ({first})"
        ) from err
    listing = _listing(_header(data, paths.weights), paths.weights)
    dtypes = sorted({t["dtype"] for t in listing.values()})
    plain[_WEIGHTS] = {
        "file": paths.weights.name,
        "dtype": ", ".join(dtypes) if dtypes else None,
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "tensors": listing,
    }
    paths.weights.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(paths.weights, data)
    _write_atomic(paths.record, (_format_json(plain) + "\n").encode("utf-8"))
    return paths


def _storable(where: Path, tensors: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Dense, contiguous CPU tensors safetensors can write; shared memory cloned apart."""
    state: dict[str, torch.Tensor] = {}
    for name, value in tensors.items():
        if not isinstance(name, str):
            raise ValueError(f"tensor names must be strings; got {name!r}")
        _check_storable(where, name, value)
        state[name] = value.detach().to("cpu").contiguous()
    owners: dict[int, list[str]] = {}
    for name, t in state.items():
        storage = t.untyped_storage()
        if storage.nbytes():
            owners.setdefault(storage.data_ptr(), []).append(name)
    for names in owners.values():
        if len(names) > 1:
            for name in names:
                state[name] = state[name].clone()
    return state


def _check_storable(where: Path, name: str, value: Any) -> None:
    import torch

    if not isinstance(value, torch.Tensor):
        raise TypeError(
            f"{where}: tensor {name!r} is a {type(value).__name__}; save_checkpoint stores "
            "torch.Tensor values (put other values in the record)"
        )
    if value.is_nested:
        problem, fix = "a nested tensor", "save its components, or pad it to one tensor"
    elif value.layout != torch.strided:
        problem, fix = f"sparse ({value.layout})", f"pass {name}.to_dense()"
    elif value.is_quantized:
        problem, fix = "quantized", f"pass {name}.dequantize()"
    elif value.device.type == "meta":
        problem, fix = "on the meta device (it holds no values)", "materialise it first"
    elif value.dtype not in _storable_dtypes():
        stored = ", ".join(str(d).removeprefix("torch.") for d in _storable_dtypes())
        raise ValueError(
            f"{where}: tensor {name!r} has dtype {value.dtype}, which safetensors does not "
            f"store; convert it to one of {stored}"
        )
    else:
        return
    raise ValueError(
        f"{where}: tensor {name!r} is {problem}; save_checkpoint stores dense (strided) "
        f"tensors: {fix}"
    )


def load_checkpoint(
    path: str | os.PathLike[str],
    expect: Mapping[str, Any] | None = None,
    *,
    require: Iterable[str] = (),
    device: str | torch.device = "cpu",
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a checkpoint after verifying it; never unpickles.

    Every check of :func:`verify_checkpoint` runs first, on the very bytes that are then
    deserialised (the whole file is read into memory once).

    Args:
        path: Base path, or either file of the pair.
        expect: Values the record must hold, by dotted key (``{"arch": "ttame",
            "config.num_classes": 4}``); compared as JSON (a tuple equals a list, 4 does not
            equal 4.0).
        require: Dotted keys the record must contain, whatever their values.
        device: Device of the returned tensors.

    Returns:
        ``(tensors, record)``: name -> tensor with the stored dtypes, and the JSON record
        (including its ``"weights"`` section).

    Raises:
        ValueError: If ``path`` names no file (``""``).
        CheckpointError: If a file is missing or any check fails; a JSON record, header or
            record copy holding ``NaN`` or ``Infinity`` (not JSON) is damage like any other.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load

    paths = checkpoint_paths(path)
    data, record = _read_verified(paths, expect, require)
    try:
        tensors = load(data)
    except (SafetensorError, ValueError, RuntimeError, TypeError, KeyError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise CheckpointError(
            paths.weights, f"safetensors cannot read it ({first})", _RESAVE
        ) from err
    if str(device) != "cpu":
        tensors = {k: v.to(device) for k, v in tensors.items()}
    return tensors, record


def verify_checkpoint(
    path: str | os.PathLike[str],
    expect: Mapping[str, Any] | None = None,
    *,
    require: Iterable[str] = (),
) -> dict[str, Any]:
    """Verify a checkpoint pair and return its record, without building tensors.

    Checks, in order: both files exist; the JSON parses and has a ``weights`` section with a
    sha256; the file's size and sha256 match it; the file carries a record copy equal to the
    JSON (``weights`` excluded); the listed tensors (if the record lists them) match the
    file's names, dtypes and shapes; ``require`` and ``expect`` hold.

    Args:
        path: Base path, or either file of the pair.
        expect: Values the record must hold, by dotted key (see :func:`load_checkpoint`).
        require: Dotted keys the record must contain.

    Returns:
        The JSON record, a fresh dict.

    Raises:
        ValueError: If ``path`` names no file (``""``).
        CheckpointError: If a file is missing or any check fails.
    """
    return _read_verified(checkpoint_paths(path), expect, require)[1]


# --------------------------------------------------------------------------------------------
# strict JSON


def dumps_json(
    value: Any, source: object = "value", *, indent: int | None = None, canonical: bool = False
) -> str:
    """Strict JSON text of ``value``, or a one-line ``ValueError`` naming the offending key.

    Python's ``json.dumps`` writes ``NaN``, ``Infinity`` and ``-Infinity``, which JSON does
    not have (other readers refuse them), turns int keys into strings and fails on other types
    without saying where. This writes only what reads back as it was: dicts with str keys,
    lists (and tuples, written as lists), str, int, finite float, bool and ``None``. A missing
    or undefined number is stored as ``None`` (``null``).

    Args:
        value: The value to write.
        source: The file (or name) the text is for, named in the error.
        indent: Indentation as for ``json.dumps`` (``None``: one line).
        canonical: Sorted keys, no spaces (for hashing and comparing); ignores ``indent``.

    Returns:
        The JSON text (non-ASCII characters kept).

    Raises:
        ValueError: ``"<source>: history[1].loss is nan; JSON has no NaN or Infinity: ..."``,
            or a key that is not a str, or a value of another type, each named by its path.
    """
    problem = _json_problem(value, "", set())
    if problem:
        raise ValueError(f"{source}: {problem}")
    if canonical:
        return json.dumps(
            value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
        )
    return json.dumps(value, indent=indent, ensure_ascii=False, allow_nan=False)


def loads_json(text: str | bytes, source: object, remedy: str = _RESAVE, *, name: str = "") -> Any:
    """Parse strict JSON; anything else is a one-line :class:`CheckpointError`.

    Besides syntax errors and invalid UTF-8, the constants ``NaN``, ``Infinity`` and
    ``-Infinity`` (which Python's ``json.loads`` accepts) are refused: a file holding them was
    not written by this package and is treated as damaged.

    Args:
        text: The JSON text (bytes are decoded as UTF-8).
        source: The file the text comes from, the error's path.
        remedy: What to do, for the error.
        name: What the text is (``"record"``), for the error: ``"record is not valid JSON"``.

    Returns:
        The parsed value.

    Raises:
        CheckpointError: ``"<source>: [<name> is] not valid JSON (<why>); <remedy>"``.
    """
    what = f"{name} is not valid JSON" if name else "not valid JSON"
    if not isinstance(text, str | bytes | bytearray):
        raise CheckpointError(source, f"{what} (a {type(text).__name__}, not text)", remedy)
    try:
        if not isinstance(text, str):
            text = bytes(text).decode("utf-8")
        return json.loads(text, parse_constant=_refuse_constant)
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError, the constants
        raise CheckpointError(source, f"{what} ({err})", remedy) from err
    except RecursionError as err:
        raise CheckpointError(source, f"{what} (nested too deeply)", remedy) from err


def read_json(path: str | os.PathLike[str], remedy: str = _RESAVE, *, name: str = "") -> Any:
    """Read a strict JSON file (:func:`loads_json`).

    Args:
        path: The file.
        remedy: What to do, for the error.
        name: What the file is, for the error (see :func:`loads_json`).

    Returns:
        The parsed value.

    Raises:
        CheckpointError: The file cannot be read, or is not strict JSON (one line, naming it).
    """
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise CheckpointError(path, f"cannot be read ({err.strerror or err})", remedy) from err
    return loads_json(data, path, remedy, name=name)


def _refuse_constant(constant: str) -> Any:
    raise ValueError(f"{constant} is not JSON; a number must be finite, a missing one null")


def _json_problem(value: Any, where: str, seen: set[int]) -> str | None:
    """What keeps ``value`` from being strict JSON, at which dotted path; ``None`` if nothing."""
    if value is None or isinstance(value, str | bool | int):
        return None
    if isinstance(value, float):
        if math.isfinite(value):
            return None
        return (
            f"{where or 'the value'} is {value!r}; JSON has no NaN or Infinity: store None "
            "(written null) for a missing number"
        )
    if isinstance(value, dict | list | tuple):
        if id(value) in seen:
            return f"{where or 'the value'} contains itself"
        seen.add(id(value))
        try:
            if isinstance(value, dict):
                for k, v in value.items():
                    if not isinstance(k, str):
                        return (
                            f"key {k!r} of {where or 'the top level'} is "
                            f"{type(k).__name__}; JSON object keys are strings"
                        )
                    found = _json_problem(v, f"{where}.{k}" if where else k, seen)
                    if found:
                        return found
            else:
                for i, v in enumerate(value):
                    found = _json_problem(v, f"{where}[{i}]", seen)
                    if found:
                        return found
        finally:
            seen.discard(id(value))
        return None
    return (
        f"{where or 'the value'} is a {type(value).__name__}; JSON holds dicts, lists, "
        "strings, finite numbers, booleans and None"
    )


# --------------------------------------------------------------------------------------------
# checks


def _read_verified(
    paths: CheckpointPaths, expect: Mapping[str, Any] | None, require: Iterable[str]
) -> tuple[bytes, dict[str, Any]]:
    for p in paths:
        if not p.is_file():
            raise CheckpointError(
                p,
                f"file missing (a checkpoint is the pair {paths.weights.name} + "
                f"{paths.record.name})",
                "check the path, or save the checkpoint",
            )
    record = _read_record(paths.record)
    data = paths.weights.read_bytes()
    _check_file(paths, record[_WEIGHTS], data)
    header = _header(data, paths.weights)
    actual = _listing(header, paths.weights)
    _check_copy(paths, record, header.get("__metadata__", {}))
    listed = record[_WEIGHTS].get("tensors")
    if listed is not None:
        _check_listing(paths, listed, actual)
    for key in require:
        _lookup(paths.record, record, key)
    for key, want in (expect or {}).items():
        got = _lookup(paths.record, record, key)
        if _canonical(got) != _canonical(want, f"expect[{key!r}]"):
            raise CheckpointError(
                paths.record,
                f"record has {key}={got!r}, expected {want!r}",
                "load a checkpoint made for this model and configuration",
            )
    return data, record


def _read_record(path: Path) -> dict[str, Any]:
    record = read_json(path, name="record")
    weights = record.get(_WEIGHTS) if isinstance(record, dict) else None
    if not isinstance(weights, dict):
        raise CheckpointError(
            path,
            f"record has no {_WEIGHTS!r} section (file, bytes, sha256)",
            "write checkpoints with captum_ext.checkpoint.save_checkpoint",
        )
    sha = weights.get("sha256")
    if not (isinstance(sha, str) and len(sha) == 64 and set(sha) <= set("0123456789abcdef")):
        raise CheckpointError(path, f"record has no valid {_WEIGHTS}.sha256 (got {sha!r})", _RESAVE)
    size = weights.get("bytes")
    if not (isinstance(size, int) and not isinstance(size, bool) and size >= 0):
        raise CheckpointError(path, f"record has no valid {_WEIGHTS}.bytes (got {size!r})", _RESAVE)
    return record


def _check_file(paths: CheckpointPaths, weights: dict[str, Any], data: bytes) -> None:
    size = weights["bytes"]
    if size != len(data):
        raise CheckpointError(
            paths.weights,
            f"file has {len(data)} bytes but {paths.record.name} records {size} (truncated, "
            "replaced, or from another save)",
            _RESAVE,
        )
    digest = hashlib.sha256(data).hexdigest()
    if digest != weights["sha256"]:
        raise CheckpointError(
            paths.weights,
            f"sha256 is {digest[:16]}... but {paths.record.name} records "
            f"{weights['sha256'][:16]}... (the file was modified or replaced, or the recorded "
            "hash was edited)",
            _RESAVE,
        )


def _check_copy(paths: CheckpointPaths, record: dict[str, Any], meta: Any) -> None:
    if not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise CheckpointError(
            paths.weights,
            "header metadata is not a map of text to text (not a safetensors file as "
            "save_checkpoint writes it)",
            _RESAVE,
        )
    if RECORD_KEY not in meta:
        raise CheckpointError(
            paths.weights,
            f"file carries no record copy (metadata key {RECORD_KEY!r}); it was not written "
            "by captum_ext.checkpoint.save_checkpoint",
            "save it again with save_checkpoint",
        )
    inner = loads_json(meta[RECORD_KEY], paths.weights, name="record copy in the metadata")
    outer = {k: v for k, v in record.items() if k != _WEIGHTS}
    if _canonical(outer) != _canonical(inner):
        where = ", ".join(_differences(outer, inner)[:5])
        raise CheckpointError(
            paths.record,
            f"record differs from the copy inside {paths.weights.name} at {where} (the JSON "
            "was edited, or the two files come from different saves)",
            _RESAVE,
        )


def _check_listing(paths: CheckpointPaths, listed: Any, actual: dict[str, dict[str, Any]]) -> None:
    if not isinstance(listed, dict):
        raise CheckpointError(
            paths.record, f"{_WEIGHTS}.tensors must map names to dtype and shape", _RESAVE
        )
    for name in sorted(set(listed) | set(actual)):
        if name not in actual:
            problem = f"record lists tensor {name!r}, which {paths.weights.name} does not hold"
        elif name not in listed:
            problem = f"{paths.weights.name} holds tensor {name!r}, which the record does not list"
        elif _canonical(listed[name]) != _canonical(actual[name]):
            problem = (
                f"tensor {name!r} is recorded as {_describe(listed[name])} but "
                f"{paths.weights.name} holds {_describe(actual[name])}"
            )
        else:
            continue
        raise CheckpointError(paths.record, problem, _RESAVE)


def _lookup(path: Path, record: dict[str, Any], key: str) -> Any:
    value: Any = record
    for part in key.split("."):
        if not (isinstance(value, dict) and part in value):
            raise CheckpointError(
                path,
                f"record has no {key!r}",
                "load a checkpoint written for this purpose, or save it again with that key",
            )
        value = value[part]
    return value


# --------------------------------------------------------------------------------------------
# helpers


def _canonical(value: Any, source: object = "value") -> str:
    return dumps_json(value, source, canonical=True)


def _differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Dotted paths where two JSON values differ (type-aware: 1 differs from 1.0 and True)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for k in [*a, *(k for k in b if k not in a)]:
            if k not in a or k not in b:
                out.append(f"{prefix}{k}")
            else:
                out += _differences(a[k], b[k], f"{prefix}{k}.")
        return out
    if _canonical(a) != _canonical(b):
        return [prefix.rstrip(".") or "the top level"]
    return []


def _header(data: bytes, path: Path) -> dict[str, Any]:
    """The JSON header of safetensors bytes (u64 little-endian length, then the JSON)."""
    try:
        (n,) = struct.unpack("<Q", data[:8])
    except struct.error as err:
        raise CheckpointError(path, f"not a safetensors file ({err})", _RESAVE) from err
    header = loads_json(data[8 : 8 + n], path, name="not a safetensors file: its header")
    if not isinstance(header, dict):
        raise CheckpointError(
            path, "not a safetensors file (its header is not a JSON object)", _RESAVE
        )
    return header


def _listing(header: dict[str, Any], path: Path) -> dict[str, dict[str, Any]]:
    """Name -> ``{"dtype", "shape"}`` of the header's tensors; a malformed entry is refused."""
    out = {}
    for name, info in sorted(header.items()):
        if name == "__metadata__":
            continue
        dtype = info.get("dtype") if isinstance(info, dict) else None
        shape = info.get("shape") if isinstance(info, dict) else None
        if not isinstance(dtype, str):
            problem = f"header entry of tensor {name!r} has no dtype (got {dtype!r})"
            raise CheckpointError(path, problem, _RESAVE)
        if not (
            isinstance(shape, list)
            and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
        ):
            problem = f"header entry of tensor {name!r} has no shape (got {shape!r})"
            raise CheckpointError(path, problem, _RESAVE)
        out[name] = {"dtype": _DTYPES.get(dtype, dtype.lower()), "shape": shape}
    return out


def _describe(entry: Any) -> str:
    if isinstance(entry, dict):
        return f"{entry.get('dtype')} {entry.get('shape')}"
    return repr(entry)


def _write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, flush it, then ``os.replace``."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "xb") as f:  # mode 0o666 minus umask, like any new file
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _format_json(value: Any, level: int = 0) -> str:
    """Indented JSON whose short containers without nested objects stay on one line."""
    flat = json.dumps(value, ensure_ascii=False, allow_nan=False)
    if isinstance(value, dict):
        children: Iterable[Any] = value.values()
    elif isinstance(value, list):
        children = value
    else:
        return flat
    if len(flat) <= 72 and not any(isinstance(c, dict) for c in children):
        return flat
    pad, inner = "  " * level, "  " * (level + 1)
    if isinstance(value, dict):
        items = [
            f"{inner}{json.dumps(k, ensure_ascii=False)}: {_format_json(v, level + 1)}"
            for k, v in value.items()
        ]
        return "{\n" + ",\n".join(items) + f"\n{pad}}}"
    items = [f"{inner}{_format_json(v, level + 1)}" for v in value]
    return "[\n" + ",\n".join(items) + f"\n{pad}]"
