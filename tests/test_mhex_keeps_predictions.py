"""MHEX keeps the model's predictions: a short default fit on an ImageNet-shaped CNN.

The model is timm's ResNet-18 with 1000 classes, randomly initialised with a fixed seed (no
pretrained weights offline) and its residual branches active (``zero_init_last=False``, so
that its features have the scale of a trained network's), at 112 x 112 inputs. With the gates
in the frozen model's path (``gated_backbone=True``) the default recipe (peak lr 0.05) for one
epoch in batches of 4 on 8 images lets the untrained 1000-class heads swing the gates until
most images change class; the default (``gated_backbone=False``) cannot change a prediction.
"""

from __future__ import annotations

import warnings

import pytest
import tiny_models
import torch
from method_table import TINY_CNN

from captum_ext import MHEX, TrainingRecipe
from captum_ext.adapters import adapter_for
from captum_ext.explainers._mhex_network import _correct, mhex_step, predicted_targets

timm = pytest.importorskip("timm")


@pytest.fixture(scope="module")
def data():
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=1000, zero_init_last=False).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 3, 112, 112, generator=g)
    held_out = torch.randn(8, 3, 112, 112, generator=g)
    y = torch.randint(0, 1000, (8,), generator=g)
    return model, x, held_out, y


def _agreement(mhex, model, x):
    with torch.no_grad():
        return (mhex.network(x).argmax(1) == model(x).argmax(1)).float().mean().item()


def _fit(model, x, y, mhex_kw=None, **recipe):
    torch.manual_seed(2)
    mhex = MHEX(model, **(mhex_kw or {}))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = mhex.fit(
            (x, y), TrainingRecipe(epochs=1, batch_size=4, show_progress=False, **recipe)
        )
    return mhex, history, [str(w.message) for w in caught if "predicts what" in str(w.message)]


def test_default_fit_keeps_the_models_scores_on_fitted_and_held_out_images(data):
    model, x, held_out, y = data
    mhex, history, warned = _fit(model, x, y)
    assert len(history) == 1 and history[-1]["steps"] == 2
    assert history[-1]["agreement"] == 1.0 and not warned
    with torch.no_grad():
        for images in (x, held_out):  # by construction: the very same scores
            assert torch.equal(mhex.network(images), model(images))
    # and the gates and heads did learn
    assert not torch.equal(mhex.network.gates[0].conv.bias, torch.full((1,), 3.0))


def test_gates_in_the_frozen_path_change_predictions_and_fit_says_so_in_one_line(data):
    model, x, held_out, y = data
    mhex, history, warned = _fit(model, x, y, {"gated_backbone": True})
    measured = _agreement(mhex, model, x)
    assert measured < 0.99 and _agreement(mhex, model, held_out) < 0.99
    assert history[-1]["agreement"] < 0.99  # the epoch's mean, before each step's update
    assert len(warned) == 1 and "\n" not in warned[0]
    assert f"{history[-1]['agreement']:.1%}" in warned[0] and "gated_backbone=False" in warned[0]


def test_agreement_is_the_share_of_same_class_or_same_set():
    a = torch.tensor([[2.0, -1.0, 0.5], [0.1, 0.3, -2.0], [-1.0, -1.0, 3.0], [1.0, 1.0, 1.0]])
    b = torch.tensor([[1.0, -3.0, -0.5], [0.2, 0.1, -1.0], [-2.0, -1.0, 1.0], [1.0, 2.0, 3.0]])
    # ce: argmax 0,1,2,0 vs 0,0,2,2 -> same, differ, same, differ
    assert predicted_targets(b, "ce").tolist() == [0, 0, 2, 2]
    assert _correct(a, predicted_targets(b, "ce"), "ce").item() == 2
    # bce: sets {0,2},{0,1},{2},{0,1,2} vs {0},{0,1},{2},{0,1,2}
    assert predicted_targets(b, "bce").tolist() == [[1, 0, 0], [1, 1, 0], [0, 0, 1], [1, 1, 1]]
    assert _correct(a, predicted_targets(b, "bce"), "bce").item() == 3


