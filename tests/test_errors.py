"""Bad input gets a clear error naming what was wrong and what is supported."""

from __future__ import annotations

import pytest
import torch
import torchvision
from method_table import METHODS
from tiny_models import IMAGE_MODELS, TEXT_MODELS, build, make_inputs

from captum_ext import CDAM, AttentionMap, UnsupportedModelError, adapter_for

VIT = IMAGE_MODELS[0]
BERT = TEXT_MODELS[0]


@pytest.mark.parametrize("method", METHODS, ids=[m.name for m in METHODS])
def test_resnet_is_rejected_with_supported_families(method):
    model = torchvision.models.resnet18(num_classes=3)
    with pytest.raises(UnsupportedModelError, match=r"got ResNet \(CNN .*\)\. Supported: .*timm"):
        method.make(model)


def test_non_module_is_rejected():
    with pytest.raises(UnsupportedModelError, match=r"torch\.nn\.Module"):
        CDAM(lambda x: x)


@pytest.mark.parametrize("target", [5, -1, [0, 9, 1]])
def test_target_out_of_range(target):
    model = build(VIT)
    x, _ = make_inputs(VIT)
    with pytest.raises(ValueError, match="out of range for a model with 5 outputs"):
        CDAM(model).attribute(x, target=target)


def test_wrong_number_of_targets():
    model = build(VIT)
    x, _ = make_inputs(VIT, batch=3)
    with pytest.raises(ValueError, match="got 2 targets for a batch of 3"):
        CDAM(model).attribute(x, target=[0, 1])


def test_float_target_rejected():
    model = build(VIT)
    x, _ = make_inputs(VIT, batch=2)
    with pytest.raises(ValueError, match="integer class indices"):
        CDAM(model).attribute(x, target=torch.tensor([0.0, 1.0]))


@pytest.mark.parametrize("method", METHODS, ids=[m.name for m in METHODS])
def test_image_size_not_divisible_by_patch(method):
    case = next(c for c in IMAGE_MODELS if c.name == "timm_dynamic")
    model = build(case)
    x = torch.randn(1, 3, 30, 32, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"30x32 is not divisible by the patch size 8x8"):
        method.make(model).attribute(x, target=0)


def test_fixed_size_model_names_its_size():
    model = build(VIT)
    with pytest.raises(ValueError, match="built for 32x32 images; got 40x40"):
        CDAM(model).attribute(torch.randn(1, 3, 40, 40, dtype=torch.float64), target=0)


def test_dynamic_size_model_accepts_other_sizes():
    case = next(c for c in IMAGE_MODELS if c.name == "timm_dynamic")
    model = build(case)
    out = CDAM(model).attribute(torch.randn(1, 3, 16, 40, dtype=torch.float64), target=0)
    assert out.shape == (1, 1, 16, 40)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("method", METHODS, ids=[m.name for m in METHODS])
def test_nan_and_inf_input(method, bad):
    model = build(VIT)
    x, _ = make_inputs(VIT)
    x[0, 0, 3, 3] = bad
    with pytest.raises(ValueError, match="NaN or inf"):
        method.make(model).attribute(x, target=0)


def test_wrong_rank_and_dtype():
    model = build(VIT)
    with pytest.raises(ValueError, match=r"expects images \(B, C, H, W\)"):
        CDAM(model).attribute(torch.randn(3, 32, 32, dtype=torch.float64), target=0)
    with pytest.raises(ValueError, match="floating point"):
        CDAM(model).attribute(torch.zeros(1, 3, 32, 32, dtype=torch.long), target=0)
    text = build(BERT)
    ids, extra = make_inputs(BERT)
    with pytest.raises(ValueError, match="integer input_ids"):
        CDAM(text).attribute(ids.double(), target=0, additional_forward_args=extra)
    with pytest.raises(ValueError, match=r"expects input_ids \(B, T\)"):
        CDAM(text).attribute(ids[0], target=0)


def test_tuple_of_several_inputs_rejected():
    model = build(VIT)
    x, _ = make_inputs(VIT)
    with pytest.raises(ValueError, match="additional_forward_args"):
        CDAM(model).attribute((x, x), target=0)


def test_layer_not_in_model():
    model = build(VIT)
    with pytest.raises(ValueError, match="not a submodule"):
        CDAM(model, layer=torch.nn.Linear(2, 2))


def test_unused_layer_is_reported():
    model = build(VIT)
    x, _ = make_inputs(VIT)
    model.unused = torch.nn.Identity()
    with pytest.raises(RuntimeError, match="was not called"):
        CDAM(model, layer=model.unused).attribute(x, target=0)


def test_bad_output_and_variant():
    model = build(VIT)
    x, _ = make_inputs(VIT)
    with pytest.raises(ValueError, match="output must be one of"):
        CDAM(model).attribute(x, target=0, output="pixels")
    with pytest.raises(ValueError, match="variant must be"):
        CDAM(model, variant="fancy")
    with pytest.raises(ValueError, match="heads must be"):
        AttentionMap(model, heads="max")
    with pytest.raises(ValueError, match="readout must be"):
        adapter_for(model, readout="pool")


def test_inference_mode_is_explained():
    model = build(VIT)
    x, _ = make_inputs(VIT)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        CDAM(model).attribute(x, target=0)
