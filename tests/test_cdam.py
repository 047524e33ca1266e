"""CDAM against literal references and Captum, for every adapter family."""

from __future__ import annotations

import pytest
import torch
from captum.attr import LayerGradientXActivation
from reference import cdam_finite_difference, cdam_timm_manual
from tiny_models import (
    ALL_MODELS,
    IMAGE_MODELS,
    NUM_CLASSES,
    TEXT_MODELS,
    MeanPoolBert,
    build,
    make_inputs,
)

from captum_ext import CDAM, ConceptCDAM, adapter_for

IDS = [c.name for c in ALL_MODELS]


def _family(name: str) -> str:
    return "timm" if name.startswith("timm") else name


@pytest.mark.parametrize("case", ALL_MODELS, ids=IDS)
def test_cdam_equals_finite_difference_reference(case):
    model = build(case)
    x, extra = make_inputs(case, batch=2)
    target = 3
    got = CDAM(model).attribute(x, target=target, additional_forward_args=extra, output="tokens")
    prefix = adapter_for(model).num_prefix_tokens
    for b in range(2):
        xb = x[b : b + 1]
        eb = tuple(e[b : b + 1] for e in extra)
        ref = cdam_finite_difference(model, _family(case.name), xb, eb, lambda o: o[0, target])
        assert got.dtype == torch.float64
        torch.testing.assert_close(got[b], ref[prefix:], rtol=1e-6, atol=1e-7)


def test_cdam_equals_manual_timm_forward():
    case = IMAGE_MODELS[0]
    model = build(case)
    x, _ = make_inputs(case, batch=3)
    got = CDAM(model).attribute(x, target=2, output="tokens")
    ref = cdam_timm_manual(model, x, 2)[:, 1:]
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", IMAGE_MODELS[:5], ids=[c.name for c in IMAGE_MODELS[:5]])
def test_cdam_equals_captum_layer_gradient_x_activation(case):
    model = build(case)
    x, _ = make_inputs(case, batch=3)
    target = [0, 4, 2]
    ours = CDAM(model).attribute(x, target=target, output="tokens")
    lgxa = LayerGradientXActivation(model, model.blocks[-1].norm1).attribute(x, target=target)
    p = model.num_prefix_tokens
    torch.testing.assert_close(ours, lgxa.sum(-1)[:, p:], rtol=1e-12, atol=1e-12)


