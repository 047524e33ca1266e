"""Checkpoint, zoo and shard JSON under adversarial input: non-finite numbers, odd headers,
empty paths, tensors safetensors cannot store. Every refusal is one line naming the file."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import struct
from pathlib import Path

import pytest
import tiny_models
import torch
from method_table import EXPLAINER_MODELS, fit_data

from captum_ext import zoo
from captum_ext.checkpoint import (
    RECORD_KEY,
    CheckpointError,
    checkpoint_paths,
    dumps_json,
    load_checkpoint,
    loads_json,
    read_json,
    save_checkpoint,
    verify_checkpoint,
)
from captum_ext.distributed import World
from captum_ext.evaluation import ShardedOutputError, load_maps
from captum_ext.evaluation._sharded import config_hash, run_sharded
from captum_ext.zoo._build import WEIGHTS_DIR

NON_FINITE = ["NaN", "Infinity", "-Infinity"]


def _one_line(err: BaseException) -> str:
    msg = str(err)
    assert msg and "\n" not in msg, msg
    return msg


def _refused(base: Path, match: str, where: Path) -> CheckpointError:
    for read in (load_checkpoint, verify_checkpoint):
        with pytest.raises(CheckpointError, match=match) as err:
            read(base)
        assert _one_line(err.value).startswith(str(where)), str(err.value)
        assert err.value.path == str(where)
    return err.value


def _raw_safetensors(header: dict, data: bytes) -> bytes:
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data


def _write_pair(base: Path, weights: bytes, record_text: str) -> None:
    """A pair whose hash and size match: only what is inside can be wrong."""
    paths = checkpoint_paths(base)
    paths.weights.write_bytes(weights)
    digest = hashlib.sha256(weights).hexdigest()
    text = record_text.replace("SHA", digest).replace('"BYTES"', str(len(weights)))
    paths.record.write_text(text, encoding="utf-8")


# ------------------------------------------------------------------------------------------
# non-finite numbers in checkpoint JSON


@pytest.mark.parametrize("constant", NON_FINITE)
def test_non_finite_constant_in_the_record_is_a_checkpoint_error(tmp_path, constant):
    paths = save_checkpoint(tmp_path / "c", {"w": torch.zeros(2)}, {"arch": "a", "loss": 0.5})
    text = paths.record.read_text(encoding="utf-8").replace("0.5", constant)
    paths.record.write_text(text, encoding="utf-8")
    err = _refused(tmp_path / "c", f"not valid JSON.*{constant}", paths.record)
    assert "Out of range float" not in str(err)


@pytest.mark.parametrize("constant", NON_FINITE)
def test_non_finite_constant_in_the_weights_metadata_is_a_checkpoint_error(tmp_path, constant):
    meta = {"format": "pt", RECORD_KEY: f'{{"loss":{constant}}}'}
    weights = _raw_safetensors(
        {"__metadata__": meta, "w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}},
        b"\0" * 4,
    )
    _write_pair(
        tmp_path / "c", weights, '{"loss": null, "weights": {"sha256": "SHA", "bytes": "BYTES"}}'
    )
    _refused(tmp_path / "c", f"record copy.*not valid JSON.*{constant}", tmp_path / "c.safetensors")


def test_non_finite_constant_in_the_weights_header_is_a_checkpoint_error(tmp_path):
    header = {"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}
    text = json.dumps(header).replace("[1]", "[NaN]").encode()
    text += b" " * (-len(text) % 8)
    weights = struct.pack("<Q", len(text)) + text + b"\0" * 4
    _write_pair(tmp_path / "c", weights, '{"weights": {"sha256": "SHA", "bytes": "BYTES"}}')
    _refused(tmp_path / "c", "not a safetensors file.*NaN", tmp_path / "c.safetensors")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_saving_a_non_finite_number_is_refused_naming_key_and_file(tmp_path, value):
    record = {"arch": "a", "history": [{"loss": 1.0}, {"loss": value}]}
    with pytest.raises(ValueError, match=r"history\[1\]\.loss") as err:
        save_checkpoint(tmp_path / "c", {"w": torch.zeros(2)}, record)
    msg = _one_line(err.value)
    assert str(tmp_path / "c.json") in msg and "null" in msg
    assert not list(tmp_path.iterdir())  # nothing written
    # stored as null (None), it round-trips
    record["history"][1]["loss"] = None
    save_checkpoint(tmp_path / "c", {"w": torch.zeros(2)}, record)
    assert verify_checkpoint(tmp_path / "c")["history"][1] == {"loss": None}


def test_json_helpers_are_strict_both_ways(tmp_path):
    with pytest.raises(ValueError, match=r"^config: a\.b is nan"):
        dumps_json({"a": {"b": float("nan")}}, "config")
    with pytest.raises(ValueError, match=r"^x: key 1 of the top level is int"):
        dumps_json({1: 2}, "x")
    with pytest.raises(ValueError, match=r"^x: list\[0\] is a set"):
        dumps_json({"list": [{1}]}, "x")
    assert dumps_json({"b": 1, "a": (1, 2.5)}, "x", canonical=True) == '{"a":[1,2.5],"b":1}'
    with pytest.raises(CheckpointError, match=r"^y: not valid JSON \(NaN"):
        loads_json('{"a": NaN}', "y")
    path = tmp_path / "r.json"
    path.write_text('{"a": -Infinity}')
    with pytest.raises(CheckpointError, match=rf"^{path}: not valid JSON"):
        read_json(path)
    path.write_bytes(b'{"a": "\xff"}')
    with pytest.raises(CheckpointError, match="not valid JSON"):
        read_json(path)
    with pytest.raises(CheckpointError, match="cannot be read"):
        read_json(tmp_path / "missing.json")
    path.write_text('{"a": [1, null]}')
    assert read_json(path) == {"a": [1, None]}


# ------------------------------------------------------------------------------------------
# zoo records


def test_non_finite_constant_in_a_zoo_record_is_a_checkpoint_error(tmp_path):
    for suffix in (".safetensors", ".json"):
        shutil.copy(WEIGHTS_DIR / f"text-bert{suffix}", tmp_path / f"text-bert{suffix}")
    path = tmp_path / "text-bert.json"
    record = json.loads(path.read_text(encoding="utf-8"))
    record["heldout"]["accuracy"] = "ACC"
    path.write_text(json.dumps(record).replace('"ACC"', "NaN"), encoding="utf-8")
    assert zoo.available(directory=tmp_path) == ["text-bert"]
    for read in (zoo.load, zoo.info):
        with pytest.raises(
            CheckpointError, match="zoo model 'text-bert': record is not valid JSON \\(NaN"
        ) as err:
            read("text-bert", directory=tmp_path)
        assert _one_line(err.value).startswith(str(path))


# ------------------------------------------------------------------------------------------
# shards


def _chunk(c: int, examples: range):
    return {"x": torch.arange(examples.start, examples.stop, dtype=torch.float32)}, {"n": c}


def _run(out: Path, computed: list[int]):
    def compute(c, examples):
        computed.append(c)
        return _chunk(c, examples)

    return run_sharded(out, {"kind": "toy"}, 5, 2, compute, World())


@pytest.mark.parametrize("constant", NON_FINITE)
def test_a_shard_record_with_a_non_finite_constant_is_computed_again(tmp_path, constant):
    computed: list[int] = []
    _run(tmp_path / "out", computed)
    assert computed == [0, 1, 2]
    path = tmp_path / "out" / "shard-00001.json"
    path.write_text(path.read_text().replace('"n": 1', f'"n": {constant}'))
    computed.clear()
    run = _run(tmp_path / "out", computed)
    assert computed == [1] and run.reused == [0, 2]
    assert read_json(path)["n"] == 1  # rewritten, strict JSON again


def test_an_index_with_a_non_finite_constant_is_refused_in_one_line(tmp_path):
    _run(tmp_path / "out", [])
    index = tmp_path / "out" / "index.json"
    index.write_text(index.read_text().replace('"n_examples": 5', '"n_examples": NaN'))
    with pytest.raises(ShardedOutputError, match="not valid JSON") as err:
        load_maps(tmp_path / "out")
    assert "index.json" in _one_line(err.value)
    with pytest.raises(ShardedOutputError, match=r"index\.json cannot be read.*overwrite") as err:
        _run(tmp_path / "out", [])
    _one_line(err.value)


def test_a_non_finite_config_or_shard_record_is_refused_naming_the_key(tmp_path):
    with pytest.raises(ValueError, match=r"^config: settings\.eps is inf"):
        config_hash({"settings": {"eps": float("inf")}})

    def compute(c, examples):
        return {"x": torch.zeros(1)}, {"meta": {"accuracy": float("nan")}}

    with pytest.raises(ValueError, match=r"shard-00000\.json: meta\.accuracy is nan") as err:
        run_sharded(tmp_path / "out", {"kind": "toy"}, 2, 2, compute, World())
    _one_line(err.value)


# ------------------------------------------------------------------------------------------
# resumable epoch checkpoints


def test_fit_resume_from_an_epoch_checkpoint_with_nan_is_a_checkpoint_error(tmp_path):
    case, tiny = EXPLAINER_MODELS[0]
    recipe = dataclasses.replace(case.fit_recipe, epochs=1, checkpoint_dir=tmp_path)
    torch.manual_seed(0)
    case.build(tiny_models.build(tiny, torch.float64, 0)).fit(fit_data(tiny, 4), recipe)
    path = tmp_path / "epoch-001.json"
    record = json.loads(path.read_text())
    record["history"][0]["time_s"] = "T"
    path.write_text(json.dumps(record).replace('"T"', "NaN"))
    explainer = case.build(tiny_models.build(tiny, torch.float64, 0))
    resume = dataclasses.replace(recipe, epochs=2, resume=True)
    with pytest.raises(CheckpointError, match="not valid JSON") as err:
        explainer.fit(fit_data(tiny, 4), resume)
    assert _one_line(err.value).startswith(str(path))


# ------------------------------------------------------------------------------------------
# low-severity parts: empty paths, odd headers and records, tensors safetensors cannot store


@pytest.mark.parametrize("path", ["", ".", "/"])
def test_an_empty_path_is_refused_in_one_line(path):
    for call in (
        lambda: load_checkpoint(path),
        lambda: verify_checkpoint(path),
        lambda: save_checkpoint(path, {"w": torch.zeros(1)}, {}),
        lambda: checkpoint_paths(path),
    ):
        with pytest.raises(ValueError, match="names no checkpoint file") as err:
            call()
        _one_line(err.value)


@pytest.mark.parametrize(
    ("entry", "match"),
    [
        ({"shape": [1], "data_offsets": [0, 4]}, "tensor 'w' has no dtype"),
        ({"dtype": "F32", "data_offsets": [0, 4]}, "tensor 'w' has no shape"),
        ([1, 2], "tensor 'w' has no dtype"),
    ],
)
def test_a_header_entry_without_dtype_or_shape_is_a_checkpoint_error(tmp_path, entry, match):
    meta = {"format": "pt", RECORD_KEY: "{}"}
    weights = _raw_safetensors({"__metadata__": meta, "w": entry}, b"\0" * 4)
    _write_pair(tmp_path / "c", weights, '{"weights": {"sha256": "SHA", "bytes": "BYTES"}}')
    _refused(tmp_path / "c", match, tmp_path / "c.safetensors")


@pytest.mark.parametrize("meta", [[1], {RECORD_KEY: 3}])
def test_metadata_that_is_not_text_is_a_checkpoint_error(tmp_path, meta):
    weights = _raw_safetensors({"__metadata__": meta}, b"")
    _write_pair(tmp_path / "c", weights, '{"weights": {"sha256": "SHA", "bytes": "BYTES"}}')
    _refused(tmp_path / "c", "metadata", tmp_path / "c.safetensors")


def test_a_record_without_bytes_is_a_checkpoint_error(tmp_path):
    paths = save_checkpoint(tmp_path / "c", {"w": torch.zeros(1)}, {})
    record = json.loads(paths.record.read_text())
    del record["weights"]["bytes"]
    paths.record.write_text(json.dumps(record))
    _refused(tmp_path / "c", r"no valid weights\.bytes", paths.record)


def test_an_explainer_record_without_config_is_a_checkpoint_error(tmp_path):
    case, tiny = EXPLAINER_MODELS[0]
    model = tiny_models.build(tiny, torch.float64, 0)
    explainer = case.build(model)
    explainer.fit(fit_data(tiny, 4), dataclasses.replace(case.fit_recipe, epochs=1))
    paths = explainer.save(tmp_path / "e")
    tensors, record = load_checkpoint(paths.weights)
    record = {k: v for k, v in record.items() if k not in ("weights", "config")}
    save_checkpoint(tmp_path / "e", tensors, record)  # consistent, but without config
    with pytest.raises(CheckpointError, match="record has no 'config'") as err:
        type(explainer).load(tmp_path / "e", model)
    assert _one_line(err.value).startswith(str(paths.record))


@pytest.mark.parametrize(
    ("value", "match"),
    [
        (3, r"tensor 'bad' is a int; save_checkpoint stores torch\.Tensor"),
        ([1.0], r"tensor 'bad' is a list"),
        (torch.eye(2).to_sparse(), r"tensor 'bad' is sparse \(torch\.sparse_coo\).*to_dense"),
        (torch.zeros(2, device="meta"), r"tensor 'bad' is on the meta device"),
        (torch.zeros(2, dtype=torch.complex128), r"tensor 'bad' has dtype torch\.complex128"),
    ],
)
def test_values_safetensors_cannot_store_are_refused_naming_the_key(tmp_path, value, match):
    with pytest.raises((TypeError, ValueError), match=match) as err:
        save_checkpoint(tmp_path / "c", {"ok": torch.zeros(1), "bad": value}, {})
    _one_line(err.value)
    assert not list(tmp_path.iterdir())


def test_tensors_that_share_memory_are_stored_as_copies(tmp_path):
    base = torch.arange(6.0)
    tied = torch.nn.Linear(3, 3)
    tensors = {
        "a": base,
        "view": base[2:5],
        "same": base,
        "w": tied.weight,
        "w_tied": tied.weight,
    }
    save_checkpoint(tmp_path / "c", tensors, {})
    loaded, record = load_checkpoint(tmp_path / "c")
    for name, t in tensors.items():
        assert torch.equal(loaded[name], t.detach()), name
    assert record["weights"]["tensors"]["view"] == {"dtype": "float32", "shape": [3]}
    assert base.tolist() == list(range(6))  # the caller's tensors are untouched


def test_a_consistent_pair_safetensors_cannot_read_is_a_checkpoint_error(tmp_path):
    meta = {"format": "pt", RECORD_KEY: "{}"}
    entry = {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}  # 8 bytes needed, 4 given
    weights = _raw_safetensors({"__metadata__": meta, "w": entry}, b"\0" * 4)
    _write_pair(tmp_path / "c", weights, '{"weights": {"sha256": "SHA", "bytes": "BYTES"}}')
    with pytest.raises(CheckpointError, match="safetensors cannot read it") as err:
        load_checkpoint(tmp_path / "c")
    assert _one_line(err.value).startswith(str(tmp_path / "c.safetensors"))


def test_report_json_writes_nan_and_inf_as_null(tmp_path):
    """Python's json writes Infinity, which JSON has not; a report holds null instead."""
    from captum_ext.checkpoint import read_json
    from captum_ext.evaluation import EvalResult

    result = EvalResult(rows=[{"mean": float("inf"), "lo": float("nan"), "hi": 1.0}])
    data = read_json(result.to_json(tmp_path / "report.json"))
    assert data["rows"] == [{"mean": None, "lo": None, "hi": 1.0}]


def test_cli_json_output_refuses_nan_in_one_line(tmp_path):
    from captum_ext.cli._common import CLIError, write_json

    with pytest.raises(CLIError, match=r"score is nan") as err:
        write_json(tmp_path / "p.json", {"score": float("nan")})
    assert "\n" not in str(err.value) and not (tmp_path / "p.json").exists()
