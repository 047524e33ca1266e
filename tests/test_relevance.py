"""RelevancePropagation against a literal, per-example, float64 re-implementation of the rule."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from tiny_models import ALL_MODELS, IMAGE_MODELS, TEXT_MODELS, Case, build, make_inputs

from captum_ext.adapters.base import adapter_for
from captum_ext.attr import relevance as relevance_module
from captum_ext.attr.relevance import RelevancePropagation, relevance_increment
from captum_ext.errors import MissingAttentionError

ATOL = 1e-10
TARGETS = [1, 4, 0]
EXPECTED_READOUT = {"timm_deit_distilled": "cls_dist", "timm_avgpool": "mean"}
EXPECTED_PREFIX = {"timm_deit_distilled": 2, "timm_registers": 5, "timm_avgpool": 0}


def _readout(case: Case) -> str | None:
    """The readout override a user passes: the mean-pooling sentence encoder reads the mean."""
    return "mean" if case.name == "meanpool_bert" else None


def _prefix(case: Case) -> int:
    return 0 if case.modality == "text" else EXPECTED_PREFIX.get(case.name, 1)


def _literal_readout(case: Case, n: int, extra=None) -> torch.Tensor:
    """Readout weights (N,) written out per family, independent of the adapter."""
    kind = _readout(case) or EXPECTED_READOUT.get(case.name, "cls")
    w = torch.zeros(n, dtype=torch.float64)
    if kind == "cls":
        w[0] = 1.0
    elif kind == "cls_dist":
        w[0] = w[1] = 0.5
    else:
        p = _prefix(case)
        w[p:] = 1.0 / (n - p)
        if extra:  # text: the mean over the attended tokens, as the model pools them
            m = extra[0][0].to(torch.float64)
            w = m / m.sum()
    return w


def _attention_and_grads(model, case, x, extra, target):
    """Every block's A_b (H, N, N) and dA_b for one example, by plain forward hooks + grad."""
    adapter = adapter_for(model, readout=_readout(case))
    store: dict[int, torch.Tensor] = {}
    handles = []
    for b in range(adapter.num_layers):
        pt = adapter.attention_point(b)

        def hook(mod, args, out, b=b, idx=pt.index):
            store[b] = out if idx is None else out[idx]

        handles.append(pt.module.register_forward_hook(hook))
    try:
        with adapter.attention_probabilities():
            out = adapter.forward(x, extra)
    finally:
        for h in handles:
            h.remove()
    attn = [store[b] for b in range(adapter.num_layers)]
    grads = torch.autograd.grad(out[0, target], attn)
    return [a[0].detach() for a in attn], [g[0] for g in grads]


def literal_relevance(model, case, x, extra, target, start_layer=0, per_head=False):
    """Chefer et al. (2021), generic rule, batch size 1, with explicit (N, N) matrices.

    R = I; for b = start..L-1: Abar_b = mean_h ReLU(dA_b^h * A_b^h); R = R + Abar_b R.
    Returns the readout row over all tokens (N,), or (H, N) per head of the last block.
    """
    attn, grads = _attention_and_grads(model, case, x, extra, target)
    n_layers = len(attn)
    heads, n, _ = attn[0].shape
    eye = torch.eye(n, dtype=torch.float64)
    r = eye.clone()
    for b in range(start_layer, n_layers - 1 if per_head else n_layers):
        abar = torch.zeros(n, n, dtype=torch.float64)
        for h in range(heads):
            abar += torch.clamp(grads[b][h] * attn[b][h], min=0.0)
        abar /= heads
        r = r + abar @ r
    w = _literal_readout(case, n, extra)
    if not per_head:
        return w @ r
    last = n_layers - 1
    rows = [
        w @ (eye + torch.clamp(grads[last][h] * attn[last][h], min=0.0)) @ r for h in range(heads)
    ]
    return torch.stack(rows)


def _per_sample_reference(model, case, x, extra, **kw):
    rows = []
    for i in range(x.shape[0]):
        extra_i = tuple(e[i : i + 1] for e in extra)
        row = literal_relevance(model, case, x[i : i + 1], extra_i, TARGETS[i], **kw)
        rows.append(row[..., _prefix(case) :])
    return torch.stack(rows)


@pytest.mark.parametrize("case", ALL_MODELS, ids=lambda c: c.name)
def test_batched_streaming_and_naive_equal_literal_reference(case):
    model = build(case)
    x, extra = make_inputs(case, batch=3)
    expected = _per_sample_reference(model, case, x, extra)
    for streaming in (True, False):
        rp = RelevancePropagation(model, readout=_readout(case), streaming=streaming)
        got = rp.attribute(x, target=TARGETS, additional_forward_args=extra, output="tokens")
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    assert expected.abs().max() > 0