def test_cdam_equals_captum_on_hf_vit():
    case = next(c for c in IMAGE_MODELS if c.name == "hf_vit")
    model = build(case)
    x, _ = make_inputs(case)
    layer = model.vit.layers[-1].layernorm_before
    wrapped = lambda inp: model(inp).logits  # noqa: E731
    lgxa = LayerGradientXActivation(wrapped, layer).attribute(x, target=1)
    ours = CDAM(model).attribute(x, target=1, output="tokens")
    torch.testing.assert_close(ours, lgxa.sum(-1)[:, 1:], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", ALL_MODELS, ids=IDS)
def test_batch_equals_single_calls_and_is_deterministic(case):
    model = build(case)
    x, extra = make_inputs(case, batch=3)
    cdam = CDAM(model)
    target = torch.tensor([1, 0, 4])
    batched = cdam.attribute(x, target=target, additional_forward_args=extra)
    for b in range(3):
        single = cdam.attribute(
            x[b : b + 1],
            target=int(target[b]),
            additional_forward_args=tuple(e[b : b + 1] for e in extra),
        )
        torch.testing.assert_close(batched[b : b + 1], single, rtol=1e-10, atol=1e-12)
    again = cdam.attribute(x, target=target, additional_forward_args=extra)
    assert torch.equal(batched, again)


def test_scores_are_signed_and_class_dependent():
    case = IMAGE_MODELS[0]
    model = build(case)
    x, _ = make_inputs(case, batch=2)
    a0 = CDAM(model).attribute(x, target=0, output="tokens")
    a1 = CDAM(model).attribute(x, target=1, output="tokens")
    assert (a0 < 0).any() and (a0 > 0).any()
    assert not torch.allclose(a0, a1)


def test_several_targets_share_one_forward_pass():
    case = IMAGE_MODELS[0]
    model = build(case)
    x, _ = make_inputs(case, batch=2)
    calls = []
    handle = model.patch_embed.register_forward_hook(lambda *a: calls.append(1))
    try:
        cdam = CDAM(model)
        many = cdam.attribute_targets(x, [0, 3, [1, 2]], output="grid")
        assert len(calls) == 1
    finally:
        handle.remove()
    assert many.shape == (3, 2, 1, 4, 4)
    for k, t in enumerate([0, 3, [1, 2]]):
        torch.testing.assert_close(many[k], cdam.attribute(x, target=t, output="grid"))


def test_output_layouts_agree():
    case = next(c for c in IMAGE_MODELS if c.name == "timm_nonsquare")
    model = build(case)
    x, _ = make_inputs(case, batch=2)
    cdam = CDAM(model)
    tokens = cdam.attribute(x, target=1, output="tokens")
    grid = cdam.attribute(x, target=1, output="grid")
    full = cdam.attribute(x, target=1)
    assert tokens.shape == (2, 24) and grid.shape == (2, 1, 4, 6) and full.shape == (2, 1, 32, 48)
    torch.testing.assert_close(grid.reshape(2, -1), tokens)
    # nearest upsampling: every 8x8 cell holds its token's score
    torch.testing.assert_close(full[:, :, ::8, ::8], grid)
    torch.testing.assert_close(full[:, :, 7::8, 7::8], grid)


@pytest.mark.parametrize("case", TEXT_MODELS, ids=[c.name for c in TEXT_MODELS])
def test_text_maps_align_with_input_ids(case):
    model = build(case)
    ids, extra = make_inputs(case)
    a = CDAM(model).attribute(ids, target=0, additional_forward_args=extra)
    assert a.shape == ids.shape


def test_layer_argument_accepts_block_or_token_module():
    case = IMAGE_MODELS[0]
    model = build(case)
    x, _ = make_inputs(case)
    default = CDAM(model).attribute(x, target=1)
    by_block = CDAM(model, layer=model.blocks[-1]).attribute(x, target=1)
    by_norm = CDAM(model, layer=model.blocks[-1].norm1).attribute(x, target=1)
    earlier = CDAM(model, layer=model.blocks[0]).attribute(x, target=1)
    torch.testing.assert_close(default, by_block)
    torch.testing.assert_close(default, by_norm)
    assert not torch.allclose(default, earlier)


def test_frozen_model_and_input_without_grad():
    case = IMAGE_MODELS[0]
    model = build(case)
    for p in model.parameters():
        p.requires_grad_(False)
    x, _ = make_inputs(case)
    with torch.no_grad():
        got = CDAM(model).attribute(x, target=1, output="tokens")
    for p in model.parameters():
        p.requires_grad_(True)
    torch.testing.assert_close(got, CDAM(model).attribute(x, target=1, output="tokens"))
    assert not any(p.grad is not None for p in model.parameters())


def _cdam_reference_with_stream(model, x, target, transform):
    """Manual timm forward with ``transform`` applied to the stream entering the last block."""
    t = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
    for blk in model.blocks[:-1]:
        t = blk(t)
    t = transform(t.detach())
    last = model.blocks[-1]
    tokens = last.norm1(t).detach().requires_grad_(True)
    t = t + last.ls1(last.attn(tokens))
    t = t + last.ls2(last.mlp(last.norm2(t)))
    logits = model.forward_head(model.norm(t))
    (grad,) = torch.autograd.grad(logits[:, target].sum(), tokens)
    return (tokens * grad).sum(-1).detach()[:, 1:]


def test_integrated_cdam_equals_reference():
    case = IMAGE_MODELS[0]
    model = build(case)
    x, _ = make_inputs(case, batch=2)
    m = 6
    got = CDAM(model, variant="integrated", n_samples=m).attribute(x, target=2, output="tokens")
    ref = sum(
        _cdam_reference_with_stream(model, x, 2, lambda t, k=k: t * k / m) for k in range(1, m)
    ) / (m - 1)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)


def test_smooth_cdam_equals_reference_and_is_seeded():
    case = IMAGE_MODELS[0]
    model = build(case)
    x, _ = make_inputs(case, batch=2)
    n, level = 4, 0.05
    got = CDAM(model, variant="smooth", n_samples=n, seed=7).attribute(x, 2, output="tokens")
    gen = torch.Generator().manual_seed(7)

    def noisy(t):
        flat = t.flatten(1)
        sigma = level * (flat.max(1).values - flat.min(1).values)
        # every example draws the same noise from the seed: its map does not depend on the batch
        return t + torch.randn(t.shape[1:], generator=gen, dtype=t.dtype) * sigma[:, None, None]

    ref = sum(_cdam_reference_with_stream(model, x, 2, noisy) for _ in range(n)) / n
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    again = CDAM(model, variant="smooth", n_samples=n, seed=7).attribute(x, 2, output="tokens")
    other = CDAM(model, variant="smooth", n_samples=n, seed=8).attribute(x, 2, output="tokens")
    assert torch.equal(got, again) and not torch.equal(got, other)


