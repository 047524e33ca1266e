"""``captum-ext explain`` / ``evaluate`` on CNNs: Captum references (gradcam, ig), trained
explainers (ttame, mhex) from the zoo or ``--explainer FILE``, and the one-line refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from captum_ext.cli import main

HERE = Path(__file__).resolve().parent


def _zoo_has(*names: str) -> bool:
    try:
        from captum_ext import zoo

        return set(names) <= set(zoo.available(kind="all"))
    except Exception:
        return False


needs_cnn_zoo = pytest.mark.skipif(
    not _zoo_has("shapes-cnn", "shapes-cnn-ttame", "shapes-cnn-mhex"),
    reason="zoo weights (captum_ext/zoo/weights/*.safetensors) are not present",
)

TINY_KWARGS = {"channels": [8, 8, 8, 8]}


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _one_line_error(capsys, expected: str) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("captum-ext") and expected in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def shapes_png(tmp_path_factory) -> tuple[Path, int]:
    """A two-object benchmark image as a PNG, and one of its classes."""
    from captum_ext.data import shapes

    batch = shapes(1, 11, min_objects=2)
    path = tmp_path_factory.mktemp("img") / "shapes.png"
    pixels = (batch.images[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    Image.fromarray(pixels).save(path)
    return path, int(batch.labels[0].nonzero()[0])


def _tiny_resnet(seed: int = 0) -> torch.nn.Module:
    import timm

    torch.manual_seed(seed)
    return timm.create_model("resnet10t", num_classes=3, pretrained=False, **TINY_KWARGS).eval()


@pytest.fixture(scope="module")
def tiny_cnn(tmp_path_factory) -> dict[str, Path]:
    """A tiny timm ResNet saved to a safetensors file, a T-TAME and an MHEX saved for it
    (``save`` as ``captum-ext fit`` writes them) and a T-TAME saved for other weights."""
    from safetensors.torch import save_file

    from captum_ext import MHEX, TTAME

    root = tmp_path_factory.mktemp("cnn")
    model = _tiny_resnet(0)
    save_file(model.state_dict(), str(root / "r10.safetensors"))
    ttame = TTAME(model).mark_fitted()
    with torch.no_grad():  # not the zero-ish initial maps: a map worth comparing
        for p in ttame.mechanism.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ttame.save(root / "r10-ttame")
    MHEX(model).mark_fitted().save(root / "r10-mhex")
    TTAME(_tiny_resnet(1)).mark_fitted().save(root / "other-ttame")
    return {
        "weights": root / "r10.safetensors",
        "ttame": root / "r10-ttame.safetensors",
        "mhex": root / "r10-mhex.json",
        "other": root / "other-ttame",
    }


def _tiny_args(tiny_cnn, image: Path, out: Path, *rest: str) -> list[str]:
    return [
        "explain",
        "--model",
        "timm:resnet10t",
        "--weights",
        str(tiny_cnn["weights"]),
        "--model-kwargs",
        json.dumps(TINY_KWARGS),
        "--image",
        str(image),
        "--out",
        str(out),
        "-q",
        *rest,
    ]


# --- zoo:shapes-cnn ----------------------------------------------------------------------------


@needs_cnn_zoo
def test_zoo_cnn_explains_with_trained_explainers_and_captum_references(tmp_path, shapes_png):
    from captum.attr import IntegratedGradients, LayerAttribution, LayerGradCam

    from captum_ext import zoo
    from captum_ext.models import load

    image, k = shapes_png
    out = tmp_path / "out"
    methods = ["ttame", "mhex", "gradcam", "ig"]
    args = ["--model", "zoo:shapes-cnn", "--image", str(image), "--method", *methods]
    assert (
        main(["explain", *args, "--target", str(k), "--ig-steps", "4", "-q", "--out", str(out)])
        == 0
    )
    pred = json.loads((out / "prediction.json").read_text())
    assert list(pred["methods"]) == methods
    assert pred["methods"]["ttame"]["explainer"] == "zoo:shapes-cnn-ttame"
    assert pred["methods"]["gradcam"]["group"] == "reference"
    assert pred["methods"]["mhex"]["group"] == "trained"
    maps = {m: np.load(out / f"shapes_{m}_class{k}.npy") for m in methods}
    for m in methods:
        assert maps[m].shape == (32, 32) and maps[m].dtype == np.float32, m
        assert np.isfinite(maps[m]).all() and np.abs(maps[m]).max() > 0, m
        assert (out / f"shapes_{m}_class{k}.png").is_file()

    # The rows are Captum's (and the zoo's) maps, computed directly on the same input.
    loaded = load("zoo:shapes-cnn")
    model = loaded.model
    with Image.open(image) as img:
        x = loaded.image_transform(img)[None]
    cam = LayerGradCam(model, model.layer4).attribute(x, target=k, relu_attributions=True)
    cam = LayerAttribution.interpolate(cam, (32, 32), "bilinear")[0, 0]
    np.testing.assert_allclose(maps["gradcam"], cam.detach().numpy(), rtol=1e-4, atol=1e-6)
    ig = IntegratedGradients(model).attribute(x, target=k, n_steps=4).sum(1)[0]
    np.testing.assert_allclose(maps["ig"], ig.detach().numpy(), rtol=1e-4, atol=1e-6)
    ttame = zoo.load("shapes-cnn-ttame").attribute(x, target=k)[0, 0]
    np.testing.assert_allclose(maps["ttame"], ttame.detach().numpy(), rtol=1e-4, atol=1e-6)


@needs_cnn_zoo
def test_method_all_on_a_cnn_runs_the_references_and_the_zoo_explainers(
    tmp_path, shapes_png, capsys
):
    image, _ = shapes_png
    out = tmp_path / "all"
    args = ["--model", "zoo:shapes-cnn", "--image", str(image), "--method", "all"]
    assert main(["explain", *args, "--ig-steps", "2", "-q", "--out", str(out)]) == 0
    pred = json.loads((out / "prediction.json").read_text())
    assert sorted(pred["methods"]) == ["gradcam", "ig", "mhex", "ttame"]
    assert "cdam" in capsys.readouterr().out  # the note names what was not run


@needs_cnn_zoo
def test_transformer_method_on_a_cnn_is_refused_naming_what_cnns_get(tmp_path, shapes_png, capsys):
    image, _ = shapes_png
    out = tmp_path / "x"
    args = ["--model", "zoo:shapes-cnn", "--image", str(image), "--method", "cdam"]
    assert main(["explain", *args, "--out", str(out)]) == 2
    line = _one_line_error(capsys, "CNNs get gradcam, ig")
    assert "ttame, mhex" in line
    assert not out.exists()


@needs_cnn_zoo
def test_reference_on_a_transformer_is_refused(tmp_path, shapes_png, capsys):
    image, _ = shapes_png
    out = tmp_path / "x"
    args = ["--model", "zoo:shapes-vit", "--image", str(image), "--method", "gradcam"]
    assert main(["explain", *args, "--out", str(out)]) == 2
    _one_line_error(capsys, "Captum reference for CNNs")
    assert not out.exists()


@needs_cnn_zoo
def test_zoo_vit_takes_its_zoo_ttame(tmp_path, shapes_png):
    image, k = shapes_png
    out = tmp_path / "vit"
    args = ["--model", "zoo:shapes-vit", "--image", str(image), "--method", "ttame", "mhex"]
    assert main(["explain", *args, "--target", str(k), "-q", "--out", str(out)]) == 0
    pred = json.loads((out / "prediction.json").read_text())
    assert pred["methods"]["mhex"]["explainer"] == "zoo:shapes-vit-mhex"
    assert np.load(out / f"shapes_ttame_class{k}.npy").shape == (32, 32)


# --- a timm CNN from a local weights file ------------------------------------------------------


def test_timm_cnn_with_references_and_an_explainer_file(tmp_path, shapes_png, tiny_cnn):
    from captum_ext import TTAME
    from captum_ext.models import load

    image, _ = shapes_png
    out = tmp_path / "out"
    rest = ["--method", "gradcam", "ig", "ttame", "--ig-steps", "2"]
    rest += ["--explainer", str(tiny_cnn["ttame"]), "--target", "2"]
    assert main(_tiny_args(tiny_cnn, image, out, *rest)) == 0
    pred = json.loads((out / "prediction.json").read_text())
    assert pred["methods"]["ttame"]["explainer"] == str(tiny_cnn["ttame"])
    loaded = load("timm:resnet10t", tiny_cnn["weights"], model_kwargs=TINY_KWARGS)
    size = loaded.input_size
    for m in ("gradcam", "ig", "ttame"):
        assert np.load(out / f"shapes_{m}_class2.npy").shape == size, m
    with Image.open(image) as img:
        x = loaded.image_transform(img)[None]
    expected = TTAME.load(tiny_cnn["ttame"], loaded.model).attribute(x, target=2)[0, 0]
    np.testing.assert_allclose(
        np.load(out / "shapes_ttame_class2.npy"), expected.detach().numpy(), rtol=1e-4, atol=1e-6
    )


def test_explainer_files_are_told_apart_by_their_record(tmp_path, shapes_png, tiny_cnn):
    image, _ = shapes_png
    out = tmp_path / "out"
    files = [str(tiny_cnn["mhex"]), str(tiny_cnn["ttame"])]
    rest = ["--method", "ttame", "mhex", "--explainer", *files]
    assert main(_tiny_args(tiny_cnn, image, out, *rest)) == 0
    pred = json.loads((out / "prediction.json").read_text())
    assert pred["methods"]["mhex"]["explainer"] == str(tiny_cnn["mhex"])
    assert pred["methods"]["ttame"]["explainer"] == str(tiny_cnn["ttame"])


def test_explainer_file_of_another_model_is_refused(tmp_path, shapes_png, tiny_cnn, capsys):
    image, _ = shapes_png
    out = tmp_path / "out"
    rest = ["--method", "ttame", "--explainer", str(tiny_cnn["other"])]
    assert main(_tiny_args(tiny_cnn, image, out, *rest)) == 2
    _one_line_error(capsys, "belongs to another model")
    assert not out.exists()


@needs_cnn_zoo
def test_explainer_file_of_another_architecture_is_refused(tmp_path, shapes_png, tiny_cnn, capsys):
    image, _ = shapes_png
    out = tmp_path / "out"
    args = ["--model", "zoo:shapes-cnn", "--image", str(image), "--method", "ttame"]
    assert main(["explain", *args, "--explainer", str(tiny_cnn["ttame"]), "--out", str(out)]) == 2
    _one_line_error(capsys, "belongs to another model")
    assert not out.exists()


def test_explainer_file_for_a_method_not_asked_for_is_refused(
    tmp_path, shapes_png, tiny_cnn, capsys
):
    image, _ = shapes_png
    out = tmp_path / "out"
    rest = ["--method", "gradcam", "--explainer", str(tiny_cnn["mhex"])]
    assert main(_tiny_args(tiny_cnn, image, out, *rest)) == 2
    _one_line_error(capsys, "add --method mhex")
    assert not out.exists()


def test_explainer_that_is_not_a_file_is_refused(tmp_path, shapes_png, tiny_cnn, capsys):
    image, _ = shapes_png
    out = tmp_path / "out"
    rest = ["--method", "ttame", "--explainer", str(tmp_path / "nope.safetensors")]
    assert main(_tiny_args(tiny_cnn, image, out, *rest)) == 2
    _one_line_error(capsys, "no such file")
    assert not out.exists()


def test_ttame_on_a_model_without_a_fitted_one_names_captum_ext_fit(
    tmp_path, shapes_png, tiny_cnn, capsys
):
    image, _ = shapes_png
    out = tmp_path / "out"
    assert main(_tiny_args(tiny_cnn, image, out, "--method", "ttame")) == 2
    line = _one_line_error(capsys, "must be fitted first")
    assert "captum-ext fit ttame --model timm:resnet10t" in line and "--explainer FILE" in line
    assert not out.exists()


def test_method_all_on_a_timm_cnn_runs_the_references_and_says_what_to_fit(
    tmp_path, shapes_png, tiny_cnn, capsys
):
    image, _ = shapes_png
    out = tmp_path / "out"
    assert main(_tiny_args(tiny_cnn, image, out, "--method", "all", "--ig-steps", "2")) == 0
    assert sorted(json.loads((out / "prediction.json").read_text())["methods"]) == ["gradcam", "ig"]
    assert "captum-ext fit" in capsys.readouterr().out


def test_torchvision_cnn_from_a_local_file(tmp_path, shapes_png):
    import torchvision
    from safetensors.torch import save_file

    torch.manual_seed(0)
    weights = tmp_path / "tv.safetensors"
    save_file(torchvision.models.resnet18(num_classes=3).state_dict(), str(weights))
    image, _ = shapes_png
    out = tmp_path / "out"
    args = ["--model", "torchvision:resnet18", "--weights", str(weights), "--image", str(image)]
    assert main(["explain", *args, "--method", "gradcam", "-q", "--out", str(out)]) == 0
    pred = json.loads((out / "prediction.json").read_text())
    assert pred["preprocessing"]["crop"] == [224]
    assert len(pred["inputs"][0]["top"]) == 3
    assert np.load(next(out.glob("shapes_gradcam_class*.npy"))).shape == (224, 224)


# --- evaluate ------------------------------------------------------------------------------------


@needs_cnn_zoo
def test_evaluate_shapes_cnn_with_gradcam_and_ttame(tmp_path):
    out = tmp_path / "eval"
    args = ["--models", "shapes-cnn", "--methods", "gradcam", "ttame", "--n", "4"]
    assert main(["evaluate", *args, "--bootstrap", "10", "-q", "--out", str(out)]) == 0
    rows = json.loads((out / "metrics.json").read_text())["rows"]
    methods = {r["method"] for r in rows}
    assert {"gradcam", "ttame"} <= methods and "mhex" not in methods
    assert "Captum GradCAM" in (out / "metrics.md").read_text()


@needs_cnn_zoo
def test_evaluate_refuses_a_transformer_method_on_the_cnn(tmp_path, capsys):
    out = tmp_path / "eval"
    assert main(["evaluate", "--models", "shapes-cnn", "--methods", "cdam", "--out", str(out)]) == 2
    _one_line_error(capsys, "CNNs get gradcam, ig")
    assert not out.exists()


# --- the references as a library ------------------------------------------------------------


def test_references_leave_the_model_as_it_was_and_refuse_transformers():
    from tiny_models import timm_vit

    from captum_ext.errors import UnsupportedModelError
    from captum_ext.references import GradCAM, IntegratedGradientsMap

    model = _tiny_resnet().train()
    x = torch.rand(2, 3, 32, 32)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    maps = GradCAM(model).attribute(x, target=torch.tensor([0, 2]))
    assert maps.shape == (2, 1, 32, 32) and (maps >= 0).all()
    assert IntegratedGradientsMap(model, n_steps=2).attribute(x, target=1).shape == (2, 1, 32, 32)
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert not any(m._forward_hooks or m._backward_hooks for m in model.modules())
    with pytest.raises(UnsupportedModelError, match="Captum reference for CNNs"):
        GradCAM(timm_vit())
    with pytest.raises(ValueError, match="n_steps"):
        IntegratedGradientsMap(model, n_steps=0)
