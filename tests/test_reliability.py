"""What users hit first (issue 11) and the CDAM variant target defect (issue 10), each a case.

Every test here failed on the code before its fix: wrong-shape targets flattened, smooth CDAM
depending on the batch, variants explaining each noisy pass's own class, mean-pooling wrappers
read at the CLS row, all-zero masks explained, EVA accepted then crashing, threads corrupting
each other's hooks and modes, raw torch errors for bad token ids, late argument errors.
"""

from __future__ import annotations

import threading
import warnings

import pytest
import torch
from method_table import METHODS
from tiny_models import IMAGE_MODELS as IMAGES
from tiny_models import TEXT_MODELS as TEXTS
from tiny_models import VOCAB, MeanPoolBert, _bert_cfg, bert_classifier, build, make_inputs

from captum_ext import (
    CDAM,
    AttentionMap,
    AttentionRollout,
    ConceptCDAM,
    ReentrantCallError,
    RelevancePropagation,
    TokenAblation,
    UnsupportedModelError,
)

VIT = IMAGES[0]
BERT = TEXTS[0]


# ------------------------------------------------------------------ targets
@pytest.mark.parametrize("cls", [CDAM, TokenAblation, RelevancePropagation])
def test_target_of_wrong_shape_is_refused_not_flattened(cls):
    model = build(VIT)
    x, _ = make_inputs(VIT, batch=4)
    with pytest.raises(ValueError, match=r"target has shape \(2, 2\); for a batch of 4"):
        cls(model).attribute(x, target=torch.tensor([[0, 1], [2, 3]]))
    ok = cls(model).attribute(x, target=torch.tensor([[0], [1], [2], [3]]), output="tokens")
    ref = cls(model).attribute(x, target=[0, 1, 2, 3], output="tokens")
    torch.testing.assert_close(ok, ref)


def test_meta_and_float_targets_are_refused_early():
    model = build(VIT)
    x, _ = make_inputs(VIT, batch=2)
    with pytest.raises(ValueError, match="meta tensor"):
        CDAM(model).attribute(x, target=torch.tensor([0, 1], device="meta"))
    with pytest.raises(ValueError, match="integer class indices"):
        CDAM(model).attribute(x, target=torch.tensor([0.0, 1.0]))


# ------------------------------------------------------------------ CDAM variants
@pytest.mark.parametrize("variant", ["smooth", "integrated"])
def test_cdam_variants_batch_equals_single_calls(variant):
    model = build(VIT)
    x, _ = make_inputs(VIT, batch=3)
    cdam = CDAM(model, variant=variant, n_samples=4, seed=3)
    batch = cdam.attribute(x, target=[0, 1, 2], output="tokens")
    singles = torch.cat([cdam.attribute(x[i : i + 1], target=i, output="tokens") for i in range(3)])
    torch.testing.assert_close(batch, singles, rtol=0, atol=1e-12)


@pytest.mark.parametrize("variant", ["smooth", "integrated"])
def test_cdam_variants_explain_the_clean_prediction(variant):
    model = build(VIT)
    x, _ = make_inputs(VIT, batch=4)
    cdam = CDAM(model, variant=variant, n_samples=6, noise_level=0.5, seed=1)
    pred = model(x).argmax(1)
    torch.testing.assert_close(
        cdam.attribute(x, output="tokens"), cdam.attribute(x, target=pred, output="tokens")
    )
    both = cdam.attribute_targets(x, [None, 0], output="tokens")
    torch.testing.assert_close(both[0], cdam.attribute(x, target=pred, output="tokens"))


# ------------------------------------------------------------------ readout
def test_mean_pooling_wrapper_readout_is_detected_for_every_method():
    model = build(TEXTS[-1])  # MeanPoolBert
    ids, extra = make_inputs(TEXTS[-1], batch=3)
    for cls in (RelevancePropagation, AttentionRollout, AttentionMap):
        detected = cls(model)
        assert detected.adapter.readout == "mean" and not detected.adapter.readout_assumed
        torch.testing.assert_close(
            detected.attribute(ids, additional_forward_args=extra),
            cls(model, readout="mean").attribute(ids, additional_forward_args=extra),
        )
    # the CLS row alone is what main read before: not what the model pools
    cls_map = AttentionRollout(model, readout="cls").attribute(ids, additional_forward_args=extra)
    mean_map = AttentionRollout(model).attribute(ids, additional_forward_args=extra)
    assert not torch.allclose(cls_map, mean_map)


