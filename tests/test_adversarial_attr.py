"""Adversarial cases of the five transformer methods: each failed on the code before its fix.

timm pools no row weighting reproduces read as a patch mean, NaN/strings as numeric options,
overflowing inputs giving NaN maps, concurrent forwards reported as a layer running twice,
non-tensor text masks, meta-device inputs and an extra timm argument becoming ``attn_mask``.
"""

from __future__ import annotations

import threading

import pytest
import torch
from captum.attr import LayerGradientXActivation
from tiny_models import IMAGE_MODELS, TEXT_MODELS, MeanPoolBert, _timm, build, make_inputs

from captum_ext import (
    CDAM,
    AttentionMap,
    AttentionRollout,
    ConceptCDAM,
    RelevancePropagation,
    TokenAblation,
    UnsupportedModelError,
)

VIT = IMAGE_MODELS[0]
BERT = TEXT_MODELS[0]
FIVE = [CDAM, TokenAblation, RelevancePropagation, AttentionRollout, AttentionMap]
READOUT_METHODS = [AttentionMap, AttentionRollout, RelevancePropagation]


def one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text, text
    return text


def _pooled(pool: str) -> torch.nn.Module:
    torch.manual_seed(0)
    kw = {"class_token": False} if pool == "map" else {}
    return _timm(global_pool=pool, **kw).double().eval()


def _x(batch: int = 2) -> torch.Tensor:
    return make_inputs(VIT, batch=batch)[0]


# ------------------------------------------------------------------ timm global_pool
@pytest.mark.parametrize("pool", ["max", "avgmax", "map"])
@pytest.mark.parametrize("cls", READOUT_METHODS, ids=lambda c: c.__name__)
def test_pools_no_row_weighting_reproduces_are_refused(cls, pool):
    model = _pooled(pool)
    with pytest.raises(UnsupportedModelError) as err:
        cls(model)
    text = one_line(err)
    assert f"global_pool={pool!r}" in text and "'token', 'avg'" in text, text
    # an explicit readout is the user's statement of which rows are read
    assert cls(model, readout="mean").attribute(_x(), target=0).isfinite().all()


def test_avg_pool_including_prefix_is_read_as_mean_over_every_token():
    torch.manual_seed(0)
    model = _timm(global_pool="avg", pool_include_prefix=True).double().eval()
    x = _x()
    am = AttentionMap(model, heads="mean")
    attn = []
    hook = model.blocks[-1].attn.attn_drop.register_forward_hook(lambda m, a, o: attn.append(o))
    model.blocks[-1].attn.fused_attn = False
    try:
        with torch.no_grad():
            model(x)
    finally:
        hook.remove()
        model.blocks[-1].attn.fused_attn = True
    expected = attn[0].mean(1).mean(1)[:, 1:]  # every row, CLS included, as timm pools
    torch.testing.assert_close(am.attribute(x, output="tokens"), expected)


@pytest.mark.parametrize("pool", ["max", "avgmax", "map"])
def test_cdam_follows_any_pool_like_layer_gradient_x_activation(pool):
    model = _pooled(pool)
    x = _x()
    ours = CDAM(model).attribute(x, target=[1, 3], output="tokens")
    captum = LayerGradientXActivation(model, model.blocks[-1].norm1)
    ref = captum.attribute(x, target=[1, 3]).sum(-1)[:, model.num_prefix_tokens :]
    torch.testing.assert_close(ours, ref)


@pytest.mark.parametrize("pool", ["max", "map"])
def test_tam_follows_any_pool_like_literal_removal(pool):
    model = _pooled(pool)
    x = _x(batch=1)
    p = model.num_prefix_tokens
    ours = TokenAblation(model).attribute(x, target=2, output="tokens")[0]
    with torch.no_grad():
        clean = model(x)[0, 2]
        ref = []
        for i in range(16):

            def drop(m, a, out, i=i):
                return torch.cat([out[:, : p + i], out[:, p + i + 1 :]], 1)

            h = model.patch_drop.register_forward_hook(drop)
            try:
                ref.append(clean - model(x)[0, 2])
            finally:
                h.remove()
    torch.testing.assert_close(ours, torch.stack(ref))


