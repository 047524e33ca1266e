"""Adversarial review of :mod:`captum_ext.metrics`: model state, option values, targets, batches.

* Metrics that run the model run it in eval mode under the model's lock and leave it exactly as
  they found it (modes, BatchNorm statistics), also when they raise.
* Numeric options (thresholds, fractions, steps, sizes, seeds) are refused in one line naming
  the argument and the allowed range when they are NaN, infinite, strings or out of range.
* Non-finite inputs, attributions or model scores, and out-of-range targets, are refused in one
  line instead of giving NaN or a raw indexing error.
* An empty batch gives an empty result of the documented shape, for every metric, without
  calling the model or an ``Attribution`` object.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import captum_ext.metrics as M

K = 4  # classes of the tiny image model
H = W = 8
PATCH = 4  # token_perturbation_auc: a 2 x 2 grid of patches
VOCAB = 12
T = 6


class BNNet(nn.Module):
    """Tiny CNN with BatchNorm and Dropout: train mode changes both its outputs and its state."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(6, K)
        self.calls = 0
        self.fail_at: int | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.fail_at is not None and self.calls >= self.fail_at:
            raise RuntimeError("boom inside the model")
        h = torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3))
        return self.fc(self.drop(h))


class BNText(nn.Module):
    """Tiny text classifier ``model(input_ids, attention_mask)`` with BatchNorm and Dropout."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 8)
        self.bn = nn.BatchNorm1d(8)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(8, 3)
        self.calls = 0
        self.fail_at: int | None = None

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.fail_at is not None and self.calls >= self.fail_at:
            raise RuntimeError("boom inside the model")
        m = mask.unsqueeze(-1).float()
        h = (self.emb(ids) * m).sum(1) / m.sum(1).clamp(min=1)
        return self.fc(self.drop(self.bn(h)))


def _image_model() -> BNNet:
    torch.manual_seed(0)
    model = BNNet()
    with torch.no_grad():  # non-trivial running statistics, so that train vs eval differs
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
    return model


def _text_model() -> BNText:
    torch.manual_seed(0)
    model = BNText()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
    return model


def _image_data(batch: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(batch, 3, H, W, generator=g), torch.rand(batch, H, W, generator=g)


def _text_data(batch: int = 3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(1, VOCAB, (batch, T), generator=g)
    return ids, torch.ones(batch, T, dtype=torch.long), torch.rand(batch, T, generator=g)


# ----------------------------------------------------------------------------------------------
# The metrics that run a model, each as call(model, inputs, map, **overrides)
# ----------------------------------------------------------------------------------------------

Call = Callable[..., Any]

IMAGE_CALLS: dict[str, Call] = {
    "deletion_auc": lambda m, x, a, **kw: M.deletion_auc(m, x, a, **{"steps": 4, **kw}),
    "insertion_auc": lambda m, x, a, **kw: M.insertion_auc(
        m, x, a, **{"steps": 4, "blur_kernel_size": 3, **kw}
    ),
    "average_drop": lambda m, x, a, **kw: M.average_drop(m, x, a, **{"keep": 0.5, **kw}),
    "increase_in_confidence": lambda m, x, a, **kw: M.increase_in_confidence(
        m, x, a, **{"keep": 0.5, **kw}
    ),
    "average_drop_ttame": lambda m, x, a, **kw: M.average_drop_ttame(m, x, a, **kw),
    "road": lambda m, x, a, **kw: M.road(
        m, x, a, **{"percentages": (0.25, 0.5), "score": "softmax", **kw}
    ),
    "token_perturbation_auc": lambda m, x, a, **kw: M.token_perturbation_auc(
        m, x, a, **{"patch_size": PATCH, "fractions": (0.25, 0.5), "score": "softmax", **kw}
    ),
}
TEXT_CALLS: dict[str, Call] = {
    "comprehensiveness": lambda m, ids, mask, s, **kw: M.comprehensiveness(
        m, ids, s, attention_mask=mask, **{"fractions": (0.2, 0.5), **kw}
    ),
    "sufficiency": lambda m, ids, mask, s, **kw: M.sufficiency(
        m, ids, s, attention_mask=mask, **{"fractions": (0.2, 0.5), **kw}
    ),
}


def _as_tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, dict):
        return [out[k] for k in sorted(out)]
    if isinstance(out, tuple):
        return list(out)
    return [out]


def _assert_same(a: Any, b: Any) -> None:
    for x, y in zip(_as_tensors(a), _as_tensors(b), strict=True):
        torch.testing.assert_close(x, y, equal_nan=True)


def _snapshot(model: nn.Module) -> tuple[list[bool], dict[str, torch.Tensor]]:
    return [m.training for m in model.modules()], copy.deepcopy(model.state_dict())


def _assert_untouched(model: nn.Module, snap: tuple[list[bool], dict[str, torch.Tensor]]) -> None:
    modes, state = snap
    assert [m.training for m in model.modules()] == modes
    now = model.state_dict()
    for k, v in state.items():
        assert torch.equal(now[k], v), f"{k} changed"


def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg, f"multi-line error: {msg!r}"
    return msg


# ----------------------------------------------------------------------------------------------
# Model state: eval mode under the lock, everything restored
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(IMAGE_CALLS))
def test_image_metric_runs_train_mode_model_in_eval_and_restores(name):
    call = IMAGE_CALLS[name]
    x, a = _image_data()
    model = _image_model()
    reference = call(model.eval(), x, a)
    model.train()
    model.drop.eval()  # mixed modes come back exactly as they were
    snap = _snapshot(model)
    torch.manual_seed(123)
    out = call(model, x, a)
    _assert_untouched(model, snap)
    _assert_same(out, reference)


@pytest.mark.parametrize("name", sorted(TEXT_CALLS))
def test_text_metric_runs_train_mode_model_in_eval_and_restores(name):
    call = TEXT_CALLS[name]
    ids, mask, s = _text_data()
    model = _text_model()
    reference = call(model.eval(), ids, mask, s)
    model.train()
    snap = _snapshot(model)
    out = call(model, ids, mask, s)
    _assert_untouched(model, snap)
    _assert_same(out, reference)


@pytest.mark.parametrize("fail_at", [1, 2])
@pytest.mark.parametrize("name", sorted(IMAGE_CALLS))
def test_image_metric_restores_the_model_when_it_raises(name, fail_at):
    x, a = _image_data()
    model = _image_model().train()
    snap = _snapshot(model)
    model.fail_at = fail_at  # the clean pass (1) or a perturbed pass (2) raises
    with pytest.raises(RuntimeError, match="boom"):
        IMAGE_CALLS[name](model, x, a)
    _assert_untouched(model, snap)
    assert model.training


@pytest.mark.parametrize("name", sorted(TEXT_CALLS))
def test_text_metric_restores_the_model_when_it_raises(name):
    ids, mask, s = _text_data()
    model = _text_model().train()
    snap = _snapshot(model)
    model.fail_at = 2
    with pytest.raises(RuntimeError, match="boom"):
        TEXT_CALLS[name](model, ids, mask, s)
    _assert_untouched(model, snap)
    assert model.training


def test_bound_forward_is_run_in_eval_mode_too():
    x, a = _image_data()
    model = _image_model()
    reference = M.deletion_auc(model.eval(), x, a, steps=4)
    model.train()
    snap = _snapshot(model)
    out = M.deletion_auc(model.forward, x, a, steps=4)
    _assert_untouched(model, snap)
    _assert_same(out, reference)


@pytest.mark.filterwarnings("ignore:Input Tensor 0 did not already require gradients")
def test_captum_attribution_object_runs_on_the_eval_model():
    from captum.attr import Saliency

    x, _ = _image_data()
    model = _image_model()
    reference = M.deletion_auc(model.eval(), x, Saliency(model), steps=4)
    model.train()
    snap = _snapshot(model)
    out = M.deletion_auc(model, x, Saliency(model), steps=4)
    _assert_untouched(model, snap)
    _assert_same(out, reference)
    for fn in (M.pointing_game, M.relevance_mass_accuracy, M.relevance_rank_accuracy):
        masks = torch.zeros(3, H, W, dtype=torch.bool)
        masks[:, :4] = True
        model.eval()
        ref = fn(Saliency(model), masks, inputs=x, target=1)
        model.train()
        got = fn(Saliency(model), masks, inputs=x, target=1)
        _assert_untouched(model, snap)
        _assert_same(got, ref)


def test_captum_ext_method_and_wrappers_are_not_reentrant_errors():
    """captum_ext methods take the model's lock themselves: the metric must not hold it then."""
    from captum.attr import NoiseTunnel
    from tiny_models import IMAGE_MODELS, build

    from captum_ext import CDAM

    vit = build(IMAGE_MODELS[0], dtype=torch.float32)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    cdam = CDAM(vit)

    class Wrapper:  # a user's own object around a captum_ext method
        def attribute(self, inputs, target=None, **kw):
            return cdam.attribute(inputs, target=target, **kw)

    ref = M.deletion_auc(vit, x, cdam, steps=2)
    assert torch.isfinite(ref).all()
    _assert_same(M.deletion_auc(vit, x, Wrapper(), steps=2), ref)
    nt = M.deletion_auc(vit, x, NoiseTunnel(cdam), steps=2, attribute_kwargs={"nt_samples": 2})
    assert torch.isfinite(nt).all()
    assert not vit.training


