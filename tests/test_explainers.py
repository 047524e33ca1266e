"""What every trained explainer (T-TAME, MHEX) shares, written once over ``method_table``.

The base contract (:class:`~captum_ext.explainers.TrainableExplainer`): an unfitted explainer
refuses to explain or save; :class:`~captum_ext.TrainingRecipe` validates itself and fills its
unset fields from the method's ``default_recipe``; Captum's argument order; ``attribute_targets``
is ``attribute`` per target, stacked. Then what used to be copied in ``test_ttame.py`` and
``test_mhex.py``: the model left as it was after explaining, fitting and failing; checkpoints
every epoch, resume equal to the uninterrupted run, ``keep_checkpoints``; save/load round trip;
damaged, edited and foreign checkpoints refused; DDP under torchrun equal to one process.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path

import pytest
import tiny_models
import torch
from method_table import (
    EXPLAINER_MODEL_IDS,
    EXPLAINER_MODELS,
    EXPLAINERS,
    LAST_BLOCK,
    ExplainerCase,
    fit_data,
    model_state,
)
from torch.utils.data import Dataset
from torchrun_launch import run_two_ranks

from captum_ext import CheckpointError, NotFittedError, TrainingRecipe
from captum_ext.checkpoint import save_checkpoint
from captum_ext.explainers import TrainableExplainer
from captum_ext.registry import TRAINED

TESTS = Path(__file__).resolve().parent
IDS = [e.name for e in EXPLAINERS]

pair = pytest.mark.parametrize(("case", "tiny"), EXPLAINER_MODELS, ids=EXPLAINER_MODEL_IDS)
each = pytest.mark.parametrize("case", EXPLAINERS, ids=IDS)


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: on a shared 2-core machine two threads oversubscribe badly."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _model(tiny: tiny_models.Case, seed: int = 0) -> torch.nn.Module:
    return tiny_models.build(tiny, torch.float64, seed)


def _inputs(tiny: tiny_models.Case, batch: int = 3):
    return tiny_models.make_inputs(tiny, batch, torch.float64)


def _fresh(case: ExplainerCase, tiny: tiny_models.Case, seed: int = 5) -> TrainableExplainer:
    """An unfitted explainer with a seeded initial module around a seeded model."""
    model = _model(tiny)
    torch.manual_seed(seed)
    return case.build(model)


def _recipe(case: ExplainerCase, **kw) -> TrainingRecipe:
    return dataclasses.replace(case.fit_recipe, **kw)


def test_the_table_holds_every_trained_explainer_of_the_registry():
    assert [e.name for e in EXPLAINERS] == list(TRAINED)
    for e in EXPLAINERS:
        assert e.spec is TRAINED[e.name] and e.spec.trained
        assert issubclass(e.spec.build, TrainableExplainer)
        assert e.spec.build.default_recipe == TrainingRecipe(*e.published)


# ---------------------------------------------------------------------------------------------
# fitted or not


@pair
def test_an_unfitted_explainer_refuses_to_explain_and_to_save(case, tiny, tmp_path):
    explainer = case.build(_model(tiny))
    assert not explainer.is_fitted
    x, extra = _inputs(tiny)
    name = explainer._method
    calls = {
        "attribute": lambda: explainer.attribute(x, 1, extra),
        "attribute_targets": lambda: explainer.attribute_targets(x, [0, 1], extra),
        "save": lambda: explainer.save(tmp_path / "e"),
    }
    for action, call in calls.items():
        with pytest.raises(NotFittedError) as err:
            call()
        message = str(err.value)
        assert isinstance(err.value, ValueError)
        assert "\n" not in message
        assert message.startswith(f"{name} is not fitted: call fit(data) or {name}.load(path, ")
        assert f"before {action}()" in message
    assert list(tmp_path.iterdir()) == []  # save wrote nothing


@pair
def test_fitted_after_mark_fitted_load_state_dict_fit_and_load(case, tiny, tmp_path):
    model = _model(tiny)
    x, extra = _inputs(tiny)

    marked = case.build(model)
    assert marked.mark_fitted() is marked and marked.is_fitted
    expected = marked.attribute(x, 1, extra)

    loaded_state = case.build(model)
    loaded_state.load_state_dict(marked.state_dict())
    assert loaded_state.is_fitted
    torch.testing.assert_close(loaded_state.attribute(x, 1, extra), expected, rtol=0, atol=0)

    trained = case.build(model)
    trained.fit(fit_data(tiny, 4), case.fit_recipe)
    assert trained.is_fitted
    trained.attribute(x, 1, extra)

    marked.save(tmp_path / "e")
    loaded = type(marked).load(tmp_path / "e", model)
    assert loaded.is_fitted
    torch.testing.assert_close(loaded.attribute(x, 1, extra), expected, rtol=0, atol=0)


class _Failing(Dataset):
    """The examples of ``data``; raises on the first item fetched after ``limit`` items."""

    def __init__(self, data: Dataset, limit: int) -> None:
        self.data, self.limit, self.count = data, limit, 0

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        self.count += 1
        if self.count > self.limit:
            raise RuntimeError("interrupted")
        return self.data[i]


@each
def test_a_fit_that_raises_leaves_the_explainer_unfitted(case):
    tiny = case.models[0]
    explainer = case.build(_model(tiny))
    with pytest.raises(RuntimeError, match="interrupted"):
        explainer.fit(_Failing(fit_data(tiny, 8), 2), case.fit_recipe)
    assert not explainer.is_fitted
    with pytest.raises(NotFittedError):
        explainer.attribute(_inputs(tiny)[0])


# ---------------------------------------------------------------------------------------------
# the recipe


BAD_RECIPES = [
    ("epochs", 0),
    ("epochs", -1),
    ("epochs", 1.5),
    ("epochs", True),
    ("batch_size", 0),
    ("batch_size", "32"),
    ("keep_checkpoints", 0),
    ("keep_checkpoints", -1),
    ("keep_checkpoints", 2.0),
    ("lr", 0),
    ("lr", -1e-3),
    ("lr", math.nan),
    ("lr", math.inf),
    ("lr", "0.1"),
    ("momentum", -0.1),
    ("momentum", math.nan),
    ("weight_decay", -1e-4),
    ("pct_start", 0),
    ("pct_start", 1),
    ("pct_start", 1.5),
    ("seed", 1.5),
    ("seed", True),
    ("num_workers", -1),
    ("num_workers", 1.0),
]


@pytest.mark.parametrize(
    ("field", "value"), BAD_RECIPES, ids=[f"{f}={v!r}" for f, v in BAD_RECIPES]
)
def test_training_recipe_refuses_a_bad_value_naming_its_field(field, value):
    with pytest.raises(ValueError, match=rf"^TrainingRecipe: {field} must ") as err:
        TrainingRecipe(**{field: value})
    assert repr(value) in str(err.value)


def test_training_recipe_resume_needs_a_directory_and_the_recipe_is_frozen(tmp_path):
    with pytest.raises(ValueError, match=r"^TrainingRecipe: resume=True needs checkpoint_dir"):
        TrainingRecipe(resume=True)
    TrainingRecipe(resume=True, checkpoint_dir=tmp_path)
    TrainingRecipe(keep_checkpoints=1)
    TrainingRecipe(keep_checkpoints=None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        TrainingRecipe().epochs = 3
    recipe = TrainingRecipe(epochs=2)
    filled = recipe.with_defaults(TrainingRecipe(epochs=8, batch_size=32, lr=1e-3))
    assert (filled.epochs, filled.batch_size, filled.lr) == (2, 32, 1e-3)
    assert recipe.batch_size is None  # not changed in place


@each
def test_fit_takes_a_training_recipe_only(case):
    tiny = case.models[0]
    explainer = case.build(_model(tiny))
    data = fit_data(tiny, 4)
    with pytest.raises(TypeError, match="recipe must be a TrainingRecipe; got dict"):
        explainer.fit(data, {"epochs": 1})
    with pytest.raises(TypeError, match="epochs"):
        explainer.fit(data, epochs=1)  # the options before TrainingRecipe
    assert not explainer.is_fitted


@each
def test_unset_epochs_batch_size_and_lr_come_from_the_default_recipe(case, tmp_path):
    tiny = case.models[0]
    epochs, batch_size, lr = case.published
    data = fit_data(tiny, 4)  # one step per epoch

    history = case.build(_model(tiny)).fit(data)  # no recipe at all
    assert [h["epoch"] for h in history] == list(range(1, epochs + 1))
    assert all(h["steps"] == 1 and h["images"] == 4 for h in history)

    recipe = TrainingRecipe(epochs=1, show_progress=False, checkpoint_dir=tmp_path)
    history = case.build(_model(tiny)).fit(data, recipe)
    assert len(history) == 1
    record = json.loads((tmp_path / "epoch-001.json").read_text())
    assert record["recipe"]["epochs"] == 1
    assert record["recipe"]["batch_size"] == batch_size
    assert record["recipe"]["lr"] == lr
    assert recipe.batch_size is None and recipe.lr is None  # the caller's recipe is untouched


# ---------------------------------------------------------------------------------------------
# Captum's argument order; several targets


@pair
def test_captum_argument_order_positional_equals_keyword(case, tiny):
    explainer = case.make(_model(tiny))
    x, extra = _inputs(tiny)
    target = [1, 0, 2]
    keyword = explainer.attribute(x, target=target, additional_forward_args=extra, output="input")
    for positional in (
        explainer.attribute(x, target, extra),
        explainer.attribute(x, target, extra, "input"),
    ):
        torch.testing.assert_close(positional, keyword, rtol=0, atol=0)
    stacked = explainer.attribute_targets(x, [0, 1], extra, "input")
    torch.testing.assert_close(
        stacked,
        explainer.attribute_targets(
            x, targets=[0, 1], additional_forward_args=extra, output="input"
        ),
        rtol=0,
        atol=0,
    )
    if tiny.modality == "image":
        grid = explainer.attribute(x, target, extra, "grid")
        torch.testing.assert_close(
            grid, explainer.attribute(x, target=target, output="grid"), rtol=0, atol=0
        )
        assert grid.shape[:2] == (3, 1) and grid.shape != keyword.shape


@pair
def test_attribute_targets_equals_attribute_per_target_stacked(case, tiny):
    explainer = case.make(_model(tiny))
    x, extra = _inputs(tiny)
    targets = [0, [1, 2, 0], torch.tensor([3, 4, 1]), None]
    outputs = ["input", "like_input", "grid"] if tiny.modality == "image" else ["input"]
    for output in outputs:
        got = explainer.attribute_targets(x, targets, extra, output)
        want = torch.stack([explainer.attribute(x, t, extra, output) for t in targets])
        assert got.shape == want.shape and got.shape[:2] == (4, 3)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    as_tuple = explainer.attribute_targets((x,), targets, extra)
    assert isinstance(as_tuple, torch.Tensor)
    torch.testing.assert_close(
        as_tuple, explainer.attribute_targets(x, targets, extra), rtol=0, atol=0
    )
    with pytest.raises(ValueError, match="targets must be a list"):
        explainer.attribute_targets(x, 1, extra)


# ---------------------------------------------------------------------------------------------
# the model as it was: after explaining, fitting and failing


def _full_state(model: torch.nn.Module) -> dict:
    return {
        **model_state(model),
        "tensors": {k: v.clone() for k, v in model.state_dict().items()},
        "grads": [p.grad for p in model.parameters()],
        "forward_overrides": [m for m in model.modules() if "forward" in vars(m)],
    }


def _assert_same_state(model: torch.nn.Module, before: dict) -> None:
    after = _full_state(model)
    assert after["tensors"].keys() == before["tensors"].keys()
    for k, v in before["tensors"].items():  # parameters and BatchNorm statistics, bit for bit
        assert torch.equal(after["tensors"][k], v), f"{k} changed"
    for key in before:
        if key not in ("tensors", "grads"):
            assert after[key] == before[key], key
    assert all(g is None for g in after["grads"])


@pair
def test_model_left_as_it_was_after_attribute_fit_and_failures(case, tiny):
    model = _model(tiny)
    model.train()  # every call must switch to eval and back
    model.get_submodule(next(n for n, _ in model.named_children())).eval()  # a mixed mode
    for p in list(model.parameters())[:2]:
        p.requires_grad_(False)
    before = _full_state(model)
    explainer = case.make(model)
    x, extra = _inputs(tiny, batch=4)
    data = fit_data(tiny, 4)

    explainer.attribute(x, target=1, additional_forward_args=extra)
    _assert_same_state(model, before)
    explainer.attribute_targets(x, [0, None], additional_forward_args=extra)
    _assert_same_state(model, before)
    explainer.fit(data, _recipe(case, batch_size=2))  # frozen backbone: bit-identical
    _assert_same_state(model, before)
    if case.also is not None:
        case.also(explainer, data)
        _assert_same_state(model, before)
    with pytest.raises(ValueError, match="out of range"):
        explainer.attribute(x, target=99, additional_forward_args=extra)
    _assert_same_state(model, before)

    def boom(*args, **kwargs):
        raise RuntimeError("boom from the model")

    last = model.get_submodule(LAST_BLOCK[tiny.name])
    last.forward = boom
    try:
        with pytest.raises(RuntimeError, match="boom from the model"):
            explainer.attribute(x, target=1, additional_forward_args=extra)
        with pytest.raises(RuntimeError, match="boom from the model"):
            explainer.fit(data, case.fit_recipe)
    finally:
        del last.forward
    _assert_same_state(model, before)

    def fail(*args, **kwargs):
        raise RuntimeError("boom from the explainer")

    calls = {
        "fit": lambda: explainer.fit(data, case.fit_recipe),
        "attribute": lambda: explainer.attribute(x, target=1, additional_forward_args=extra),
    }
    for part, failing in case.failing_parts(explainer):
        handle = part.register_forward_pre_hook(fail)
        try:
            for name in failing:
                with pytest.raises(RuntimeError, match="boom from the explainer"):
                    calls[name]()
                _assert_same_state(model, before)
        finally:
            handle.remove()
    assert not any("forward" in vars(m) for m in explainer.modules())
    explainer.attribute(x, target=1, additional_forward_args=extra)  # still works
    _assert_same_state(model, before)


TIMM_PAIRS = [
    pytest.param(e, c, id=f"{e.name}-{c.name}")
    for e, c in EXPLAINER_MODELS
    if hasattr(tiny_models.build(c, torch.float32), "set_grad_checkpointing")
]


@pytest.mark.parametrize(("case", "tiny"), TIMM_PAIRS)
def test_gradient_checkpointing_of_the_model_is_respected_and_restored(case, tiny):
    model = _model(tiny)
    model.set_grad_checkpointing(True)
    model.train()
    before = _full_state(model)
    explainer = case.make(model)
    x, extra = _inputs(tiny, batch=4)
    expected = explainer.attribute(x, target=1, additional_forward_args=extra)
    _assert_same_state(model, before)
    explainer.fit(fit_data(tiny, 4), _recipe(case, batch_size=2))
    _assert_same_state(model, before)
    model.set_grad_checkpointing(False)
    model.eval()
    unset = explainer.attribute(x, target=1, additional_forward_args=extra)
    model.set_grad_checkpointing(True)
    model.train()
    torch.testing.assert_close(
        explainer.attribute(x, target=1, additional_forward_args=extra), unset, rtol=0, atol=0
    )
    assert expected.shape == unset.shape


# ---------------------------------------------------------------------------------------------
# checkpoints during training: every epoch, resume, keep_checkpoints


def _files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def _epochs(*numbers: int) -> list[str]:
    return [f"epoch-{i:03d}.{ext}" for i in numbers for ext in ("json", "safetensors")]


def _no_time(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in h.items() if k != "time_s"} for h in history]


RESUME_PAIRS = [pytest.param(e, c, id=f"{e.name}-{c.name}") for e, c in EXPLAINER_MODELS]


@pytest.mark.parametrize(("case", "tiny"), RESUME_PAIRS)
def test_resume_from_a_checkpoint_gives_the_uninterrupted_result(case, tiny, tmp_path):
    data = fit_data(tiny, 8)
    options = case.resume_options

    def recipe(directory: str, **kw) -> TrainingRecipe:
        return _recipe(case, epochs=3, checkpoint_dir=tmp_path / directory, **kw)

    full = _fresh(case, tiny)
    h_full = full.fit(data, recipe("a"), **options)
    assert _files(tmp_path / "a") == _epochs(1, 2, 3)
    assert [h["epoch"] for h in h_full] == [1, 2, 3]

    part = _fresh(case, tiny)
    with pytest.raises(RuntimeError, match="interrupted"):
        part.fit(_Failing(data, 8 + 4), recipe("b"), **options)  # during epoch 2
    assert _files(tmp_path / "b") == _epochs(1)

    resumed = _fresh(case, tiny)
    h_res = resumed.fit(data, recipe("b", resume=True), **options)
    assert resumed.state_dict().keys() == full.state_dict().keys()
    for k, v in full.state_dict().items():
        assert torch.equal(resumed.state_dict()[k], v), k
    assert _no_time(h_res) == _no_time(h_full)
    assert _files(tmp_path / "b") == _epochs(1, 2, 3)

    done = _fresh(case, tiny).fit(data, recipe("b", resume=True), **options)
    assert _no_time(done) == _no_time(h_full)  # nothing left to train
    with pytest.raises(CheckpointError, match="recipe"):
        _fresh(case, tiny).fit(data, recipe("b", resume=True, lr=0.01), **options)


@each
def test_keep_checkpoints_keeps_the_newest(case, tmp_path):
    tiny = case.models[0]
    data = fit_data(tiny, 8)
    for keep, kept in ((1, (3,)), (2, (2, 3)), (None, (1, 2, 3))):
        directory = tmp_path / f"keep-{keep}"
        recipe = _recipe(case, epochs=3, checkpoint_dir=directory, keep_checkpoints=keep)
        _fresh(case, tiny).fit(data, recipe)
        assert _files(directory) == _epochs(*kept), keep


# ---------------------------------------------------------------------------------------------
# save / load


@pair
def test_save_load_round_trip_gives_identical_maps(case, tiny, tmp_path, monkeypatch):
    import pickle

    model = _model(tiny)
    torch.manual_seed(2)
    explainer = case.build(model)
    explainer.fit(fit_data(tiny, 4), _recipe(case, batch_size=2))
    paths = explainer.save(tmp_path / "e", extra={"note": "test"})
    record = json.loads(paths.record.read_text())
    assert record["method"] == case.name and record["note"] == "test"
    own = explainer.record()
    assert {k: record[k] for k in own} == json.loads(json.dumps(own))
    for key in ("config", "weights", "method"):
        with pytest.raises(ValueError, match=rf"must not set \['{key}'\]; the explainer writes"):
            explainer.save(tmp_path / "u", extra={key: 1, "note": "test"})
    assert not (tmp_path / "u.json").exists()

    def refuse(*a, **k):
        raise AssertionError("unpickled")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    loaded = type(explainer).load(tmp_path / "e", model)
    assert loaded.is_fitted
    assert not any(m.training for m in loaded.modules())
    assert loaded.state_dict().keys() == explainer.state_dict().keys()
    for k, v in explainer.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    x, extra = _inputs(tiny)
    for target in (None, 3):
        torch.testing.assert_close(
            loaded.attribute(x, target, extra),
            explainer.attribute(x, target, extra),
            rtol=0,
            atol=0,
        )
    assert loaded.record() == own


@pair
def test_damaged_or_edited_checkpoints_are_refused(case, tiny, tmp_path):
    model = _model(tiny)
    explainer = case.make(model)
    paths = explainer.save(tmp_path / "e")
    data = bytearray(paths.weights.read_bytes())
    data[-5] ^= 0xFF
    paths.weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        type(explainer).load(tmp_path / "e", model)
    paths = explainer.save(tmp_path / "e")
    record = json.loads(paths.record.read_text())
    record["config"]["num_classes"] = 4
    paths.record.write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match="differs from the copy"):
        type(explainer).load(tmp_path / "e", model)


@each
def test_checkpoints_of_another_method_or_format_are_refused(case, tmp_path):
    tiny = case.models[0]
    model = _model(tiny)
    explainer = case.make(model)
    cls = type(explainer)
    for other in EXPLAINERS:
        if other is not case:
            other.make(model).save(tmp_path / other.name)
            with pytest.raises(
                CheckpointError, match=f"not a {cls._method} checkpoint of format 1 "
            ):
                cls.load(tmp_path / other.name, model)
    tensors = {k: v.detach().clone() for k, v in explainer.state_dict().items()}
    record = explainer.record()
    save_checkpoint(tmp_path / "v2", tensors, {**record, "format": 2})
    with pytest.raises(CheckpointError, match=r"\(method='\w+', format=2\)"):
        cls.load(tmp_path / "v2", model)


# ---------------------------------------------------------------------------------------------
# DDP under torchrun (gloo, CPU)


@pytest.mark.e2e
@each
def test_torchrun_two_processes_match_one_process_with_the_same_global_batch(case, tmp_path):
    from safetensors.torch import load_file

    sys.path.insert(0, str(TESTS))
    try:
        import explainer_ddp_worker as worker
    finally:
        sys.path.remove(str(TESTS))
    run_two_ranks(TESTS / "explainer_ddp_worker.py", case.name, tmp_path)
    worker.run(case.name, tmp_path, distributed=False)

    r0, r1 = (load_file(str(tmp_path / f"rank-{r}.safetensors")) for r in (0, 1))
    single = load_file(str(tmp_path / "single.safetensors"))
    assert r0.keys() == single.keys() == r1.keys()
    for k in r0:
        assert torch.equal(r0[k], r1[k]), f"ranks differ at {k}"
        torch.testing.assert_close(r0[k], single[k], rtol=1e-9, atol=1e-12, msg=k)
    h_ddp = json.loads((tmp_path / "rank-0.json").read_text())["history"]
    h_one = json.loads((tmp_path / "single.json").read_text())["history"]
    assert [h["steps"] for h in h_ddp] == [h["steps"] for h in h_one] == [3, 3]
    terms = {
        "ttame": ("loss", "ce", "area", "tv"),
        "mhex": ("loss", "final", "head0", "head1", "head2"),
    }
    for a, b in zip(h_ddp, h_one, strict=True):
        assert a.keys() == b.keys()
        assert set(terms[case.name]) | {"lr", "images"} <= a.keys()
        for key in a.keys() - {"time_s"}:
            assert a[key] == pytest.approx(b[key], rel=1e-9), key
    assert _files(tmp_path / "ckpt") == _epochs(1, 2)
