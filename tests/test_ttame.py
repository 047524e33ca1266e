"""T-TAME: features per family, the mechanism and loss against literal references, training,
the frozen backbone, checkpoints of other models refused, CUDA, the zoo entries.

What T-TAME shares with MHEX (model state after explaining, fitting and failing; resume and
``keep_checkpoints``; save/load round trip; damaged checkpoints; DDP under torchrun) is tested
once for both in ``test_explainers.py``."""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from captum.attr import Attribution, NoiseTunnel
from tiny_models import NUM_CLASSES, _timm, bert_classifier, hf_vit_classifier

from captum_ext import TTAME, TrainingRecipe, UnsupportedModelError, adapter_for, zoo
from captum_ext.checkpoint import save_checkpoint
from captum_ext.data import ShapesDataset, shapes
from captum_ext.errors import CheckpointError
from captum_ext.explainers import TrainableExplainer, TTAMEMechanism
from captum_ext.explainers.losses import area_loss, ttame_loss, variation_loss
from captum_ext.metrics import pointing_game

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device present")


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: on a shared 2-core machine two threads oversubscribe badly."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _vit(depth: int = 3, dtype=torch.float64, **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    return _timm(depth=depth, **kw).to(dtype).eval()


def fitted(explainer: TTAME) -> TTAME:
    """``explainer`` declared fitted: the tests that explain with its random initialisation."""
    return explainer.mark_fitted()