# ----------------------------------------------------------------------------------------------
# Numeric options: NaN, inf, strings, bools, out of range
# ----------------------------------------------------------------------------------------------

NAN, INF = float("nan"), float("inf")


def _map_metric(fn: Call, **kw: Any) -> Call:
    return lambda: fn(torch.rand(2, H, W), **kw)


def _masks() -> torch.Tensor:
    m = torch.zeros(2, H, W, dtype=torch.bool)
    m[:, :3, :3] = True
    return m


OPTION_CASES: list[tuple[str, str, Any]] = [
    *[("sparsity", "threshold", v) for v in (NAN, INF, -0.1, 1.5, "0.1", None)],
    *[("deletion_auc", "steps", v) for v in (0, -3, 2.5, NAN, True, "4")],
    *[("insertion_auc", "steps", v) for v in (0, NAN)],
    *[("deletion_auc", "batch_size", v) for v in (0, 2.5, NAN, "8")],
    *[("insertion_auc", "blur_sigma", v) for v in (NAN, INF, 0.0, -1.0, "5")],
    *[("insertion_auc", "blur_kernel_size", v) for v in (4, 0, 3.0, NAN)],
    *[("average_drop", "keep", v) for v in (NAN, 0.0, 1.5, "0.5", INF)],
    *[("increase_in_confidence", "keep", v) for v in (NAN, -0.5)],
    *[("average_drop", "batch_size", v) for v in (0, NAN)],
    *[("road", "percentages", v) for v in ([NAN], [1.0], [-0.1], "0.5", [], [INF], ["0.5"])],
    *[("road", "noise_std", v) for v in (NAN, INF, -1.0, "0.01")],
    *[("road", "seed", v) for v in (1.5, "0", NAN)],
    *[("token_perturbation_auc", "fractions", v) for v in ([NAN], [], [0.5, 0.2], "0.5", [0.0])],
    *[("token_perturbation_auc", "patch_size", v) for v in (0, 2.5, NAN, -4)],
    *[("comprehensiveness", "fractions", v) for v in ([NAN], [], "0.5", [1.5])],
    *[("sufficiency", "replace_id", v) for v in (1.5, -1, NAN, "0")],
    *[("pointing_game", "tolerance", v) for v in (NAN, 1.5, -1, True, INF)],
    *[("model_randomisation", "init_std", v) for v in (NAN, -1.0, INF)],
    *[("model_randomisation", "seed", v) for v in (1.5, NAN)],
]


