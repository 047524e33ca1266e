"""``captum-ext fit``: T-TAME and MHEX trained on folders of images, written for ``load``.

Driven in-process through ``main([...])`` on a few generated 32x32 images: the zoo's
``shapes-cnn`` (a small ResNet) and a tiny timm ViT saved as safetensors.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import shutil
import typing
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from captum_ext import MHEX, TTAME, TrainingRecipe
from captum_ext.cli import _fit_options as fo
from captum_ext.cli import build_parser, main

TIMM_ARCH = "vit_tiny_patch16_224"
TIMM_KWARGS = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 3, "num_heads": 2}
SHAPES = ["square", "circle", "triangle", "plus"]  # zoo:shapes-cnn's classes


def _zoo_has(*names: str) -> bool:
    from captum_ext import zoo

    return set(names) <= set(zoo.available())


needs_zoo = pytest.mark.skipif(
    not _zoo_has("shapes-cnn"),
    reason="zoo weights (captum_ext/zoo/weights/*.safetensors) are not present; "
    "train them with python benchmarks/training/train_zoo.py",
)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """``flat``: 6 images at the top level; ``tree``: 2 images in each class sub-folder of
    shapes-cnn's classes; ``vit``: a tiny timm ViT's weights."""
    import timm
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("fit")
    rng = np.random.default_rng(0)
    (root / "flat").mkdir()
    for i in range(6):
        pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "flat" / f"im{i}.png")
    for name in SHAPES:
        (root / "tree" / name).mkdir(parents=True)
        for i in range(2):
            pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "tree" / name / f"im{i}.png")
    torch.manual_seed(0)
    vit = timm.create_model(TIMM_ARCH, num_classes=4, **TIMM_KWARGS)
    save_file(vit.state_dict(), root / "vit.safetensors")
    return {"flat": root / "flat", "tree": root / "tree", "vit": root / "vit.safetensors"}


def _shapes_cnn():
    from captum_ext.models import load

    return load("zoo:shapes-cnn")


def _one_line_error(capsys, *needles: str) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err
    return err


def _no_staging(folder: Path) -> None:
    assert not list(folder.rglob(".captum-ext-*"))


def _ttame(data, out: Path, *extra: str) -> list[str]:
    args = ["fit", "ttame", "--model", "zoo:shapes-cnn", "--data", str(data["flat"])]
    return [*args, "--out", str(out), "--epochs", "1", "--batch-size", "3", "-q", *extra]


# --- training and loading back ------------------------------------------------------------


@needs_zoo
def test_fit_ttame_writes_the_pair_that_ttame_load_reads(data, tmp_path, capsys):
    out = tmp_path / "runs" / "cnn-ttame"
    assert main(_ttame(data, out, "--ce-weight", "2", "--loss-maps", "batch")) == 0
    printed = capsys.readouterr().out
    assert f"{out}.safetensors" in printed and "TTAME on 6 images" in printed
    assert sorted(p.name for p in out.parent.iterdir()) == [
        "cnn-ttame.json",
        "cnn-ttame.safetensors",
    ]
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["method"] == "ttame"
    fit = record["fit_command"]
    assert fit["options"] == {"ce_weight": 2.0, "loss_maps": "batch"}
    assert fit["recipe"]["epochs"] == 1 and fit["recipe"]["lr"] == 1e-3  # T-TAME's default lr
    assert fit["data"]["n"] == 6 and len(fit["history"]) == 1

    loaded = _shapes_cnn()
    explainer = TTAME.load(out, loaded.model)
    with Image.open(data["flat"] / "im0.png") as img:
        x = loaded.image_transform(img)[None]
    maps = explainer.attribute(x, target=1)
    assert maps.shape == (1, 1, 32, 32) and torch.isfinite(maps).all()


def test_fit_ttame_on_a_timm_vit(data, tmp_path):
    from captum_ext.models import load

    out = tmp_path / "vit-ttame"
    args = ["--model", f"timm:{TIMM_ARCH}", "--weights", str(data["vit"])]
    args += ["--model-kwargs", json.dumps(TIMM_KWARGS), "--data", str(data["tree"])]
    assert main(["fit", "ttame", *args, "--out", str(out), "--epochs", "1", "-q"]) == 0
    loaded = load(f"timm:{TIMM_ARCH}", data["vit"], model_kwargs=TIMM_KWARGS)
    explainer = TTAME.load(out, loaded.model)
    maps = explainer.attribute(torch.rand(2, 3, 32, 32), target=0)
    assert maps.shape == (2, 1, 32, 32) and torch.isfinite(maps).all()


@needs_zoo
def test_fit_ttame_takes_a_tree_whose_folders_are_not_the_models_classes(data, tmp_path):
    """T-TAME ignores labels, so a tree of other class names (ImageNet-style folders for a
    model with other classes) was refused as if the labels mattered."""
    tree = tmp_path / "tree"
    for name in ("n01440764", "n01443537"):
        shutil.copytree(data["flat"], tree / name)
    out = tmp_path / "t"
    args = ["fit", "ttame", "--model", "zoo:shapes-cnn", "--data", str(tree)]
    assert main([*args, "--out", str(out), "--epochs", "1", "--batch-size", "4", "-q"]) == 0
    assert json.loads(out.with_suffix(".json").read_text())["fit_command"]["data"]["n"] == 12


@needs_zoo
def test_relative_out_and_a_folder_named_shapes(data, tmp_path, monkeypatch):
    """``--out NAME`` writes into the current folder (staged there, not in its parent), and
    ``--data shapes`` is the folder of that name (``explain --dataset shapes`` is the
    benchmark; fit trains on folders only)."""
    import shutil

    shutil.copytree(data["flat"], tmp_path / "shapes")
    monkeypatch.chdir(tmp_path)
    args = ["fit", "ttame", "--model", "zoo:shapes-cnn", "--data", "shapes", "--out", "rel"]
    assert main([*args, "--epochs", "1", "--batch-size", "3", "-q"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rel.json", "rel.safetensors", "shapes"]
    record = json.loads((tmp_path / "rel.json").read_text())
    assert record["fit_command"]["data"]["n"] == 6
    assert record["weights"]["file"] == "rel.safetensors"


@needs_zoo
def test_fit_mhex_on_an_imagefolder_tree(data, tmp_path):
    out = tmp_path / "cnn-mhex.safetensors"  # a suffix is dropped: the pair is cnn-mhex.*
    args = ["fit", "mhex", "--model", "zoo:shapes-cnn", "--data", str(data["tree"])]
    args += ["--val-data", str(data["tree"]), "--objective", "bce", "--head-weights", "0.5"]
    assert main([*args, "--out", str(out), "--epochs", "1", "--batch-size", "4", "-q"]) == 0
    record = json.loads((tmp_path / "cnn-mhex.json").read_text())
    assert record["training"]["loss"] == {
        "objective": "bce",
        "head_weights": [0.5] * 3,
        "targets": "labels",
    }
    assert "val_final" in record["training"]["history"][0]  # --val-data was scored
    assert record["fit_command"]["data"]["classes"] == sorted(SHAPES)
    explainer = MHEX.load(tmp_path / "cnn-mhex", _shapes_cnn().model)
    maps = explainer.attribute(torch.rand(2, 3, 32, 32), target=[0, 3])
    assert maps.shape == (2, 1, 32, 32) and torch.isfinite(maps).all()


@needs_zoo
def test_class_folders_are_labelled_with_the_model_class_of_their_name(data):
    """The folders sort as circle, plus, square, triangle; the labels are shapes-cnn's
    indices of those names (square 0, circle 1, triangle 2, plus 3), not the sorted order."""
    from captum_ext.cli.fit import _folder

    loaded = _shapes_cnn()
    index = _folder("--data", str(data["tree"]), loaded, "mhex", "index")
    onehot = _folder("--data", str(data["tree"]), loaded, "mhex", "onehot")
    images = _folder("--data", str(data["tree"]), loaded, "ttame", "none")
    for i, file in enumerate(index.data.files):
        image, label = index[i]
        assert label == SHAPES.index(file.parent.name)
        assert onehot[i][1].tolist() == [float(k == label) for k in range(4)]
        assert torch.equal(images[i], image) and image.shape == (3, 32, 32)
    assert len(index) == len(images) == 8


@needs_zoo
def test_mhex_refuses_a_folder_without_labels_in_one_line(data, tmp_path, capsys):
    out = tmp_path / "mhex"
    args = ["fit", "mhex", "--model", "zoo:shapes-cnn", "--data", str(data["flat"])]
    assert main([*args, "--out", str(out), "-q"]) == 2
    _one_line_error(capsys, f"--data {data['flat']}", "MHEX trains on labels", "ImageFolder")
    assert list(tmp_path.iterdir()) == []


@needs_zoo
def test_fit_mhex_on_the_models_own_predictions_takes_any_folder(data, tmp_path):
    out = tmp_path / "mhex"
    args = ["fit", "mhex", "--model", "zoo:shapes-cnn", "--data", str(data["flat"])]
    args += ["--val-data", str(data["flat"]), "--targets", "predictions", "--objective", "bce"]
    assert main([*args, "--out", str(out), "--epochs", "1", "--batch-size", "4", "-q"]) == 0
    record = json.loads((tmp_path / "mhex.json").read_text())
    assert record["training"]["loss"]["targets"] == "predictions"
    last = record["training"]["history"][-1]
    assert last["agreement"] == 1.0 and last["val_final"] == 1.0
    explainer = MHEX.load(out, _shapes_cnn().model)
    assert explainer.attribute(torch.rand(2, 3, 32, 32), target=[0, 3]).shape == (2, 1, 32, 32)


# --- resume, existing output, errors --------------------------------------------------------


@needs_zoo
def test_resume_after_an_interrupt_trains_only_the_epoch_left(data, tmp_path, monkeypatch, capsys):
    """An interrupt after epoch 1 of 2 writes no output (only the epoch checkpoint);
    ``--resume`` trains epoch 2 from it and gives the uninterrupted run's explainer."""
    from captum_ext.explainers import _training

    two = ["--epochs", "2", "--overwrite"]
    assert main(_ttame(data, tmp_path / "whole", *two)) == 0

    save = _training._save

    def save_then_stop(directory, epoch, *args, **kwargs):
        save(directory, epoch, *args, **kwargs)
        if epoch == 1:
            raise KeyboardInterrupt

    ckpt = tmp_path / "ckpt"
    out = tmp_path / "out" / "resumed"
    resumable = [*two, "--checkpoint-dir", str(ckpt), "--keep-checkpoints", "1", "--resume"]
    monkeypatch.setattr(_training, "_save", save_then_stop)
    assert main(_ttame(data, out, *resumable)) == 130
    assert "interrupted" in capsys.readouterr().err
    assert not out.parent.exists()  # nothing written, no staging folder
    assert sorted(p.name for p in ckpt.iterdir()) == ["epoch-001.json", "epoch-001.safetensors"]
    first = json.loads((ckpt / "epoch-001.json").read_text())["history"]

    monkeypatch.setattr(_training, "_save", save)
    assert main(_ttame(data, out, *resumable)) == 0
    assert sorted(p.name for p in ckpt.iterdir()) == ["epoch-002.json", "epoch-002.safetensors"]
    history = json.loads(out.with_suffix(".json").read_text())["fit_command"]["history"]
    assert [h["epoch"] for h in history] == [1, 2]
    assert history[0] == first[0]  # epoch 1 was read back, not trained again (same time_s)
    whole = load_file(tmp_path / "whole.safetensors")
    resumed = load_file(out.with_suffix(".safetensors"))
    assert whole.keys() == resumed.keys()
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)