def _images(n: int = 4, size=(32, 32), dtype=torch.float64, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, *size, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _hook_count(model: torch.nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        for m in model.modules()
    )


def _model_state(model: torch.nn.Module) -> dict:
    return {
        "tensors": {k: v.clone() for k, v in model.state_dict().items()},
        "training": [m.training for m in model.modules()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "grads": [p.grad for p in model.parameters()],
        "hooks": _hook_count(model),
        "forward_overrides": [m for m in model.modules() if "forward" in vars(m)],
    }


def _assert_same_state(model: torch.nn.Module, before: dict) -> None:
    after = _model_state(model)
    assert after["tensors"].keys() == before["tensors"].keys()
    for k, v in before["tensors"].items():
        assert torch.equal(after["tensors"][k], v), f"{k} changed"
    for key in ("training", "requires_grad", "hooks", "forward_overrides"):
        assert after[key] == before[key], key
    assert all(g is None for g in after["grads"])


_CNN_CHECKED: list[bool] = []


def _has_cnn_adapter() -> bool:
    if not _CNN_CHECKED:
        import torchvision

        try:
            adapter_for(torchvision.models.resnet18(num_classes=3))
            _CNN_CHECKED.append(True)
        except UnsupportedModelError:
            _CNN_CHECKED.append(False)
    return _CNN_CHECKED[0]


needs_cnn_adapter = pytest.mark.skipif(
    "not _has_cnn_adapter()",
    reason="captum_ext.adapters has no CNN adapter yet (branch wip-cnn); T-TAME's CNN feature "
    "tests run once it is merged",
)


# ---------------------------------------------------------------------------------------------
# features of every family


def test_timm_vit_branches_are_the_pre_attention_tokens_of_the_last_three_blocks():
    model = _vit(depth=4)
    t = TTAME(model, input_size=32, vit_features="plain")
    assert t.layers == [1, 2, 3]
    assert t.feature_shapes == [(32, 4, 4)] * 3
    assert t.num_classes == NUM_CLASSES
    x = _images()
    seen = {}
    handles = [
        model.blocks[i].norm1.register_forward_hook(lambda m, a, o, i=i: seen.__setitem__(i, o))
        for i in (1, 2, 3)
    ]
    try:
        feats, logits = t.features(x)
    finally:
        for h in handles:
            h.remove()
    torch.testing.assert_close(logits, model(x), rtol=0, atol=0)
    for f, i in zip(feats, (1, 2, 3), strict=True):
        tokens = seen[i][:, 1:]  # CLS dropped; row-major 4 x 4 grid
        expected = tokens.transpose(1, 2).reshape(4, 32, 4, 4)
        torch.testing.assert_close(f, expected, rtol=0, atol=0)
        assert f[0, :, 1, 2].equal(seen[i][0, 1 + 1 * 4 + 2])

    cls = TTAME(model, input_size=32)  # default for a model with a CLS token
    assert cls.vit_features == "cls"
    feats_cls, _ = cls.features(x)
    for f, plain, i in zip(feats_cls, feats, (1, 2, 3), strict=True):
        torch.testing.assert_close(f, plain * seen[i][:, 0, :, None, None], rtol=0, atol=0)


@pytest.mark.parametrize(
    ("kw", "prefix"), [({"reg_tokens": 4}, 5), ({"name": "deit_tiny_distilled_patch16_224"}, 2)]
)
def test_prefix_tokens_are_dropped(kw, prefix):
    model = _vit(depth=3, **kw)
    t = TTAME(model, input_size=32, vit_features="plain")
    assert t.adapter.num_prefix_tokens == prefix
    assert t.feature_shapes == [(32, 4, 4)] * 3


def test_avgpool_vit_without_cls_token_defaults_to_plain_and_refuses_cls():
    model = _vit(depth=3, class_token=False, global_pool="avg")
    assert TTAME(model, input_size=32).vit_features == "plain"
    with pytest.raises(ValueError, match="CLS token"):
        TTAME(model, input_size=32, vit_features="cls")


def test_hf_vit_size_from_config_and_layernorm_before_features():
    torch.manual_seed(0)
    model = hf_vit_classifier().double().eval()
    t = TTAME(model)
    assert t.input_size == (3, 32, 32)
    assert t.layers == [0, 1]  # two blocks: both
    assert t.feature_shapes == [(32, 4, 4)] * 2
    x = _images()
    seen = {}
    layers = [m for m in model.modules() if hasattr(m, "layernorm_before")]
    handles = [
        blk.layernorm_before.register_forward_hook(lambda m, a, o, i=i: seen.__setitem__(i, o))
        for i, blk in enumerate(layers)
    ]
    try:
        feats, _ = t.features(x)
    finally:
        for h in handles:
            h.remove()
    for f, i in zip(feats, (0, 1), strict=True):
        patches = seen[i][:, 1:].transpose(1, 2).reshape(4, 32, 4, 4)
        torch.testing.assert_close(f, patches * seen[i][:, 0, :, None, None], rtol=0, atol=0)


def test_timm_vit_built_for_another_size_asks_for_input_size():
    with pytest.raises(ValueError, match=r"input_size=\(H, W\)"):
        TTAME(_vit())  # timm's pretrained_cfg says 224; this model takes 32 x 32


def test_text_models_and_bad_arguments_are_refused():
    with pytest.raises(UnsupportedModelError, match="image classifiers"):
        TTAME(bert_classifier())
    model = _vit()
    with pytest.raises(ValueError, match="no module named 'nope'"):
        TTAME(model, layers=["nope"], input_size=32)
    with pytest.raises(ValueError, match="must be a list"):
        TTAME(model, layers="blocks.1", input_size=32)
    with pytest.raises(ValueError, match="out of range"):
        TTAME(model, layers=[7], input_size=32)
    with pytest.raises(ValueError, match="num_classes=3 but the model returns 5"):
        TTAME(model, num_classes=3, input_size=32)
    with pytest.raises(ValueError, match="vit_features"):
        TTAME(model, vit_features="mean", input_size=32)


def test_module_names_give_block_outputs_as_in_the_authors_vit_code():
    model = _vit(depth=3)
    t = TTAME(model, layers=["blocks.0", "blocks.1", "blocks.2"], input_size=32)
    assert t.feature_shapes == [(32, 4, 4)] * 3


@needs_cnn_adapter
@pytest.mark.parametrize(
    ("arch", "size", "shapes_"),
    [
        ("vgg16", 64, [(256, 8, 8), (512, 4, 4), (512, 2, 2)]),
        ("resnet50", 64, [(512, 8, 8), (1024, 4, 4), (2048, 2, 2)]),
    ],
)
def test_torchvision_cnn_presets(arch, size, shapes_):
    import torchvision

    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)(num_classes=7).eval()
    t = fitted(TTAME(model, input_size=size))
    expected = {"vgg16": ["features.16", "features.23", "features.30"]}
    assert t.layers == expected.get(arch, ["layer2", "layer3", "layer4"])
    assert t.feature_shapes == shapes_
    assert t.num_classes == 7
    maps = t.attribute(torch.rand(2, 3, size, size))
    assert maps.shape == (2, 1, size, size)


@needs_cnn_adapter
def test_timm_cnn_preset_and_features():
    import timm

    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=4).eval()
    t = TTAME(model, input_size=64)
    assert t.layers == ["layer2", "layer3", "layer4"]
    assert t.feature_shapes == [(128, 8, 8), (256, 4, 4), (512, 2, 2)]
    assert t.vit_features == "plain"
    x = torch.rand(2, 3, 64, 64)
    feats, _ = t.features(x)
    torch.testing.assert_close(feats[1], model.layer3(model.layer2(model.layer1(
        model.maxpool(model.act1(model.bn1(model.conv1(x))))))))  # fmt: skip