def test_mean_readout_weighs_attended_tokens_only():
    model = build(TEXTS[-1])
    ids, (mask,) = make_inputs(TEXTS[-1], batch=3)
    adapter = RelevancePropagation(model).adapter
    w = adapter.readout_weights(ids.shape[1], ids.device, torch.float64, mask=mask != 0)
    torch.testing.assert_close(w, mask.double() / mask.sum(1, keepdim=True))


class _MaxPoolBert(MeanPoolBert):
    def forward(self, input_ids, attention_mask):
        h = self.encoder(input_ids, attention_mask=attention_mask).last_hidden_state
        return self.head(h.amax(1))


def test_undetectable_readout_warns_with_the_assumption():
    torch.manual_seed(0)
    model = _MaxPoolBert().double().eval()
    with pytest.warns(UserWarning, match=r"assuming the first token \(readout='cls'\)"):
        rp = RelevancePropagation(model)
    assert rp.adapter.readout == "cls" and rp.adapter.readout_assumed
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        RelevancePropagation(model, readout="mean")  # said explicitly: no warning


def test_bare_encoder_says_what_it_explains_and_honours_mean_readout():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(_bert_cfg(BertConfig)).double().eval()
    ids, extra = make_inputs(BERT, batch=2)
    with pytest.warns(UserWarning, match="explaining pooler_output"):
        ConceptCDAM(model).concept_from_examples(ids, extra)
    ccdam = ConceptCDAM(model, readout="mean")
    z = ccdam.concept_from_examples(ids, extra)
    with torch.no_grad():
        h = model(ids, attention_mask=extra[0]).last_hidden_state
    m = extra[0][..., None].double()
    torch.testing.assert_close(z, ((h * m).sum(1) / m.sum(1)).mean(0))


# ------------------------------------------------------------------ text inputs
@pytest.mark.parametrize("case", TEXTS, ids=[c.name for c in TEXTS])
def test_all_zero_attention_mask_is_refused(case):
    model = build(case)
    ids, (mask,) = make_inputs(case, batch=2)
    mask = mask.clone()
    mask[1] = 0
    for spec in METHODS:
        with pytest.raises(ValueError, match="attention mask of example 1 is all zeros"):
            spec.make(model).attribute(ids, additional_forward_args=(mask,))


@pytest.mark.parametrize(
    "mutate, message",
    [
        (
            lambda ids, m: (ids.masked_fill(ids == ids[0, 1], VOCAB + 7), m),
            "outside the vocabulary",
        ),
        (lambda ids, m: (ids - 10, m), "token id -"),
        (lambda ids, m: (ids.repeat(1, 8), m.repeat(1, 8)), "exceed the model's 64 positions"),
        (lambda ids, m: (ids, m[:, :-1]), r"attention mask has shape \(2, 8\)"),
        (lambda ids, m: (ids[:0], m[:0]), "the batch is empty"),
    ],
    ids=["oov", "negative", "too-long", "mask-length", "empty"],
)
def test_bad_token_inputs_name_the_limit(mutate, message):
    model = bert_classifier().double().eval()
    ids, (mask,) = make_inputs(BERT, batch=2)
    bad_ids, bad_mask = mutate(ids, mask)
    for cls in (CDAM, TokenAblation, RelevancePropagation, AttentionRollout):
        with pytest.raises(ValueError, match=message):
            cls(model).attribute(bad_ids, additional_forward_args=(bad_mask,))


# ------------------------------------------------------------------ unsupported families
def test_timm_eva_is_refused_at_construction():
    import timm

    eva = timm.create_model("eva02_tiny_patch14_224", pretrained=False, img_size=28, num_classes=3)
    for spec in METHODS:
        with pytest.raises(UnsupportedModelError, match="rotary position embeddings"):
            spec.make(eva)