def _option_call(metric: str, option: str, value: Any) -> Callable[[], Any]:
    kw = {option: value}
    if metric in IMAGE_CALLS:
        x, a = _image_data(2)
        if option.startswith("blur"):
            kw["substrate"] = "blur"
        return lambda: IMAGE_CALLS[metric](_image_model().eval(), x, a, **kw)
    if metric in TEXT_CALLS:
        ids, mask, s = _text_data(2)
        return lambda: TEXT_CALLS[metric](_text_model().eval(), ids, mask, s, **kw)
    if metric == "sparsity":
        return _map_metric(M.sparsity, **kw)
    if metric == "pointing_game":
        return _map_metric(M.pointing_game, masks=_masks(), **kw)
    if metric == "model_randomisation":
        model = nn.Linear(3, 2)
        return lambda: M.model_randomisation(
            model, lambda m, x, t: m.weight.detach().expand(2, -1, -1), torch.zeros(2, 3), **kw
        )
    raise AssertionError(metric)


@pytest.mark.parametrize(("metric", "option", "value"), OPTION_CASES, ids=repr)
def test_bad_numeric_option_is_refused_in_one_line(metric, option, value):
    with pytest.raises((ValueError, TypeError)) as exc:
        _option_call(metric, option, value)()
    msg = _one_line(exc)
    assert option in msg, msg
    assert exc.type in (ValueError, TypeError)