def test_wrong_cnn_layer_lists_the_candidate_maps():
    import timm

    model = timm.create_model("resnet18", num_classes=4).eval()
    with pytest.raises(ValueError, match=r"no module named 'layer9'.*layer3.*\(256, 4, 4\)"):
        TTAME(model, layers=["layer2", "layer9"], input_size=64)


def test_same_parameters_but_other_feature_shapes_are_refused(tmp_path):
    from timm.models.resnet import BasicBlock, ResNet

    import captum_ext.zoo._build as build

    torch.manual_seed(0)
    stride1 = build.zoo_resnet_s1(num_classes=4).eval()
    fitted(TTAME(stride1)).save(tmp_path / "t")
    strided = ResNet(BasicBlock, (1, 1, 1, 1), channels=(16, 32, 64, 128), stem_type="deep",
                     stem_width=8, num_classes=4).eval()  # fmt: skip
    assert strided.state_dict().keys() == stride1.state_dict().keys()
    with pytest.raises(CheckpointError, match=r"feature shapes \[\[32, 16, 16\]"):
        TTAME.load(tmp_path / "t", strided)


# ---------------------------------------------------------------------------------------------
# the mechanism and the loss, against literal references (float64)


def _literal_mechanism(mech: TTAMEMechanism, feats: list[torch.Tensor]) -> torch.Tensor:
    """T-TAME's attention mechanism written out, eval-mode BatchNorm."""
    size = (min(feats[0].shape[2], 56), min(feats[0].shape[3], 56))
    branches = []
    for f, conv, bn in zip(feats, mech.convs, mech.bns, strict=True):
        y = torch.einsum("oc,bchw->bohw", conv.weight[:, :, 0, 0], f)
        y = y + conv.bias[None, :, None, None]
        y = (y - bn.running_mean[None, :, None, None]) / torch.sqrt(
            bn.running_var[None, :, None, None] + bn.eps
        )
        y = y * bn.weight[None, :, None, None] + bn.bias[None, :, None, None]
        y = torch.clamp(y + f, min=0)
        if tuple(y.shape[2:]) != size:
            y = F.interpolate(y, size=size, mode="bilinear", align_corners=False)
        branches.append(y)
    z = torch.cat(branches, 1)
    return (
        torch.einsum("kc,bchw->bkhw", mech.fuser.weight[:, :, 0, 0], z)
        + mech.fuser.bias[None, :, None, None]
    )


def test_mechanism_equals_the_literal_equations():
    torch.manual_seed(0)
    mech = TTAMEMechanism([2, 3, 4], num_classes=5).double()
    for bn in mech.bns:
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.5, 0.5)
    mech.eval()
    feats = [
        torch.randn(2, 2, 6, 6, dtype=torch.float64),
        torch.randn(2, 3, 3, 3, dtype=torch.float64),
        torch.randn(2, 4, 2, 2, dtype=torch.float64),
    ]
    c = mech(feats)
    assert c.shape == (2, 5, 6, 6)
    torch.testing.assert_close(c, _literal_mechanism(mech, feats), rtol=1e-12, atol=1e-12)
    classes = torch.tensor([3, 0])
    one = mech(feats, classes=classes)  # only the maps attribute needs
    assert one.shape == (2, 1, 6, 6)
    torch.testing.assert_close(one[:, 0], c[torch.arange(2), classes], rtol=1e-12, atol=1e-12)


