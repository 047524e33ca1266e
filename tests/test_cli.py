"""The ``captum-ext`` command: help, explain on timm / HF / zoo models, errors, demo, evaluate.

Driven in-process through ``main([...])`` (which returns the exit status) and once as a
subprocess. Models are tiny, seeded and saved in ``tmp_path``; nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from captum_ext import CDAM
from captum_ext.cli import main

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TIMM_ARCH = "vit_tiny_patch16_224"
TIMM_KWARGS = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}
NUM_CLASSES = 4
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "great", "movie", "not", "good"]


def _zoo_has(*names: str) -> bool:
    try:
        from captum_ext import zoo
    except ImportError:
        return False
    return set(names) <= set(zoo.available())


needs_zoo = pytest.mark.skipif(
    not _zoo_has("shapes-vit", "shapes-vit-free", "text-bert"),
    reason="zoo weights (captum_ext/zoo/weights/*.safetensors) are not present; "
    "train them with python benchmarks/training/train_zoo.py",
)


# --- fixtures: tiny models and images saved as files ---------------------------------------


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Two PNG images, a tiny timm ViT as safetensors and .pt, tiny HF ViT and BERT folders."""
    import timm
    from safetensors.torch import save_file
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        BertTokenizer,
        ViTConfig,
        ViTForImageClassification,
    )

    root = tmp_path_factory.mktemp("cli")
    rng = np.random.default_rng(0)
    for i, size in enumerate([(40, 48), (32, 32)]):
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(root / f"im{i}.png")

    torch.manual_seed(0)
    vit = timm.create_model(TIMM_ARCH, num_classes=NUM_CLASSES, **TIMM_KWARGS)
    with torch.no_grad():  # scores that depend clearly on the input and the class
        for p in vit.parameters():
            p.normal_(0, 0.3)
    save_file(vit.state_dict(), root / "vit.safetensors")
    torch.save(vit.state_dict(), root / "vit.pt")
    torch.save({"model": vit.state_dict(), "optimizer": argparse_namespace()}, root / "pickle.pt")

    labels = {0: "cat", 1: "dog", 2: "fox"}
    hf_vit = ViTForImageClassification(
        ViTConfig(
            image_size=32,
            patch_size=8,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            num_labels=3,
            id2label=labels,
            label2id={v: k for k, v in labels.items()},
        )
    )
    hf_vit.save_pretrained(root / "hf-vit")

    (root / "vocab").mkdir()
    (root / "vocab" / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    tok = BertTokenizer.from_pretrained(root / "vocab")
    bert = BertForSequenceClassification(
        BertConfig(
            vocab_size=len(WORDS),
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=32,
            num_labels=2,
        )
    )
    bert.save_pretrained(root / "hf-bert")
    tok.save_pretrained(root / "hf-bert")
    return {
        "root": root,
        "im0": root / "im0.png",
        "im1": root / "im1.png",
        "vit": root / "vit.safetensors",
        "vit_pt": root / "vit.pt",
        "pickle": root / "pickle.pt",
        "hf_vit": root / "hf-vit",
        "hf_bert": root / "hf-bert",
    }


def argparse_namespace():
    """A non-tensor object: ``torch.load(weights_only=True)`` must refuse to unpickle it."""
    import argparse

    return argparse.Namespace(lr=0.1)


def _timm_args(files, out: Path, *extra: str, weights: str = "vit") -> list[str]:
    return [
        "explain",
        "--model",
        f"timm:{TIMM_ARCH}",
        "--weights",
        str(files[weights]),
        "--model-kwargs",
        json.dumps(TIMM_KWARGS),
        "--out",
        str(out),
        *extra,
    ]


def _timm_model(files) -> torch.nn.Module:
    import timm
    from safetensors.torch import load_file

    model = timm.create_model(TIMM_ARCH, num_classes=NUM_CLASSES, **TIMM_KWARGS)
    model.load_state_dict(load_file(files["vit"]))
    return model.eval()


# --- help, version, subprocess ---------------------------------------------------------------


def test_subprocess_help_lists_commands():
    proc = subprocess.run(
        [sys.executable, "-m", "captum_ext.cli", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr
    for command in ("demo", "explain", "evaluate"):
        assert command in proc.stdout


@pytest.mark.parametrize("command", ["demo", "explain", "evaluate"])
def test_subcommand_help_has_examples(command, capsys):
    assert main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert "examples:" in out and f"captum-ext {command}" in out


def test_version(capsys):
    from captum_ext import __version__

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"captum-ext {__version__}"


# --- explain: timm ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def timm_run(files, tmp_path_factory):
    """One explain run on two images, CDAM and relevance, targets 0 and 2."""
    out = tmp_path_factory.mktemp("run") / "out"
    args = ["--image", str(files["im0"]), str(files["im1"])]
    args += ["--method", "cdam", "relevance", "--target", "0", "2"]
    assert main(_timm_args(files, out, *args)) == 0
    return out


def test_explain_timm_writes_overlays_that_differ_between_targets(timm_run):
    for name in ("im0", "im1"):
        for method in ("cdam", "relevance"):
            for k in (0, 2):
                with Image.open(timm_run / f"{name}_{method}_class{k}.png") as img:
                    assert img.size == (400, 400)
    a = np.asarray(Image.open(timm_run / "im0_cdam_class0.png").convert("RGB"), dtype=float)
    b = np.asarray(Image.open(timm_run / "im0_cdam_class2.png").convert("RGB"), dtype=float)
    assert a.std() > 10  # an image, not a blank canvas
    assert np.abs(a - b).mean() > 1.0  # the signed map of another class looks different


def test_explain_timm_maps_equal_direct_cdam_and_prediction_is_the_models(files, timm_run):
    from safetensors.torch import load_file
    from timm.data import create_transform

    pred = json.loads((timm_run / "prediction.json").read_text())
    prep = {k: v for k, v in pred["preprocessing"].items() if k != "source"}
    assert prep["input_size"] == [3, 32, 32]  # the model's size, not the arch's default 224
    x = create_transform(**prep)(Image.open(files["im0"]).convert("RGB"))[None]
    model = _timm_model(files)
    stored = load_file(timm_run / "attributions.safetensors")
    for k in (0, 2):
        expected = CDAM(model).attribute(x, target=k)[0, 0]
        got = np.load(timm_run / f"im0_cdam_class{k}.npy")
        assert got.shape == (32, 32) and got.dtype == np.float32
        np.testing.assert_allclose(got, expected.numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(stored[f"im0/cdam/class{k}"][0].numpy(), got)

    with torch.no_grad():
        probs = model(x).softmax(-1)[0]
    entry = pred["inputs"][0]
    assert pred["score"] == "softmax"
    assert [t["class"] for t in entry["top"]] == probs.argsort(descending=True).tolist()
    assert entry["top"][0]["score"] == pytest.approx(float(probs.max()), abs=1e-5)
    assert [t["class"] for t in entry["targets"]] == [0, 2]


def test_explain_pt_weights_equal_safetensors_and_default_target_is_top_class(
    files, timm_run, tmp_path
):
    out = tmp_path / "pt"
    args = ["--image", str(files["im0"]), "--method", "cdam"]
    assert main(_timm_args(files, out, *args, weights="vit_pt")) == 0
    top = json.loads((timm_run / "prediction.json").read_text())["inputs"][0]["top"][0]["class"]
    got = torch.from_numpy(np.load(out / f"im0_cdam_class{top}.npy"))
    torch.testing.assert_close(got, _direct_cdam(files, top), rtol=1e-5, atol=1e-6)


def _direct_cdam(files, target: int) -> torch.Tensor:
    from timm.data import create_transform, resolve_data_config

    model = _timm_model(files)
    cfg = resolve_data_config({}, model=model)
    cfg["input_size"] = (3, 32, 32)
    x = create_transform(**cfg)(Image.open(files["im0"]).convert("RGB"))[None]
    return CDAM(model).attribute(x, target=target)[0, 0]


# --- explain: HuggingFace --------------------------------------------------------------------


def test_explain_hf_vit_by_class_name(files, tmp_path, capsys):
    from transformers import ViTForImageClassification, ViTImageProcessor

    out = tmp_path / "hf"
    args = ["--model", f"hf:{files['hf_vit']}", "--image", str(files["im0"])]
    assert main(["explain", *args, "--method", "cdam", "--target", "dog", "--out", str(out)]) == 0
    assert "no preprocessor_config.json" in capsys.readouterr().out  # the assumption is shown
    pred = json.loads((out / "prediction.json").read_text())
    assert {t["label"] for t in pred["inputs"][0]["top"]} == {"cat", "dog", "fox"}
    model = ViTForImageClassification.from_pretrained(files["hf_vit"]).eval()
    proc = ViTImageProcessor(size={"height": 32, "width": 32})
    x = proc(images=Image.open(files["im0"]).convert("RGB"), return_tensors="pt")["pixel_values"]
    expected = CDAM(model).attribute(x, target=1)[0, 0]
    np.testing.assert_allclose(np.load(out / "im0_cdam_class1.npy"), expected, atol=1e-6)
    with Image.open(out / "im0_cdam_class1.png") as img:
        assert img.size == (400, 400)


def test_explain_hf_bert_text(files, tmp_path):
    from transformers import AutoTokenizer, BertForSequenceClassification

    out = tmp_path / "text"
    args = ["--model", f"hf:{files['hf_bert']}", "--text", "a great movie", "not good"]
    assert (
        main(["explain", *args, "--method", "cdam", "tam", "--target", "1", "--out", str(out)]) == 0
    )
    html = (out / "text.html").read_text()
    assert "great" in html and "<table" in html
    with Image.open(out / "text.png") as img:
        assert img.size[0] > 100 and img.size[1] > 50
    pred = json.loads((out / "prediction.json").read_text())
    assert pred["inputs"][0]["tokens"] == ["[CLS]", "a", "great", "movie", "[SEP]"]
    tok = AutoTokenizer.from_pretrained(files["hf_bert"])
    model = BertForSequenceClassification.from_pretrained(files["hf_bert"]).eval()
    enc = tok(["a great movie"], return_tensors="pt")
    expected = CDAM(model).attribute(
        enc.input_ids, target=1, additional_forward_args=(enc.attention_mask,)
    )[0]
    got = np.load(out / "text0_cdam_class1.npy")
    assert got.shape == (5,)
    np.testing.assert_allclose(got, expected.numpy(), atol=1e-6)


def test_explain_labels_class_agnostic_maps_with_no_class(files, tmp_path, monkeypatch):
    """Issue 11: rollout does not depend on the target, so no class is named for it; the
    score shown for a class says which it is (softmax here)."""
    from captum_ext import viz

    titles = []
    real = viz.save_overlay

    def recording(path, attr, image, signed, title, *args, **kwargs):
        titles.append(title)
        return real(path, attr, image, signed, title, *args, **kwargs)

    monkeypatch.setattr(viz, "save_overlay", recording)
    out = tmp_path / "img"
    args = ["--model", f"hf:{files['hf_vit']}", "--image", str(files["im0"])]
    args += ["--method", "cdam", "rollout", "--target", "dog", "--out", str(out)]
    assert main(["explain", *args]) == 0
    assert sorted(titles)[0].startswith("CDAM: dog (softmax 0.")
    assert sorted(titles)[1] == "Rollout (class-agnostic)"

    out = tmp_path / "text"
    args = ["--model", f"hf:{files['hf_bert']}", "--text", "a great movie"]
    args += ["--method", "rollout", "cdam", "--target", "1", "--out", str(out)]
    assert main(["explain", *args]) == 0
    html = (out / "text.html").read_text()
    assert "Rollout (class-agnostic)" in html and "(Rollout)" not in html
    assert "LABEL_1 (CDAM)" in html


# --- errors: exit status 2, one line on stderr, no output folder ------------------------------


ERRORS = {
    "unknown method": (["--method", "lime"], "unknown method 'lime'"),
    "unknown spec": (["--model", "onnx:model.onnx"], "unknown model spec"),
    "spec without kind": (["--model", "vit_small"], "unknown model spec"),
    "missing image": (["--image", "{root}/nope.png"], "no such file"),
    "missing weights": (["--weights", "{root}/nope.safetensors"], "no such file"),
    "timm without weights": (["--weights", None], "would need a download"),
    "unknown timm arch": (["--model", "timm:vit_nonexistent_patch99"], "unknown timm architecture"),
    "pickled object": (["--weights", "{root}/pickle.pt"], "weights_only=True"),
    "target out of range": (["--target", "7"], "out of range"),
    "unknown target name": (["--target", "zebra"], "neither a class index nor a class name"),
    "bad model kwargs": (["--model-kwargs", "{img_size: 32"], "not valid JSON"),
    "missing hf folder": (
        ["--model", "hf:{root}/nowhere", "--model-kwargs", None],
        "no such folder",
    ),
    "unknown zoo model": (
        ["--model", "zoo:imagenet-vit", "--model-kwargs", None],
        "unknown zoo model",
    ),
    "text for an image model": (
        ["--image", None, "--text", "hello"],
        "is an image model; use --image",
    ),
    "missing required option": (["--method", None], "required"),
}


def _with_overrides(files, out: Path, overrides: list) -> list[str]:
    base = {
        "--model": f"timm:{TIMM_ARCH}",
        "--weights": str(files["vit"]),
        "--model-kwargs": json.dumps(TIMM_KWARGS),
        "--image": str(files["im0"]),
        "--method": "cdam",
        "--out": str(out),
    }
    for key, value in zip(overrides[::2], overrides[1::2]):
        base[key] = None if value is None else value.replace("{root}", str(files["root"]))
    args = ["explain"]
    for key, value in base.items():
        if value is not None:
            args += [key, value]
    return args


@pytest.mark.parametrize("case", list(ERRORS), ids=list(ERRORS))
def test_errors_are_one_line_exit_2_and_write_nothing(case, files, tmp_path, capsys):
    overrides, expected = ERRORS[case]
    out = tmp_path / "out"
    assert main(_with_overrides(files, out, overrides)) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert expected in lines[0]
    assert lines[0].startswith("captum-ext")
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".captum-ext-")]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error when CUDA is absent")
def test_cuda_requested_without_cuda_is_a_clear_error(files, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(_with_overrides(files, out, ["--device", "cuda"])) == 2
    assert "CUDA is not available" in capsys.readouterr().err
    assert not out.exists()


def test_staged_output_leaves_nothing_on_error_and_merges_into_existing(tmp_path):
    from captum_ext.cli._common import staged_output

    out = tmp_path / "out"
    with pytest.raises(RuntimeError), staged_output(out) as tmp:
        (tmp / "half.png").write_bytes(b"x")
        raise RuntimeError("failed half-way")
    assert list(tmp_path.iterdir()) == []

    out.mkdir()
    (out / "keep.txt").write_text("old")
    (out / "a.txt").write_text("old")
    with staged_output(out) as tmp:
        (tmp / "a.txt").write_text("new")
    assert (out / "keep.txt").read_text() == "old"
    assert (out / "a.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# --- zoo: explain, demo, evaluate ------------------------------------------------------------


@needs_zoo
def test_demo_seed_is_not_a_training_seed():
    from captum_ext import zoo
    from captum_ext.cli.demo import DEMO_SEED

    for name in zoo.available():
        assert DEMO_SEED not in zoo.info(name)["training"]["data_seeds"], name


@needs_zoo
def test_explain_zoo_model_reports_sigmoid_scores(tmp_path):
    from captum_ext.data import shapes

    batch = shapes(1, 11, min_objects=2)
    path = tmp_path / "shapes.png"
    pixels = (batch.images[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    Image.fromarray(pixels).save(path)
    out = tmp_path / "zoo"
    k = int(batch.labels[0].nonzero()[0])
    args = ["--model", "zoo:shapes-vit", "--image", str(path), "--method", "tam"]
    assert main(["explain", *args, "--target", str(k), "--out", str(out)]) == 0
    pred = json.loads((out / "prediction.json").read_text())
    assert pred["score"].startswith("sigmoid")
    assert len(pred["inputs"][0]["top"]) == 4


@pytest.mark.e2e
@needs_zoo
def test_demo_small_writes_every_output(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--n", "1", "--eval-n", "2"]) == 0
    expected = [
        "explanations.png",
        "explanations-shapes-vit-plain.png",
        "explanations-shapes-vit-free.png",
        "explanations-shapes-cnn.png",
        "text.html",
        "text.png",
        "metrics.md",
        "metrics.json",
    ]
    printed = capsys.readouterr().out
    for name in expected:
        assert (out / name).is_file(), name
        assert str(out / name) in printed  # the command says where everything went
    grid = np.asarray(Image.open(out / "explanations.png").convert("RGB"))
    assert grid.shape[0] > 300 and grid.shape[1] > 600
    assert len(np.unique(grid.reshape(-1, 3), axis=0)) > 500  # images and maps, not blank
    assert "shapes-vit" in (out / "metrics.md").read_text()
    rows = json.loads((out / "metrics.json").read_text())["rows"]
    assert {r["method"] for r in rows} >= {"cdam", "random"}
    assert "<table" in (out / "text.html").read_text()


@needs_zoo
def test_demo_grid_names_the_score_and_the_class_agnostic_columns():
    """Issue 11: rows say which score they show, class-agnostic columns say so, and the maps
    use captum_ext.viz's colours (green = for the class, red = against)."""
    from captum_ext.cli.demo import image_grid
    from captum_ext.viz import POSITIVE_CMAP, SIGNED_CMAP

    fig, _ = image_grid("shapes-vit", 1)
    heads = {ax.get_title(): ax for ax in fig.axes if ax.get_title()}
    assert {"Rollout\n(class-agnostic)", "Attention map\n(class-agnostic)", "CDAM"} <= set(heads)
    labels = [ax.get_ylabel() for ax in fig.axes if ax.get_ylabel()]
    assert labels and all("(sigmoid " in label for label in labels)
    xs = np.linspace(0, 1, 5)
    assert np.allclose(heads["CDAM"].get_images()[-1].get_cmap()(xs), SIGNED_CMAP(xs))
    assert np.allclose(heads["Relevance"].get_images()[-1].get_cmap()(xs), POSITIVE_CMAP(xs))


@needs_zoo
def test_demo_grids_have_a_t_tame_column_where_the_zoo_ships_one():
    """Issue 12: T-TAME next to the methods (ViT) and next to Captum's CNN references."""
    from captum_ext import zoo
    from captum_ext.cli.demo import image_grid
    from captum_ext.viz import POSITIVE_CMAP

    shipped = zoo.available(kind="explainer")
    if not {"shapes-vit-ttame", "shapes-cnn-ttame"} <= set(shipped):
        pytest.skip("the zoo of this installation ships no T-TAME explainers")
    _, vit = image_grid("shapes-vit", 1)
    assert "T-TAME" in vit["methods"][-2:] and "CDAM" in vit["methods"]
    fig, cnn = image_grid("shapes-cnn", 1)
    assert cnn["methods"][0] == "T-TAME" and "CDAM" in cnn["skipped"]
    assert any(m.startswith("Captum GradCAM") for m in cnn["methods"])
    heads = {ax.get_title(): ax for ax in fig.axes if ax.get_title()}
    xs = np.linspace(0, 1, 5)
    assert np.allclose(heads["T-TAME"].get_images()[-1].get_cmap()(xs), POSITIVE_CMAP(xs))


@needs_zoo
def test_evaluate_prints_and_writes_the_table(tmp_path, capsys):
    out = tmp_path / "eval"
    args = ["--models", "shapes-vit", "--methods", "cdam", "--n", "4", "--bootstrap", "10"]
    assert main(["evaluate", *args, "--out", str(out)]) == 0
    md = (out / "metrics.md").read_text()
    assert "CDAM" in md and md.strip() in capsys.readouterr().out
    assert json.loads((out / "metrics.json").read_text())["rows"]


def test_evaluate_unknown_model_is_one_line(tmp_path, capsys):
    pytest.importorskip("captum_ext.zoo")
    out = tmp_path / "eval"
    assert main(["evaluate", "--models", "no-such-model", "--out", str(out)]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert not out.exists()


@pytest.mark.slow
@needs_zoo
def test_demo_default_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["demo"]) == 0
    assert (tmp_path / "captum-ext-demo" / "explanations.png").is_file()


# --- issue 11: one line and exit 2 for every mistake; folders, batches, labels, targets -------


def _png_chunks(data: bytes):
    import struct

    i = 8
    while i < len(data):
        n = struct.unpack(">I", data[i : i + 4])[0]
        yield i, n, data[i + 4 : i + 8]
        i += 12 + n


def _broken_png(path: Path, source: Path, kind: str) -> Path:
    """A copy of ``source`` with a bad IDAT checksum, or IDAT data that is not zlib."""
    import struct
    import zlib

    data = source.read_bytes()
    i, n, _ = next(c for c in _png_chunks(data) if c[2] == b"IDAT")
    if kind == "crc":
        out = bytearray(data)
        out[i + 8 + n] ^= 0xFF
        path.write_bytes(bytes(out))
    else:
        payload = b"this is not zlib data"
        crc = struct.pack(">I", zlib.crc32(b"IDAT" + payload) & 0xFFFFFFFF)
        chunk = struct.pack(">I", len(payload)) + b"IDAT" + payload + crc
        path.write_bytes(data[:i] + chunk + data[i + 12 + n :])
    return path


def _one_line_error(capsys, expected: str) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("captum-ext") and expected in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("kind", ["crc", "zlib", "bomb"])
def test_unreadable_image_is_one_line_exit_2(kind, files, tmp_path, capsys, monkeypatch):
    image = files["im0"]
    if kind == "bomb":
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 400)  # im0 has 40 x 48 = 1920 pixels
    else:
        image = _broken_png(tmp_path / f"{kind}.png", files["im1"], kind)
    out = tmp_path / "out"
    assert main(_with_overrides(files, out, ["--image", str(image)])) == 2
    _one_line_error(capsys, f"--image {image}: not an image PIL can read")
    assert not out.exists()


def test_hf_folder_with_a_pickled_bin_is_one_line_and_unpickles_nothing(files, tmp_path, capsys):
    import shutil

    folder = tmp_path / "hf-pickle"
    shutil.copytree(files["hf_vit"], folder)
    from safetensors.torch import load_file

    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save({**state, "extra": argparse_namespace()}, folder / "pytorch_model.bin")
    out = tmp_path / "out"
    args = ["--model", f"hf:{folder}", "--model-kwargs", None, "--weights", None]
    assert main(_with_overrides(files, out, args)) == 2
    line = _one_line_error(capsys, "pytorch_model.bin")
    assert "weights_only=True" in line and "argparse.Namespace" in line
    assert not out.exists()


@pytest.fixture
def no_loading(monkeypatch):
    """Fails the test if the command loads a model (it must check --out before computing)."""
    from captum_ext import models

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before --out was checked")

    monkeypatch.setattr(models, "load", refuse)


@pytest.mark.parametrize(
    "where", ["proc", "parent is a file", "read-only folder", "read-only file system"]
)
def test_unwritable_out_is_refused_before_computing(
    where, files, tmp_path, capsys, no_loading, monkeypatch
):
    if where == "read-only file system":  # simulated: root may write into any folder
        import errno
        import tempfile

        def read_only(*args, **kwargs):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))

        monkeypatch.setattr(tempfile, "mkdtemp", read_only)
        out = tmp_path / "out"
    elif where == "proc":
        if not Path("/proc/self").is_dir():
            pytest.skip("no /proc on this system")
        out = Path("/proc/captum-ext-test/out")
    elif where == "parent is a file":
        (tmp_path / "file").write_text("x")
        out = tmp_path / "file" / "out"
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only folders")
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        out = locked / "out"
    assert main(_with_overrides(files, out, [])) == 2
    _one_line_error(capsys, f"--out {out}")
    assert not out.exists()
    assert not [p for p in tmp_path.rglob(".captum-ext-*")]


@pytest.mark.e2e
@needs_zoo
def test_sigterm_during_demo_leaves_no_staging_folder(tmp_path):
    import signal
    import time

    out = tmp_path / "demo"
    proc = subprocess.Popen(
        [sys.executable, "-m", "captum_ext.cli", "demo", "--out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    deadline = time.monotonic() + 120
    staged: list[Path] = []
    while time.monotonic() < deadline and proc.poll() is None:
        staged = [f for d in tmp_path.glob(".captum-ext-*") for f in d.iterdir()]
        if staged:  # a first file is written: the run is half-way
            break
        time.sleep(0.05)
    assert staged, "the demo wrote nothing into a staging folder"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no staging folder, no --out
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "terminated" in err.strip().splitlines()[-1]


def test_staged_output_turns_sigterm_into_cleanup_and_restores_the_handler(tmp_path):
    import signal

    from captum_ext.cli._common import Terminated, staged_output

    before = signal.getsignal(signal.SIGTERM)
    out = tmp_path / "out"
    with pytest.raises(Terminated) as stop, staged_output(out) as tmp:
        (tmp / "half.png").write_bytes(b"x")
        assert signal.getsignal(signal.SIGTERM) is not before  # else the kill ends pytest
        os.kill(os.getpid(), signal.SIGTERM)
    assert stop.value.code == 128 + signal.SIGTERM
    assert list(tmp_path.iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) is before


def test_explain_refuses_a_non_empty_out_unless_overwrite(files, tmp_path, capsys):
    out = tmp_path / "out"
    first = ["--image", str(files["im0"]), str(files["im1"]), "--target", "0", "--quiet"]
    assert main(_timm_args(files, out, *first, "--method", "cdam", "relevance")) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()

    second = ["--image", str(files["im0"]), "--target", "1", "--method", "cdam", "--quiet"]
    assert main(_timm_args(files, out, *second)) == 2
    _one_line_error(capsys, "--overwrite")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # untouched

    assert main(_timm_args(files, out, *second, "--overwrite")) == 0
    pred = json.loads((out / "prediction.json").read_text())
    listed = {f for entry in pred["inputs"] for f in entry["files"]}
    assert listed == {"im0_cdam_class1.npy", "im0_cdam_class1.png"}
    expected = listed | {"prediction.json", "attributions.safetensors"}
    assert {p.name for p in out.iterdir()} == expected  # exactly this run's output


def test_weight_mismatch_names_the_keys_in_one_line(files, tmp_path, capsys):
    out = tmp_path / "out"
    deeper = json.dumps({**TIMM_KWARGS, "depth": 3})
    assert main(_with_overrides(files, out, ["--model-kwargs", deeper])) == 2
    line = _one_line_error(capsys, "do not fit the model")
    assert "missing" in line and "blocks.2." in line
    wider = json.dumps({**TIMM_KWARGS, "embed_dim": 48, "num_heads": 2})
    assert main(_with_overrides(files, out, ["--model-kwargs", wider])) == 2
    line = _one_line_error(capsys, "do not fit the model")
    assert "mis-shaped" in line and "cls_token" in line
    assert not out.exists()


def test_image_folders_and_globs_expand_sorted(files, tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    for name in ("b.png", "a.png"):
        (folder / name).write_bytes(files["im0"].read_bytes())
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "folder"
    assert main(_timm_args(files, out, "--image", str(folder), "--method", "cdam", "-q")) == 0
    pred = json.loads((out / "prediction.json").read_text())
    assert [e["input"] for e in pred["inputs"]] == [str(folder / "a.png"), str(folder / "b.png")]

    out = tmp_path / "glob"
    pattern = str(files["root"] / "im*.png")
    assert main(_timm_args(files, out, "--image", pattern, "--method", "cdam", "-q")) == 0
    pred = json.loads((out / "prediction.json").read_text())
    assert [e["name"] for e in pred["inputs"]] == ["im0", "im1"]

    empty = tmp_path / "empty"
    empty.mkdir()
    capsys.readouterr()
    assert (
        main(_timm_args(files, tmp_path / "none", "--image", str(empty), "--method", "cdam")) == 2
    )
    _one_line_error(capsys, "no images")


def test_batch_size_does_not_change_the_maps(files, tmp_path):
    third = tmp_path / "im2.png"
    Image.open(files["im0"]).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(third)
    images = ["--image", str(files["im0"]), str(files["im1"]), str(third)]
    runs = {}
    for b in (1, 2):
        out = tmp_path / f"b{b}"
        args = [*images, "--method", "cdam", "tam", "--batch-size", str(b), "--quiet"]
        assert main(_timm_args(files, out, *args)) == 0
        runs[b] = out
    names = sorted(p.name for p in runs[1].glob("*.npy"))
    assert names == sorted(p.name for p in runs[2].glob("*.npy")) and len(names) == 6
    for name in names:
        np.testing.assert_allclose(
            np.load(runs[1] / name), np.load(runs[2] / name), rtol=1e-5, atol=1e-6
        )


def test_progress_bars_on_stderr_unless_quiet(files, tmp_path, capsys):
    args = ["--image", str(files["im0"]), "--method", "cdam"]
    assert main(_timm_args(files, tmp_path / "a", *args)) == 0
    assert "explain" in capsys.readouterr().err  # the tqdm bar
    assert main(_timm_args(files, tmp_path / "b", *args, "--quiet")) == 0
    assert capsys.readouterr().err == ""


def test_method_all_runs_every_registered_method(files, tmp_path):
    from captum_ext.registry import METHODS

    out = tmp_path / "all"
    args = ["--image", str(files["im0"]), "--method", "all", "--target", "1", "-q"]
    assert main(_timm_args(files, out, *args)) == 0
    assert sorted(json.loads((out / "prediction.json").read_text())["methods"]) == sorted(METHODS)
    for m in METHODS:
        assert (out / f"im0_{m}_class1.npy").is_file()


@pytest.mark.parametrize("form", ["lines", "json"])
def test_labels_file_names_the_classes(form, files, tmp_path, capsys):
    names = ["cat", "car", "dog", "fox"]
    labels = tmp_path / f"labels.{form}"
    labels.write_text("\n".join(names) + "\n" if form == "lines" else json.dumps(names))
    out = tmp_path / "out"
    args = ["--image", str(files["im0"]), "--method", "cdam", "--labels", str(labels), "-q"]
    assert main(_timm_args(files, out, *args, "--target", "do")) == 0  # a prefix of "dog"
    pred = json.loads((out / "prediction.json").read_text())
    assert pred["inputs"][0]["targets"][0]["label"] == "dog"
    assert {t["label"] for t in pred["inputs"][0]["top"]} == set(names)

    assert main(_timm_args(files, tmp_path / "x", *args, "--target", "ca")) == 2
    _one_line_error(capsys, "ambiguous")
    labels.write_text("cat\ndog\n")
    assert main(_timm_args(files, tmp_path / "y", *args)) == 2
    _one_line_error(capsys, "2 class names")


def test_target_prefix_on_hf_labels(files, tmp_path):
    out = tmp_path / "hf"
    args = ["--model", f"hf:{files['hf_vit']}", "--image", str(files["im0"]), "--method", "cdam"]
    assert main(["explain", *args, "--target", "Fo", "--out", str(out), "-q"]) == 0
    assert (out / "im0_cdam_class2.npy").is_file()


def test_explain_help_lists_the_zoo_models(capsys):
    from captum_ext import zoo

    assert main(["explain", "--help"]) == 0
    out = capsys.readouterr().out
    for name in zoo.available():
        assert name in out


def test_hf_processor_size_other_than_the_models_is_resized(files, tmp_path, capsys):
    import shutil

    from transformers import ViTImageProcessor

    folder = tmp_path / "hf-vit-28"
    shutil.copytree(files["hf_vit"], folder)
    ViTImageProcessor(size={"height": 28, "width": 28}).save_pretrained(folder)
    out = tmp_path / "out"
    args = ["--model", f"hf:{folder}", "--image", str(files["im0"]), "--method", "cdam", "-q"]
    assert main(["explain", *args, "--out", str(out)]) == 0
    assert "32x32" in capsys.readouterr().out  # the note says what was done
    assert np.load(next(out.glob("*.npy"))).shape == (32, 32)


def test_timm_img_size_not_a_multiple_of_the_patch_suggests_sizes_that_work(
    files, tmp_path, capsys
):
    out = tmp_path / "out"
    odd = json.dumps({**TIMM_KWARGS, "img_size": 36})
    assert main(_with_overrides(files, out, ["--model-kwargs", odd])) == 2
    line = _one_line_error(capsys, "36x36")
    assert "32" in line and "40" in line
    assert not out.exists()


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["explain", "--help"],
        ["evaluate", "--help"],
        ["demo", "--help"],
        ["explain"],
        ["fit", "--help"],
        ["fit"],
        ["fit", "ttame", "--help"],
        ["fit", "mhex", "--help"],
        ["fit", "ttame"],
        ["fit", "x"],
    ],
)
def test_help_and_usage_errors_import_no_torch(argv):
    """`captum-ext --help` took 3-24 s: every heavy import ran before argument parsing. Help
    and usage errors now import neither torch nor timm nor Captum (so they answer at once)."""
    code = (
        "import sys\nfrom captum_ext.cli import main\n"
        f"rc = main({argv!r})\n"
        "heavy = sorted(m for m in ('torch', 'timm', 'captum', 'numpy') if m in sys.modules)\n"
        "print('HEAVY', heavy, rc)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip().splitlines()[-1] == f"HEAVY [] {0 if '--help' in argv else 2}", out
    if argv[:1] == ["fit"] and len(argv) == 3:  # a fit explainer's help lists its recipe
        assert "--checkpoint-dir" in out and "examples" not in out.split("usage:")[0]


def test_package_import_is_lazy_but_complete():
    """`import captum_ext` imports no torch; every name of __all__ still resolves."""
    code = (
        "import sys, captum_ext\nassert 'torch' not in sys.modules\n"
        "missing = [n for n in captum_ext.__all__ if getattr(captum_ext, n, None) is None]\n"
        "print(missing, sorted(set(captum_ext.__all__) - set(dir(captum_ext))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "[] []", out.stderr
