"""Core checks on every device: CPU always, CUDA when present (skipped with a reason otherwise)."""

from __future__ import annotations

import pytest
import torch
from method_table import METHODS
from tiny_models import ALL_MODELS, build, make_inputs

CUDA = pytest.param(
    "cuda",
    marks=[
        pytest.mark.cuda,
        pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device present"),
    ],
)
DEVICES = ["cpu", CUDA]
PAIRS = [(m, c) for m in METHODS for c in (ALL_MODELS[0], ALL_MODELS[6], ALL_MODELS[7])]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("method", "case"), PAIRS, ids=[f"{m.name}-{c.name}" for m, c in PAIRS])
def test_device_parity_and_placement(device, method, case):
    model = build(case, dtype=torch.float64)
    x, extra = make_inputs(case, batch=2, dtype=torch.float64)
    reference = method.make(model).attribute(x, target=1, additional_forward_args=extra)

    moved = build(case, dtype=torch.float64).to(device)
    xd = x.to(device)
    extra_d = tuple(e.to(device) for e in extra)
    got = method.make(moved).attribute(xd, target=1, additional_forward_args=extra_d)
    assert got.device.type == device
    torch.testing.assert_close(got.cpu(), reference, rtol=1e-7, atol=1e-9)
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in moved.modules())
    assert hooks == 0