def test_map_size_is_the_first_branch_capped_at_56():
    mech = TTAMEMechanism([2, 2], num_classes=3).double()
    assert mech.output_size(112, 60) == (56, 56)
    assert mech.output_size(28, 14) == (28, 14)
    feats = [torch.randn(1, 2, 80, 70, dtype=torch.float64), torch.randn(1, 2, 5, 5).double()]
    assert mech(feats).shape == (1, 3, 56, 56)


def test_area_and_variation_terms_by_hand():
    m = torch.tensor([[[[0.1, 0.4], [0.7, 0.2]]]], dtype=torch.float64)
    expected_area = sum((v + 5e-4) ** 0.3 for v in (0.1, 0.4, 0.7, 0.2)) / 4
    assert area_loss(m).item() == pytest.approx(expected_area, rel=1e-14)
    # vertical: (0.7-0.1)^2 + (0.2-0.4)^2 = 0.40; horizontal: (0.4-0.1)^2 + (0.2-0.7)^2 = 0.34;
    # edges (every cell of a 2 x 2 map is on two edges): 2 * (0.01 + 0.16 + 0.49 + 0.04) = 1.40
    expected_tv = (0.40 + 0.34 + 0.3 * 1.40) / (2 * 1)
    assert variation_loss(m).item() == pytest.approx(expected_tv, rel=1e-14)
    assert variation_loss(m, power=1, border=0).item() == pytest.approx(0.6 + 0.2 + 0.3 + 0.5)
    assert area_loss(m, power=1).item() == pytest.approx(0.35, rel=1e-14)


def _literal_variation(m: torch.Tensor, p: float, border: float) -> float:
    b, k, h, w = m.shape
    total = 0.0
    for i in range(b):
        for j in range(k):
            for r in range(h):
                for c in range(w):
                    v = m[i, j, r, c].item()
                    if r + 1 < h:
                        total += abs(m[i, j, r + 1, c].item() - v) ** p
                    if c + 1 < w:
                        total += abs(m[i, j, r, c + 1].item() - v) ** p
                    on_edges = (r == 0) + (r == h - 1) + (c == 0) + (c == w - 1)
                    total += border * on_edges * abs(v) ** p
    return total / (p * b)