@pytest.mark.parametrize(
    ("call", "option"),
    [
        (lambda: M.gaussian_blur(torch.zeros(1, 1, 4, 4), 3, NAN), "sigma"),
        (lambda: M.gaussian_blur(torch.zeros(1, 1, 4, 4), 3, 0.0), "sigma"),
        (lambda: M.gaussian_blur(torch.zeros(1, 1, 4, 4), 3.0, 1.0), "kernel_size"),
        (
            lambda: M.noisy_linear_imputation(torch.zeros(1, 4, 4), torch.eye(4) > 0, NAN),
            "noise_std",
        ),
        (
            lambda: M.noisy_linear_imputation(torch.zeros(1, 4, 4), torch.eye(4) > 0, -0.1),
            "noise_std",
        ),
    ],
    ids=["blur-sigma-nan", "blur-sigma-0", "blur-kernel-float", "nli-noise-nan", "nli-noise-neg"],
)
def test_bad_helper_option_is_refused_in_one_line(call, option):
    with pytest.raises((ValueError, TypeError)) as exc:
        call()
    assert option in _one_line(exc)


def test_valid_numeric_options_still_work():
    x, a = _image_data(2)
    model = _image_model().eval()
    import numpy as np

    M.deletion_auc(model, x, a, steps=np.int64(2), batch_size=np.int64(3))
    M.insertion_auc(model, x, a, steps=2, blur_kernel_size=3, blur_sigma=np.float32(1.5))
    M.average_drop(model, x, a, keep=np.float64(0.5))
    assert M.sparsity(a, threshold=0).eq(0).all()
    assert M.sparsity(a, threshold=1).lt(1).all()
    M.road(model, x, a, percentages=(0.0, 0.5), noise_std=0, seed=np.int64(3))
    M.pointing_game(a, _masks(), tolerance=np.int64(1))


# ----------------------------------------------------------------------------------------------
# Non-finite inputs, attributions and model scores
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [NAN, INF])
@pytest.mark.parametrize("name", sorted(IMAGE_CALLS))
def test_non_finite_inputs_are_refused(name, value):
    x, a = _image_data(2)
    x[1, 0, 2, 3] = value
    with pytest.raises(ValueError) as exc:
        IMAGE_CALLS[name](_image_model().eval(), x, a)
    msg = _one_line(exc)
    assert "inputs" in msg and "finite" in msg, msg


@pytest.mark.parametrize("name", sorted(IMAGE_CALLS))
def test_non_finite_attributions_are_refused(name):
    x, a = _image_data(2)
    a[0, 1, 1] = NAN
    if name == "token_perturbation_auc":
        a = torch.tensor([[0.1, NAN, 0.3, 0.4], [0.1, 0.2, 0.3, 0.4]])
    with pytest.raises(ValueError) as exc:
        IMAGE_CALLS[name](_image_model().eval(), x, a)
    assert "NaN" in _one_line(exc)


def test_non_finite_substrate_is_refused():
    x, a = _image_data(2)
    sub = torch.zeros(1, 3, 1, 1)
    sub[0, 1] = NAN
    with pytest.raises(ValueError) as exc:
        M.deletion_auc(_image_model().eval(), x, a, steps=2, substrate=sub)
    assert "substrate" in _one_line(exc)