# ------------------------------------------------------------------ concurrency
def test_two_threads_on_one_model_serialise_and_restore_train_mode():
    model = build(VIT).train()
    model.blocks[0].train(False)  # mixed modes must come back exactly
    modes = [m.training for m in model.modules()]
    x, _ = make_inputs(VIT, batch=2)
    cdam, rollout = CDAM(model), AttentionRollout(model)
    expected = {"cdam": cdam.attribute(x, target=1), "rollout": rollout.attribute(x)}
    assert [m.training for m in model.modules()] == modes
    errors: list[BaseException] = []
    results: dict[str, list[torch.Tensor]] = {"cdam": [], "rollout": []}

    def run(name, fn):
        try:
            for _ in range(50):
                results[name].append(fn())
        except BaseException as err:  # collected and re-raised by the test below
            errors.append(err)

    threads = [
        threading.Thread(target=run, args=("cdam", lambda: cdam.attribute(x, target=1))),
        threading.Thread(target=run, args=("rollout", lambda: rollout.attribute(x))),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    for name, maps in results.items():
        assert len(maps) == 50
        for m in maps:
            torch.testing.assert_close(m, expected[name], rtol=0, atol=0)
    assert [m.training for m in model.modules()] == modes
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_reentrant_call_from_a_hook_says_so_and_leaves_the_model_clean():
    model = build(VIT)
    x, _ = make_inputs(VIT, batch=1)
    inner = CDAM(model)
    fused = [b.attn.fused_attn for b in model.blocks]

    def hook(mod, args, out):
        inner.attribute(x, target=0)

    handle = model.head.register_forward_hook(hook)
    try:
        with pytest.raises(ReentrantCallError, match="re-entrant calls are not supported"):
            AttentionMap(model).attribute(x)
    finally:
        handle.remove()
    assert all(m._forward_hooks == {} and m._forward_pre_hooks == {} for m in model.modules())
    assert [b.attn.fused_attn for b in model.blocks] == fused
    CDAM(model).attribute(x, target=0)  # the lock was released


# ------------------------------------------------------------------ argument checks
def test_argument_errors_come_at_the_earliest_point():
    model = build(VIT)
    x, _ = make_inputs(VIT, batch=4)
    cdam = CDAM(model)
    with pytest.raises(ValueError, match="targets is empty"):
        cdam.attribute_targets(x, [])
    with pytest.raises(ValueError, match="targets must be a list"):
        cdam.attribute_targets(x, 3)
    with pytest.raises(ValueError, match="n_samples must be an int"):
        CDAM(model, variant="smooth", n_samples=2.5)
    with pytest.raises(ValueError, match="layer 99 is out of range for a model with 2 blocks"):
        AttentionMap(model, layer=99)  # at construction, not at attribute()
    encoder = build(VIT)
    encoder.reset_classifier(0)
    ccdam = ConceptCDAM(encoder)
    concept = torch.randn(3, encoder.embed_dim, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"concept has shape \(3, 32\) for a batch of 4"):
        ccdam.attribute(x, concept)


def test_fixed_size_model_suggests_its_own_size():
    import timm

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3).eval()
    x = torch.rand(1, 3, 200, 200)
    with pytest.raises(ValueError, match="Resize the input to 224x224"):
        CDAM(model).attribute(x, target=0)


# ------------------------------------------------------------------ outputs
def test_like_input_output_feeds_infidelity_without_expand():
    from captum.metrics import infidelity

    model = build(VIT)
    x, _ = make_inputs(VIT, batch=2)
    cdam = CDAM(model)
    like = cdam.attribute(x, target=1, output="like_input")
    assert like.shape == x.shape
    torch.testing.assert_close(like, cdam.attribute(x, target=1).expand_as(x))

    def perturb(inputs):
        noise = torch.randn_like(inputs) * 0.01
        return noise, inputs - noise

    torch.manual_seed(0)
    a = infidelity(model, perturb, x, like, target=1, n_perturb_samples=2)
    torch.manual_seed(0)
    b = infidelity(
        model, perturb, x, cdam.attribute(x, target=1).expand_as(x), target=1, n_perturb_samples=2
    )
    torch.testing.assert_close(a, b)