@needs_zoo
def test_existing_out_is_refused_unless_overwrite(data, tmp_path, capsys):
    out = tmp_path / "ttame"
    assert main(_ttame(data, out)) == 0
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    capsys.readouterr()
    assert main(_ttame(data, out, "--seed", "1")) == 2
    _one_line_error(capsys, f"{out}.safetensors exists", "--overwrite")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before

    out.with_suffix(".safetensors").unlink()  # half a pair is refused as well
    assert main(_ttame(data, out, "--seed", "1")) == 2
    _one_line_error(capsys, f"{out}.json exists")

    assert main(_ttame(data, out, "--seed", "1", "--overwrite")) == 0
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["fit_command"]["recipe"]["seed"] == 1
    assert out.with_suffix(".safetensors").is_file()


@needs_zoo
@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--ce-weight", "-1"], "--ce-weight must be a finite number >= 0"),
        (["--lr", "0"], "--lr must be a finite number > 0"),
        (["--resume"], "--resume needs --checkpoint-dir"),
        (["--momentum", "0"], "got --momentum 0.0 (pass --no-nesterov"),
    ],
)
def test_option_errors_are_one_line_in_flags_and_write_nothing(
    data, tmp_path, capsys, extra, needle
):
    out = tmp_path / "out" / "ttame"
    assert main(_ttame(data, out, *extra)) == 2
    line = _one_line_error(capsys, needle)
    assert "TrainingRecipe" not in line and "TTAME.fit" not in line
    assert not out.parent.exists()


