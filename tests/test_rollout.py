"""AttentionRollout against a literal, per-example, float64 re-implementation of the product."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny_models import ALL_MODELS, IMAGE_MODELS, TEXT_MODELS, Case, build, make_inputs

from captum_ext.adapters.base import adapter_for
from captum_ext.attr.attention_map import AttentionMap
from captum_ext.attr.rollout import AttentionRollout, rollout_matrix
from captum_ext.errors import MissingAttentionError

ATOL = 1e-10
EXPECTED_READOUT = {"timm_deit_distilled": "cls_dist", "timm_avgpool": "mean"}
EXPECTED_PREFIX = {"timm_deit_distilled": 2, "timm_registers": 5, "timm_avgpool": 0}


def _readout(case: Case) -> str | None:
    return "mean" if case.name == "meanpool_bert" else None


def _prefix(case: Case) -> int:
    return 0 if case.modality == "text" else EXPECTED_PREFIX.get(case.name, 1)


def _literal_readout(case: Case, n: int, extra=None) -> torch.Tensor:
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


@torch.no_grad()
def _attention(model, case, x, extra):
    """Every block's post-softmax attention (H, N, N) for one example, by plain forward hooks."""
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
            adapter.forward(x, extra)
    finally:
        for h in handles:
            h.remove()
    return [store[b][0] for b in range(adapter.num_layers)]


def literal_rollout(model, case, x, extra, start_layer=0):
    """Abnar & Zuidema (2020), batch size 1: R = I; R = Ahat_b R with Ahat = rownorm(mean_h A + I)."""
    attn = _attention(model, case, x, extra)
    heads, n, _ = attn[0].shape
    r = torch.eye(n, dtype=torch.float64)
    for b in range(start_layer, len(attn)):
        a = sum(attn[b][h] for h in range(heads)) / heads + torch.eye(n, dtype=torch.float64)
        for i in range(n):
            a[i] = a[i] / a[i].sum()
        r = a @ r
    return _literal_readout(case, n, extra) @ r


def _per_sample_reference(model, case, x, extra, **kw):
    rows = []
    for i in range(x.shape[0]):
        extra_i = tuple(e[i : i + 1] for e in extra)
        rows.append(literal_rollout(model, case, x[i : i + 1], extra_i, **kw)[_prefix(case) :])
    return torch.stack(rows)


@pytest.mark.parametrize("case", ALL_MODELS, ids=lambda c: c.name)
def test_batched_equals_literal_reference(case):
    model = build(case)
    x, extra = make_inputs(case, batch=3)
    expected = _per_sample_reference(model, case, x, extra)
    got = AttentionRollout(model, readout=_readout(case)).attribute(
        x, additional_forward_args=extra, output="tokens"
    )
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    assert (got >= 0).all()
    if case.modality == "text" and _readout(case) is None:  # a readout row sums to 1
        torch.testing.assert_close(got.sum(-1), torch.ones(3, dtype=got.dtype), atol=ATOL, rtol=0)


def test_rollout_matrix_rows_sum_to_one():
    g = torch.Generator().manual_seed(0)
    attn = torch.rand(3, 4, 6, 6, generator=g, dtype=torch.float64)
    attn = attn / attn.sum(-1, keepdim=True)
    attn[0, 0, 2] = torch.tensor([0, 0, 0, 0, 0, 1.0])  # a one-hot row
    mat = rollout_matrix(attn)
    assert mat.shape == (3, 6, 6)
    assert (mat >= 0).all()
    torch.testing.assert_close(
        mat.sum(-1), torch.ones(3, 6, dtype=torch.float64), atol=1e-12, rtol=0
    )
    expected = (attn.mean(1) + torch.eye(6, dtype=torch.float64)) / 2
    torch.testing.assert_close(mat, expected, atol=1e-12, rtol=0)
    # Unnormalised input (e.g. probabilities in a lower precision): rows still sum to 1.
    mat = rollout_matrix(attn * 1.3)
    torch.testing.assert_close(
        mat.sum(-1), torch.ones(3, 6, dtype=torch.float64), atol=1e-12, rtol=0
    )


def _uniform_attention_vit():
    model = build(IMAGE_MODELS[0])
    d = model.embed_dim
    with torch.no_grad():
        for blk in model.blocks:
            blk.attn.qkv.weight[: 2 * d] = 0  # q = k = 0: every attention row is uniform
            blk.attn.qkv.bias[: 2 * d] = 0
    return model


def test_uniform_attention_gives_uniform_rollout_and_attention_map():
    model = _uniform_attention_vit()
    x, _ = make_inputs(IMAGE_MODELS[0], batch=2)
    for method in (AttentionRollout(model), AttentionMap(model)):
        tokens = method.attribute(x, output="tokens")
        assert tokens.shape == (2, 16)
        assert tokens.min() > 0
        torch.testing.assert_close(tokens, tokens[:, :1].expand_as(tokens), atol=1e-12, rtol=0)
    # The random model is not uniform: the check above can fail.
    tokens = AttentionRollout(build(IMAGE_MODELS[0])).attribute(x, output="tokens")
    assert (tokens - tokens[:, :1]).abs().max() > 1e-6


