"""Mixed precision and compiled models.

* Under ``torch.autocast`` (CPU bfloat16 here; CUDA float16/bfloat16 when a GPU is present)
  every method returns finite float32 maps close to its float32 maps: chained products
  (rollout, relevance propagation) and logit differences (TAM) accumulate in float32 even
  when the model's attention probabilities and logits come out in half precision.
* A ``torch.compile``d model (an ``OptimizedModule``) is explained through its eager
  ``_orig_mod``: the maps equal the eager model's, the compiled graph never runs during an
  explanation, and the user's compiled module is left as it was.

Tolerances. bfloat16 keeps 8 significant bits (unit roundoff 2^-9 ~ 0.2%); through a
2-block model and a backward pass the maps differ from float32 by about 1% in relative L2
norm, so ``REL_TOL = 3%``. TAM's map is a difference of two logits, each carrying a few
bfloat16 ulps of the logits' own scale, so its bound is absolute: ``2^-6 * max |logit|``.
"""

from __future__ import annotations

import pytest
import torch
from method_table import METHODS
from tiny_models import ALL_MODELS, build, make_inputs
from torch import nn

from captum_ext._scores import model_output_to_tensor
from captum_ext.attr.relevance import relevance_increment
from captum_ext.attr.rollout import rollout_matrix
from captum_ext.explainers import MHEX, TTAME

CASES = (ALL_MODELS[0], ALL_MODELS[6], ALL_MODELS[7])  # timm ViT, HF ViT, BERT
PAIRS = [(m, c) for m in METHODS for c in CASES]
PAIR_IDS = [f"{m.name}-{c.name}" for m, c in PAIRS]
REL_TOL = 3e-2
TAM_TOL = 2.0**-6

AUTOCAST = [
    pytest.param("cpu", torch.bfloat16, id="cpu-bf16"),
    *(
        pytest.param(
            "cuda",
            dt,
            id=f"cuda-{name}",
            marks=[
                pytest.mark.cuda,
                pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device present"),
            ],
        )
        for dt, name in ((torch.float16, "fp16"), (torch.bfloat16, "bf16"))
    ),
]


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30))


@pytest.mark.parametrize(("device", "half"), AUTOCAST)
@pytest.mark.parametrize(("method", "case"), PAIRS, ids=PAIR_IDS)
def test_methods_under_autocast_give_float32_maps_close_to_float32(device, half, method, case):
    model = build(case, dtype=torch.float32).to(device)
    x, extra = make_inputs(case, batch=2, dtype=torch.float32)
    x, extra = x.to(device), tuple(e.to(device) for e in extra)
    attr = method.make(model)
    ref = attr.attribute(x, target=1, additional_forward_args=extra, output="tokens")
    with torch.autocast(device, dtype=half):
        got = attr.attribute(x, target=1, additional_forward_args=extra, output="tokens")
    assert got.dtype == torch.float32
    assert got.device == x.device
    assert torch.isfinite(got).all()
    if method.name == "tam":
        with torch.no_grad():
            scale = model_output_to_tensor(model(x, *extra)).abs().max()
        assert (got - ref).abs().max() <= TAM_TOL * scale
    else:
        assert _rel(got, ref) <= REL_TOL, method.name


def test_rollout_matrix_accumulates_half_precision_attention_in_float32():
    torch.manual_seed(0)
    attn = torch.rand(2, 3, 5, 5).softmax(-1).to(torch.bfloat16)
    got = rollout_matrix(attn)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, rollout_matrix(attn.float()), rtol=1e-6, atol=1e-7)
    assert rollout_matrix(attn.double()).dtype == torch.float64  # float64 stays float64


def test_relevance_increment_is_float32_for_half_precision_inputs():
    torch.manual_seed(0)
    attn = torch.rand(2, 3, 5, 5).to(torch.float16)
    grad = torch.randn(2, 3, 5, 5).to(torch.float16)
    got = relevance_increment(attn, grad)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, (grad.float() * attn.float()).clamp_min(0))


