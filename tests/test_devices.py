"""Devices: every method, explainer and metric keeps its tensors on the input's device.

Two kinds of checks:

* A parity table: every method of the registry (via ``method_table``), T-TAME and MHEX
  inference, and every registered metric, on each device in ``[cpu, cuda]``. On the CPU it
  checks the output's device and dtype; on CUDA (skipped with a reason when no GPU is
  present) also CPU/CUDA parity within tolerance.
* A hygiene audit (CPU, any machine): :class:`device_audit.DeviceAudit` records every tensor
  factory that captum_ext calls without a device and every device-to-host copy it makes while
  explaining or scoring. That is the bug class a CPU-only test suite otherwise never sees
  (Captum 0.9's ``Occlusion`` builds masks on the CPU); the self-tests below show the audit
  catches a deliberately broken method and Captum's own slip.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import captum
import pytest
import torch
from device_audit import DeviceAudit
from method_table import METHODS
from tiny_models import ALL_MODELS, build, make_inputs
from torch import nn

import captum_ext
import captum_ext.metrics as M
from captum_ext.attr import AttentionMap
from captum_ext.explainers import MHEX, TTAME

ROOT = os.path.dirname(os.path.abspath(captum_ext.__file__))
HERE = os.path.dirname(os.path.abspath(__file__))
CUDA = pytest.param(
    "cuda",
    marks=[
        pytest.mark.cuda,
        pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device present"),
    ],
)
DEVICES = ["cpu", CUDA]
CASES = (ALL_MODELS[0], ALL_MODELS[6], ALL_MODELS[7])  # timm ViT, HF ViT, BERT
PAIRS = [(m, c) for m in METHODS for c in CASES]
PAIR_IDS = [f"{m.name}-{c.name}" for m, c in PAIRS]

ALLOWED: dict[tuple[str, str], str] = {
    ("attr/tam.py", "_plan"): "the removal plan buckets rows by kept length, a Python int "
    "(one .tolist() per example, before any ablated forward pass)",
    ("metrics/road.py", "road"): "ROAD's imputation is a scipy sparse solve: images and ranks "
    "are copied to the host once per call, the model runs on the inputs' device",
    ("metrics/road.py", "noisy_linear_imputation"): "the scipy sparse solve itself (host only)",
}
"""(file under captum_ext, function) -> why its host copies or CPU tensors are deliberate."""


def _moved(extra: tuple, device: str) -> tuple:
    return tuple(e.to(device) for e in extra)


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


# ------------------------------------------------------------------ methods
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("method", "case"), PAIRS, ids=PAIR_IDS)
def test_device_parity_and_placement(device, method, case):
    x, extra = make_inputs(case, batch=2, dtype=torch.float64)
    moved = build(case, dtype=torch.float64).to(device)
    got = method.make(moved).attribute(
        x.to(device), target=1, additional_forward_args=_moved(extra, device)
    )
    assert got.device.type == device
    assert got.dtype == torch.float64  # the model's precision, not a default float32
    assert _hooks(moved) == 0
    if device != "cpu":
        model = build(case, dtype=torch.float64)
        reference = method.make(model).attribute(x, target=1, additional_forward_args=extra)
        torch.testing.assert_close(got.cpu(), reference, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", METHODS, ids=[m.name for m in METHODS])
def test_several_targets_stay_on_the_device(device, method):
    case = ALL_MODELS[0]
    model = build(case, dtype=torch.float64).to(device)
    x, _ = make_inputs(case, batch=2, dtype=torch.float64)
    attr = method.make(model)
    for target in (None, [0, 3], torch.tensor([2, 1], device=device)):
        got = attr.attribute(x.to(device), target=target)
        assert got.device.type == device, target
    if hasattr(attr, "attribute_targets"):
        assert attr.attribute_targets(x.to(device), targets=[0, 1]).device.type == device


# ------------------------------------------------------------------ explainers
def _explainers(case) -> dict[str, Callable[[nn.Module], nn.Module]]:
    """Explainers declared fitted (``mark_fitted``): they explain with their initial modules."""
    out = {"mhex": lambda m: MHEX(m).mark_fitted()}
    if case.modality == "image":
        out["ttame"] = lambda m: TTAME(m, input_size=32).mark_fitted()
    return out


EXPLAINER_PAIRS = [(n, c) for c in (ALL_MODELS[0], ALL_MODELS[7]) for n in _explainers(c)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    ("name", "case"), EXPLAINER_PAIRS, ids=[f"{n}-{c.name}" for n, c in EXPLAINER_PAIRS]
)
def test_explainer_inference_parity_and_placement(device, name, case):
    make = _explainers(case)[name]
    x, extra = make_inputs(case, batch=2, dtype=torch.float64)
    model = build(case, dtype=torch.float64)
    torch.manual_seed(3)
    reference = make(model).attribute(x, target=1, additional_forward_args=extra)
    moved = build(case, dtype=torch.float64).to(device)
    torch.manual_seed(3)  # the same initial heads / mechanism (created on the CPU, then moved)
    explainer = make(moved)
    got = explainer.attribute(x.to(device), target=1, additional_forward_args=_moved(extra, device))
    assert got.device.type == device
    assert got.dtype == torch.float64
    torch.testing.assert_close(got.cpu(), reference, rtol=1e-6, atol=1e-8)
    assert _hooks(moved) == 0


# ------------------------------------------------------------------ metrics
class _Text(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(6, 3)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return (self.emb(ids) * mask[..., None]).sum(1)


def _metric_data() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    masks = torch.zeros(2, 8, 8, dtype=torch.bool)
    masks[0, 2:5, 1:6] = True
    masks[1, 4:8, 4:8] = True
    return {
        "x": torch.randn(2, 3, 8, 8, generator=g, dtype=torch.float64),
        "a": torch.randn(2, 1, 8, 8, generator=g, dtype=torch.float64),
        "b": torch.randn(2, 1, 8, 8, generator=g, dtype=torch.float64),
        "tokens": torch.randn(2, 16, generator=g, dtype=torch.float64),
        "masks": masks,
        "masks_b": ~masks,
        "ids": torch.tensor([[4, 1, 2, 3, 1, 5], [4, 3, 3, 2, 5, 0]]),
        "ids_mask": torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0]]),
        "tok": torch.tensor([[0.0, 0.9, 0.1, 0.5, 0.8, 0.0], [0.0, 0.2, 0.7, 0.4, 0.0, 0.0]]),
        "rationale": torch.tensor([[0, 1, 0, 0, 1, 0], [0, 0, 1, 1, 0, 0]], dtype=torch.bool),
    }


def _models() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    image = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(4, 3),
    )  # fmt: skip
    return image.double().eval(), _Text().double().eval()


METRIC_CALLS: dict[str, Callable[[nn.Module, nn.Module, dict], object]] = {
    "deletion_auc": lambda m, t, d: M.deletion_auc(m, d["x"], d["a"], steps=4),
    "insertion_auc": lambda m, t, d: M.insertion_auc(
        m, d["x"], d["a"], steps=4, blur_kernel_size=3
    ),
    "average_drop": lambda m, t, d: M.average_drop(m, d["x"], d["a"], keep=0.5),
    "increase_in_confidence": lambda m, t, d: M.increase_in_confidence(m, d["x"], d["a"], keep=0.5),
    "average_drop_ttame": lambda m, t, d: M.average_drop_ttame(m, d["x"], d["a"]),
    "token_perturbation_auc": lambda m, t, d: M.token_perturbation_auc(
        m, d["x"], d["tokens"], patch_size=2, score="softmax"
    ),
    "road": lambda m, t, d: M.road(m, d["x"], d["a"], percentages=(0.25, 0.5), score="softmax"),
    "comprehensiveness": lambda m, t, d: M.comprehensiveness(
        t, d["ids"], d["tok"], attention_mask=d["ids_mask"]
    ),
    "sufficiency": lambda m, t, d: M.sufficiency(
        t, d["ids"], d["tok"], attention_mask=d["ids_mask"]
    ),
    "token_auprc": lambda m, t, d: M.token_auprc(d["tok"], d["rationale"], d["ids_mask"].bool()),
    "pointing_game": lambda m, t, d: M.pointing_game(d["a"], d["masks"], tolerance=1),
    "relevance_mass_accuracy": lambda m, t, d: M.relevance_mass_accuracy(d["a"], d["masks"]),
    "relevance_rank_accuracy": lambda m, t, d: M.relevance_rank_accuracy(d["a"], d["masks"]),
    "sparsity": lambda m, t, d: M.sparsity(d["a"]),
    "discrimination_score": lambda m, t, d: M.discrimination_score(
        d["a"], d["b"], d["masks"], d["masks_b"]
    ),
    "pearson": lambda m, t, d: M.pearson(d["a"], d["b"]),
    "spearman": lambda m, t, d: M.spearman(d["a"], d["b"]),
    "model_randomisation": lambda m, t, d: M.model_randomisation(
        m, lambda net, x, target: net[0](x).sum(1), d["x"]
    ),
}
NOT_COMPARED = {"model_randomisation": "re-initialises layers with the device's own RNG"}


def test_metric_table_covers_every_registered_metric():
    assert set(METRIC_CALLS) == set(M.METRICS)


def _tensors(out: object) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return list(out.values())
    return []


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", sorted(METRIC_CALLS))
def test_metric_parity_and_placement(device, name):
    call = METRIC_CALLS[name]
    data = _metric_data()
    reference = call(*_models(), data)
    image, text = _models()
    got = call(image.to(device), text.to(device), {k: v.to(device) for k, v in data.items()})
    if name in NOT_COMPARED:  # a Python list of (layer, similarity)
        assert len(got) == len(reference)
        assert all(isinstance(s, float) for _, s in got)
        return
    pairs = list(zip(_tensors(got), _tensors(reference), strict=True))
    assert pairs
    for g, r in pairs:
        assert g.device.type == device, name
        assert g.dtype == r.dtype
        torch.testing.assert_close(g.cpu(), r, rtol=1e-6, atol=1e-9, equal_nan=True)


# ------------------------------------------------------------------ hygiene audit
_TENSOR_TARGET = torch.tensor([1, 0])


def _explain_every_way(attr, x: torch.Tensor, extra: tuple) -> None:
    """What a user calls: every target form, several targets, a 1-tuple, token output."""
    for target in (1, [0, 1], _TENSOR_TARGET, None):
        attr.attribute(x, target=target, additional_forward_args=extra)
    attr.attribute((x,), target=1, additional_forward_args=extra, output="tokens")
    if hasattr(attr, "attribute_targets"):
        attr.attribute_targets(x, targets=[0, 1], additional_forward_args=extra)


def _audit(fn: Callable[[], object], roots: list[str] | None = None) -> list[str]:
    allowed = set(ALLOWED)
    with DeviceAudit(roots or [ROOT], allowed) as audit:
        fn()
    return sorted({str(s) for s in audit.slips})


AUDIT_PAIRS = [(m, c) for m in METHODS for c in (CASES[0], CASES[2])]  # an image, a text model


@pytest.mark.parametrize(
    ("method", "case"), AUDIT_PAIRS, ids=[f"{m.name}-{c.name}" for m, c in AUDIT_PAIRS]
)
def test_methods_create_no_tensor_off_the_inputs_device(method, case):
    model = build(case, dtype=torch.float32)
    x, extra = make_inputs(case, batch=2, dtype=torch.float32)
    attr = method.make(model)
    assert _audit(lambda: _explain_every_way(attr, x, extra)) == []


@pytest.mark.parametrize(
    ("name", "case"), EXPLAINER_PAIRS, ids=[f"{n}-{c.name}" for n, c in EXPLAINER_PAIRS]
)
def test_explainer_inference_creates_no_tensor_off_the_inputs_device(name, case):
    model = build(case, dtype=torch.float32)
    x, extra = make_inputs(case, batch=2, dtype=torch.float32)
    explainer = _explainers(case)[name](model)

    def run() -> None:
        for target in (1, [0, 1], None):
            explainer.attribute(x, target=target, additional_forward_args=extra)

    assert _audit(run) == []


@pytest.mark.parametrize("name", sorted(METRIC_CALLS))
def test_metrics_create_no_tensor_off_the_inputs_device(name):
    image, text = _models()
    data = _metric_data()
    assert _audit(lambda: METRIC_CALLS[name](image, text, data)) == []


class _CpuMaskAttentionMap(AttentionMap):
    """A deliberately broken method: readout weights built on the CPU, then moved."""

    def _token_scores(self, x, target, extra):
        attn = super()._token_scores(x, target, extra)
        w = torch.ones(attn.shape[-1])  # the bug: no device=
        return attn * w.to(attn.device)


def test_audit_catches_a_method_that_builds_a_tensor_on_the_cpu():
    case = ALL_MODELS[0]
    model = build(case, dtype=torch.float32)
    x, extra = make_inputs(case, batch=2, dtype=torch.float32)
    broken = _CpuMaskAttentionMap(model)
    slips = _audit(lambda: _explain_every_way(broken, x, extra), roots=[ROOT, HERE])
    assert slips and all("(_token_scores)" in s and "ones" in s for s in slips), slips
    # the same calls through the sound method record nothing
    assert _audit(lambda: _explain_every_way(AttentionMap(model), x, extra), [ROOT, HERE]) == []


@pytest.mark.skipif(
    not captum.__version__.startswith("0.9"), reason="the known slip is Captum 0.9's"
)
def test_audit_catches_captums_occlusion_masks_built_on_the_cpu():
    from captum.attr import Occlusion

    root = os.path.dirname(os.path.abspath(captum.__file__))
    model = nn.Bilinear(4, 4, 2).double()
    a, b = torch.randn(2, 4, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64)
    occ = Occlusion(model)
    # several features per evaluation, spanning both inputs: the cross-tensor mask path
    slips = _audit(
        lambda: occ.attribute(
            (a, b), sliding_window_shapes=((1,), (1,)), target=0, perturbations_per_eval=8
        ),
        roots=[root],
    )
    assert any("occlusion.py" in s and "zeros" in s for s in slips), slips


def _literal_ap(scores: list[float], labels: list[bool]) -> float:
    """AP from its definition: sum over distinct thresholds t of (R(t) - R(t_prev)) * P(t)."""
    n_pos = sum(labels)
    if n_pos == 0:
        return float("nan")
    ap, recall_prev = 0.0, 0.0
    for t in sorted(set(scores), reverse=True):
        picked = [y for s, y in zip(scores, labels) if s >= t]
        recall = sum(picked) / n_pos
        ap += (recall - recall_prev) * sum(picked) / len(picked)
        recall_prev = recall
    return ap


def test_token_auprc_in_one_batched_pass_equals_the_definition_per_row():
    g = torch.Generator().manual_seed(0)
    s = torch.randint(0, 4, (12, 10), generator=g).float()  # many ties
    r = torch.rand(12, 10, generator=g) < 0.3
    v = torch.rand(12, 10, generator=g) < 0.8
    got = M.token_auprc(s, r, v)
    for i in range(12):
        keep = v[i]
        want = _literal_ap(s[i][keep].tolist(), r[i][keep].tolist())
        if want != want:
            assert got[i].isnan()
        else:
            assert abs(got[i].item() - want) < 1e-12, i