def test_concept_cdam_timm_equals_reference():
    import timm

    torch.manual_seed(0)
    model = (
        timm.create_model(
            "vit_tiny_patch16_224",
            img_size=32,
            patch_size=8,
            embed_dim=32,
            depth=2,
            num_heads=2,
            num_classes=0,
        )
        .double()
        .eval()
    )
    g = torch.Generator().manual_seed(3)
    examples = torch.randn(4, 3, 32, 32, generator=g, dtype=torch.float64)
    x = torch.randn(2, 3, 32, 32, generator=g, dtype=torch.float64)
    ccdam = ConceptCDAM(model)
    concept = ccdam.concept_from_examples(examples)
    with torch.no_grad():
        torch.testing.assert_close(concept, model(examples).mean(0))
    got = ccdam.attribute(x, concept, output="tokens")
    for b in range(2):
        ref = cdam_finite_difference(
            model, "timm", x[b : b + 1], (), lambda z: (z[0] * concept).sum()
        )
        torch.testing.assert_close(got[b], ref[1:], rtol=1e-6, atol=1e-7)


def test_concept_cdam_text_wrapper_equals_reference():
    torch.manual_seed(0)
    model = MeanPoolBert(num_classes=None).double().eval()
    case = next(c for c in TEXT_MODELS if c.name == "meanpool_bert")
    ids, extra = make_inputs(case, batch=3)
    ccdam = ConceptCDAM(model, readout="mean")
    concept = ccdam.concept_from_examples(ids, additional_forward_args=extra)
    got = ccdam.attribute(ids, concept, additional_forward_args=extra)
    assert got.shape == ids.shape
    ref = cdam_finite_difference(
        model, "meanpool_bert", ids[:1], (extra[0][:1],), lambda z: (z[0] * concept).sum()
    )
    torch.testing.assert_close(got[0], ref, rtol=1e-6, atol=1e-7)


GRAPH_CASES = [c for c in ALL_MODELS if c.name in ("timm_vit", "hf_vit", "bert", "meanpool_bert")]


def _watch_blocks(adapter):
    """Forward hooks recording, per block call, grad mode and whether its output has a graph."""
    seen: dict[int, list[tuple[bool, bool]]] = {}

    def watch(i):
        def fn(module, args, output):
            t = output[0] if isinstance(output, tuple) else output
            seen.setdefault(i, []).append((torch.is_grad_enabled(), t.requires_grad))

        return fn

    handles = [b.register_forward_hook(watch(i)) for i, b in enumerate(adapter.blocks)]
    return seen, handles


@pytest.mark.parametrize("case", GRAPH_CASES, ids=[c.name for c in GRAPH_CASES])
@pytest.mark.parametrize("call", ["attribute", "attribute_targets", "smooth", "concept"])
def test_blocks_before_the_layer_build_no_graph(case, call):
    model = build(case)
    x, extra = make_inputs(case, batch=2)
    if call == "concept":  # the logits stand in for the latent
        cdam = ConceptCDAM(model)
    else:
        cdam = CDAM(model, variant="smooth" if call == "smooth" else "plain", n_samples=2)
    adapter = cdam.adapter
    seen, handles = _watch_blocks(adapter)
    try:
        if call == "attribute_targets":
            cdam.attribute_targets(x, [0, 2], additional_forward_args=extra)
        elif call == "concept":
            concept = torch.ones(NUM_CLASSES, dtype=torch.float64)
            cdam.attribute(x, concept, additional_forward_args=extra)
        else:
            cdam.attribute(x, target=1, additional_forward_args=extra)
    finally:
        for h in handles:
            h.remove()
    last = adapter.num_layers - 1
    for i, calls in seen.items():
        if i < last:  # before the hooked tokens: no grad mode, no graph
            assert all(calls_i == (False, False) for calls_i in calls), (i, calls)
        else:  # the last block runs with grad and its output depends on the leaf
            assert all(calls_i == (True, True) for calls_i in calls), (i, calls)
    assert set(seen) == set(range(last + 1))
    assert torch.is_grad_enabled()
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("outer_grad", [True, False])
def test_grad_mode_is_restored_after_an_exception(outer_grad):
    case = IMAGE_MODELS[0]
    model = build(case)
    x, _ = make_inputs(case, batch=2)
    cdam = CDAM(model)

    def fail(module, args, output):
        assert torch.is_grad_enabled()  # switched on at the last block's tokens
        raise RuntimeError("boom in the head")

    handle = model.head.register_forward_hook(fail)
    try:
        with torch.set_grad_enabled(outer_grad), pytest.raises(RuntimeError, match="boom"):
            cdam.attribute(x, target=1)
        assert torch.is_grad_enabled()
        with torch.set_grad_enabled(outer_grad):
            with pytest.raises(RuntimeError, match="boom"):
                cdam.attribute(x, target=1)
            assert torch.is_grad_enabled() == outer_grad
    finally:
        handle.remove()
    assert not model._forward_hooks and not model.blocks[-1].attn._forward_pre_hooks
    with torch.set_grad_enabled(outer_grad):
        got = cdam.attribute(x, target=1, output="tokens")
        assert torch.is_grad_enabled() == outer_grad
    torch.testing.assert_close(got, cdam_timm_manual(model, x, 1)[:, 1:], rtol=1e-12, atol=1e-12)
