"""The fine-resolution zoo entries (``benchmarks/training/train_dino.py``).

Both are 96 px, patch-8 conv-stem timm ViTs (a 12 x 12 token grid) with a frozen backbone and
a linear head trained alone; they differ only in how the backbone was trained.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from bench_scripts import training_script

from captum_ext import CDAM, TAM, zoo
from captum_ext.data import shapes

ROOT = Path(__file__).resolve().parents[1]
NAMES = ("shapes-vit-dino", "shapes-vit-fine")
FINE = dict(layout="free", max_objects=2, size=96, patch=8, min_extent=16, max_extent=40)
# The held-out accuracies stated in docs/benchmark.md (each record must reach its own).
STATED = {"shapes-vit-dino": 0.97, "shapes-vit-fine": 0.99}
FRESH_SEED = 987654  # never a training seed

_MODELS: dict[str, torch.nn.Module] = {}


def _model(name: str) -> torch.nn.Module:
    if name not in _MODELS:
        _MODELS[name] = zoo.load(name)
    return _MODELS[name]


def _script():
    return training_script("train_dino")


def _tiny_entry(td, name: str):
    """A DINO entry small enough to train in seconds."""
    return td.FineEntry(
        name,
        "dino",
        dino=td.DINOConfig(steps=2, batch_size=4, out_dim=16, hidden_dim=16, bottleneck_dim=8),
        probe=td.ProbeConfig(epochs=1, batch_size=4, n_train=8),
    )


@pytest.mark.parametrize("name", NAMES)
def test_fine_entry_loads_as_a_96px_patch8_vit_in_eval_mode(name):
    assert name in zoo.available()
    model = _model(name)
    assert not any(m.training for m in model.modules())
    assert model.patch_embed.img_size == (96, 96) and model.patch_embed.grid_size == (12, 12)
    assert zoo.info(name)["arch"] == "zoo_vit_convstem"
    assert sum(p.numel() for p in model.parameters()) == zoo.info(name)["params"]
    assert zoo.data_kwargs(name) == FINE == _script().FINE


@pytest.mark.parametrize("name", NAMES)
def test_record_states_a_frozen_backbone_and_a_head_only_probe(name):
    rec = zoo.info(name)
    assert rec["backbone_frozen"] is True
    backbone, probe = rec["training"]["phases"]
    assert backbone["name"] == "backbone" and probe["name"] == "linear-probe"
    assert probe["trainable"].startswith("head only")
    assert probe["optimizer"]["name"] == "Adam" and probe["epochs"] == 10
    assert "random resized crop" in probe["augmentation"] and "flip" in probe["augmentation"]
    assert rec["heldout"]["accuracy"] >= STATED[name]
    assert rec["train_time_s"] > 0
    assert rec["command"] == f"python benchmarks/training/train_dino.py --only {name}"
    assert FRESH_SEED not in rec["training"]["data_seeds"]
    assert rec["heldout"]["seed"] not in rec["training"]["data_seeds"]
    if name == "shapes-vit-dino":
        assert rec["backbone_training"] == "dino"
        assert "labels unused" in backbone["objective"]
        assert backbone["recipe"]["n_local"] >= 2
    else:
        assert rec["backbone_training"] == "supervised"


def test_the_twins_differ_only_in_how_the_backbone_was_trained():
    dino, fine = (zoo.info(n) for n in NAMES)
    for key in ("library", "arch", "model_kwargs", "data", "classes", "params"):
        assert dino[key] == fine[key], key
    assert dino["training"]["init"] == fine["training"]["init"]
    assert dino["training"]["seed"] == fine["training"]["seed"]
    assert dino["training"]["data_seeds"] == fine["training"]["data_seeds"]
    db, dp = dino["training"]["phases"]
    fb, fp = fine["training"]["phases"]
    assert db["data"] == fb["data"]  # the same training images (DINO ignores the labels)
    same_probe = ("trainable", "data", "epochs", "batch_size", "optimizer", "augmentation")
    assert {k: dp[k] for k in same_probe} == {k: fp[k] for k in same_probe}
    a, b = _model(NAMES[0]).state_dict(), _model(NAMES[1]).state_dict()
    assert not torch.equal(a["blocks.0.attn.qkv.weight"], b["blocks.0.attn.qkv.weight"])


@pytest.mark.parametrize("name", NAMES)
def test_heldout_accuracy_remeasured_on_a_slice_agrees_with_the_record(name):
    rec = zoo.info(name)
    n = 256
    batch = shapes(n, rec["heldout"]["seed"], **zoo.data_kwargs(name))
    with torch.no_grad():
        logits = _model(name)(batch.images)
    acc = ((logits > 0) == (batch.labels > 0.5)).all(dim=1).float().mean().item()
    p = rec["heldout"]["accuracy"]
    # A random 256-image slice of the 2048: 4 binomial standard deviations (and one image).
    tol = 4 * math.sqrt(max(p * (1 - p), 0.01) / n) + 1 / n
    assert abs(acc - p) <= tol, (acc, p, tol)


@pytest.mark.parametrize("name", NAMES)
def test_fresh_data_accuracy_reaches_the_stated_value_within_sampling_error(name):
    batch = shapes(256, FRESH_SEED, **zoo.data_kwargs(name))
    with torch.no_grad():
        logits = _model(name)(batch.images)
    acc = ((logits > 0) == (batch.labels > 0.5)).all(dim=1).float().mean().item()
    assert acc >= STATED[name] - 4 * math.sqrt(0.05 * 0.95 / 256), acc


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("method", [CDAM, TAM])
def test_maps_come_out_as_12x12_grids(name, method):
    model = _model(name)
    batch = shapes(2, FRESH_SEED, **zoo.data_kwargs(name))
    k = int(batch.labels[0].nonzero()[0])
    grid = method(model).attribute(batch.images, target=k, output="grid")
    assert grid.shape == (2, 1, 12, 12)
    assert torch.isfinite(grid).all() and grid.abs().sum() > 0


@pytest.mark.slow
def test_train_entry_runs_end_to_end_on_a_tiny_recipe(tmp_path):
    td = _script()
    entry = _tiny_entry(td, "tiny-dino")
    cache = tmp_path / "cache"
    rec = td.train_entry(
        entry, tmp_path, progress=False, cache=cache, heldout_n=16, whiten_images=16
    )
    assert rec["name"] == "tiny-dino" and rec["backbone_frozen"] is True
    (phase,) = [p for p in rec["training"]["phases"] if p["name"] == "backbone"]
    assert "recolouring" in phase["augmentation"] and "48 px" in phase["augmentation"]
    assert phase["time_s"] > 0 and "resumed_at_steps" not in phase
    assert (cache / "tiny-dino.backbone.safetensors").is_file()
    assert 0.0 <= rec["heldout"]["accuracy"] <= 1.0
    assert (tmp_path / "tiny-dino.safetensors").is_file()
    model = zoo.load("tiny-dino", directory=tmp_path)
    assert model(torch.rand(1, 3, 96, 96)).shape == (1, 4)


@pytest.mark.slow
def test_a_cached_backbone_gives_the_same_entry_and_keeps_its_training_record(tmp_path):
    from safetensors.torch import load_file, save_file

    td = _script()
    entry = _tiny_entry(td, "tiny-dino")
    cache = tmp_path / "cache"
    kw = dict(progress=False, cache=cache, heldout_n=16, whiten_images=16)
    first = td.train_entry(entry, tmp_path / "a", **kw)
    again = td.train_entry(entry, tmp_path / "b", **kw)  # backbone read from the cache
    a = load_file(tmp_path / "a" / "tiny-dino.safetensors")
    b = load_file(tmp_path / "b" / "tiny-dino.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # head included
    (p1, _), (p2, h2) = first["training"]["phases"], again["training"]["phases"]
    assert "cached" not in p1 and p2["cached"] == "tiny-dino.backbone.safetensors"
    for key in ("time_s", "final_loss", "first_loss"):
        assert p2[key] == p1[key], key
    assert again["train_time_s"] >= p1["time_s"] + h2["time_s"]
    assert again["heldout"] == first["heldout"]
    # another recipe, or a backbone file without its record, is refused in one line
    other = replace(entry, dino=replace(entry.dino, steps=3))
    with pytest.raises(ValueError, match=r"another recipe \(differs in steps\)"):
        td.train_entry(other, tmp_path / "c", **kw)
    bare = cache / "tiny-dino.backbone.safetensors"
    save_file(load_file(bare), bare)
    with pytest.raises(ValueError, match="carries no training record"):
        td.train_entry(entry, tmp_path / "c", **kw)


def test_probe_overrides_parse_probe_fields():
    td = _script()
    assert td.config_overrides(["n_train=16384", "lr=0.001"], td.ProbeConfig) == {
        "n_train": 16384,
        "lr": 0.001,
    }
    with pytest.raises(ValueError, match="expected KEY=VALUE with a ProbeConfig field"):
        td.config_overrides(["steps=3"], td.ProbeConfig)


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device present")
def test_train_entry_on_cuda_writes_a_cpu_loadable_checkpoint(tmp_path):
    td = _script()
    entry = _tiny_entry(td, "tiny-dino-cuda")
    rec = td.train_entry(
        entry, tmp_path, progress=False, heldout_n=16, whiten_images=16, device="cuda"
    )
    assert rec["train_device"] == "cuda"
    model = zoo.load("tiny-dino-cuda", directory=tmp_path)
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert model(torch.rand(1, 3, 96, 96)).shape == (1, 4)