class NaNModel(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(x.shape[0], K)
        out[x[:, 0, 0, 0] == 0] = NAN  # NaN scores once the first pixel is removed
        return out


@pytest.mark.parametrize("name", ["deletion_auc", "average_drop", "road"])
def test_nan_model_scores_are_refused_not_averaged(name):
    x, _ = _image_data(2)
    x[:, 0, 0, 0] = 1.0
    a = torch.zeros(2, H, W)
    a[:, 0, 0] = 1.0  # the first pixel is the most relevant: removed first
    kw: dict[str, Any] = {}
    if name == "average_drop":
        a = torch.ones(2, H, W)
        a[:, 0, 0] = 0.0  # the soft mask zeroes the first pixel
    if name == "road":
        kw = {"noise_std": 0.0, "percentages": (0.5,)}
        x[:, 0] = 0.0  # the imputed first pixel is 0 in channel 0
        x[:, 0, 0, 0] = 1.0
    call = IMAGE_CALLS[name]
    with pytest.raises(ValueError) as exc:
        call(NaNModel(), x, a, **kw)
    assert "NaN" in _one_line(exc)


# ----------------------------------------------------------------------------------------------
# Targets
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", [K, 10, -1, [0, K]])
@pytest.mark.parametrize("name", sorted(IMAGE_CALLS))
def test_out_of_range_target_is_refused_in_one_line(name, target):
    x, a = _image_data(2)
    with pytest.raises(ValueError) as exc:
        IMAGE_CALLS[name](_image_model().eval(), x, a, target=target)
    msg = _one_line(exc)
    assert "target" in msg and f"0..{K - 1}" in msg, msg


@pytest.mark.parametrize("target", [3, -1])
@pytest.mark.parametrize("name", sorted(TEXT_CALLS))
def test_out_of_range_text_target_is_refused_in_one_line(name, target):
    ids, mask, s = _text_data(2)
    with pytest.raises(ValueError) as exc:
        TEXT_CALLS[name](_text_model().eval(), ids, mask, s, target=target)
    msg = _one_line(exc)
    assert "target" in msg and "0..2" in msg, msg


# ----------------------------------------------------------------------------------------------
# Empty batches: an empty result of the documented shape, nothing called
# ----------------------------------------------------------------------------------------------


class NeverCalled:
    """An ``Attribution``-like object that must not be called for an empty batch."""

    def attribute(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        raise AssertionError("attribute() called for an empty batch")


def _empty_image_expectations() -> dict[str, Callable[[Any], None]]:
    def flat(out: Any) -> None:
        assert isinstance(out, torch.Tensor) and out.shape == (0,), out
        assert out.dtype == torch.float64

    def ttame(out: Any) -> None:
        assert sorted(out) == sorted(["AD100", "IC100", "AD50", "IC50", "AD15", "IC15"])
        for v in out.values():
            flat(v)

    def road(out: Any) -> None:
        assert out.shape == (0, 2) and out.dtype == torch.float64

    expect = dict.fromkeys(IMAGE_CALLS, flat)
    expect.update(average_drop_ttame=ttame, road=road)
    return expect


@pytest.mark.parametrize("as_object", [False, True], ids=["tensor", "object"])
@pytest.mark.parametrize("name", sorted(IMAGE_CALLS))
def test_empty_image_batch_gives_empty_result(name, as_object):
    model = _image_model().train()
    snap = _snapshot(model)
    x = torch.zeros(0, 3, H, W)
    if as_object:
        a = NeverCalled()
    elif name == "token_perturbation_auc":
        a = torch.zeros(0, 4)
    else:
        a = torch.zeros(0, H, W)
    out = IMAGE_CALLS[name](model, x, a)
    _empty_image_expectations()[name](out)
    assert model.calls == 0
    _assert_untouched(model, snap)


@pytest.mark.parametrize("name", ["deletion_auc", "token_perturbation_auc"])
def test_empty_batch_curves_have_the_documented_shapes(name):
    x = torch.zeros(0, 3, H, W)
    a = torch.zeros(0, 4) if name == "token_perturbation_auc" else torch.zeros(0, H, W)
    auc, curve, xs = IMAGE_CALLS[name](_image_model(), x, a, return_curve=True)
    assert auc.shape == (0,)
    assert curve.shape == (0, xs.shape[0]) and xs.shape[0] == (5 if name == "deletion_auc" else 3)


@pytest.mark.parametrize("per_fraction", [False, True])
@pytest.mark.parametrize("name", sorted(TEXT_CALLS))
def test_empty_text_batch_gives_empty_result(name, per_fraction):
    model = _text_model()
    ids = torch.zeros(0, T, dtype=torch.long)
    out = TEXT_CALLS[name](model, ids, torch.ones(0, T), NeverCalled(), per_fraction=per_fraction)
    assert out.shape == ((0, 2) if per_fraction else (0,)) and out.dtype == torch.float64
    assert model.calls == 0


MAP_ONLY: dict[str, Call] = {
    "sparsity": lambda a, **kw: M.sparsity(a, **kw),
    "pointing_game": lambda a, **kw: M.pointing_game(a, torch.zeros(0, H, W, dtype=bool), **kw),
    "relevance_mass_accuracy": lambda a, **kw: M.relevance_mass_accuracy(
        a, torch.zeros(0, H, W, dtype=bool), **kw
    ),
    "relevance_rank_accuracy": lambda a, **kw: M.relevance_rank_accuracy(
        a, torch.zeros(0, H, W, dtype=bool), **kw
    ),
    "discrimination_score": lambda a, **kw: M.discrimination_score(
        a, a, torch.zeros(0, H, W), torch.zeros(0, H, W), **kw
    ),
    "pearson": lambda a, **kw: M.pearson(a, a, **kw),
    "spearman": lambda a, **kw: M.spearman(a, a, **kw),
    "token_auprc": lambda a, **kw: M.token_auprc(a, torch.zeros(0, H * W, dtype=bool), **kw),
}


@pytest.mark.parametrize("as_object", [False, True], ids=["tensor", "object"])
@pytest.mark.parametrize("name", sorted(MAP_ONLY))
def test_empty_batch_of_maps_gives_empty_result(name, as_object):
    if as_object:
        shape = (0, H * W) if name == "token_auprc" else (0, 3, H, W)
        out = MAP_ONLY[name](NeverCalled(), inputs=torch.zeros(shape))
    else:
        out = MAP_ONLY[name](
            torch.zeros(0, H * W) if name == "token_auprc" else torch.zeros(0, H, W)
        )
    assert out.shape == (0,) and out.dtype == torch.float64


def test_empty_batch_still_checks_shapes_and_targets():
    model = _image_model()
    with pytest.raises(ValueError, match="batch size"):
        M.deletion_auc(model, torch.zeros(0, 3, H, W), torch.zeros(2, H, W))
    with pytest.raises(ValueError, match="target"):
        M.deletion_auc(model, torch.zeros(0, 3, H, W), torch.zeros(0, H, W), target=[1, 2])
    with pytest.raises(ValueError, match="steps"):
        M.deletion_auc(model, torch.zeros(0, 3, H, W), torch.zeros(0, H, W), steps=0)


def test_model_randomisation_refuses_an_empty_batch():
    model = nn.Linear(3, 2)
    with pytest.raises(ValueError) as exc:
        M.model_randomisation(model, lambda m, x, t: m(x), torch.zeros(0, 3))
    msg = _one_line(exc)
    assert "empty" in msg and "inputs" in msg, msg


def test_maps_without_elements_are_refused():
    with pytest.raises(ValueError) as exc:
        M.sparsity(torch.zeros(2, 0))
    assert "no elements" in _one_line(exc)


def test_model_randomisation_uses_eval_copies():
    model = _image_model().train()
    snap = _snapshot(model)
    x, _ = _image_data(2)

    def explain(m: nn.Module, inputs: torch.Tensor, target: Any) -> torch.Tensor:
        assert not m.training
        return m(inputs)

    res = M.model_randomisation(model, explain, x)
    assert all(math.isfinite(v) for _, v in res)
    _assert_untouched(model, snap)


# ----------------------------------------------------------------------------------------------
# Every registered metric is covered by the tables above
# ----------------------------------------------------------------------------------------------


def test_every_metric_is_covered():
    covered = set(IMAGE_CALLS) | set(TEXT_CALLS) | set(MAP_ONLY) | {"model_randomisation"}
    assert covered == set(M.METRICS)
