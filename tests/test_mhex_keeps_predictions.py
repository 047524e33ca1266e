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
import torch

from captum_ext import MHEX, TrainingRecipe
from captum_ext.explainers._mhex_network import _same_prediction, mhex_step

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
    assert _same_prediction(a, b, "ce").tolist() == [True, False, True, False]
    # bce: sets {0,2},{0,1},{2},{0,1,2} vs {0},{0,1},{2},{0,1,2}
    assert _same_prediction(a, b, "bce").tolist() == [False, True, True, True]


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
