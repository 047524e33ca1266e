"""CNN adapter: detection by structure, preset feature layers, layer checks, hooks removed."""

from __future__ import annotations

import functools
import re

import pytest
import timm
import torch
import torchvision
from method_table import METHODS
from tiny_models import ALL_MODELS, IMAGE_MODELS, build
from torch import nn

from captum_ext import UnsupportedModelError, adapter_for, zoo
from captum_ext.adapters import CNNAdapter, TransformerAdapter
from captum_ext.adapters.base import _REGISTRY
from captum_ext.capture import check_feature_layers, layer_shapes
from captum_ext.evaluation._maps import model_grid

NUM_CLASSES = 3
SIZE = 64

# name -> (builder, preset layers)
CNNS = {
    "tv_resnet18": (lambda: torchvision.models.resnet18(num_classes=NUM_CLASSES), "layer"),
    "tv_resnet50": (lambda: torchvision.models.resnet50(num_classes=NUM_CLASSES), "layer"),
    "tv_vgg16": (
        lambda: torchvision.models.vgg16(num_classes=NUM_CLASSES),
        ["features.16", "features.23", "features.30"],
    ),
    "tv_efficientnet_b0": (
        lambda: torchvision.models.efficientnet_b0(num_classes=NUM_CLASSES),
        ["features.3", "features.5", "features.7"],
    ),
    "timm_resnet18": (lambda: timm.create_model("resnet18", num_classes=NUM_CLASSES), "layer"),
    "timm_efficientnet_b0": (
        lambda: timm.create_model("efficientnet_b0", num_classes=NUM_CLASSES),
        ["blocks.2", "blocks.4", "blocks.6"],
    ),
    "timm_convnext_atto": (
        lambda: timm.create_model("convnext_atto", num_classes=NUM_CLASSES),
        ["stages.1", "stages.2", "stages.3"],
    ),
    "timm_vgg11": (
        lambda: timm.create_model("vgg11", num_classes=NUM_CLASSES),
        ["features.10", "features.15", "features.20"],
    ),
}
RESNET_PRESET = ["layer2", "layer3", "layer4"]


@functools.cache
def _cnn(name: str) -> nn.Module:
    """The named CNN, seeded, random weights, eval mode (built once per session)."""
    if name == "zoo":
        return zoo.load("shapes-cnn").eval()
    torch.manual_seed(0)
    return CNNS[name][0]().eval()


def _images(size: int = SIZE, batch: int = 2) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(0))


def _hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


# ---------------------------------------------------------------------------- detection
@pytest.mark.parametrize("name", [*CNNS, "zoo"])
def test_cnn_is_detected_with_its_preset(name):
    model = _cnn(name)
    adapter = adapter_for(model)
    assert type(adapter) is CNNAdapter
    assert (adapter.kind, adapter.modality, adapter.prefix) == ("cnn", "image", "")
    assert adapter.model is model
    expected = CNNS[name][1] if name in CNNS else "layer"
    assert adapter.default_feature_layers() == (RESNET_PRESET if expected == "layer" else expected)