@pytest.mark.parametrize("case", [ALL_MODELS[0], ALL_MODELS[7]], ids=lambda c: c.name)
def test_explainers_under_cpu_autocast_give_float32_maps(case):
    model = build(case, dtype=torch.float32)
    x, extra = make_inputs(case, batch=2, dtype=torch.float32)
    explainers = [MHEX(model).mark_fitted()]  # explains with its initial gates and heads
    if case.modality == "image":
        explainers.append(TTAME(model, input_size=32).mark_fitted())
    for explainer in explainers:
        ref = explainer.attribute(x, target=1, additional_forward_args=extra)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = explainer.attribute(x, target=1, additional_forward_args=extra)
        assert got.dtype == torch.float32
        assert torch.isfinite(got).all()
        assert _rel(got, ref) <= REL_TOL, type(explainer).__name__


# ------------------------------------------------------------------ torch.compile
class _Counting:
    """A dynamo backend that records every graph it is asked to compile and runs it eagerly."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs):
        self.graphs += 1
        return gm.forward


def _state(model: nn.Module) -> tuple:
    hooks = sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        for m in model.modules()
    )
    flags = tuple(p.requires_grad for p in model.parameters())
    modes = tuple(m.training for m in model.modules())
    return hooks, flags, modes


COMPILE_PAIRS = [(m, c) for m in METHODS for c in (CASES[0], CASES[2])]  # image, text


@pytest.mark.parametrize(
    ("method", "case"), COMPILE_PAIRS, ids=[f"{m.name}-{c.name}" for m, c in COMPILE_PAIRS]
)
def test_compiled_models_are_explained_through_the_eager_module(method, case):
    model = build(case, dtype=torch.float64)
    x, extra = make_inputs(case, batch=2, dtype=torch.float64)
    backend = _Counting()
    compiled = torch.compile(model, backend=backend)
    before = _state(compiled)
    ref = method.make(model).attribute(x, target=1, additional_forward_args=extra)
    attr = method.make(compiled)
    assert attr.adapter.model is model
    got = attr.attribute(x, target=1, additional_forward_args=extra)
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    assert backend.graphs == 0  # the compiled graph never ran: hooks saw the eager model
    assert compiled._orig_mod is model
    assert _state(compiled) == before


def test_the_users_compiled_module_still_runs_after_an_explanation():
    case = ALL_MODELS[0]
    model = build(case, dtype=torch.float64)
    x, _ = make_inputs(case, batch=2, dtype=torch.float64)
    backend = _Counting()
    compiled = torch.compile(model, backend=backend)
    for method in METHODS:
        method.make(compiled).attribute(x, target=1)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))
    assert backend.graphs >= 1  # now the compiled path ran, unaffected by the explanations


@pytest.mark.parametrize("case", [ALL_MODELS[0], ALL_MODELS[7]], ids=lambda c: c.name)
def test_explainers_take_compiled_models(case):
    model = build(case, dtype=torch.float64)
    x, extra = make_inputs(case, batch=2, dtype=torch.float64)
    backend = _Counting()
    compiled = torch.compile(model, backend=backend)
    makers = [lambda m: MHEX(m).mark_fitted()]  # explains with its initial gates and heads
    if case.modality == "image":
        makers.append(lambda m: TTAME(m, input_size=32).mark_fitted())
    for make in makers:
        torch.manual_seed(3)
        ref = make(model).attribute(x, target=1, additional_forward_args=extra)
        torch.manual_seed(3)
        explainer = make(compiled)
        assert explainer.adapter.model is model
        got = explainer.attribute(x, target=1, additional_forward_args=extra)
        torch.testing.assert_close(got, ref, rtol=0, atol=0)
    assert backend.graphs == 0


@pytest.mark.parametrize("method", METHODS, ids=[m.name for m in METHODS])
def test_compiled_parts_inside_a_wrapper_run_eagerly(method):
    # A user's mean-pooling wrapper whose encoder was compiled: the adapter finds the encoder
    # inside; the compiled part runs eagerly during the explanation (no graph, no recompile).
    case = ALL_MODELS[10]
    assert case.name == "meanpool_bert"
    model = build(case, dtype=torch.float64)
    x, extra = make_inputs(case, batch=2, dtype=torch.float64)
    wrapped = build(case, dtype=torch.float64)
    backend = _Counting()
    compiled_encoder = torch.compile(wrapped.encoder, backend=backend)
    wrapped.encoder = compiled_encoder
    ref = method.make(model).attribute(x, target=1, additional_forward_args=extra)
    got = method.make(wrapped).attribute(x, target=1, additional_forward_args=extra)
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    assert backend.graphs == 0
    assert wrapped.encoder is compiled_encoder