@needs_zoo
def test_an_error_while_writing_leaves_nothing(data, tmp_path, monkeypatch):
    """The pair is written into a staging folder: a failure half-way leaves neither file."""
    out = tmp_path / "out" / "ttame"
    out.parent.mkdir()
    save = TTAME.save

    def save_then_fail(self, path, extra=None):
        save(self, path, extra)
        assert Path(f"{path}.safetensors").is_file()
        raise OSError("disk full")

    monkeypatch.setattr(TTAME, "save", save_then_fail)
    with pytest.raises(OSError, match="disk full"):
        main(_ttame(data, out))
    assert list(out.parent.iterdir()) == []
    _no_staging(tmp_path)


@needs_zoo
def test_unknown_folder_and_text_model_are_one_line_errors(data, tmp_path, capsys):
    out = tmp_path / "ttame"
    args = ["fit", "ttame", "--model", "zoo:shapes-cnn", "--out", str(out), "-q"]
    assert main([*args, "--data", str(tmp_path / "nope")]) == 2
    _one_line_error(capsys, f"--data {tmp_path / 'nope'}: no such folder")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([*args, "--data", str(empty)]) == 2
    _one_line_error(capsys, "no images")
    assert main(["fit", "ttame", "--model", "zoo:text-bert", "--data", str(data["flat"]),
                 "--out", str(out), "-q"]) == 2  # fmt: skip
    _one_line_error(capsys, "text model")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