@pytest.mark.parametrize("name", [*CNNS, "zoo"])
def test_preset_feature_maps_are_three_maps_shallow_to_deep(name):
    model = _cnn(name)
    adapter = adapter_for(model)
    size = 32 if name == "zoo" else SIZE
    x = _images(size)
    points = check_feature_layers(adapter, x, None, "T-TAME")
    names = adapter.default_feature_layers()
    assert [p.name for p in points] == names
    modules = dict(model.named_modules())
    assert all(p.module is modules[n] and p.where == "output" for p, n in zip(points, names))
    shapes = [s for _, s in layer_shapes(adapter, x[:1], names)]
    assert all(s is not None and len(s) == 4 and s[0] == 1 for s in shapes)
    sides = [s[-1] for s in shapes]
    if name == "zoo":  # stride-1 stem, no max-pool: strides 2, 4, 8
        assert sides == [16, 8, 4]
    else:  # strides 8, 16, 32
        assert sides == [SIZE // 8, SIZE // 16, SIZE // 32]


def test_forward_and_input_checks():
    adapter = adapter_for(_cnn("tv_resnet18"))
    x = _images()
    assert adapter.forward(x).shape == (2, NUM_CLASSES)
    with pytest.raises(ValueError, match=r"expects images \(B, C, H, W\)"):
        adapter.check_inputs(x[0], "T-TAME")


def test_cnns_come_after_the_transformer_adapters():
    assert _REGISTRY[-1] is CNNAdapter
    assert all(issubclass(cls, TransformerAdapter) for cls in _REGISTRY[:-1])


@pytest.mark.parametrize("case", ALL_MODELS, ids=[c.name for c in ALL_MODELS])
def test_no_transformer_is_a_cnn(case):
    model = build(case, dtype=torch.float32)
    assert not CNNAdapter.matches(model)
    assert not isinstance(adapter_for(model), CNNAdapter)


def test_conv_stem_vit_is_not_a_cnn():
    model = zoo.load("shapes-vit")  # a timm ViT whose patch embedding is a stack of Conv2d
    assert any(isinstance(m, nn.Conv2d) for m in model.modules())
    assert not CNNAdapter.matches(model)


class _ConvAttention(nn.Module):
    """A torchvision-like ``features`` + ``classifier`` layout that also holds attention."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU())
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.classifier = nn.Linear(8, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.features(x).flatten(2).transpose(1, 2)
        return self.classifier(self.attn(t, t, t)[0].mean(1))


def test_models_with_attention_or_hf_models_are_not_cnns():
    from transformers import ResNetConfig, ResNetForImageClassification

    assert not CNNAdapter.matches(_ConvAttention())
    hf = ResNetForImageClassification(
        ResNetConfig(embedding_size=8, hidden_sizes=[8] * 4, depths=[1] * 4, num_labels=3)
    )
    assert not CNNAdapter.matches(hf)
    with pytest.raises(UnsupportedModelError):
        adapter_for(hf)


def test_wrapped_cnn_names_carry_the_wrapper_prefix():
    torch.manual_seed(0)
    model = nn.Sequential(nn.BatchNorm2d(3), torchvision.models.resnet18(num_classes=3)).eval()
    adapter = adapter_for(model)
    assert type(adapter) is CNNAdapter and adapter.prefix == "1"
    assert adapter.default_feature_layers() == ["1.layer2", "1.layer3", "1.layer4"]
    assert len(check_feature_layers(adapter, _images(), None)) == 3


def test_readout_is_refused_for_a_cnn():
    with pytest.raises(ValueError, match="applies to transformers"):
        adapter_for(_cnn("tv_resnet18"), readout="cls")


# ---------------------------------------------------------------------------- feature shapes
@pytest.mark.parametrize(
    ("name", "expected"),
    [
        (
            "tv_vgg16",
            {"features.16": (256, 8, 8), "features.23": (512, 4, 4), "features.30": (512, 2, 2)},
        ),
        ("tv_resnet50", {"layer2": (512, 8, 8), "layer3": (1024, 4, 4), "layer4": (2048, 2, 2)}),
    ],
)
def test_t_tame_branches_of_vgg16_and_resnet50(name, expected):
    adapter = adapter_for(_cnn(name))
    assert adapter.default_feature_layers() == list(expected)
    shapes = dict(layer_shapes(adapter, _images(batch=2), list(expected)))
    assert shapes == {n: (2, *s) for n, s in expected.items()}


# ---------------------------------------------------------------------------- layer errors
def _listing(message: str) -> dict[str, tuple[int, ...]]:
    """``name: (C, h, w)`` pairs of an error message."""
    return {
        n: tuple(int(v) for v in s.split(", "))
        for n, s in re.findall(r"([\w.]+): \((\d+, \d+, \d+)\)", message)
    }


@pytest.mark.parametrize(
    ("layers", "problem"),
    [
        (["layer5"], "has no module named 'layer5'"),
        (["layer2", "layer3", "nope"], "has no module named 'nope'"),
        (["fc"], r"layer 'fc': expected a feature map \(B, C, h, w\) .* got shape \(1, 3\)"),
        ([3], r"layers are named by module name \(str\); got 3\."),
        ([], "layers is empty"),
    ],
)
def test_bad_layer_lists_candidates_with_shapes(layers, problem):
    adapter = adapter_for(_cnn("tv_resnet18"))
    with pytest.raises(ValueError, match=rf"^T-TAME: .*{problem}") as err:
        check_feature_layers(adapter, _images(), layers, "T-TAME")
    message = str(err.value)
    listing = _listing(message)
    assert listing["layer2"] == (128, 8, 8)
    assert listing["layer3"] == (256, 4, 4)
    assert listing["layer4"] == (512, 2, 2)
    assert "fc" not in listing  # (B, C) outputs are not maps
    assert "for a 64x64 input" in message


def test_unknown_name_lists_close_matches_first():
    adapter = adapter_for(_cnn("tv_resnet50"))
    with pytest.raises(ValueError, match=r"no module named 'layer3\.0\.conv'") as err:
        check_feature_layers(adapter, _images(), ["layer3.0.conv"], "T-TAME")
    listing = _listing(str(err.value))
    closest = ["layer3.0.conv1", "layer3.0.conv2", "layer3.0.conv3"]
    assert sorted(list(listing)[:3]) == closest
    assert listing["layer3.0.conv2"] == (256, 4, 4)
    assert listing["layer4"] == (2048, 2, 2)


def test_layer_called_several_times_is_refused():
    adapter = adapter_for(_cnn("tv_resnet18"))  # BasicBlock.relu runs twice per block
    with pytest.raises(ValueError, match=r"'layer1.0.relu' runs 2 times in one forward pass"):
        check_feature_layers(adapter, _images(), ["layer1.0.relu"], "T-TAME")


class _TinyCNN(nn.Module):
    """A CNN of the torchvision layout with a single stride level: no preset."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, 2, 1), nn.ReLU(), nn.Conv2d(4, 6, 3, 1, 1))
        self.classifier = nn.Linear(6, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).mean((2, 3)))