def test_step_measures_agreement_against_the_plain_model_before_the_update(data):
    model, x, _, y = data
    mhex = MHEX(model, gated_backbone=True)
    with torch.no_grad():
        mhex.network.gates[0].conv.bias.fill_(-6.0)  # gate ~0.0025: layer2's features vanish
        plain = model(x[:4])
        gated = mhex.network(x[:4])
    want = (plain.argmax(1) == gated.argmax(1)).float().mean()
    terms = mhex_step(mhex.network, (x[:4], y[:4]), head_weights=[1.0] * 3, agreement=True)
    assert terms["agreement"].item() == pytest.approx(want.item(), abs=0)
    assert want < 1  # the check can fail: the gates changed a prediction


def test_training_the_backbone_fits_labels_and_reports_no_agreement(data):
    _, x, _, y = data
    mhex = MHEX(timm.create_model("resnet18", num_classes=1000).eval())
    history = mhex.fit(
        (x[:4], y[:4]), TrainingRecipe(epochs=1, batch_size=4, show_progress=False),
        train_backbone=True,
    )  # fmt: skip
    assert "agreement" not in history[-1]
    assert mhex.backbone_trained and mhex.training_record["train_backbone"]


# ---------------------------------------------------------------------------------------------
# no labels: the plain model's own predictions as targets


@pytest.mark.parametrize(
    "case", [TINY_CNN, tiny_models.IMAGE_MODELS[0], tiny_models.TEXT_MODELS[0]]
)
@pytest.mark.parametrize("objective", ["ce", "bce"])
@pytest.mark.parametrize("gated", [False, True])
def test_predictions_as_targets_are_the_plain_models_top1_or_set(case, objective, gated):
    model = tiny_models.build(case, torch.float64, 0)
    mhex = MHEX(model, gated_backbone=gated)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():  # gates that change the scores: the targets must be the plain ones
        for p in mhex.network.gates.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))
    x, extra = tiny_models.make_inputs(case, 5, torch.float64)
    with torch.no_grad():
        plain = adapter_for(model).forward(x, extra or None)
    want = plain.argmax(1) if objective == "ce" else (plain > 0).double()
    lam = [1.0] * len(mhex.stages)
    got = mhex_step(mhex.network, (x, *extra), objective=objective, head_weights=lam,
                    targets="predictions")  # fmt: skip
    ref = mhex_step(mhex.network, (x, *extra, want), objective=objective, head_weights=lam)
    assert got.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=0)


def test_fit_without_labels_explains_what_the_model_predicts(data):
    """A folder of unlabelled photos is enough: images only, or (images, anything) as an
    ImageFolder yields; validation scores the heads against the model's predictions."""
    model, x, held_out, y = data
    torch.manual_seed(3)
    mhex = MHEX(model)
    recipe = TrainingRecipe(epochs=1, batch_size=4, show_progress=False)
    history = mhex.fit(x, recipe, targets="predictions", val_data=held_out)
    assert history[-1]["steps"] == 2 and history[-1]["agreement"] == 1.0
    assert history[-1]["val_final"] == 1.0  # the network's scores are the model's
    assert 0.0 <= history[-1]["val_layer4"] <= 1.0
    assert mhex.training_record["loss"]["targets"] == "predictions"
    # labels after the images are ignored, as T-TAME ignores them
    torch.manual_seed(3)
    again = MHEX(model)
    other = again.fit((x, y), recipe, targets="predictions", val_data=(held_out, y))
    assert other[-1]["loss"] == history[-1]["loss"]
    with pytest.raises(ValueError, match="targets must be 'labels' or 'predictions'"):
        MHEX(model).fit(x, recipe, targets="model")
    with pytest.raises(ValueError, match="with train_backbone=True the model changes"):
        MHEX(model).fit(x, recipe, targets="predictions", train_backbone=True)
    with pytest.raises(TypeError, match="val_data must be image tensors"):
        MHEX(model).fit(x, recipe, targets="predictions", val_data="held-out/")
