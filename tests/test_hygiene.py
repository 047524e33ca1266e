"""Cross-cutting checks over every (method, model): hooks gone and model state restored.

After success, after a bad target and after a module that raises, no hook is
left on any module, and training flags, fused-attention flags, attention
implementations and gradient-checkpointing flags are exactly as before
(:func:`method_table.model_state`). The trained explainers get the same checks, after fitting
too, in ``test_explainers.py``.
"""

from __future__ import annotations

import pytest
import torch
from method_table import METHODS
from method_table import model_state as _state
from tiny_models import ALL_MODELS, build, make_inputs

CASES = [(m, c) for m in METHODS for c in ALL_MODELS]
IDS = [f"{m.name}-{c.name}" for m, c in CASES]


def _prepare(case):
    model = build(case, dtype=torch.float32)
    model.train()  # the call must switch to eval and back
    if hasattr(model, "set_grad_checkpointing"):
        model.set_grad_checkpointing(True)
    return model


@pytest.mark.parametrize(("method", "case"), CASES, ids=IDS)
def test_state_restored_after_success_bad_target_and_exception(method, case):
    model = _prepare(case)
    x, extra = make_inputs(case, batch=2, dtype=torch.float32)
    before = _state(model)
    explainer = method.make(model)

    out = explainer.attribute(x, target=1, additional_forward_args=extra)
    assert torch.isfinite(out).all()
    assert _state(model) == before

    if not method.class_agnostic:  # class-agnostic methods ignore the target
        with pytest.raises(ValueError, match="out of range"):
            explainer.attribute(x, target=99, additional_forward_args=extra)
        assert _state(model) == before

    blocks = explainer.adapter.blocks
    last = blocks[-1]

    def boom(*args, **kwargs):
        raise RuntimeError("boom from the model")

    last.forward = boom
    try:
        with pytest.raises(RuntimeError, match="boom"):
            explainer.attribute(x, target=1, additional_forward_args=extra)
    finally:
        del last.forward
    assert _state(model) == before
    if hasattr(model, "set_grad_checkpointing"):
        model.set_grad_checkpointing(False)


def test_train_mode_result_equals_eval_result():
    case = ALL_MODELS[0]
    model = build(case)
    x, _ = make_inputs(case)
    explainer = METHODS[0].make(model)
    eval_map = explainer.attribute(x, target=0)
    model.train()
    assert torch.equal(explainer.attribute(x, target=0), eval_map)
    assert model.training


def test_mixed_training_modes_come_back_exactly():
    """Frozen-BatchNorm style: some modules in eval inside a training model, and vice versa."""
    case = ALL_MODELS[0]
    model = build(case)
    model.train()
    mods = list(model.modules())
    for m in mods[1::3]:
        m.training = False  # set flags directly, as a user freezing norms would
    before = _state(model)
    seen = []
    explainer = METHODS[0].make(model)
    handle = mods[-1].register_forward_hook(
        lambda *a: seen.append(any(m.training for m in model.modules()))
    )
    try:
        explainer.attribute(make_inputs(case)[0], target=0)
    finally:
        handle.remove()
    assert seen == [False]  # everything in eval during the call
    assert _state(model) == before