def test_variation_term_equals_the_literal_loop():
    m = torch.rand(2, 3, 4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for p, border in ((2.0, 0.3), (1.0, 0.0), (3.0, 1.0)):
        assert variation_loss(m, p, border).item() == pytest.approx(
            _literal_variation(m, p, border), rel=1e-12
        )


def test_ttame_loss_weights_the_terms():
    logits = torch.tensor([[1.0, 2.0, 0.0], [0.5, -1.0, 3.0]], dtype=torch.float64)
    y = torch.tensor([1, 0])
    maps = torch.rand(2, 1, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    out = ttame_loss(logits, y, maps)
    ce = (
        -math.log(math.exp(2) / (math.exp(1) + math.exp(2) + 1))
        - math.log(math.exp(0.5) / (math.exp(0.5) + math.exp(-1) + math.exp(3)))
    ) / 2
    assert out["ce"].item() == pytest.approx(ce, rel=1e-14)
    assert out["area"].item() == pytest.approx(area_loss(maps).item(), rel=1e-14)
    assert out["tv"].item() == pytest.approx(variation_loss(maps).item(), rel=1e-14)
    assert out["loss"].item() == pytest.approx(
        1.5 * ce + 2 * out["area"].item() + 0.01 * out["tv"].item(), rel=1e-14
    )
    other = ttame_loss(logits, y, maps, ce_weight=1, area_weight=0, tv_weight=3)
    assert other["loss"].item() == pytest.approx(ce + 3 * out["tv"].item(), rel=1e-14)
    assert out["loss"].dtype == torch.float64


# ---------------------------------------------------------------------------------------------
# attribute


@pytest.fixture(scope="module")
def vit_ttame():
    model = _vit(depth=3)
    torch.manual_seed(2)
    t = fitted(TTAME(model, input_size=32))
    for bn in t.mechanism.bns:  # non-trivial eval statistics
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2)
    return t


def test_attribute_is_the_min_max_normalised_class_map_upsampled(vit_ttame):
    t = vit_ttame
    x = _images(3)
    feats, logits = t.features(x)
    c = _literal_mechanism(t.mechanism, feats)
    for target in (None, 2, [0, 4, 1], torch.tensor([[3], [3], [0]])):
        if target is None:
            idx = logits.argmax(1)
        elif isinstance(target, int):
            idx = torch.full((3,), target)
        else:
            idx = torch.as_tensor(target).view(-1)
        m = c[torch.arange(3), idx][:, None]
        lo = m.amin(dim=(2, 3), keepdim=True)
        hi = m.amax(dim=(2, 3), keepdim=True)
        grid = (m - lo) / (hi - lo)
        got = t.attribute(x, target=target, output="grid")
        assert got.shape == (3, 1, 4, 4)
        torch.testing.assert_close(got, grid, rtol=1e-12, atol=1e-12)
        full = t.attribute(x, target=target)
        assert full.shape == (3, 1, 32, 32)
        up = F.interpolate(grid, size=(32, 32), mode="bilinear", align_corners=False)
        torch.testing.assert_close(full, up, rtol=1e-12, atol=1e-12)
    like = t.attribute(x, target=1, output="like_input")
    assert like.shape == x.shape
    (as_tuple,) = t.attribute((x,), target=1)
    torch.testing.assert_close(as_tuple, t.attribute(x, target=1), rtol=0, atol=0)
    with pytest.raises(ValueError, match="out of range"):
        t.attribute(x, target=NUM_CLASSES)
    with pytest.raises(ValueError, match="output must be one of"):
        t.attribute(x, output="tokens")


def test_attribute_is_one_forward_pass_and_works_under_inference_mode(vit_ttame):
    t = vit_ttame
    calls = []
    handle = t.adapter.model.register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        expected = t.attribute(_images(2))
        with torch.inference_mode():
            got = t.attribute(_images(2))
    finally:
        handle.remove()
    assert len(calls) == 2
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_captum_contract_and_module_surface(vit_ttame):
    t = vit_ttame
    assert isinstance(t, Attribution) and isinstance(t, torch.nn.Module)
    assert isinstance(t, TrainableExplainer)
    assert t.forward_func is t.adapter.model
    assert not t.multiplies_by_inputs and not t.has_convergence_delta()
    keys = list(t.state_dict())
    assert keys and all(k.startswith("mechanism.") for k in keys)
    assert [id(p) for p in t.parameters()] == [id(p) for p in t.mechanism.parameters()]
    model = t.adapter.model
    modes = [m.training for m in model.modules()]
    t.train()
    assert t.mechanism.training and [m.training for m in model.modules()] == modes
    t.eval()
    x = _images(2)
    nt = NoiseTunnel(t).attribute(x, nt_samples=2, stdevs=0.01, target=1)
    assert nt.shape == (2, 1, 32, 32)
    assert t(x).shape == (2, NUM_CLASSES, 4, 4)


def test_mechanism_follows_the_features_dtype_and_the_model_is_not_moved(vit_ttame):
    model = _vit(depth=3, dtype=torch.float32)
    t = fitted(TTAME(model, input_size=32))
    assert next(t.mechanism.parameters()).dtype == torch.float32
    t.double()
    assert next(model.parameters()).dtype == torch.float32  # .to()/.double() touch the mechanism
    maps = t.attribute(_images(2, dtype=torch.float32))
    assert maps.dtype == torch.float32
    assert next(t.mechanism.parameters()).dtype == torch.float32


# ---------------------------------------------------------------------------------------------
# training


def test_fit_masks_the_input_with_the_upsampled_map_of_the_top1_class():
    model = _vit(depth=3)
    t = TTAME(model, input_size=32)
    start = copy.deepcopy(t.mechanism).train()
    seen: list[torch.Tensor] = []
    handle = model.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
    try:
        t.fit(_images(6), TrainingRecipe(epochs=1, batch_size=6, show_progress=False))
    finally:
        handle.remove()
    assert len(seen) == 2  # clean pass, masked pass
    clean, masked = seen
    feats, logits = t.features(clean)
    y = logits.argmax(1)
    a = torch.sigmoid(start(feats))[torch.arange(6), y][:, None]
    mask = F.interpolate(a, size=(32, 32), mode="bilinear", align_corners=False)
    assert mask.shape == (6, 1, 32, 32) and mask.min() > 0 and mask.max() < 1
    torch.testing.assert_close(masked, clean * mask, rtol=1e-12, atol=1e-12)


@pytest.fixture(scope="module")
def shapes_vit():
    return zoo.load("shapes-vit")


def test_backbone_bit_identical_after_fit_and_train_mode_option(shapes_vit, tmp_path):
    model = copy.deepcopy(shapes_vit)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    model.train()
    before = _model_state(model)
    t = TTAME(model)
    data = ShapesDataset(64, 5, **zoo.data_kwargs("shapes-vit"))
    history = t.fit(data, TrainingRecipe(epochs=1, batch_size=32, show_progress=False))
    assert history[0]["steps"] == 2
    _assert_same_state(model, before)

    t.fit(data, TrainingRecipe(epochs=1, batch_size=32, show_progress=False),
          backbone_train_mode=True)  # fmt: skip
    after = model.state_dict()
    moved = [k for k, v in before["tensors"].items() if not torch.equal(after[k], v)]
    assert moved and all("running_" in k or "num_batches" in k for k in moved)
    assert [m.training for m in model.modules()] == before["training"]


def test_a_few_steps_on_the_zoo_vit_lower_the_loss(shapes_vit):
    torch.manual_seed(0)
    t = TTAME(shapes_vit)
    data = ShapesDataset(192, 5, **zoo.data_kwargs("shapes-vit"))
    history = t.fit(data, TrainingRecipe(epochs=3, batch_size=32, lr=0.05, show_progress=False))
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert history[-1]["loss"] < history[0]["loss"] - 0.2
    for h in history:
        assert h["loss"] == pytest.approx(1.5 * h["ce"] + 2 * h["area"] + 0.01 * h["tv"])
        assert h["images"] == 192 and h["steps"] == 6


def test_validation_reports_average_drop_and_increase_in_confidence(shapes_vit):
    torch.manual_seed(0)
    t = TTAME(shapes_vit)
    kw = zoo.data_kwargs("shapes-vit")
    history = t.fit(
        ShapesDataset(32, 5, **kw),
        TrainingRecipe(epochs=1, batch_size=16, show_progress=False),
        val_data=shapes(16, 6, **kw).images,
    )
    for key in ("val_AD100", "val_IC100", "val_AD50", "val_IC50", "val_AD15", "val_IC15"):
        assert 0 <= history[0][key] <= 100, key


def test_loss_maps_batch_option_and_bad_values():
    model = _vit(depth=3)
    t = TTAME(model, input_size=32)
    h = t.fit(_images(8), TrainingRecipe(epochs=1, batch_size=4, show_progress=False),
              loss_maps="batch")  # fmt: skip
    assert math.isfinite(h[0]["loss"])
    with pytest.raises(ValueError, match="loss_maps"):
        t.fit(_images(8), loss_maps="all")
    with pytest.raises(ValueError, match="batch_size"):
        t.fit(_images(8), TrainingRecipe(batch_size=0))


# ---------------------------------------------------------------------------------------------
# save / load


def test_mismatched_checkpoints_are_refused(vit_ttame, tmp_path):
    paths = vit_ttame.save(tmp_path / "t")
    assert json.loads(paths.record.read_text())["config"]["layers"] == [0, 1, 2]
    torch.manual_seed(0)
    with pytest.raises(CheckpointError, match="made for a VisionTransformer, not a ViTForImage"):
        TTAME.load(tmp_path / "t", hf_vit_classifier())
    with pytest.raises(CheckpointError, match="fingerprint"):
        TTAME.load(tmp_path / "t", _vit(depth=3, embed_dim=48))
    with pytest.raises(CheckpointError, match="fingerprint"):
        TTAME.load(tmp_path / "t", _vit(depth=3, num_classes=3))
    with pytest.raises(CheckpointError, match="not a TTAME checkpoint of format 1"):
        TTAME.load(zoo._build.WEIGHTS_DIR / "shapes-vit", vit_ttame.adapter.model)

    tensors = {k: v.clone() for k, v in vit_ttame.mechanism.state_dict().items()}
    record = json.loads((tmp_path / "t.json").read_text())
    del record["weights"]
    model = vit_ttame.adapter.model
    for edit, message in [
        (lambda r: r["config"].__setitem__("layers", ["nope", 1, 2]), "layers"),
        (lambda r: r["config"].__setitem__("num_classes", 9), "made for 9 classes"),
        (lambda r: r["backbone"]["feature_shapes"][0].__setitem__(0, 16), "feature shapes"),
    ]:
        r = copy.deepcopy(record)
        edit(r)
        save_checkpoint(tmp_path / "e", tensors, r)
        with pytest.raises(CheckpointError, match=message):
            TTAME.load(tmp_path / "e", model)


# ---------------------------------------------------------------------------------------------
# CUDA


@CUDA
def test_cuda_fit_with_autocast_and_attribute_parity(shapes_vit):
    model = copy.deepcopy(shapes_vit).cuda()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(0)
    t = TTAME(model)
    assert next(t.mechanism.parameters()).is_cuda
    data = ShapesDataset(256, 5, **zoo.data_kwargs("shapes-vit"))
    history = t.fit(data, TrainingRecipe(epochs=2, batch_size=32, lr=0.05, show_progress=False))
    assert all(math.isfinite(h["loss"]) for h in history)
    assert history[-1]["loss"] < history[0]["loss"]
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    x = shapes(8, 6, **zoo.data_kwargs("shapes-vit")).images
    on_gpu = t.attribute(x.cuda())
    assert on_gpu.is_cuda
    cpu_model = copy.deepcopy(model).cpu()
    cpu = copy.deepcopy(t.mechanism).cpu()
    t_cpu = TTAME(cpu_model)
    t_cpu.load_state_dict({f"mechanism.{k}": v for k, v in cpu.state_dict().items()})
    torch.testing.assert_close(on_gpu.cpu(), t_cpu.attribute(x), rtol=1e-3, atol=1e-3)


@CUDA
def test_attribute_follows_the_input_device(vit_ttame):
    model = copy.deepcopy(vit_ttame.adapter.model).cuda()
    t = fitted(TTAME(model, input_size=32))
    t.mechanism.cpu()
    maps = t.attribute(_images(2).cuda())
    assert maps.is_cuda and next(t.mechanism.parameters()).is_cuda


# ---------------------------------------------------------------------------------------------
# zoo


def _explainer_entries() -> list[str]:
    return zoo.available(kind="explainer")


def test_zoo_lists_explainers_apart_from_models():
    models, explainers = zoo.available(), zoo.available(kind="explainer")
    assert not set(models) & set(explainers)
    assert zoo.available(kind="all") == sorted([*models, *explainers])
    with pytest.raises(ValueError, match="kind"):
        zoo.available(kind="other")
    if "shapes-vit-ttame" in explainers:
        zoo.check_name("shapes-vit-ttame", kind="explainer")
        with pytest.raises(ValueError, match="is a trained explainer, not a model"):
            zoo.check_name("shapes-vit-ttame")  # where a model is expected (CLI specs)
        with pytest.raises(ValueError, match="is a model, not a trained explainer"):
            zoo.check_name("shapes-vit", kind="explainer")
        assert zoo.data_kwargs("shapes-vit-ttame") == zoo.data_kwargs("shapes-vit")


@pytest.mark.parametrize("name", ["shapes-vit-ttame", "shapes-cnn-ttame"])
def test_zoo_explainer_loads_ready_and_points_at_the_objects(name):
    if name not in _explainer_entries():
        pytest.skip(
            f"{name} is not in the zoo yet; train it with benchmarks/training/train_ttame.py"
        )
    info = zoo.info(name)
    assert info["kind"] == "explainer" and info["method"] == "ttame"
    assert info["pointing_game"]["score"] >= 0.8
    assert info["weights"]["bytes"] < 1_000_000
    explainer = zoo.load(name)
    assert isinstance(explainer, TTAME) and not explainer.mechanism.training
    backbone = zoo.load(info["backbone_model"])
    for a, b in zip(
        explainer.adapter.model.state_dict().values(), backbone.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b)
    batch = shapes(64, 424243, min_objects=2, **zoo.data_kwargs(name))
    assert info["pointing_game"]["seed"] != 424243
    assert 424243 not in info["training"]["data_seeds"]
    hits, pixel_hits = [], []
    for k in range(batch.labels.shape[1]):
        rows = batch.labels[:, k] > 0.5
        x, masks = batch.images[rows], batch.masks[rows, k]
        cells = F.adaptive_max_pool2d(masks[:, None].float(), (4, 4))[:, 0] > 0
        grid = explainer.attribute(x, target=k, output="grid")
        pooled = F.adaptive_avg_pool2d(F.interpolate(grid, size=(32, 32), mode="nearest"), 4)
        hits.append(pointing_game(pooled, cells))  # the benchmark's 8 x 8 cells
        pixel_hits.append(pointing_game(explainer.attribute(x, target=k), masks))
    assert torch.cat(hits).nanmean().item() >= 0.8  # fresh data, 128 targets; chance 0.06
    assert torch.cat(pixel_hits).nanmean().item() >= 0.35  # exact pixels; see train_ttame.py


def test_zoo_explainer_entry_refuses_a_damaged_copy(tmp_path):
    if "shapes-vit-ttame" not in _explainer_entries():
        pytest.skip(
            "shapes-vit-ttame is not in the zoo yet; train it with benchmarks/training/train_ttame.py"
        )
    import shutil

    for name in ("shapes-vit", "shapes-vit-ttame"):
        for ext in ("json", "safetensors"):
            shutil.copy(zoo._build.WEIGHTS_DIR / f"{name}.{ext}", tmp_path)
    assert zoo.available(directory=tmp_path, kind="explainer") == ["shapes-vit-ttame"]
    assert isinstance(zoo.load("shapes-vit-ttame", directory=tmp_path), TTAME)
    path = tmp_path / "shapes-vit-ttame.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        zoo.load("shapes-vit-ttame", directory=tmp_path)


@pytest.mark.slow
def test_training_script_reproduces_the_pointing_game(tmp_path):
    script = ROOT / "benchmarks" / "training" / "train_ttame.py"
    proc = subprocess.run(
        [sys.executable, str(script), "--only", "shapes-vit-ttame", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=1800,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((tmp_path / "shapes-vit-ttame.json").read_text())
    assert record["pointing_game"]["score"] >= 0.8


@pytest.mark.parametrize("which", ["ttame", "mhex"])
def test_fit_on_a_device_other_than_the_models_is_refused_before_training(which):
    from captum_ext.explainers import MHEX

    batch = shapes(4, 1, **zoo.data_kwargs("shapes-vit"))
    explainer = (TTAME if which == "ttame" else MHEX)(zoo.load("shapes-vit"))
    hint = "model.to('meta')" if which == "ttame" else "mhex.to('meta')"
    with pytest.raises(ValueError, match=r"\.fit\(device='meta'\) but the model is on cpu") as e:
        explainer.fit((batch.images, batch.labels), TrainingRecipe(epochs=1, device="meta"))
    assert hint in str(e.value) and "\n" not in str(e.value)