# --- one source for the flags and the Python options ---------------------------------------


def _keyword_params(fn) -> dict[str, inspect.Parameter]:
    params = inspect.signature(fn).parameters
    return {k: p for k, p in params.items() if k not in fo.EXCLUDED["fit"]}


@pytest.mark.parametrize("explainer, cls", [("ttame", TTAME), ("mhex", MHEX)])
def test_flags_are_the_python_signature(explainer, cls):
    """The flags come from the source; here they are checked against the live signature
    of ``fit`` and the fields of ``TrainingRecipe``: a new, renamed or re-defaulted option
    fails this test until the command takes it."""
    opts = {o.name: o for o in fo.options(explainer)}
    fit = _keyword_params(cls.fit)
    fields = {f.name: f for f in dataclasses.fields(TrainingRecipe)}
    assert fo.EXCLUDED["fit"] <= set(inspect.signature(cls.fit).parameters)  # no stale names
    assert fo.EXCLUDED["recipe"] <= set(fields)
    recipe = {k: f for k, f in fields.items() if k not in fo.EXCLUDED["recipe"]}
    assert [o.name for o in opts.values() if o.owner == "recipe"] == list(recipe)
    assert [o.name for o in opts.values() if o.owner == "fit"] == list(fit)

    hints = {
        **typing.get_type_hints(TrainingRecipe),
        **typing.get_type_hints(cls.fit),
    }
    for name, opt in opts.items():
        default = recipe[name].default if opt.owner == "recipe" else fit[name].default
        assert opt.default == default and type(opt.default) is type(default), name
        assert opt.help, f"{name} has no docstring entry"
        hint = hints[name]
        args = {hint} if typing.get_origin(hint) is typing.Literal else set(typing.get_args(hint))
        args = args or {hint}
        if opt.kind == "choice":
            literal = next(a for a in args if typing.get_origin(a) is typing.Literal)
            assert opt.choices == typing.get_args(literal), name
        else:
            expected = {"bool": bool, "int": int, "float": float, "floats": float, "path": str}
            assert expected[opt.kind] in args, (name, args)

    defaults = cls.default_recipe
    assert fo.recipe_defaults()[explainer] == {
        k: getattr(defaults, k) for k in ("epochs", "batch_size", "lr")
    }