@pytest.mark.parametrize(
    "case", [IMAGE_MODELS[0], IMAGE_MODELS[1], TEXT_MODELS[2]], ids=lambda c: c.name
)
def test_heads_all_is_last_block_per_head_and_averages_to_mean(case):
    model = build(case)
    x, extra = make_inputs(case, batch=3)
    expected = _per_sample_reference(model, case, x, extra, per_head=True)
    mean_map = RelevancePropagation(model, readout=_readout(case)).attribute(
        x, target=TARGETS, additional_forward_args=extra, output="tokens"
    )
    for streaming in (True, False):
        rp = RelevancePropagation(model, readout=_readout(case), heads="all", streaming=streaming)
        got = rp.attribute(x, target=TARGETS, additional_forward_args=extra, output="tokens")
        assert got.shape == (3, 2, expected.shape[-1])
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
        torch.testing.assert_close(got.mean(1), mean_map, atol=ATOL, rtol=0)
    assert (expected[:, 0] - expected[:, 1]).abs().max() > 1e-8  # heads really differ


def _deep_vit():
    import timm

    torch.manual_seed(0)
    return (
        timm.create_model(
            "vit_tiny_patch16_224",
            img_size=16,
            patch_size=8,
            embed_dim=16,
            depth=4,
            num_heads=2,
            num_classes=5,
        )
        .double()
        .eval()
    )


DEEP = Case("timm_vit", _deep_vit, "image", (16, 16))


