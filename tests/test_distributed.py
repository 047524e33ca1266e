"""Whole-dataset runs: sharding, torchrun (2 gloo ranks on CPU), resume, refusal, folder inputs.

The torchrun test runs this file as the worker script (``python -m torch.distributed.run
--nproc-per-node 2 tests/test_distributed.py ...``): each rank calls the ``captum-ext`` command
line, as a user's ``torchrun -m captum_ext.cli`` would.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torchrun_launch import run_two_ranks

from captum_ext import distributed, zoo
from captum_ext.cli import main
from captum_ext.data import SHAPE_CLASSES, shapes
from captum_ext.evaluation import (
    ImageFiles,
    ShapesSource,
    ShardedOutputError,
    _sharded,
    evaluate,
    evaluate_dataset,
    explain_dataset,
    load_maps,
)
from captum_ext.evaluation._sharded import shard_chunks

ROOT = Path(__file__).resolve().parents[1]
MODEL = "shapes-vit-plain"  # no trained explainers in the zoo: the fastest full evaluation
N, CHUNK = 7, 2  # 4 chunks, the last one short; 2 ranks get 2 chunks each
METRICS = [
    "pointing_game",
    "pointing_game_grid",
    "sparsity",
    "discrimination_score",
    "deletion_auc",
]


def _explain_args(folder: Path, out: Path) -> list[str]:
    return [
        "explain", "--model", f"zoo:{MODEL}", "--dataset", str(folder), "--method", "cdam",
        "rollout", "--target", "label", "--chunk-size", "3", "--batch-size", "2", "--out",
        str(out), "-q",
    ]  # fmt: skip


def _evaluate_args(out: Path) -> list[str]:
    return [
        "evaluate", "--models", MODEL, "--dataset", "shapes", "--num-examples", str(N),
        "--chunk-size", str(CHUNK), "--methods", "cdam", "--metrics", *METRICS,
        "--bootstrap", "50", "--out", str(out), "-q",
    ]  # fmt: skip


def _write_pngs(folder: Path, images: torch.Tensor, names: list[str]) -> None:
    from PIL import Image

    for x, name in zip(images, names, strict=True):
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = (x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(pixels).save(path)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """An ImageFolder tree of 5 one-object shapes images (sub-folders named as classes)."""
    root = tmp_path_factory.mktemp("imagefolder")
    data = shapes(24, 11, **zoo.data_kwargs(MODEL))
    single = [i for i in range(len(data)) if int(data.labels[i].sum()) == 1][:5]
    names = [f"{SHAPE_CLASSES[int(data.labels[i].argmax())]}/img{i:02d}.png" for i in single]
    _write_pngs(root, data.images[single], names)
    return root


@pytest.fixture(scope="module")
def plain_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("plain")
    data = shapes(5, 12, **zoo.data_kwargs(MODEL))
    _write_pngs(root, data.images, [f"x{i}.png" for i in range(5)])
    return root


# ---------------------------------------------------------------------------------------------
# sharding


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_every_chunk_goes_to_exactly_one_rank(world):
    for n_chunks in range(1, 10):
        shares = [shard_chunks(n_chunks, r, world) for r in range(world)]
        flat = [c for share in shares for c in share]
        assert sorted(flat) == list(range(n_chunks)), (n_chunks, shares)  # no padding repeats


# ---------------------------------------------------------------------------------------------
# captum_ext.distributed: the process group and the device of a process


def test_local_device_is_the_processs_own_gpu_under_torchrun(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert distributed.local_device("cuda") == torch.device("cuda")
    assert distributed.local_device("cpu") == torch.device("cpu")
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert distributed.local_device("cuda") == torch.device("cuda", 3)
    assert distributed.local_device(torch.device("cuda")) == torch.device("cuda", 3)
    assert distributed.local_device("cuda:1") == torch.device("cuda", 1)  # an explicit GPU stays
    assert distributed.local_device("cpu") == torch.device("cpu")


def test_world_alone_and_distributed_true_without_a_group(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    assert not distributed.torchrun_env()
    for wanted in (None, False):
        with distributed.world(torch.device("cpu"), wanted) as w:
            assert (w.rank, w.size, w.main, w.sync_group) == (0, 1, True, None)
    with (
        pytest.raises(RuntimeError, match="distributed=True"),
        distributed.world(torch.device("cpu"), True),
    ):
        pass


# ---------------------------------------------------------------------------------------------
# torchrun: 2 gloo ranks on CPU equal one process


def _worker(folder: str, out: str) -> None:
    """Each rank: explain an ImageFolder tree, then evaluate the shapes benchmark."""
    assert main(_explain_args(Path(folder), Path(out) / "explain")) == 0
    assert main(_evaluate_args(Path(out) / "evaluate")) == 0


def _rows(path: Path) -> list[tuple]:
    data = json.loads(path.read_text())
    return [(r["method"], r["metric"], r["n"], r["mean"], r["lo"], r["hi"]) for r in data["rows"]]


@pytest.mark.e2e
def test_torchrun_two_ranks_equal_one_process(image_folder, tmp_path):
    run_two_ranks(__file__, image_folder, tmp_path / "ddp", timeout=600)
    _worker(str(image_folder), str(tmp_path / "one"))

    # explain: the union of both ranks' shards is the one-process output, every example once
    ddp, ids_ddp = load_maps(tmp_path / "ddp" / "explain")
    one, ids_one = load_maps(tmp_path / "one" / "explain")
    assert ids_ddp == ids_one == ImageFiles(image_folder, lambda x: x).ids
    assert torch.equal(ddp["examples"], torch.arange(5))
    assert ddp.keys() == one.keys()
    for key in ddp:
        torch.testing.assert_close(ddp[key], one[key], rtol=1e-5, atol=1e-6, msg=key)
    index = json.loads((tmp_path / "ddp" / "explain" / "index.json").read_text())
    assert index["complete"] and index["world_size"] == 2
    assert [(s["start"], s["stop"]) for s in index["shards"]] == [(0, 3), (3, 5)]
    # the folder's class is explained: the targets are the folders' classes
    folders = [i.split("/")[0] for i in ids_ddp]
    assert [SHAPE_CLASSES[k] for k in ddp["pair_target"].tolist()] == folders

    # evaluate: the table gathered on rank 0 equals the one-process table
    rows_ddp = _rows(tmp_path / "ddp" / "evaluate" / "metrics.json")
    rows_one = _rows(tmp_path / "one" / "evaluate" / "metrics.json")
    assert [r[:3] for r in rows_ddp] == [r[:3] for r in rows_one]
    assert {r[1] for r in rows_ddp} == set(METRICS)
    for a, b in zip(rows_ddp, rows_one, strict=True):
        assert a[3:] == pytest.approx(b[3:], rel=1e-6, abs=1e-9), a[:2]
    meta = json.loads((tmp_path / "ddp" / "evaluate" / "metrics.json").read_text())["meta"]
    assert meta[MODEL]["n_images"] == N  # every image scored once
    ev_index = json.loads((tmp_path / "ddp" / "evaluate" / "index.json").read_text())
    assert ev_index["world_size"] == 2 and len(ev_index["shards"]) == 4


def test_one_chunk_equals_the_in_memory_evaluation():
    data_kwargs = zoo.data_kwargs(MODEL)
    ds = ShapesSource(N, 5, **data_kwargs)
    settings = {"metrics": METRICS, "bootstrap": 50, "seed": 5}
    ref = evaluate(MODEL, ["cdam"], data=shapes(N, 5, **data_kwargs), **settings)
    import tempfile

    with tempfile.TemporaryDirectory() as out:
        got = evaluate_dataset(MODEL, ds, out, ["cdam"], chunk_size=N, **settings)
    assert [(r["method"], r["metric"]) for r in got.rows] == [
        (r["method"], r["metric"]) for r in ref.rows
    ]
    for a, b in zip(got.rows, ref.rows, strict=True):
        assert (a["mean"], a["lo"], a["hi"]) == pytest.approx((b["mean"], b["lo"], b["hi"]))


# ---------------------------------------------------------------------------------------------
# resume and refusal


class _Interrupt(Exception):
    pass


def test_resume_after_an_interruption_computes_only_the_missing_shards(
    plain_folder, tmp_path, monkeypatch
):
    model = zoo.load(MODEL)
    info = zoo.info(MODEL)
    data = ImageFiles(plain_folder, _transform(info))
    kwargs = {"chunk_size": 2, "batch_size": 2, "multi_label": True}
    saved = []
    original = _sharded.save_checkpoint

    def interrupted(path, tensors, record):
        if len(saved) == 1:
            raise _Interrupt  # dies while computing the second shard
        saved.append(record["chunk"])
        return original(path, tensors, record)

    monkeypatch.setattr(_sharded, "save_checkpoint", interrupted)
    with pytest.raises(_Interrupt):
        explain_dataset(model, ["cdam"], data, tmp_path / "out", **kwargs)
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert not index["complete"]
    with pytest.raises(ShardedOutputError, match="not complete"):
        load_maps(tmp_path / "out")
    first = (tmp_path / "out" / "shard-00000.safetensors").read_bytes()

    computed = []
    original_compute = _sharded.run_sharded

    def counting(out, config, n, chunk_size, compute, world, **kw):
        def wrapped(c, examples):
            computed.append(c)
            return compute(c, examples)

        return original_compute(out, config, n, chunk_size, wrapped, world, **kw)

    monkeypatch.setattr(_sharded, "save_checkpoint", original)
    monkeypatch.setattr(_sharded, "run_sharded", counting)
    run = explain_dataset(model, ["cdam"], data, tmp_path / "out", **kwargs)
    assert computed == [1, 2] and run.computed == [1, 2] and run.reused == [0]
    assert (tmp_path / "out" / "shard-00000.safetensors").read_bytes() == first  # kept as is

    computed.clear()
    fresh = explain_dataset(model, ["cdam"], data, tmp_path / "fresh", **kwargs)
    assert computed == [0, 1, 2] and fresh.reused == []
    resumed, ids = load_maps(tmp_path / "out")
    full, ids_full = load_maps(tmp_path / "fresh")
    assert ids == ids_full == [f"x{i}.png" for i in range(5)]
    for key in full:
        torch.testing.assert_close(resumed[key], full[key], msg=key)

    # a shard damaged on disk is computed again, not trusted
    (tmp_path / "out" / "shard-00001.safetensors").write_bytes(b"broken")
    computed.clear()
    again = explain_dataset(model, ["cdam"], data, tmp_path / "out", **kwargs)
    assert computed == [1] and again.reused == [0, 2]


def _transform(info):
    size = int(zoo.data_kwargs(MODEL).get("size", 32))

    def transform(img):
        img = img.convert("RGB").resize((size, size))
        return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)

    return transform


def test_an_out_written_with_other_settings_is_refused_in_one_line(plain_folder, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["explain", "--model", f"zoo:{MODEL}", "--dataset", str(plain_folder), "-q"]
    args += ["--chunk-size", "2"]
    assert main([*args, "--method", "cdam", "--out", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    assert main([*args, "--method", "rollout", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "another configuration" in err and "methods" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # untouched

    # the same settings resume (nothing to do); --overwrite starts again
    assert main([*args, "--method", "cdam", "--out", str(out)]) == 0
    assert "0 computed, 3 reused" in capsys.readouterr().out
    assert main([*args, "--method", "rollout", "--out", str(out), "--overwrite"]) == 0
    assert json.loads((out / "index.json").read_text())["config"]["methods"] == ["rollout"]

    # a non-empty folder that is not a run's output is refused too
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    capsys.readouterr()
    assert main([*args, "--method", "cdam", "--out", str(other)]) == 2
    err = capsys.readouterr().err
    assert "holds no index.json" in err
    assert f"--out {other}:" in err and "--overwrite" in err  # the command's own options
    assert (other / "notes.txt").read_text() == "mine"

    # the library names its arguments instead
    data = ImageFiles(plain_folder, _transform(zoo.info(MODEL)))
    with pytest.raises(ShardedOutputError) as refused:
        explain_dataset(zoo.load(MODEL), ["cdam"], data, other)
    message = str(refused.value)
    assert message.startswith(f"out={other}:") and "overwrite=True" in message
    assert "--" not in message


def test_evaluate_refuses_an_out_of_another_evaluation(tmp_path, capsys):
    out = tmp_path / "ev"
    base = [
        "evaluate", "--models", MODEL, "--dataset", "shapes", "--num-examples", "3",
        "--methods", "cdam", "--bootstrap", "0", "--out", str(out), "-q",
    ]  # fmt: skip
    assert main([*base, "--metrics", "sparsity", "--chunk-size", "2"]) == 0
    table = (out / "metrics.json").read_text()
    shard = (out / "shard-00001.safetensors").read_bytes()
    (out / "shard-00000.json").unlink()  # an interrupted shard: computed again, the other kept
    assert main([*base, "--metrics", "sparsity", "--chunk-size", "2"]) == 0
    assert (out / "metrics.json").read_text() == table
    assert (out / "shard-00001.safetensors").read_bytes() == shard
    capsys.readouterr()
    assert main([*base, "--metrics", "pointing_game", "--chunk-size", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "differs in: metrics" in err


# ---------------------------------------------------------------------------------------------
# folder inputs


def test_imagefolder_and_plain_folder_layouts(image_folder, plain_folder):
    tree = ImageFiles(image_folder, lambda img: img)
    assert tree.layout == "imagefolder"
    assert tree.ids == sorted(tree.ids) and all("/" in i for i in tree.ids)
    # folders named as the model's classes get the model's class indices, not sorted order
    tree.map_classes(list(SHAPE_CLASSES))
    assert [SHAPE_CLASSES[k] for k in tree.labels] == [i.split("/")[0] for i in tree.ids]
    flat = ImageFiles(plain_folder, lambda img: img)
    assert flat.layout == "folder" and flat.labels == [-1] * 5
    empty = plain_folder.parent / "empty"
    empty.mkdir(exist_ok=True)
    with pytest.raises(ValueError, match="no images"):
        ImageFiles(empty, lambda img: img)
    with pytest.raises(ValueError, match="not a folder"):
        ImageFiles(empty / "missing", lambda img: img)


def test_plain_folder_label_targets_are_refused_and_evaluation_skips_mask_metrics(
    plain_folder, tmp_path, capsys
):
    args = ["explain", "--model", f"zoo:{MODEL}", "--dataset", str(plain_folder), "-q"]
    assert main([*args, "--method", "cdam", "--target", "label", "--out", str(tmp_path / "a")]) == 2
    assert "has no label" in capsys.readouterr().err

    data = ImageFiles(plain_folder, _transform(zoo.info(MODEL)))
    result = evaluate_dataset(
        MODEL, data, tmp_path / "ev", ["cdam"], chunk_size=2, bootstrap=0, metrics=METRICS
    )
    metrics = {r["metric"] for r in result.rows}
    assert metrics == {"sparsity", "deletion_auc"}  # no masks: no pointing game, no D
    assert any("no object masks" in n for n in result.notes[MODEL])
    assert result.meta[MODEL]["n_images"] == 5


if __name__ == "__main__":  # a torchrun worker: python -m torch.distributed.run ... FOLDER OUT
    _worker(sys.argv[1], sys.argv[2])