def test_given_flags_become_the_python_values_and_others_stay_unset():
    argv = ["fit", "mhex", "--model", "zoo:x", "--data", "d", "--out", "o", "--lr", "0.1"]
    argv += ["--no-nesterov", "--amp", "--objective", "bce", "--head-weights", "1", "0.5", "2"]
    argv += ["--checkpoint-dir", "ck", "--keep-checkpoints", "2", "--train-backbone"]
    args = build_parser().parse_args(argv)
    assert fo.chosen(args, "mhex", "recipe") == {
        "lr": 0.1,
        "nesterov": False,
        "amp": True,
        "checkpoint_dir": "ck",
        "keep_checkpoints": 2,
    }
    assert fo.chosen(args, "mhex", "fit") == {
        "objective": "bce",
        "head_weights": [1.0, 0.5, 2.0],
        "train_backbone": True,
    }
    TrainingRecipe(**fo.chosen(args, "mhex", "recipe"))  # the values are the recipe's types


def test_library_messages_name_the_flags():
    line = "TrainingRecipe: resume=True needs checkpoint_dir."
    assert fo.to_flags(line, "ttame") == "--resume needs --checkpoint-dir."
    line = "TrainingRecipe: nesterov=True needs momentum > 0; got momentum=0 (pass nesterov=False)"
    assert fo.to_flags(line, "ttame") == (
        "--nesterov needs momentum > 0; got --momentum 0 (pass --no-nesterov)"
    )
    line = "MHEX.fit: head_weights has 2 values for 3 heads"
    assert fo.to_flags(line, "mhex") == "--head-weights has 2 values for 3 heads"


# fit --help and usage errors import no torch: tests/test_cli.py::test_help_and_usage_errors_import_no_torch


def test_fit_help_lists_every_option_with_its_default():
    import argparse

    from captum_ext.cli.fit import add_parser

    sub = argparse.ArgumentParser(prog="captum-ext").add_subparsers()
    fit = add_parser(sub)
    text = fit._subparsers._group_actions[0].choices["ttame"].format_help()
    for opt in fo.options("ttame"):
        assert opt.flag in text, opt.flag
    assert "(default for ttame: 8)" in text  # --epochs: T-TAME's own recipe
    assert "--ce-weight X" in text and "(default: 1.5)" in text
    assert "checkpoint_dir" not in text  # Python names in the help are spelled as flags
    assert "examples:" in fit.format_help()


# --- torchrun ------------------------------------------------------------------------------


@pytest.mark.e2e
@needs_zoo
def test_fit_under_torchrun_trains_as_one_process_and_rank_0_writes(data, tmp_path):
    """Two gloo ranks on CPU, the global batch split over them: the explainer rank 0 writes
    equals the one-process run's (up to float summation order)."""
    import torchrun_launch

    common = ["--model", "zoo:shapes-cnn", "--data", str(data["flat"]), "--epochs", "2"]
    common += ["--batch-size", "2", "-q"]
    assert main(["fit", "ttame", *common, "--out", str(tmp_path / "one")]) == 0
    torchrun_launch.run_two_ranks(
        "-m", "captum_ext.cli", "fit", "ttame", *common, "--out", tmp_path / "two"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "one.json",
        "one.safetensors",
        "two.json",
        "two.safetensors",
    ]
    one, two = load_file(tmp_path / "one.safetensors"), load_file(tmp_path / "two.safetensors")
    assert one.keys() == two.keys()
    for k in one:
        assert torch.allclose(one[k].double(), two[k].double(), atol=1e-5, rtol=1e-4), k
    history = json.loads((tmp_path / "two.json").read_text())["fit_command"]["history"]
    assert [h["images"] for h in history] == [6, 6]


def test_torchrun_passes_every_fit_flag_through():
    """torchrun's own parser takes an option of the launched command that abbreviates one of
    its own (``--n`` for ``--nnodes``); every flag of ``fit`` reaches the command."""
    from torch.distributed.run import get_args_parser

    for explainer in fo.EXPLAINERS:
        flags = [o.flag for o in fo.options(explainer)]
        flags += ["--no-" + o.flag[2:] for o in fo.options(explainer) if o.kind == "bool"]
        flags += ["--model", "--weights", "--model-kwargs", "--labels", "--data", "--val-data"]
        flags += ["--out", "--overwrite", "--device", "--quiet", "-q"]
        argv = ["--nproc-per-node", "2", "-m", "captum_ext.cli", "fit", explainer, *flags]
        args = get_args_parser().parse_args(argv)
        assert args.training_script_args == ["fit", explainer, *flags]