def test_cnn_without_preset_asks_for_layers():
    adapter = adapter_for(_TinyCNN())
    assert type(adapter) is CNNAdapter
    with pytest.raises(ValueError, match=r"has no preset feature layers; pass layers=\[\.\.\.\]"):
        adapter.default_feature_layers()
    with pytest.raises(ValueError, match=r"layers=\[\.\.\.\]") as err:
        check_feature_layers(adapter, _images(16), None, "T-TAME")
    assert _listing(str(err.value)) == {
        "features": (6, 8, 8),
        "features.0": (4, 8, 8),
        "features.1": (4, 8, 8),
        "features.2": (6, 8, 8),
    }
    points = check_feature_layers(adapter, _images(16), ["features.1", "features.2"])
    assert [p.module for p in points] == [adapter.model.features[1], adapter.model.features[2]]


def test_layer_shapes_of_named_modules():
    model = _cnn("tv_resnet18")
    adapter = adapter_for(model)
    shapes = dict(layer_shapes(adapter, _images(batch=1), ["layer4", "fc", "layer1.0.relu"]))
    assert shapes == {"layer4": (1, 512, 2, 2), "fc": (1, NUM_CLASSES), "layer1.0.relu": None}
    every = dict(layer_shapes(adapter, _images(batch=1)))
    assert every["avgpool"] == (1, 512, 1, 1) and "layer1.0.relu" not in every
    with pytest.raises(ValueError, match="no module named 'layer9'"):
        layer_shapes(adapter, _images(batch=1), ["layer9"])


def test_transformer_feature_layers_are_checked_too():
    case = IMAGE_MODELS[0]
    model = build(case, dtype=torch.float32)
    adapter = adapter_for(model)
    x = torch.rand(2, 3, *case.image_size)
    points = check_feature_layers(adapter, x, None, "T-TAME")
    assert len(points) == min(3, adapter.num_layers)
    with pytest.raises(ValueError, match="out of range"):
        check_feature_layers(adapter, x, [7], "T-TAME")


# ---------------------------------------------------------------------------- hooks and state
def test_probes_leave_no_hooks_and_restore_modes_also_after_an_exception():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=NUM_CLASSES).train()
    adapter = adapter_for(model)
    bn = model.bn1.running_mean.clone()
    x = _images()
    layer_shapes(adapter, x)
    check_feature_layers(adapter, x)
    assert _hook_count(model) == 0 and model.training and model.layer3.training
    assert torch.equal(model.bn1.running_mean, bn)  # eval mode during the probe

    def boom(*args, **kwargs):
        raise RuntimeError("boom from the model")

    model.layer3.forward = boom
    try:
        with pytest.raises(RuntimeError, match="boom"):
            layer_shapes(adapter, x)
        with pytest.raises(RuntimeError, match="boom"):
            check_feature_layers(adapter, x, ["layer2"])
        with pytest.raises(RuntimeError, match="boom"):
            layer_shapes(adapter, x, ["layer2", "layer4"])
    finally:
        del model.layer3.forward
    assert _hook_count(model) == 0 and model.training and model.layer3.training


# ---------------------------------------------------------------------------- methods, evaluation
_REFUSALS = [(m, n) for m in METHODS for n in ("tv_resnet18", "zoo")]


@pytest.mark.parametrize(("method", "name"), _REFUSALS, ids=[f"{m.name}-{n}" for m, n in _REFUSALS])
def test_transformer_methods_refuse_cnns(method, name):
    with pytest.raises(UnsupportedModelError) as err:
        method.make(_cnn(name))
    message = str(err.value)
    assert re.search(r"needs a vision or text transformer; got ResNet \(CNN \(", message)
    supported = message.split("Supported: ")[1]
    assert "timm VisionTransformer" in supported and "CNN" not in supported


def test_model_grid_of_a_cnn_is_the_data_cell_grid():
    class Data:
        patch = 8

    assert model_grid(_cnn("tv_resnet18"), _images(), Data()) == (8, 8)
    case = IMAGE_MODELS[0]
    vit = build(case, dtype=torch.float32)
    assert model_grid(vit, torch.rand(1, 3, 32, 32), Data()) == adapter_for(vit).grid_size(
        torch.rand(1, 3, 32, 32)
    )