@pytest.mark.parametrize("start_layer", [1, 3, -1, -2])
def test_start_layer(start_layer):
    model = build(DEEP)
    x, _ = make_inputs(DEEP, batch=3)
    start = start_layer % 4
    expected = _per_sample_reference(model, DEEP, x, (), start_layer=start)
    for streaming in (True, False):
        rp = RelevancePropagation(model, start_layer=start_layer, streaming=streaming)
        got = rp.attribute(x, target=TARGETS, output="tokens")
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_last_start_layer_is_identity_plus_last_block():
    """start_layer = L-1: r = w^T (I + Abar_{L-1}), written without the loop."""
    model = build(DEEP)
    x, _ = make_inputs(DEEP, batch=1)
    attn, grads = _attention_and_grads(model, DEEP, x, (), 2)
    abar = torch.clamp(grads[-1] * attn[-1], min=0).mean(0)
    w = _literal_readout(DEEP, abar.shape[-1])
    expected = (w + w @ abar)[1:]
    got = RelevancePropagation(model, start_layer=3).attribute(x, target=2, output="tokens")
    torch.testing.assert_close(got[0], expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("bad", [4, -5, 1.0])
def test_bad_start_layer(bad):
    with pytest.raises((ValueError, TypeError), match="start_layer"):
        RelevancePropagation(build(DEEP), start_layer=bad)


def test_frozen_parameters_under_no_grad():
    case = IMAGE_MODELS[0]
    model = build(case)
    x, _ = make_inputs(case)
    expected = RelevancePropagation(model).attribute(x, target=TARGETS, output="tokens")
    for p in model.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        got = RelevancePropagation(model).attribute(x, target=TARGETS, output="tokens")
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    assert not any(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("case", [IMAGE_MODELS[4], TEXT_MODELS[0]], ids=lambda c: c.name)
def test_output_layouts_and_tuple_inputs(case):
    model = build(case)
    x, extra = make_inputs(case, batch=2)
    rp = RelevancePropagation(model)
    tokens = rp.attribute(x, target=1, additional_forward_args=extra, output="tokens")
    (packed,) = rp.attribute((x,), target=1, additional_forward_args=extra, output="tokens")
    torch.testing.assert_close(packed, tokens, atol=0, rtol=0)
    if case.modality == "text":
        assert tokens.shape == x.shape
        torch.testing.assert_close(rp.attribute(x, 1, extra), tokens, atol=0, rtol=0)
        return
    h, w = case.image_size[0] // 8, case.image_size[1] // 8
    grid = rp.attribute(x, target=1, output="grid")
    assert grid.shape == (2, 1, h, w)
    torch.testing.assert_close(grid.flatten(1), tokens, atol=0, rtol=0)
    up = rp.attribute(x, target=1, output="input")
    assert up.shape == (2, 1, *case.image_size)
    torch.testing.assert_close(up[..., ::8, ::8], grid, atol=0, rtol=0)


def test_captum_contract():
    rp = RelevancePropagation(build(IMAGE_MODELS[0]))
    assert rp.multiplies_by_inputs is True
    assert rp.has_convergence_delta() is False
    assert hasattr(RelevancePropagation.attribute, "__wrapped__")  # log_usage, for NoiseTunnel
    with pytest.raises(ValueError, match="heads"):
        RelevancePropagation(build(IMAGE_MODELS[0]), heads="max")


# ------------------------------------------------------------------------ missing attention
def _sdpa_forward(attn):
    def forward(x, attn_mask=None, is_causal=False):
        b, n, c = x.shape
        qkv = attn.qkv(x).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)
        return attn.proj(out)

    return forward


def test_timm_attention_that_never_forms_probabilities_raises(monkeypatch):
    model = build(IMAGE_MODELS[0])
    attn = model.blocks[-1].attn
    monkeypatch.setattr(attn, "forward", _sdpa_forward(attn))
    x, _ = make_inputs(IMAGE_MODELS[0])
    for streaming in (True, False):
        with pytest.raises(MissingAttentionError, match=r"blocks\[1\]\.attn\.attn_drop"):
            RelevancePropagation(model, streaming=streaming).attribute(x, target=0)
    assert all(b.attn.fused_attn for b in model.blocks)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_hf_sdpa_model_is_switched_to_eager_and_restored():
    case = TEXT_MODELS[0]
    model = build(case)
    model.set_attn_implementation("sdpa")
    x, extra = make_inputs(case)
    got = RelevancePropagation(model).attribute(x, TARGETS, extra)
    assert model.config._attn_implementation == "sdpa"
    expected = _per_sample_reference(model, case, x, extra)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    assert model.config._attn_implementation == "sdpa"


# ------------------------------------------------------------------------ memory
@pytest.mark.parametrize("streaming", [True, False])
def test_streaming_keeps_no_per_block_gradient(monkeypatch, streaming):
    case = IMAGE_MODELS[0]
    model = build(case)
    batch = 7  # a shape (7, 2, 17, 17) no other test creates
    x, _ = make_inputs(case, batch=batch)
    seen: list[weakref.ref] = []
    earlier_alive: list[bool] = []

    def probe(attn, grad):
        gc.collect()
        earlier_alive.append(any(ref() is not None for ref in seen))
        seen.append(weakref.ref(grad))
        return relevance_increment(attn, grad)

    monkeypatch.setattr(relevance_module, "relevance_increment", probe)
    decoy = torch.zeros(batch, 2, 17, 17)
    assert _live_tensors_of_shape(decoy.shape) == 1  # the counter sees live tensors
    del decoy
    rp = RelevancePropagation(model, streaming=streaming)
    out = rp.attribute(x, target=1, output="tokens")
    assert out.shape == (batch, 16)
    assert len(seen) == 2
    # Streaming: when block 0's gradient arrives, block 1's is already gone. The naive path
    # holds both (this is what makes the check able to fail).
    assert earlier_alive == [False, not streaming]
    gc.collect()
    assert all(ref() is None for ref in seen)
    assert _live_tensors_of_shape((batch, 2, 17, 17)) == 0
    assert not [k for k, v in vars(rp).items() if isinstance(v, torch.Tensor)]


def _live_tensors_of_shape(shape) -> int:
    tensors = (o for o in gc.get_objects() if issubclass(type(o), torch.Tensor))
    return sum(1 for t in tensors if tuple(t.shape) == tuple(shape))


def test_streaming_detects_blocks_the_backward_pass_misses():
    """The order/coverage check is not dead code: a block off the gradient path is reported."""
    rp = RelevancePropagation(build(DEEP))
    a0 = torch.rand(1, 2, 3, 3, dtype=torch.float64, requires_grad=True) * 1
    a1 = torch.rand(1, 2, 3, 3, dtype=torch.float64, requires_grad=True) * 1  # independent of a0
    score = (a0 * 2).sum() + (a1 * 3).sum()
    w = torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64)
    with pytest.raises(RuntimeError, match="expected each of"):
        rp._streamed(score, [a0, a1], w)
    assert not a0._backward_hooks and not a1._backward_hooks


# ------------------------------------------------------------------------ hook hygiene
def _state(model):
    return (
        [m.training for m in model.modules()],
        [getattr(m, "fused_attn", None) for m in model.modules()],
        [
            getattr(getattr(m, "config", None), "_attn_implementation", None)
            for m in model.modules()
        ],
    )


@pytest.mark.parametrize(
    "case", [IMAGE_MODELS[1], IMAGE_MODELS[6], TEXT_MODELS[2]], ids=lambda c: c.name
)
def test_hooks_and_model_state_restored(case):
    model = build(case)
    model.train()
    model.get_submodule(next(n for n, _ in model.named_modules() if n)).eval()  # mixed modes
    before = _state(model)
    x, extra = make_inputs(case, batch=2)
    for streaming in (True, False):
        rp = RelevancePropagation(model, streaming=streaming)
        rp.attribute(x, target=[0, 1], additional_forward_args=extra)
        assert _state(model) == before
        with pytest.raises(ValueError, match="out of range"):
            rp.attribute(x, target=99, additional_forward_args=extra)
        assert _state(model) == before
        assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
