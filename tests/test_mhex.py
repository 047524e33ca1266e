"""MHEX (Sun & Liò; this project's reconstruction): gates, heads, equivalent matrices, saliency.

Exact checks in float64 against literal re-implementations (the equivalent matrix written out
as sums, the pooling written out as loops), table-driven over the tiny models of every family,
MHEX's own checkpoint checks, and the shipped zoo entries on fresh two-object data. What MHEX
shares with T-TAME (model state after explaining, fitting and failing; resume; save/load round
trip; damaged checkpoints; DDP under torchrun) is tested once for both in
``test_explainers.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tiny_models
import torch
import torch.nn.functional as F
from bench_scripts import training_script
from captum.attr import Attribution
from method_table import TINY_CNN
from torch import nn

from captum_ext import MHEX, CheckpointError, TrainingRecipe, UnsupportedModelError, zoo
from captum_ext.adapters import adapter_for
from captum_ext.data import shapes, text_rationales
from captum_ext.explainers import MHEXNetwork, TrainableExplainer, mhex_step
from captum_ext.explainers._mhex_network import MapHead, TokenHead
from captum_ext.explainers._mhex_saliency import fuse, fusion_weights
from captum_ext.zoo._build import zoo_resnet_s1

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
FRESH_SEED = 987654  # never a training seed of the zoo (checked in test_zoo)


CNN_CASE = TINY_CNN  # a 4-stage timm ResNet (BasicBlock, stride-1 stem), 4..16 channels
CASES = [CNN_CASE, *tiny_models.ALL_MODELS]
IDS = [c.name for c in CASES]


def _build(case: tiny_models.Case, seed: int = 0, **kw) -> MHEX:
    """MHEX around the case's float64 model, gates and heads randomised (not the init), declared
    fitted (``mark_fitted``) so that it explains as it is."""
    model = tiny_models.build(case, torch.float64, seed)
    mhex = MHEX(model, **kw)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for p in [*mhex.network.gates.parameters(), *mhex.network.heads.parameters()]:
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)
    return mhex.mark_fitted()


def _inputs(case: tiny_models.Case, batch: int = 3):
    x, extra = tiny_models.make_inputs(case, batch, torch.float64)
    return x, extra


def _hooks(model: nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        for m in model.modules()
    )


# ---------------------------------------------------------------------------------------------
# the equivalent matrix, literally


def test_map_head_equivalent_matrix_is_the_product_and_its_cam_pools_to_the_logits():
    torch.manual_seed(0)
    head = MapHead(channels=5, hidden=3, num_classes=4).double()
    f = torch.randn(2, 5, 3, 4, dtype=torch.float64)
    w_eq, b_eq = head.equivalent()
    w_conv = head.conv.weight[:, :, 0, 0]
    for c in range(4):  # W_eq[c, k] = sum_m W_fc[c, m] W_conv[m, k]
        for k in range(5):
            want = sum(head.fc.weight[c, m] * w_conv[m, k] for m in range(3))
            torch.testing.assert_close(w_eq[c, k], want, rtol=1e-12, atol=1e-14)
        want_b = sum(head.fc.weight[c, m] * head.conv.bias[m] for m in range(3)) + head.fc.bias[c]
        torch.testing.assert_close(b_eq[c], want_b, rtol=1e-12, atol=1e-14)
    cam = head.cam(f)
    for b, c, i, j in [(0, 0, 0, 0), (1, 3, 2, 3), (0, 2, 1, 2)]:
        want = sum(w_eq[c, k] * f[b, k, i, j] for k in range(5)) + b_eq[c]
        torch.testing.assert_close(cam[b, c, i, j], want, rtol=1e-12, atol=1e-14)
    # what the head computes layer by layer == the CAM averaged over the locations
    torch.testing.assert_close(head(f), cam.mean(dim=(2, 3)), rtol=1e-12, atol=1e-13)


def test_token_head_cam_pooled_with_the_readout_weights_is_the_head_logit():
    torch.manual_seed(0)
    head = TokenHead(channels=6, num_classes=3).double()
    f = torch.randn(2, 5, 6, dtype=torch.float64)
    weights = torch.tensor([[0.0, 0.5, 0.25, 0.25, 0.0], [1.0, 0.0, 0.0, 0.0, 0.0]]).double()
    cam = head.cam(f)
    for b in range(2):
        pooled = sum(weights[b, i] * cam[b, :, i] for i in range(5))
        torch.testing.assert_close(head(f, weights)[b], pooled, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_stage_cams_pool_to_the_head_logits_of_the_same_forward(case):
    mhex = _build(case)
    x, extra = _inputs(case)
    logits, heads = mhex.network(x, *extra, return_heads=True)
    cams = mhex.stage_cams(x, extra)
    net = mhex.network
    assert len(cams) == len(heads) == len(mhex.stages)
    for stage, cam, h in zip(mhex.stages, cams, heads, strict=True):
        assert cam.dtype == torch.float64
        if stage.layout == "map":
            pooled = cam.mean(dim=(2, 3))
        else:
            w = net.pool_weights(cam.shape[-1], x, extra, {}, torch.float64)
            w = w.expand(cam.shape[0], -1)
            pooled = torch.stack([(w[b] * cam[b]).sum(-1) for b in range(cam.shape[0])])
        torch.testing.assert_close(pooled, h.detach(), rtol=1e-10, atol=1e-10)
    # the same forward pass gives the model's logits (through the gates)
    torch.testing.assert_close(net(x, *extra), logits, rtol=0, atol=0)


@pytest.mark.parametrize("case", [CNN_CASE, tiny_models.IMAGE_MODELS[0]], ids=["cnn", "vit"])
def test_one_stage_saliency_is_its_rectified_normalised_equivalent_matrix_map(case):
    """With all weight on stage 0: ``relu(W_eq[c] F' + b_eq[c]) / max`` on the stage's grid."""
    n = 3 if case is CNN_CASE else 2
    mhex = _build(case, fusion="mean", stage_weights=[1.0] + [0.0] * (n - 1))
    x, _ = _inputs(case)
    p = mhex.network.run(x)
    w, b = mhex.equivalent_matrices()[0]
    f = p.features[0].detach()
    positive = 0
    for target in range(tiny_models.NUM_CLASSES):
        if f.dim() == 4:  # layer2 is the finest stage: the grid is its own
            cam = torch.einsum("c,bchw->bhw", w[target], f) + b[target]
        else:
            cam = (f @ w[target] + b[target])[:, mhex.adapter.num_prefix_tokens :]
        cam = cam.clamp_min(0).flatten(1)
        top = cam.amax(1, keepdim=True)
        want = torch.where(top > 0, cam / top.where(top > 0, 1), 0)  # all-zero maps stay zero
        positive += int((top > 0).sum())
        got = mhex.attribute(x, target=target, output="grid")
        torch.testing.assert_close(got.flatten(1), want, rtol=1e-9, atol=1e-9)
    assert positive >= 3


# ---------------------------------------------------------------------------------------------
# gates


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("gate", ["spatial", "elementwise"])
def test_gates_lie_in_0_1_and_gate_the_features(case, gate):
    mhex = _build(case, gate=gate, gated_backbone=False)
    x, extra = _inputs(case)
    p = mhex.network.run(x, *extra)
    for stage, a, f in zip(mhex.stages, p.gates, p.features, strict=True):
        assert ((a > 0) & (a < 1)).all()
        assert torch.broadcast_shapes(a.shape, f.shape) == f.shape
        assert a.min() < 0.95 and a.max() > 0.05  # randomised gates: not all saturated
        width = 1 if gate == "spatial" else stage.channels
        assert a.shape[1 if stage.layout == "map" else -1] == width
    # gates feeding only the heads leave the model's function exactly unchanged
    plain = adapter_for(mhex.network.model).forward(x, extra)
    torch.testing.assert_close(p.logits, plain, rtol=0, atol=0)


@pytest.mark.parametrize("case", [CNN_CASE, tiny_models.IMAGE_MODELS[0]], ids=["cnn", "vit"])
def test_gated_features_continue_through_the_backbone(case):
    gated = _build(case, gated_backbone=True)
    x, extra = _inputs(case)
    p = gated.network.run(x, *extra)
    a0, f0 = p.gates[0], p.features[0]
    # F' = F * sigmoid(g(F)): the recorded gated features are the stage output times its gate
    side = _build(case, gated_backbone=False)
    raw = side.network.run(x, *extra)
    torch.testing.assert_close(raw.gates[0], a0, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(raw.features[0], f0, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(p.logits, raw.logits)  # the downstream layers saw F'


def test_gates_start_near_one_so_a_trained_model_keeps_its_function():
    model = zoo.load("shapes-vit")
    mhex = MHEX(model, gated_backbone=True)
    x = shapes(64, FRESH_SEED, **zoo.data_kwargs("shapes-vit")).images
    p = mhex.network.run(x)
    for a in p.gates:
        torch.testing.assert_close(a, torch.full_like(a, torch.sigmoid(torch.tensor(3.0)).item()))
    with torch.no_grad():
        same = ((p.logits > 0) == (model(x) > 0)).all(1).float().mean()
    assert same >= 0.95


# ---------------------------------------------------------------------------------------------
# saliency: shapes, forms, batch independence, Captum


@pytest.mark.parametrize("stages", [2, 3, 5, 8])
def test_geometric_fusion_of_zero_maps_is_exactly_zero_not_slightly_negative(stages):
    # exp(sum_k log(FLOOR) / K) rounds one ulp below FLOOR for these K (float32): the fused map
    # used to come out at -1.2e-10 where every stage is 0, outside the documented [0, 1].
    weights = fusion_weights(None, stages)
    zero = torch.zeros(2, 1, 4, 4)
    one = torch.ones(2, 1, 4, 4)
    fused = fuse([zero] * stages, (1, 2, 3), weights, nonneg=True, fusion="geometric")
    assert (fused == 0).all()
    maps = [one] + [torch.rand(2, 1, 4, 4)] * (stages - 1)
    mixed = fuse(maps, (1, 2, 3), weights, nonneg=True, fusion="geometric")
    assert mixed.min() >= 0 and mixed.max() <= 1


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_attribute_shapes_ranges_and_batch_independence(case):
    mhex = _build(case)
    x, extra = _inputs(case, batch=3)
    if case.modality == "text":
        maps = mhex.attribute(x, target=1, additional_forward_args=extra)
        assert maps.shape == x.shape
        special = mhex.adapter.special_tokens(x, extra)
        assert (maps[special] == 0).all()
        with pytest.raises(ValueError, match="grid"):
            mhex.attribute(x, target=1, additional_forward_args=extra, output="grid")
    else:
        maps = mhex.attribute(x, target=1)
        assert maps.shape == (3, 1, *x.shape[-2:])
        like = mhex.attribute(x, target=1, output="like_input")
        assert like.shape == x.shape
        grid = mhex.attribute(x, target=1, output="grid")
        if case is CNN_CASE:
            assert grid.shape == (3, 1, 16, 16)  # the finest stage, layer2
            with pytest.raises(ValueError, match="tokens"):
                mhex.attribute(x, output="tokens")
        else:
            h, w = mhex.adapter.grid_size(x)
            assert grid.shape == (3, 1, h, w)
            tokens = mhex.attribute(x, target=1, output="tokens")
            torch.testing.assert_close(tokens.reshape(3, 1, h, w), grid)
    assert maps.min() >= 0 and maps.max() <= 1 + 1e-12
    assert torch.isfinite(maps).all() and not maps.requires_grad
    one = [
        mhex.attribute(
            x[i : i + 1], target=1, additional_forward_args=tuple(e[i : i + 1] for e in extra)
        )
        for i in range(3)
    ]
    torch.testing.assert_close(torch.cat(one), maps, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("case", [CNN_CASE, tiny_models.TEXT_MODELS[0]], ids=["cnn", "bert"])
def test_attribute_targets_equals_one_call_per_target_and_none_is_the_prediction(case):
    mhex = _build(case)
    x, extra = _inputs(case)
    both = mhex.attribute_targets(x, [0, torch.tensor([1, 2, 3])], additional_forward_args=extra)
    assert both.shape[0] == 2
    torch.testing.assert_close(both[0], mhex.attribute(x, 0, extra))
    torch.testing.assert_close(both[1], mhex.attribute(x, torch.tensor([1, 2, 3]), extra))
    pred = mhex.network(x, *extra).argmax(1)
    torch.testing.assert_close(mhex.attribute(x, None, extra), mhex.attribute(x, pred, extra))


def test_nonneg_false_keeps_the_sign_and_needs_the_mean_fusion():
    case = CNN_CASE
    with pytest.raises(ValueError, match="fusion='mean'"):
        _build(case, nonneg=False)
    mhex = _build(case, nonneg=False, fusion="mean")
    x, _ = _inputs(case)
    maps = mhex.attribute(x, target=0)
    assert maps.min() < 0 and maps.abs().max() <= 1 + 1e-12


def test_text_smoothing_is_a_moving_average_over_the_valid_tokens():
    case = tiny_models.TEXT_MODELS[0]
    x, extra = _inputs(case)
    raw = _build(case, window=1).attribute(x, target=0, additional_forward_args=extra)
    smooth = _build(case, window=3).attribute(x, target=0, additional_forward_args=extra)
    valid = ~_build(case).adapter.special_tokens(x, extra)
    for b in range(x.shape[0]):
        idx = valid[b].nonzero().flatten().tolist()
        for i in idx:
            near = [j for j in (i - 1, i, i + 1) if j in idx]
            want = sum(raw[b, j] for j in near) / len(near)
            torch.testing.assert_close(smooth[b, i], want, rtol=1e-12, atol=1e-14)


def test_it_is_a_captum_attribution_and_a_trainable_explainer():
    mhex = _build(CNN_CASE)
    assert isinstance(mhex, Attribution) and isinstance(mhex, nn.Module)
    assert isinstance(mhex, TrainableExplainer)
    assert isinstance(mhex.network, MHEXNetwork)
    assert mhex.forward_func is mhex.network
    assert not mhex.multiplies_by_inputs and not mhex.has_convergence_delta()
    x, _ = _inputs(CNN_CASE)
    out = mhex.attribute((x,), target=0)
    assert isinstance(out, tuple) and out[0].shape == (3, 1, 32, 32)
    from captum.metrics import infidelity

    def perturb(inputs):
        noise = torch.randn_like(inputs) * 0.01
        return noise, inputs - noise

    value = infidelity(
        mhex.network, perturb, x, mhex.attribute(x, target=0, output="like_input"), target=0
    )
    assert torch.isfinite(value).all()


def test_refusals_speak_the_users_language():
    with pytest.raises(UnsupportedModelError):
        MHEX(nn.Sequential(nn.Linear(3, 3)))
    model = tiny_models.build(CNN_CASE)
    with pytest.raises(ValueError, match="no module named"):
        MHEX(model, layers=["layer9"])
    with pytest.raises(ValueError, match="odd"):
        MHEX(model, window=2)
    with pytest.raises(ValueError, match="head_channels"):
        MHEX(model, head_channels=[4, 4])
    for bad in ([1.0, float("nan"), 1.0], [1.0, float("inf"), 1.0], [1.0, -1.0, 1.0], [0, 0, 0]):
        with pytest.raises(ValueError, match=r"^MHEX: stage_weights needs 3 finite"):
            MHEX(model, stage_weights=bad)
    for option, bad in (("gate", "channel"), ("pooling", "max"), ("fusion", "median")):
        with pytest.raises(ValueError, match=f"^MHEX: {option} must be"):
            MHEX(model, **{option: bad})
    mhex = MHEX(model).mark_fitted()
    with pytest.raises(ValueError, match="objective"):
        mhex.fit((torch.zeros(2, 3, 32, 32).double(), torch.zeros(2).long()), objective="mse")
    with pytest.raises(ValueError, match="objective='bce'"):
        mhex.loss((torch.zeros(2, 3, 32, 32).double(), torch.zeros(2, 5).double()), "ce")
    with pytest.raises(ValueError, match="out of range"):
        mhex.attribute(torch.zeros(1, 3, 32, 32).double(), target=7)


# ---------------------------------------------------------------------------------------------
# the backbone's flags


def test_train_backbone_trains_the_model_and_restores_its_flags():
    mhex = _build(CNN_CASE)
    model = mhex.network.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, _ = _inputs(CNN_CASE, batch=4)
    mhex.fit((x, torch.tensor([0, 1, 2, 1])), TrainingRecipe(epochs=1, batch_size=2,
             show_progress=False), train_backbone=True)  # fmt: skip
    assert not torch.equal(model.conv1[0].weight, before["conv1.0.weight"])
    assert all(p.requires_grad for p in model.parameters())
    assert not any(m.training for m in model.modules())
    assert mhex.backbone_trained


# ---------------------------------------------------------------------------------------------
# training: loss, validation


def test_loss_is_final_plus_weighted_heads():
    mhex = _build(CNN_CASE)
    x, _ = _inputs(CNN_CASE, batch=4)
    y = torch.tensor([[1, 0, 0, 1, 0], [0, 1, 0, 0, 0], [0, 0, 1, 1, 0], [1, 1, 0, 0, 0]]).double()
    terms = mhex.loss((x, y), "bce", head_weights=[0.5, 2.0, 0.25])
    logits, heads = mhex.network(x, return_heads=True)
    bce = F.binary_cross_entropy_with_logits
    want = bce(logits, y) + 0.5 * bce(heads[0], y) + 2 * bce(heads[1], y) + 0.25 * bce(heads[2], y)
    torch.testing.assert_close(terms["loss"], want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(terms["head1"], bce(heads[1], y), rtol=1e-12, atol=1e-12)
    ce = mhex_step(mhex.network, (x, y.argmax(1)), objective="ce", head_weights=[1, 1, 1])
    want = sum(F.cross_entropy(h, y.argmax(1)) for h in [logits, *heads])
    torch.testing.assert_close(ce["loss"], want, rtol=1e-12, atol=1e-12)
    # binary class indices with "bce" are one-hot encoded
    one_hot = mhex.loss((x, y.argmax(1)), "bce")["final"]
    torch.testing.assert_close(one_hot, bce(logits, F.one_hot(y.argmax(1), 5).double()))


def test_validation_reports_every_head(tmp_path):
    mhex = _build(tiny_models.TEXT_MODELS[0])
    x, (mask,) = _inputs(tiny_models.TEXT_MODELS[0], batch=6)
    y = torch.arange(6) % 2
    history = mhex.fit((x, mask, y), TrainingRecipe(epochs=1, batch_size=3, show_progress=False),
                       val_data=(x, mask, y))  # fmt: skip
    entry = history[0]
    assert {"loss", "final", "head0", "head1", "val_embeddings", "val_0", "val_final"} <= set(entry)
    assert 0 <= entry["val_final"] <= 1


# ---------------------------------------------------------------------------------------------
# collaboration analysis


def test_gradient_similarity_is_the_cosine_of_the_heads_backbone_gradients():
    mhex = _build(CNN_CASE)
    x, _ = _inputs(CNN_CASE, batch=4)
    y = torch.tensor([0, 1, 2, 1])
    sim = mhex.gradient_similarity((x, y))
    assert sim.shape == (4, 4) and sim.dtype == torch.float64
    torch.testing.assert_close(sim, sim.T)
    torch.testing.assert_close(sim.diagonal(), torch.ones(4, dtype=torch.float64))
    # literal: the gradients of head 0 and of the final loss w.r.t. the stem (shared by all)
    model = mhex.network.model
    # every loss reaches the layers up to the first gated stage (layer2), and only those
    shared = [
        p for n, p in model.named_parameters() if n.startswith(("conv1", "bn1", "layer1", "layer2"))
    ]
    logits, heads = mhex.network(x, return_heads=True)
    g0 = torch.autograd.grad(F.cross_entropy(heads[0], y), shared, retain_graph=True)
    gf = torch.autograd.grad(F.cross_entropy(logits, y), shared)
    a, b = torch.cat([g.flatten() for g in g0]), torch.cat([g.flatten() for g in gf])
    torch.testing.assert_close(sim[0, 3], (a @ b) / (a.norm() * b.norm()), rtol=1e-9, atol=1e-12)
    assert mhex.gradient_similarity((x, y), include_final=False).shape == (3, 3)
    assert all(p.grad is None for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# checkpoints


@pytest.mark.parametrize("case", [CNN_CASE, tiny_models.TEXT_MODELS[0]], ids=["cnn", "bert"])
@pytest.mark.parametrize("train_backbone", [False, True])
def test_checkpoint_holds_the_backbone_weights_when_it_was_trained(
    case, train_backbone, tmp_path, monkeypatch
):
    """The round trip itself is in test_explainers.py; here what MHEX adds: a trained backbone's
    weights travel with the checkpoint (and load into an untrained copy of the model), and the
    training record comes back."""
    import pickle

    mhex = _build(case, head_channels=3 if case is CNN_CASE else None)
    x, extra = _inputs(case, batch=4)
    mhex.fit((x, *extra, torch.tensor([0, 1, 1, 0])), TrainingRecipe(epochs=1, batch_size=2,
             show_progress=False), train_backbone=train_backbone)  # fmt: skip
    paths = mhex.save(tmp_path / "m")
    record = json.loads(paths.record.read_text())
    assert record["backbone"]["weights_stored"] is train_backbone
    assert any(k.startswith("model.") for k in record["weights"]["tensors"]) is train_backbone

    def refuse(*a, **k):
        raise AssertionError("unpickled")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    fresh = tiny_models.build(case, torch.float64, seed=0)  # the untrained model again
    if train_backbone:
        loaded = MHEX.load(tmp_path / "m", fresh)  # the trained weights come with it
    else:
        loaded = MHEX.load(tmp_path / "m", mhex.network.model)
    for (k, a), (_, b) in zip(
        mhex.network.state_dict().items(), loaded.network.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), k
    torch.testing.assert_close(
        loaded.attribute(x, 1, extra), mhex.attribute(x, 1, extra), rtol=0, atol=0
    )
    assert loaded.training_record["history"][0]["steps"] == 2


def test_load_refuses_other_backbones_layers_classes_and_weights(tmp_path):
    mhex = _build(CNN_CASE)
    mhex.save(tmp_path / "m")
    model = mhex.network.model
    with pytest.raises(CheckpointError, match="layers"):
        MHEX.load(tmp_path / "m", model, layers=["layer3", "layer4"])
    with pytest.raises(CheckpointError, match="classes"):
        MHEX.load(tmp_path / "m", model, num_classes=3)
    torch.manual_seed(0)
    other_k = zoo_resnet_s1(num_classes=3, channels=(4, 8, 8, 16)).double()
    with pytest.raises(CheckpointError, match="parameters"):
        MHEX.load(tmp_path / "m", other_k)
    wider = zoo_resnet_s1(num_classes=5, channels=(4, 8, 16, 16)).double()
    with pytest.raises(CheckpointError, match="made for a"):
        MHEX.load(tmp_path / "m", wider)
    vit = tiny_models.build(tiny_models.IMAGE_MODELS[0])
    with pytest.raises(CheckpointError, match="VisionTransformer"):
        MHEX.load(tmp_path / "m", vit)
    retrained = tiny_models.build(CNN_CASE, seed=5)  # same architecture, other weights
    with pytest.raises(CheckpointError, match="other weights"):
        MHEX.load(tmp_path / "m", retrained)
    # edited records and other methods' checkpoints: test_explainers.py


# ---------------------------------------------------------------------------------------------
# the benchmark data and the zoo


def test_a_short_run_on_the_benchmark_data_improves_every_head():
    """Top-1 hit rate (the head's highest class is in the image) of every head goes up."""
    model = zoo.load("shapes-vit")
    torch.manual_seed(0)
    mhex = MHEX(model)
    dk = zoo.data_kwargs("shapes-vit")
    train = shapes(1024, 3, **dk)
    held = shapes(512, FRESH_SEED, **dk)

    def hits() -> list[float]:
        with torch.no_grad():
            _, heads = mhex.network(held.images, return_heads=True)
        return [held.labels.gather(1, h.argmax(1, keepdim=True)).mean().item() for h in heads]

    before = hits()
    mhex.fit((train.images, train.labels), TrainingRecipe(epochs=2, batch_size=64, lr=0.05,
             show_progress=False), objective="bce")  # fmt: skip
    after = hits()
    assert all(a > b + 0.1 for a, b in zip(after, before, strict=True)), (before, after)


ZOO = ("shapes-cnn-mhex", "shapes-vit-mhex", "text-bert-mhex")


def test_zoo_lists_the_mhex_entries_as_explainers():
    names = zoo.available(kind="explainer")
    assert set(ZOO) <= set(names)
    assert not set(ZOO) & set(zoo.available())
    for name in ZOO:
        rec = zoo.info(name)
        assert rec["kind"] == "explainer" and rec["method"] == "mhex"
        assert rec["backbone_model"] == name.removesuffix("-mhex")
        assert rec["command"] == f"python benchmarks/training/train_mhex.py --only {name}"
        assert rec["data"]["train"]["seed"] != FRESH_SEED
        assert rec["weights"]["bytes"] < 3_000_000
        plain = zoo.info(rec["backbone_model"])["heldout"]["accuracy"]
        assert rec["heldout"]["accuracy"] >= plain - 0.01


@pytest.mark.parametrize("name", ZOO[:2])
def test_zoo_mhex_explains_two_object_images(name):
    mhex = zoo.load(name)
    assert isinstance(mhex, MHEX) and not mhex.network.training
    batch = shapes(48, FRESH_SEED, **{**zoo.data_kwargs(name), "min_objects": 2})
    pi, pc = batch.labels.nonzero(as_tuple=True)
    maps = mhex.attribute(batch.images[pi], target=pc)
    assert maps.shape == (len(pi), 1, 32, 32)
    grid = F.adaptive_avg_pool2d(maps, (4, 4))[:, 0].flatten(1)
    cells = F.adaptive_max_pool2d(batch.masks[pi, pc][:, None].float(), (4, 4)).flatten(1) > 0
    hit = cells.gather(1, grid.argmax(1, keepdim=True)).float().mean()
    assert hit >= 0.8
    a, b = maps[0::2], maps[1::2]  # the two classes of each image get different maps
    assert ((a - b).abs().flatten(1).amax(1) > 0.1).all()
    with torch.no_grad():
        logits = mhex.network(batch.images)
    assert ((logits > 0) == (batch.labels > 0.5)).all(1).float().mean() >= 0.9


def test_zoo_mhex_explains_sequences_with_counter_evidence():
    mhex = zoo.load("text-bert-mhex")
    batch = text_rationales(64, FRESH_SEED, **zoo.data_kwargs("text-bert"))
    has = batch.counter.any(1)
    ids, mask, y = batch.input_ids[has], batch.attention_mask[has], batch.labels[has]
    maps = mhex.attribute_targets(ids, [y, 1 - y], additional_forward_args=(mask,))
    own = (maps[0] * batch.rationale[has]).sum(1) / batch.rationale[has].sum(1)
    other = (maps[0] * batch.counter[has]).sum(1) / batch.counter[has].sum(1)
    assert (own > other).float().mean() >= 0.8  # the label's words, not the counter word
    own_b = (maps[1] * batch.counter[has]).sum(1) / batch.counter[has].sum(1)
    other_b = (maps[1] * batch.rationale[has]).sum(1) / batch.rationale[has].sum(1)
    assert (own_b > other_b).float().mean() >= 0.8  # and the other class: the counter word


# ---------------------------------------------------------------------------------------------
# slow: a full run


def _train_script():
    return training_script("train_mhex")


@pytest.mark.slow
@pytest.mark.timeout(3600)
@pytest.mark.parametrize("name", ["shapes-cnn-mhex", "shapes-vit-mhex"])
def test_full_run_of_the_shipped_recipe_keeps_the_accuracy_and_reaches_the_targets(name):
    """The zoo entry's recipe from scratch (gates and heads): accuracy and benchmark targets.

    Accuracy: the network's scores are the plain model's (gates beside the path), so its
    held-out accuracy is the model's exactly. Localisation: the standard pointing game (2 px at
    32 px) at least 0.85 (measured: CNN 0.984, ViT 0.900), the cell-grid one at least 0.8.
    """
    script = _train_script()
    entry = script.ENTRIES[name]
    dk = zoo.data_kwargs(entry.backbone)
    torch.manual_seed(entry.train_seed)
    mhex = MHEX(zoo.load(entry.backbone), **entry.mhex)
    mhex.fit(script.training_set(entry, dk), TrainingRecipe(show_progress=False, **entry.fit),
             objective=entry.objective)  # fmt: skip
    plain = zoo.load(entry.backbone)
    with torch.no_grad():
        acc = script.heldout_accuracy(mhex.network.eval(), False, dk)
        base = script.heldout_accuracy(plain, False, dk)
    assert acc == base
    loc = script.image_metrics(mhex, dk)
    assert loc["pointing_game"] >= 0.8 and loc["discrimination"] > 0.8
    assert loc["pointing_game_standard"] >= 0.85


# ---------------------------------------------------------------------------------------------
# CUDA


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device present")


@CUDA
@pytest.mark.cuda
@pytest.mark.parametrize(
    "case", [CNN_CASE, tiny_models.IMAGE_MODELS[0], tiny_models.TEXT_MODELS[0]]
)
def test_cuda_parity_and_fit_with_autocast(case):
    cpu = _build(case)
    gpu = _build(case).to("cuda")
    x, extra = _inputs(case, batch=4)
    want = cpu.attribute(x, target=1, additional_forward_args=extra)
    got = gpu.attribute(x.cuda(), target=1, additional_forward_args=tuple(e.cuda() for e in extra))
    assert got.is_cuda
    torch.testing.assert_close(got.cpu(), want, rtol=1e-6, atol=1e-8)
    history = gpu.fit((x.cuda(), *[e.cuda() for e in extra], torch.tensor([0, 1, 1, 0]).cuda()),
                      TrainingRecipe(epochs=1, batch_size=2, show_progress=False))  # fmt: skip
    assert history[0]["steps"] == 2 and torch.isfinite(torch.tensor(history[0]["loss"]))
    assert _hooks(gpu.network.model) == 0
