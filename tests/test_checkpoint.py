"""Checkpoints: round trip without pickle, every inconsistency refused, atomic writes."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from captum_ext.checkpoint import (
    RECORD_KEY,
    CheckpointError,
    checkpoint_paths,
    load_checkpoint,
    model_fingerprint,
    save_checkpoint,
    verify_checkpoint,
)

RECORD = {"arch": "toy", "config": {"num_classes": 3, "layers": (2, 3)}, "classes": ["a", "b"]}


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "w": torch.randn(3, 4, generator=g),
        "w_t": torch.randn(4, 3, generator=g).t(),  # not contiguous
        "b": torch.randn(3, generator=g, dtype=torch.float64),
        "steps": torch.tensor([7], dtype=torch.int64),
        "mask": torch.tensor([True, False]),
        "half": torch.ones(2, dtype=torch.bfloat16),
    }


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    save_checkpoint(tmp_path / "toy", _tensors(), RECORD)
    return tmp_path / "toy"


def _edit_record(base: Path, edit) -> None:
    path = checkpoint_paths(base).record
    rec = json.loads(path.read_text(encoding="utf-8"))
    edit(rec)
    path.write_text(json.dumps(rec), encoding="utf-8")


def _refused(base: Path, match: str, **kwargs) -> CheckpointError:
    for read in (load_checkpoint, verify_checkpoint):
        with pytest.raises(CheckpointError, match=match) as err:
            read(base, **kwargs)
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith(err.value.path) and Path(err.value.path).parent == base.parent
    return err.value


def test_round_trip_keeps_values_dtypes_and_record(ckpt, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("checkpoints must not unpickle")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    tensors, record = load_checkpoint(ckpt)
    expected = _tensors()
    assert set(tensors) == set(expected)
    for name, t in expected.items():
        assert tensors[name].dtype == t.dtype and torch.equal(tensors[name], t), name
    assert {k: v for k, v in record.items() if k != "weights"} == json.loads(json.dumps(RECORD))
    w = record["weights"]
    assert w["file"] == "toy.safetensors"
    assert w["bytes"] == (ckpt.parent / "toy.safetensors").stat().st_size
    assert w["tensors"]["w_t"] == {"dtype": "float32", "shape": [3, 4]}
    assert w["tensors"]["half"] == {"dtype": "bfloat16", "shape": [2]}
    assert w["dtype"] == "bfloat16, bool, float32, float64, int64"
    assert verify_checkpoint(ckpt) == record


def test_the_weights_file_carries_the_record_in_its_metadata(ckpt):
    data = (ckpt.parent / "toy.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    meta = json.loads(data[8 : 8 + n])["__metadata__"]
    assert meta["format"] == "pt"
    assert json.loads(meta[RECORD_KEY]) == json.loads(json.dumps(RECORD))


@pytest.mark.parametrize("suffix", ["", ".safetensors", ".json"])
def test_either_file_or_the_base_names_the_pair(ckpt, suffix):
    path = ckpt.with_name(ckpt.name + suffix)
    assert checkpoint_paths(path) == (ckpt.parent / "toy.safetensors", ckpt.parent / "toy.json")
    assert load_checkpoint(path)[1]["arch"] == "toy"


def test_other_suffixes_belong_to_the_base_name(tmp_path):
    paths = save_checkpoint(tmp_path / "sub" / "model.v2", {"x": torch.zeros(1)}, {})
    assert paths.weights == tmp_path / "sub" / "model.v2.safetensors"
    assert paths.record == tmp_path / "sub" / "model.v2.json"
    assert load_checkpoint(tmp_path / "sub" / "model.v2.json")[0]["x"].shape == (1,)


def test_flipped_byte_in_the_tensors_is_refused(ckpt):
    path = ckpt.parent / "toy.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01  # inside the last tensor's data: still a valid safetensors file
    path.write_bytes(bytes(data))
    _refused(ckpt, r"toy\.safetensors: sha256 is .* but toy\.json records")


def test_truncated_file_is_refused(ckpt):
    path = ckpt.parent / "toy.safetensors"
    path.write_bytes(path.read_bytes()[:-4])
    _refused(ckpt, r"file has \d+ bytes but toy\.json records \d+")


@pytest.mark.parametrize(
    ("sha", "match"),
    [("0" * 64, "sha256 is"), (None, "no valid weights.sha256"), ("abc", "no valid")],
)
def test_edited_hash_is_refused(ckpt, sha, match):
    _edit_record(ckpt, lambda r: r["weights"].update(sha256=sha))
    _refused(ckpt, match)


def test_edited_record_is_refused_naming_the_field(ckpt):
    _edit_record(ckpt, lambda r: r.update(classes=["b", "a"]))
    err = _refused(ckpt, r"toy\.json: record differs from the copy inside toy\.safetensors")
    assert "at classes " in str(err)


@pytest.mark.parametrize(
    ("edit", "where"),
    [
        (lambda r: r["config"].update(num_classes=3.0), "config.num_classes"),  # 3 vs 3.0
        (lambda r: r["config"].update(num_classes=True), "config.num_classes"),
        (lambda r: r.pop("arch"), "arch"),
        (lambda r: r.update(extra=1), "extra"),
    ],
)
def test_record_comparison_is_exact(ckpt, edit, where):
    _edit_record(ckpt, edit)
    err = _refused(ckpt, "record differs from the copy")
    assert f"at {where} " in str(err)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda t: t["w"].update(shape=[3, 5]), r"tensor 'w' is recorded as float32 \[3, 5\]"),
        (lambda t: t["w"].update(dtype="float16"), "tensor 'w' is recorded as float16"),
        (lambda t: t.pop("b"), "holds tensor 'b', which the record does not list"),
        (lambda t: t.update(ghost=t["b"]), "lists tensor 'ghost', which toy.safetensors"),
    ],
)
def test_tensor_listing_must_match_the_file(ckpt, edit, match):
    _edit_record(ckpt, lambda r: edit(r["weights"]["tensors"]))
    _refused(ckpt, match)


def test_record_without_listing_is_accepted(ckpt):
    _edit_record(ckpt, lambda r: r["weights"].pop("tensors"))
    assert load_checkpoint(ckpt)[0]["w"].shape == (3, 4)


def test_expect_and_require(ckpt):
    ok = {"arch": "toy", "config.num_classes": 3, "config.layers": (2, 3)}
    assert load_checkpoint(ckpt, expect=ok, require=["classes", "weights.sha256"])[1]
    _refused(
        ckpt, r"record has config\.num_classes=3, expected 4", expect={"config.num_classes": 4}
    )
    _refused(
        ckpt, r"record has config\.num_classes=3, expected 3\.0", expect={"config.num_classes": 3.0}
    )
    _refused(ckpt, r"record has no 'config\.depth'", expect={"config.depth": 2})
    _refused(ckpt, r"record has no 'backbone'", require=["backbone"])


@pytest.mark.parametrize("missing", ["toy.safetensors", "toy.json"])
def test_missing_file_is_a_clear_error(ckpt, missing):
    (ckpt.parent / missing).unlink()
    err = _refused(ckpt, r"file missing \(a checkpoint is the pair toy\.safetensors \+ toy\.json\)")
    assert err.path.endswith(missing)


def test_unreadable_record_is_refused(ckpt):
    (ckpt.parent / "toy.json").write_text("{not json", encoding="utf-8")
    _refused(ckpt, "record is not valid JSON")
    (ckpt.parent / "toy.json").write_text("[]", encoding="utf-8")
    _refused(ckpt, "record has no 'weights' section")


def test_pair_from_different_saves_is_refused(tmp_path):
    save_checkpoint(tmp_path / "a", {"x": torch.zeros(2)}, {"arch": "a"})
    save_checkpoint(tmp_path / "b", {"x": torch.ones(2)}, {"arch": "b"})
    (tmp_path / "b.json").write_bytes((tmp_path / "a.json").read_bytes())
    _refused(tmp_path / "b", "sha256 is")


def test_foreign_safetensors_file_is_refused(tmp_path):
    save_checkpoint(tmp_path / "toy", {"x": torch.zeros(2)}, {"arch": "toy"})
    save_file({"x": torch.zeros(2)}, str(tmp_path / "toy.safetensors"))  # no record copy
    data = (tmp_path / "toy.safetensors").read_bytes()

    def rehash(r):
        r["weights"].update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())

    _edit_record(tmp_path / "toy", rehash)
    _refused(tmp_path / "toy", "carries no record copy")


def test_save_refuses_reserved_and_non_json_records(tmp_path):
    with pytest.raises(ValueError, match="record key 'weights' is written by save_checkpoint"):
        save_checkpoint(tmp_path / "x", {}, {"weights": {}})
    with pytest.raises(ValueError, match="must be JSON"):
        save_checkpoint(tmp_path / "x", {}, {"scale": float("nan")})
    with pytest.raises(ValueError, match="must be JSON"):
        save_checkpoint(tmp_path / "x", {}, {"t": torch.zeros(1)})
    assert list(tmp_path.iterdir()) == []


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_save_replaces_files_whole_with_ordinary_permissions(ckpt):
    save_checkpoint(ckpt, {"x": torch.ones(1)}, {"arch": "second"})
    tensors, record = load_checkpoint(ckpt)
    assert list(tensors) == ["x"] and record["arch"] == "second"
    for p in checkpoint_paths(ckpt):
        assert p.stat().st_mode & 0o777 == 0o666 & ~_umask()
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["toy.json", "toy.safetensors"]


def test_interrupted_write_leaves_the_previous_checkpoint(ckpt, monkeypatch):
    before = {p: p.read_bytes() for p in checkpoint_paths(ckpt)}

    def interrupted(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(ckpt, {"x": torch.ones(1)}, {"arch": "second"})
    monkeypatch.undo()
    assert {p: p.read_bytes() for p in checkpoint_paths(ckpt)} == before
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["toy.json", "toy.safetensors"]
    assert load_checkpoint(ckpt)[1]["arch"] == "toy"


def test_interruption_between_the_two_files_is_refused_not_loaded(ckpt, monkeypatch):
    replace = os.replace
    calls = []

    def second_fails(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError("disk full")
        replace(src, dst)

    monkeypatch.setattr(os, "replace", second_fails)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(ckpt, {"x": torch.ones(1)}, {"arch": "second"})
    monkeypatch.undo()
    assert [Path(c).name for c in calls] == ["toy.safetensors", "toy.json"]
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["toy.json", "toy.safetensors"]
    _refused(ckpt, "sha256 is|bytes but")  # new tensors beside the old record


def test_checkpoint_error_is_a_picklable_value_error():
    err = CheckpointError("/x/y.json", "broken", "fix it")
    assert isinstance(err, ValueError)
    again = pickle.loads(pickle.dumps(err))
    assert str(again) == str(err) == "/x/y.json: broken; fix it"
    assert (again.path, again.problem, again.remedy) == ("/x/y.json", "broken", "fix it")


# --- model_fingerprint: the hashes the zoo's records and the sharded outputs hold ----------

# model.state_sha256 of a sharded output (the recipe of evaluation._sharded.model_fingerprint
# before it moved here), computed with that function
EXACT = {
    "shapes-cnn": "a505ad97145da16ebca5a53734204ed61886f27881d5f856d08eff513d09f0eb",
    "shapes-vit": "e2351bb4957da150b28d108168dba5dcb78914792c03551019484f2131516096",
    "text-bert": "38382b74cb249b4e01ec9657e0b79bbfe3c2aa7d007809a93517d49d114d6a78",
}


@pytest.mark.parametrize("name", sorted(EXACT))
def test_model_fingerprint_reproduces_the_hashes_of_the_zoo_records(name):
    from captum_ext import zoo

    if name not in zoo.available():
        pytest.skip("zoo weights are not installed")
    model = zoo.load(name)
    layout, weights = model_fingerprint(model, values=False), model_fingerprint(model)
    for kind in ("ttame", "mhex"):
        if f"{name}-{kind}" not in zoo.available(kind="explainer"):
            continue
        backbone = zoo.info(f"{name}-{kind}")["backbone"]
        if kind == "ttame":
            assert backbone["fingerprint"] == layout
        else:
            assert backbone["layout_sha256"] == layout
            assert backbone["weights_sha256"] == weights
    assert model_fingerprint(model, exact=True) == EXACT[name]


def test_model_fingerprint_recipes():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    layout, weights = model_fingerprint(model, values=False), model_fingerprint(model)
    exact = model_fingerprint(model, exact=True)
    assert len({layout, weights, exact}) == 3
    assert all(len(h) == 64 and int(h, 16) >= 0 for h in (layout, weights, exact))
    with torch.no_grad():
        model[0].weight.add_(1.0)
    assert model_fingerprint(model, values=False) == layout  # names and shapes only
    assert model_fingerprint(model) != weights
    assert model_fingerprint(model, exact=True) != exact
    weights, exact = model_fingerprint(model), model_fingerprint(model, exact=True)
    model.double()  # float32 values survive a float64 copy; the stored bytes do not
    assert model_fingerprint(model) == weights
    assert model_fingerprint(model, exact=True) != exact
    with pytest.raises(ValueError, match="values=True"):
        model_fingerprint(model, values=False, exact=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_load_to_cuda(ckpt):
    tensors, _ = load_checkpoint(ckpt, device="cuda")
    assert all(t.device.type == "cuda" for t in tensors.values())
    assert torch.equal(tensors["w"].cpu(), _tensors()["w"])