# ------------------------------------------------------------------ numeric options
@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"variant": "smooth", "noise_level": float("nan")}, "noise_level"),
        ({"variant": "smooth", "noise_level": "0.1"}, "noise_level"),
        ({"variant": "smooth", "noise_level": -0.1}, "noise_level"),
        ({"variant": "smooth", "noise_level": float("inf")}, "noise_level"),
        ({"variant": "smooth", "noise_level": True}, "noise_level"),
        ({"variant": "smooth", "seed": "3"}, "seed"),
        ({"variant": "smooth", "seed": 1.5}, "seed"),
        ({"n_samples": 0}, "n_samples"),
        ({"variant": "integrated", "n_samples": float("nan")}, "n_samples"),
    ],
)
def test_cdam_numeric_options_are_refused_naming_the_argument(kwargs, name):
    with pytest.raises((ValueError, TypeError)) as err:
        CDAM(build(VIT), **kwargs)
    assert one_line(err).startswith(f"CDAM: {name} must be"), str(err.value)


def test_relevance_streaming_must_be_a_bool():
    with pytest.raises(TypeError) as err:
        RelevancePropagation(build(VIT), streaming="no")
    assert "streaming must be True or False" in one_line(err)


def test_concept_cdam_refuses_a_nan_concept():
    model = build(VIT)
    ccdam = ConceptCDAM(model)
    concept = torch.full((5,), float("nan"), dtype=torch.float64)
    with pytest.raises(ValueError) as err:
        ccdam.attribute(_x(), concept)
    assert "concept holds NaN or inf" in one_line(err)


def _overflowing_vit() -> tuple[torch.nn.Module, torch.Tensor]:
    return build(VIT, dtype=torch.float32), torch.full((2, 3, 32, 32), 1e30)


@pytest.mark.parametrize("cls", FIVE, ids=lambda c: c.__name__)
def test_finite_inputs_that_overflow_the_model_give_no_nan_map(cls):
    model, x = _overflowing_vit()
    with pytest.raises(ValueError) as err:
        cls(model).attribute(x, target=0)
    text = one_line(err)
    assert text.startswith(f"{cls._method}: the map is not finite"), text
    assert "overflowed" in text


def test_concept_from_overflowing_examples_is_refused():
    model, x = _overflowing_vit()
    with pytest.raises(ValueError) as err:
        ConceptCDAM(model).concept_from_examples(x)
    assert "not finite" in one_line(err)


def test_cdam_several_targets_overflow_is_refused_too():
    model, x = _overflowing_vit()
    with pytest.raises(ValueError, match="the map is not finite"):
        CDAM(model).attribute_targets(x, [0, 1])


# ------------------------------------------------------------------ concurrency
def _pause_for(module: torch.nn.Module, fn) -> torch.utils.hooks.RemovableHandle:
    """A hook on ``module`` that, on the first call from this thread, runs ``fn`` in another
    thread and waits for it: a forward of another thread inside this thread's call."""
    me, done = threading.get_ident(), threading.Event()

    def pause(m, a, o):
        if threading.get_ident() == me and not done.is_set():
            done.set()
            t = threading.Thread(target=fn)
            t.start()
            t.join()

    return module.register_forward_hook(pause)


@pytest.mark.parametrize("cls", [CDAM, TokenAblation, AttentionRollout], ids=lambda c: c.__name__)
def test_plain_forward_in_another_thread_is_named_and_left_unchanged(cls):
    model = build(VIT)
    x = _x()
    with torch.no_grad():
        ref = model(x)
    other: dict[str, torch.Tensor] = {}

    def plain():
        with torch.no_grad():
            other["out"] = model(x)

    method = cls(model)
    handle = _pause_for(model.blocks[0], plain)
    try:
        with pytest.raises(RuntimeError) as err:
            method.attribute(x, target=0)
    finally:
        handle.remove()
    assert "ran in another thread during this" in one_line(err)
    torch.testing.assert_close(other["out"], ref)  # our hooks left the other call alone
    method.attribute(x, target=0)  # and nothing stays behind


def test_wrapper_explained_while_its_encoder_is_explained_is_named():
    torch.manual_seed(0)
    wrapper = MeanPoolBert().double().eval()
    ids, extra = make_inputs(BERT, batch=2)
    inner = CDAM(wrapper.encoder, readout="mean")
    outer = CDAM(wrapper)
    errors: list[BaseException] = []

    def explain_wrapper():
        try:
            outer.attribute(ids, target=0, additional_forward_args=extra)
        except BaseException as err:  # collected and checked below
            errors.append(err)

    layer = wrapper.encoder.encoder.layer[0]
    handle = _pause_for(layer, explain_wrapper)
    try:
        with pytest.raises(RuntimeError) as err:
            inner.attribute(ids, additional_forward_args=extra)
    finally:
        handle.remove()
    assert "ran in another thread during this" in one_line(err)
    assert not errors, errors  # the other call saw only its own forward