@pytest.mark.parametrize("case", [IMAGE_MODELS[0], TEXT_MODELS[1]], ids=lambda c: c.name)
def test_last_start_layer_is_half_attention_map_plus_residual(case):
    """start_layer = L-1: r = w^T (mean_h A_{L-1} + I) / 2, i.e. (AM + readout) / 2."""
    model = build(case)
    x, extra = make_inputs(case, batch=3)
    got = AttentionRollout(model, start_layer=-1).attribute(x, None, extra, output="tokens")
    am = AttentionMap(model).attribute(x, None, extra, output="tokens")
    expected = am / 2
    if case.modality == "text":
        expected[:, 0] += 0.5
    torch.testing.assert_close(got, expected, atol=1e-7, rtol=0)  # AM's weights are float32
    torch.testing.assert_close(
        got, _per_sample_reference(model, case, x, extra, start_layer=1), atol=ATOL, rtol=0
    )


def test_target_ignored_and_inference_mode():
    case = IMAGE_MODELS[1]
    model = build(case)
    x, _ = make_inputs(case)
    ro = AttentionRollout(model)
    base = ro.attribute(x, output="tokens")
    torch.testing.assert_close(ro.attribute(x, target=[0, 3, 4], output="tokens"), base)
    with torch.inference_mode():
        torch.testing.assert_close(ro.attribute(x, output="tokens"), base)


@pytest.mark.parametrize("case", [IMAGE_MODELS[5], TEXT_MODELS[2]], ids=lambda c: c.name)
def test_output_layouts_and_tuple_inputs(case):
    model = build(case)
    x, extra = make_inputs(case, batch=2)
    ro = AttentionRollout(model)
    tokens = ro.attribute(x, additional_forward_args=extra, output="tokens")
    (packed,) = ro.attribute((x,), additional_forward_args=extra, output="tokens")
    torch.testing.assert_close(packed, tokens, atol=0, rtol=0)
    if case.modality == "text":
        assert tokens.shape == x.shape
        return
    h, w = case.image_size[0] // 8, case.image_size[1] // 8
    grid = ro.attribute(x, output="grid")
    assert grid.shape == (2, 1, h, w)
    torch.testing.assert_close(grid.flatten(1), tokens, atol=0, rtol=0)
    up = ro.attribute(x)
    assert up.shape == (2, 1, *case.image_size)
    torch.testing.assert_close(up[..., ::8, ::8], grid, atol=0, rtol=0)


def test_captum_contract_and_arguments():
    model = build(IMAGE_MODELS[0])
    ro = AttentionRollout(model)
    assert ro.multiplies_by_inputs is False
    assert ro.has_convergence_delta() is False
    assert hasattr(AttentionRollout.attribute, "__wrapped__")
    with pytest.raises(ValueError, match="start_layer"):
        AttentionRollout(model, start_layer=2)
    with pytest.raises(ValueError, match="readout"):
        AttentionRollout(model, readout="max")


def test_timm_attention_that_never_forms_probabilities_raises(monkeypatch):
    model = build(IMAGE_MODELS[0])
    attn = model.blocks[0].attn

    def forward(x, attn_mask=None, is_causal=False):
        b, n, c = x.shape
        qkv = attn.qkv(x).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(*qkv.unbind(0))
        return attn.proj(out.transpose(1, 2).reshape(b, n, c))

    monkeypatch.setattr(attn, "forward", forward)
    x, _ = make_inputs(IMAGE_MODELS[0])
    with pytest.raises(MissingAttentionError, match=r"blocks\[0\]\.attn\.attn_drop"):
        AttentionRollout(model).attribute(x)
    assert all(b.attn.fused_attn for b in model.blocks)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_hf_sdpa_model_is_switched_to_eager_and_restored():
    case = TEXT_MODELS[0]
    model = build(case)
    model.set_attn_implementation("sdpa")
    x, extra = make_inputs(case)
    got = AttentionRollout(model).attribute(x, additional_forward_args=extra)
    assert model.config._attn_implementation == "sdpa"
    torch.testing.assert_close(got, _per_sample_reference(model, case, x, extra), atol=ATOL, rtol=0)


def _state(model):
    return (
        [m.training for m in model.modules()],
        [getattr(m, "fused_attn", None) for m in model.modules()],
        [
            getattr(getattr(m, "config", None), "_attn_implementation", None)
            for m in model.modules()
        ],
    )


@pytest.mark.parametrize("case", [IMAGE_MODELS[6], TEXT_MODELS[0]], ids=lambda c: c.name)
def test_hooks_and_model_state_restored_after_success_and_failure(case):
    model = build(case)
    model.train()
    before = _state(model)
    x, extra = make_inputs(case, batch=2)
    ro = AttentionRollout(model)
    ro.attribute(x, additional_forward_args=extra)
    assert _state(model) == before
    bad = x[..., :-1] if case.modality == "text" else x
    bad_extra = extra if case.modality == "text" else (torch.zeros(1),)  # fails in the forward
    with pytest.raises((RuntimeError, ValueError, TypeError, IndexError)):
        ro.attribute(bad, additional_forward_args=bad_extra)
    assert _state(model) == before
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
