"""The model zoo: shipped files load without unpickling, records are consistent, accuracy holds.

Held-out data uses seed 987654, which no entry was trained on (checked against each record).
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from bench_scripts import training_script

from captum_ext import CDAM, UnsupportedModelError, adapter_for, zoo
from captum_ext.data import SHAPE_CLASSES, TEXT_VOCAB, shapes, text_rationales
from captum_ext.errors import CheckpointError
from captum_ext.zoo._build import WEIGHTS_DIR

ROOT = Path(__file__).resolve().parents[1]
HELDOUT_SEED = 987654
IMAGE = (
    "shapes-cnn",
    "shapes-vit",
    "shapes-vit-dino",
    "shapes-vit-fine",
    "shapes-vit-free",
    "shapes-vit-linear",
    "shapes-vit-plain",
)
ENTRIES = (*IMAGE, "text-bert")
# 96 px, 12 x 12 tokens (benchmarks/training/train_dino.py)
FINE = ("shapes-vit-dino", "shapes-vit-fine")
TRANSFORMERS = (*IMAGE[1:], "text-bert")

_MODELS: dict[str, torch.nn.Module] = {}


def _model(name: str) -> torch.nn.Module:
    if name not in _MODELS:
        _MODELS[name] = zoo.load(name)
    return _MODELS[name]


def _train_script():
    return training_script("train_zoo")


def test_available_lists_every_entry_with_both_files():
    assert zoo.available() == sorted(ENTRIES)
    for name in ENTRIES:
        assert (WEIGHTS_DIR / f"{name}.safetensors").is_file()
        assert (WEIGHTS_DIR / f"{name}.json").is_file()


@pytest.mark.parametrize("name", ENTRIES)
def test_load_never_unpickles_and_returns_eval_float32(name, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("zoo.load must not unpickle")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    model = zoo.load(name)
    assert not any(m.training for m in model.modules())
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == zoo.info(name)["params"]


@pytest.mark.parametrize("name", ENTRIES)
def test_info_and_data_kwargs_match_the_shipped_json(name):
    shipped = json.loads((WEIGHTS_DIR / f"{name}.json").read_text(encoding="utf-8"))
    rec = zoo.info(name)
    assert rec == shipped
    assert zoo.data_kwargs(name) == shipped["data"]["kwargs"]
    rec["data"]["kwargs"]["size"] = -1  # callers get copies
    assert zoo.data_kwargs(name) == shipped["data"]["kwargs"]

    assert rec["name"] == name
    script = "training/train_dino.py" if name in FINE else "train_zoo.py"
    assert rec["command"] == f"python benchmarks/{script} --only {name}"
    assert rec["train_time_s"] > 0
    assert rec["heldout"]["accuracy"] >= 0.95
    assert HELDOUT_SEED not in rec["training"]["data_seeds"]
    assert rec["heldout"]["seed"] not in rec["training"]["data_seeds"]
    assert isinstance(rec["training"]["seed"], int)
    if name.startswith("shapes"):
        assert (rec["modality"], rec["task"]) == ("image", "multilabel")
        assert rec["classes"] == list(SHAPE_CLASSES)
        assert rec["data"]["generator"] == "shapes"
        shapes(1, 0, **zoo.data_kwargs(name))  # valid generator arguments
    else:
        assert (rec["modality"], rec["task"]) == ("text", "binary")
        assert rec["model_kwargs"]["vocab_size"] == len(TEXT_VOCAB)
        assert rec["data"]["generator"] == "text_rationales"
        text_rationales(1, 0, **zoo.data_kwargs(name))


def test_linear_probe_entry_records_frozen_backbone_and_head_phases():
    rec = zoo.info("shapes-vit-linear")
    phases = {p["name"]: p for p in rec["training"]["phases"]}
    assert phases["backbone"]["source"] == "shapes-vit"
    assert phases["linear-probe"]["trainable"].startswith("head only")
    probe, source = zoo.load("shapes-vit-linear"), _model("shapes-vit")
    for (k, a), (k2, b) in zip(
        probe.state_dict().items(), source.state_dict().items(), strict=True
    ):
        assert k == k2
        assert torch.equal(a, b) != k.startswith("head."), k  # same backbone, new head


@pytest.mark.parametrize("name", IMAGE)
def test_image_models_reach_95_percent_set_accuracy_on_fresh_data(name):
    # 1024 images: at the lowest stated accuracy (0.971) a 256-image slice has a standard
    # error of 0.010, too coarse to check a 0.95 floor.
    batch = shapes(1024, HELDOUT_SEED, **zoo.data_kwargs(name))
    with torch.no_grad():
        logits = _model(name)(batch.images)
    correct = ((logits > 0) == (batch.labels > 0.5)).all(dim=1).float().mean().item()
    assert correct >= 0.95


def test_text_model_reaches_95_percent_accuracy_on_fresh_data():
    batch = text_rationales(256, HELDOUT_SEED, **zoo.data_kwargs("text-bert"))
    with torch.no_grad():
        logits = _model("text-bert")(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask
        ).logits
    assert (logits.argmax(1) == batch.labels.long()).float().mean().item() >= 0.95


@pytest.mark.parametrize("name", TRANSFORMERS)
def test_cdam_runs_on_every_transformer_entry(name):
    model = _model(name)
    adapter = adapter_for(model)
    if name == "text-bert":
        b = text_rationales(2, HELDOUT_SEED, **zoo.data_kwargs(name))
        maps = CDAM(model).attribute(
            b.input_ids, target=1, additional_forward_args=(b.attention_mask,)
        )
        assert maps.shape == b.input_ids.shape
    else:
        assert adapter.patch_size == (8, 8)
        size = zoo.data_kwargs(name)["size"]
        b = shapes(2, HELDOUT_SEED, **zoo.data_kwargs(name))
        maps = CDAM(model).attribute(b.images, target=0)
        assert maps.shape == (2, 1, size, size)
        grid = CDAM(model).attribute(b.images, target=0, output="grid")
        assert grid.shape == (2, 1, size // 8, size // 8)
    assert torch.isfinite(maps).all() and maps.abs().sum() > 0


def test_cdam_rejects_the_cnn():
    with pytest.raises(UnsupportedModelError):
        CDAM(_model("shapes-cnn"))


def test_unknown_name_lists_available_names():
    for fn in (zoo.check_name, zoo.load, zoo.info, zoo.data_kwargs):
        with pytest.raises(ValueError, match="shapes-vit-free") as err:
            fn("no-such-model")
        assert "no-such-model" in str(err.value)


@pytest.mark.parametrize("name", ["shapes-vit", "shapes-cnn"])
def test_training_function_lowers_the_loss_in_five_steps(name):
    # text-bert sits at ln 2 for its first steps; the slow test below retrains it fully.
    tz = _train_script()
    phase = tz.ENTRIES[name].phases[0]
    torch.manual_seed(0)
    model = tz.build_model(zoo.info(name))
    # 64 examples and batch size 64: every step sees the same examples.
    losses = tz.run_phase(
        model,
        phase,
        torch.Generator().manual_seed(0),
        n_train=64,
        steps=5,
        progress=False,
    )
    assert len(losses) == 5
    assert losses[-1] < losses[0] - 0.01, losses


@pytest.mark.slow
def test_retraining_text_bert_reproduces_its_accuracy(tmp_path):
    tz = _train_script()
    rec = tz.train_entry(tz.ENTRIES["text-bert"], tmp_path, progress=False)
    assert rec["heldout"]["accuracy"] >= 0.95
    assert (tmp_path / "text-bert.safetensors").is_file()


def test_patch_whitening_gives_unit_variance_tokens():
    import timm

    tz = _train_script()
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=32,
        patch_size=8,
        embed_dim=16,
        depth=1,
        num_heads=2,
        num_classes=4,
    )
    init = dict(name="patch-whitening", eps=0.0, n_images=64, data_seed=7)
    kwargs = dict(layout="aligned", size=32, patch=8)
    tz.whiten_patch_embed(model, init, kwargs)
    images = shapes(64, 7, **kwargs).images
    with torch.no_grad():
        tokens = model.patch_embed(images).reshape(-1, 16).double()
    cov = torch.cov(tokens.T)
    assert torch.allclose(tokens.mean(0), torch.zeros(16, dtype=torch.double), atol=1e-4)
    assert torch.allclose(cov, torch.eye(16, dtype=torch.double), atol=1e-3)


# --- integrity: copies in tmp_path, never the shipped files ---------------------------------


@pytest.fixture
def copied(tmp_path: Path) -> Path:
    """shapes-vit and text-bert copied into tmp_path (the loader is pointed there)."""
    for name in ("shapes-vit", "text-bert"):
        for suffix in (".safetensors", ".json"):
            shutil.copy(WEIGHTS_DIR / f"{name}{suffix}", tmp_path / f"{name}{suffix}")
    return tmp_path


def _edit(folder: Path, name: str, edit) -> None:
    path = folder / f"{name}.json"
    rec = json.loads(path.read_text(encoding="utf-8"))
    edit(rec)
    path.write_text(json.dumps(rec, indent=2), encoding="utf-8")


def _refused(folder: Path, match: str, name: str = "shapes-vit") -> None:
    for read in (zoo.load, zoo.info, zoo.data_kwargs):
        with pytest.raises(CheckpointError, match=match) as err:
            read(name, directory=folder)
        msg = str(err.value)
        assert f"zoo model {name!r}" in msg and str(folder) in msg and "\n" not in msg
        assert f"train_zoo.py --only {name}" in msg


def test_a_copied_entry_loads_and_predicts_as_the_shipped_one(copied):
    assert zoo.available(directory=copied) == ["shapes-vit", "text-bert"]
    assert zoo.info("shapes-vit", directory=copied) == zoo.info("shapes-vit")
    x = shapes(4, HELDOUT_SEED, **zoo.data_kwargs("shapes-vit", directory=copied)).images
    with torch.no_grad():
        assert torch.equal(zoo.load("shapes-vit", directory=copied)(x), _model("shapes-vit")(x))


def test_flipped_byte_in_the_weights_is_refused(copied):
    path = copied / "shapes-vit.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x80  # a sign bit of the last tensor: the file still parses
    path.write_bytes(bytes(data))
    _refused(copied, r"shapes-vit\.safetensors: zoo model 'shapes-vit': sha256 is")


def test_record_with_permuted_class_names_is_refused(copied):
    _edit(copied, "shapes-vit", lambda r: r.update(classes=r["classes"][::-1]))
    _refused(copied, r"record differs from the copy inside shapes-vit\.safetensors at classes")


def test_record_with_edited_config_is_refused(copied):
    _edit(copied, "shapes-vit", lambda r: r["data"]["kwargs"].update(layout="free"))
    _refused(copied, "at data.kwargs.layout")


def test_record_with_zeroed_hash_is_refused(copied):
    _edit(copied, "shapes-vit", lambda r: r["weights"].update(sha256="0" * 64))
    _refused(copied, "sha256 is .* but shapes-vit.json records 0000")


def test_record_naming_a_different_tensor_shape_is_refused(copied):
    _edit(
        copied, "shapes-vit", lambda r: r["weights"]["tensors"]["head.weight"].update(shape=[5, 64])
    )
    _refused(copied, r"tensor 'head\.weight' is recorded as float32 \[5, 64\] but .* \[4, 64\]")


def test_entry_under_another_name_is_refused(copied):
    for suffix in (".safetensors", ".json"):
        shutil.copy(copied / f"text-bert{suffix}", copied / f"shapes-vit{suffix}")
    _refused(copied, r"record has name='text-bert', expected 'shapes-vit'")


@pytest.mark.parametrize("suffix", [".safetensors", ".json"])
def test_missing_file_is_a_clear_error(copied, suffix):
    (copied / f"shapes-vit{suffix}").unlink()
    _refused(copied, rf"shapes-vit\{suffix}: zoo model 'shapes-vit': file missing")
    with pytest.raises(CheckpointError):
        zoo.check_name("shapes-vit", directory=copied)
    assert zoo.available(directory=copied) == ["text-bert"]


@pytest.mark.parametrize("name", ENTRIES)
def test_shipped_records_list_the_models_tensor_shapes(name):
    listed = zoo.info(name)["weights"]["tensors"]  # verified against the file on every read
    state = _model(name).state_dict()
    assert {k: v["shape"] for k, v in listed.items()} == {
        k: list(v.shape) for k, v in state.items()
    }