# ------------------------------------------------------------------ text masks
@pytest.mark.parametrize(
    "convert, what",
    [(lambda m: m.tolist(), "list"), (lambda m: m.numpy(), "ndarray"), (lambda m: (m,), "tuple")],
    ids=["list", "ndarray", "tuple"],
)
@pytest.mark.parametrize("cls", FIVE, ids=lambda c: c.__name__)
def test_text_mask_must_be_a_tensor(cls, convert, what):
    model = build(BERT)
    ids, (mask,) = make_inputs(BERT, batch=2)
    with pytest.raises(TypeError) as err:
        cls(model).attribute(ids, target=0, additional_forward_args=(convert(mask),))
    text = one_line(err)
    assert f"must be a torch.Tensor (B, T) like input_ids; got {what}" in text, text


def test_text_mask_in_a_dict_is_refused():
    model = build(BERT)
    ids, (mask,) = make_inputs(BERT, batch=2)
    with pytest.raises(TypeError) as err:
        CDAM(model).attribute(ids, target=0, additional_forward_args=({"attention_mask": mask},))
    assert "keyword arguments cannot be passed" in one_line(err)
    with pytest.raises(TypeError, match="keyword arguments cannot be passed"):
        CDAM(model).attribute(ids, target=0, additional_forward_args={"attention_mask": mask})


class _ScaledPoolBert(MeanPoolBert):
    """A wrapper whose second extra argument is its own (a list), not a tensor."""

    def forward(self, input_ids, attention_mask, scales):
        return super().forward(input_ids, attention_mask) * scales[0]


def test_wrapper_text_model_keeps_its_own_non_tensor_arguments():
    torch.manual_seed(0)
    wrapper = _ScaledPoolBert().double().eval()
    ids, (mask,) = make_inputs(BERT, batch=2)
    cdam = CDAM(wrapper, readout="mean")  # the probe cannot call it without scales
    half = cdam.attribute(ids, target=0, additional_forward_args=(mask, [0.5]))
    full = cdam.attribute(ids, target=0, additional_forward_args=(mask, [1.0]))
    torch.testing.assert_close(half, full / 2)


# ------------------------------------------------------------------ meta inputs, timm extras
@pytest.mark.parametrize("case", [VIT, BERT], ids=["vit", "bert"])
@pytest.mark.parametrize("cls", FIVE, ids=lambda c: c.__name__)
def test_meta_device_inputs_are_refused(cls, case):
    model = build(case)
    x, extra = make_inputs(case, batch=2)
    with pytest.raises(ValueError) as err:
        cls(model).attribute(x.to("meta"), target=0, additional_forward_args=extra)
    assert "inputs on the meta device cannot be explained" in one_line(err)
    if extra:
        with pytest.raises(ValueError) as err:
            cls(model).attribute(x, target=0, additional_forward_args=(extra[0].to("meta"),))
        assert "on the meta device cannot be explained" in one_line(err)


@pytest.mark.parametrize("cls", FIVE, ids=lambda c: c.__name__)
def test_extra_argument_to_timm_vit_is_refused_not_used_as_attn_mask(cls):
    model = build(VIT)
    attn_mask = torch.zeros(17, 17, dtype=torch.bool)
    with pytest.raises(ValueError) as err:
        cls(model).attribute(_x(), target=0, additional_forward_args=(attn_mask,))
    assert "timm VisionTransformer is called as model(images)" in one_line(err)
    assert cls(model).attribute(_x(), target=0, additional_forward_args=()).isfinite().all()


def test_exclusive_nested_lets_one_inner_section_in_and_no_deeper():
    import torch.nn as nn

    from captum_ext.capture import exclusive
    from captum_ext.errors import ReentrantCallError

    model = nn.Linear(2, 2)
    match = "re-entrant calls are not supported"
    with exclusive(model), pytest.raises(ReentrantCallError, match=match), exclusive(model):
        pass
    with exclusive(model, nested=True):
        # a metric inside an explainer's fit; then a method called from a hook of that metric
        with exclusive(model), pytest.raises(ReentrantCallError, match=match), exclusive(model):
            pass
        with exclusive(model):  # the one level is available again
            pass
    with exclusive(model):  # released: an outer section takes it again
        pass
