"""Adapters: detection by structure, token layout, unwrapping, attention flags restored."""

from __future__ import annotations

import pytest
import torch
from tiny_models import ALL_MODELS, IMAGE_MODELS, TEXT_MODELS, MeanPoolBert, build, make_inputs

from captum_ext import adapter_for
from captum_ext.adapters import HFTextAdapter, HFViTAdapter, TimmViTAdapter

EXPECTED = {
    "timm_vit": (TimmViTAdapter, 1, "cls"),
    "timm_deit_distilled": (TimmViTAdapter, 2, "cls_dist"),
    "timm_registers": (TimmViTAdapter, 5, "cls"),
    "timm_avgpool": (TimmViTAdapter, 0, "mean"),
    "timm_nonsquare": (TimmViTAdapter, 1, "cls"),
    "timm_dynamic": (TimmViTAdapter, 1, "cls"),
    "hf_vit": (HFViTAdapter, 1, "cls"),
    "bert": (HFTextAdapter, 0, "cls"),
    "roberta": (HFTextAdapter, 0, "cls"),
    "distilbert": (HFTextAdapter, 0, "cls"),
    "meanpool_bert": (HFTextAdapter, 0, "cls"),
}


@pytest.mark.parametrize("case", ALL_MODELS, ids=[c.name for c in ALL_MODELS])
def test_detection_and_layout(case):
    model = build(case)
    cls, prefix, readout = EXPECTED[case.name]
    adapter = adapter_for(model)
    assert type(adapter) is cls
    assert adapter.num_prefix_tokens == prefix
    assert adapter.readout == readout
    assert adapter.num_layers == 2 and adapter.num_heads == 2


@pytest.mark.parametrize("case", IMAGE_MODELS, ids=[c.name for c in IMAGE_MODELS])
def test_grid_matches_token_count(case):
    model = build(case)
    adapter = adapter_for(model)
    x, _ = make_inputs(case, batch=1)
    seen = {}
    point = adapter.pre_attention_point(-1)
    handle = point.module.register_forward_pre_hook(
        lambda m, a, k: seen.update(n=a[0].shape[1]), with_kwargs=True
    )
    try:
        model(x)
    finally:
        handle.remove()
    h, w = adapter.grid_size(x)
    assert seen["n"] == h * w + adapter.num_prefix_tokens


def test_readout_override_for_mean_pooling_wrapper():
    adapter = adapter_for(MeanPoolBert(), readout="mean")
    assert adapter.readout == "mean"
    w = adapter.readout_weights(4, torch.device("cpu"))
    torch.testing.assert_close(w, torch.full((4,), 0.25))


def test_unwraps_compile_and_data_parallel():
    model = build(IMAGE_MODELS[0])
    assert adapter_for(torch.nn.DataParallel(model)).model is model
    compiled = torch.compile(model)
    assert adapter_for(compiled).model is model


@pytest.mark.parametrize(
    "case", [IMAGE_MODELS[0], IMAGE_MODELS[6], *TEXT_MODELS], ids=lambda c: c.name
)
def test_attention_probabilities_materialise_and_flags_restore(case):
    model = build(case)
    adapter = adapter_for(model)
    x, extra = make_inputs(case, batch=1)
    impls = [
        getattr(getattr(m, "config", None), "_attn_implementation", None) for m in model.modules()
    ]
    fused = [getattr(m, "fused_attn", None) for m in model.modules()]
    point = adapter.attention_point(-1)
    got = []

    def grab(m, a, o):
        got.append(o if point.index is None else o[point.index])

    handle = point.module.register_forward_hook(grab)
    try:
        model(x, *extra)
        # fused kernels never form the probabilities: timm skips attn_drop, HF returns None
        assert got == [] if case.name.startswith("timm") else got.pop() is None
        with adapter.attention_probabilities():
            model(x, *extra)
    finally:
        handle.remove()
    probs = got.pop()
    assert probs is not None and probs.dim() == 4
    torch.testing.assert_close(probs.sum(-1), torch.ones_like(probs.sum(-1)))
    assert impls == [
        getattr(getattr(m, "config", None), "_attn_implementation", None) for m in model.modules()
    ]
    assert fused == [getattr(m, "fused_attn", None) for m in model.modules()]


def test_hf_vit_found_in_nested_tree():
    """Both module trees (encoder.layer before transformers 5.9, layers after) are found."""
    model = build(IMAGE_MODELS[6])
    adapter = adapter_for(model)
    assert (
        adapter.blocks[-1]
        is list(model.modules())[
            [i for i, m in enumerate(model.modules()) if hasattr(m, "layernorm_before")][-1]
        ]
    )


def test_loading_local_weights_timm(tmp_path):
    import timm
    from safetensors.torch import save_file

    src = build(IMAGE_MODELS[0], dtype=torch.float32)
    path = tmp_path / "model.safetensors"
    save_file(src.state_dict(), str(path))
    model = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(path), num_classes=5),
        img_size=32,
        patch_size=8,
        embed_dim=32,
        depth=2,
        num_heads=2,
        num_classes=5,
    )
    for (k, a), b in zip(src.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), k


def test_loading_local_weights_hf(tmp_path):
    from transformers import BertForSequenceClassification

    src = build(TEXT_MODELS[0], dtype=torch.float32)
    src.save_pretrained(tmp_path)
    model = BertForSequenceClassification.from_pretrained(tmp_path, local_files_only=True)
    assert type(adapter_for(model)) is HFTextAdapter
    ids, extra = make_inputs(TEXT_MODELS[0])
    with torch.no_grad():
        torch.testing.assert_close(model(ids, *extra).logits, src(ids, *extra).logits)
