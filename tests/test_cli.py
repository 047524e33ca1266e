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
    "train them with python benchmarks/train_zoo.py",
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


# --- errors: exit status 2, one line on stderr, no output folder ------------------------------


ERRORS = {
    "unknown method": (["--method", "gradcam"], "unknown method 'gradcam'"),
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


@needs_zoo
def test_demo_small_writes_every_output(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--n", "1", "--eval-n", "2"]) == 0
    expected = [
        "explanations.png",
        "explanations-shapes-vit-plain.png",
        "explanations-shapes-vit-free.png",
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
