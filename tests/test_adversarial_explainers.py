"""Adversarial cases of the trainable explainers (T-TAME, MHEX), each a regression test.

Non-finite losses and diverging updates stop ``fit`` at the step with the explainer as it was
before that step; bad numeric options are refused in one line naming the argument; a saved
T-TAME is refused on a model with other weights; ``fit`` holds the model's lock; ``fit`` under
``no_grad`` trains, under ``inference_mode`` refuses; malformed data is refused in one line;
an ``IterableDataset`` trains; huge finite inputs never give NaN maps.
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time

import pytest
import tiny_models
import torch
from method_table import EXPLAINERS, TINY_CNN, TINY_VIT
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

from captum_ext import CDAM, CheckpointError, NotFittedError, TrainingRecipe
from captum_ext.explainers import MHEX, TTAME

CASES = {e.name: e for e in EXPLAINERS}
each = pytest.mark.parametrize("name", ["ttame", "mhex"])
RECIPE = TrainingRecipe(epochs=1, batch_size=4, lr=0.05, show_progress=False)


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _build(name: str, dtype=torch.float64, seed: int = 0, tiny=TINY_CNN):
    model = tiny_models.build(tiny, dtype, seed)
    torch.manual_seed(5)
    return CASES[name].build(model)


def _images(n: int = 8, dtype=torch.float64, tiny=TINY_CNN) -> torch.Tensor:
    return tiny_models.make_inputs(tiny, n, dtype, 1)[0]


def _labelled(x: torch.Tensor) -> TensorDataset:
    return TensorDataset(x, torch.arange(x.shape[0]) % tiny_models.NUM_CLASSES)


def _state(explainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in explainer.state_dict().items()}


def _assert_state(explainer, expected: dict[str, torch.Tensor]) -> None:
    now = explainer.state_dict()
    assert now.keys() == expected.keys()
    for k, v in expected.items():
        assert torch.equal(now[k], v), f"{k} changed"


def _one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message, message
    return message


class _Snapshots(Dataset):
    """The examples of ``data``; on every batch fetched (``batch`` items), a copy of the
    explainer's state: the last one is the state before the step of the last batch."""

    def __init__(self, data: Dataset, explainer, batch: int) -> None:
        self.data, self.explainer, self.batch = data, explainer, batch
        self.last: dict[str, torch.Tensor] | None = None

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        if i % self.batch == 0:
            self.last = _state(self.explainer)
        return self.data[i]


def _in_order(data: Dataset, batch: int = 4) -> DataLoader:
    return DataLoader(data, batch_size=batch, shuffle=False)


# ---------------------------------------------------------------------------------------------
# non-finite losses and diverging updates


@each
def test_fit_on_overflowing_images_stops_at_the_first_step_and_keeps_the_state(name):
    """float32 images of 1e30: finite, but the training step is not (MHEX used to train on
    and return ``loss: None``, every later map NaN)."""
    explainer = _build(name, torch.float32)
    before = _state(explainer)
    with pytest.raises(FloatingPointError) as err:
        explainer.fit(_in_order(_labelled(_images(8, torch.float32) * 1e30)), RECIPE)
    message = _one_line(err)
    assert message.startswith(f"{explainer._method}.fit: ")
    assert "not finite" in message and "at epoch 1, step 1;" in message
    assert "largest |input| is " in message and "lr=0.05" in message
    _assert_state(explainer, before)
    assert not explainer.is_fitted


def test_a_later_overflowing_batch_stops_fit_with_the_state_before_its_step():
    ttame = _build("ttame", torch.float32)
    x = _images(8, torch.float32)
    x[4:] *= 1e30  # the second batch: its forward pass overflows the BatchNorm statistics
    before = _state(ttame)
    data = _Snapshots(_labelled(x), ttame, 4)
    with pytest.raises(FloatingPointError, match="at epoch 1, step 2;") as err:
        ttame.fit(_in_order(data), RECIPE)
    _one_line(err)
    assert any(not torch.equal(data.last[k], v) for k, v in before.items())  # step 1 trained
    _assert_state(ttame, data.last)  # as it was before step 2
    assert not ttame.is_fitted


@each
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_fit_refuses_nan_and_inf_images_in_one_line(name, bad):
    explainer = _build(name)
    x = _images()
    x[5, 0, 3, 3] = bad  # in the second batch
    data = _Snapshots(_labelled(x), explainer, 4)
    with pytest.raises(ValueError, match="NaN or inf") as err:
        explainer.fit(_in_order(data), RECIPE)
    assert _one_line(err).startswith(f"{explainer._method}.fit: ")
    _assert_state(explainer, data.last)  # refused before the step of that batch ran
    assert not explainer.is_fitted


@each
def test_a_diverging_learning_rate_stops_fit_with_the_pre_step_state(name):
    explainer = _build(name)
    data = _Snapshots(_labelled(_images(8)), explainer, 2)
    with pytest.raises(FloatingPointError) as err:
        explainer.fit(_in_order(data, 2), dataclasses.replace(RECIPE, lr=1e300, batch_size=2))
    message = _one_line(err)
    assert message.startswith(f"{explainer._method}.fit: ")
    assert "not finite" in message and "at epoch 1, step " in message and "lr" in message
    _assert_state(explainer, data.last)
    assert not explainer.is_fitted


def test_a_refit_that_fails_at_its_first_step_keeps_the_fitted_explainer():
    """(The loop is shared; a fitted MHEX happens to train finitely on these images.)"""
    explainer = _build("ttame", torch.float32)
    x = _images(8, torch.float32)
    explainer.fit(_labelled(x), RECIPE)
    fitted = _state(explainer)
    maps = explainer.attribute(x[:2], target=1)
    with pytest.raises(FloatingPointError, match="at epoch 1, step 1;"):
        explainer.fit(_in_order(_labelled(x * 1e30)), RECIPE)
    _assert_state(explainer, fitted)
    assert explainer.is_fitted
    torch.testing.assert_close(explainer.attribute(x[:2], target=1), maps, rtol=0, atol=0)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -1.0, "1", [1.0, math.nan, 1.0]])
def test_mhex_head_weights_are_checked_at_the_call(bad):
    mhex = _build("mhex")
    with pytest.raises(ValueError, match=r"^MHEX.fit: head_weights must be ") as err:
        mhex.fit(_labelled(_images(4)), RECIPE, head_weights=bad)
    _one_line(err)
    assert not mhex.is_fitted
    with pytest.raises(ValueError, match=r"^MHEX.loss: head_weights must be "):
        mhex.loss((_images(2), torch.tensor([0, 1])), head_weights=bad)


# ---------------------------------------------------------------------------------------------
# numeric options


TTAME_OPTIONS = [
    "ce_weight",
    "area_weight",
    "tv_weight",
    "area_power",
    "area_eps",
    "tv_power",
    "tv_border",
]


@pytest.mark.parametrize("option", TTAME_OPTIONS)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -1.0, "2", None])
def test_ttame_fit_refuses_a_bad_loss_option_naming_it(option, bad):
    ttame = _build("ttame")
    with pytest.raises(ValueError, match=rf"^TTAME.fit: {option} must be ") as err:
        ttame.fit(_images(4), RECIPE, **{option: bad})
    assert repr(bad) in _one_line(err)
    assert not ttame.is_fitted


def test_ttame_fit_refuses_an_all_zero_loss():
    ttame = _build("ttame")
    with pytest.raises(ValueError, match=r"^TTAME.fit: ce_weight, area_weight and tv_weight"):
        ttame.fit(_images(4), RECIPE, ce_weight=0, area_weight=0, tv_weight=0)


BAD_RECIPES = [
    ("epochs", math.inf),
    ("epochs", "3"),
    ("batch_size", math.nan),
    ("momentum", 1.5),
    ("momentum", "0.9"),
    ("momentum", math.inf),
    ("weight_decay", math.inf),
    ("weight_decay", math.nan),
    ("weight_decay", "0"),
    ("pct_start", math.nan),
    ("nesterov", "yes"),
    ("cycle_momentum", 1),
    ("show_progress", "no"),
    ("resume", "yes"),
    ("amp", "on"),
    ("distributed", 0),
]


@pytest.mark.parametrize(
    ("field", "value"), BAD_RECIPES, ids=[f"{f}={v!r}" for f, v in BAD_RECIPES]
)
def test_training_recipe_refuses_more_bad_values_in_one_line(field, value):
    with pytest.raises(ValueError, match=rf"^TrainingRecipe: {field} must ") as err:
        TrainingRecipe(**{field: value})
    assert repr(value) in _one_line(err)


def test_nesterov_needs_momentum():
    with pytest.raises(ValueError, match=r"^TrainingRecipe: nesterov=True needs momentum > 0"):
        TrainingRecipe(momentum=0.0)
    TrainingRecipe(momentum=0.0, nesterov=False)


def test_mhex_stage_weights_that_are_not_numbers_are_refused_naming_them():
    model = tiny_models.build(TINY_CNN, torch.float64)
    for bad in (["a", 1, 1], [1.0, None, 1.0], "111"):
        with pytest.raises(ValueError, match=r"^MHEX: stage_weights needs 3 finite") as err:
            MHEX(model, stage_weights=bad)
        _one_line(err)


HUGE = [(torch.float32, 1e30), (torch.float32, 1e37), (torch.float64, 1e300)]


@each
@pytest.mark.parametrize(("dtype", "scale"), HUGE, ids=[f"{d}-{s:g}" for d, s in HUGE])
def test_huge_finite_inputs_never_give_a_nan_map(name, dtype, scale):
    explainer = _build(name, dtype)
    explainer.mark_fitted()
    x = _images(2, dtype) * scale
    assert torch.isfinite(x).all()
    try:
        maps = explainer.attribute(x, target=1)
    except ValueError as err:
        assert "\n" not in str(err)
        assert str(err).startswith(f"{explainer._method}: the maps are not finite")
    else:
        assert torch.isfinite(maps).all()


@each
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_explainer_parameters_give_an_error_not_a_nan_or_zero_map(name, bad):
    explainer = _build(name).mark_fitted()
    own = explainer.mechanism if name == "ttame" else explainer.network.heads
    with torch.no_grad():
        next(own.parameters()).view(-1)[0] = bad
    x = _images(2)
    for call in (lambda: explainer.attribute(x, 1), lambda: explainer.attribute_targets(x, [0])):
        with pytest.raises(ValueError, match="the maps are not finite") as err:
            call()
        assert _one_line(err).startswith(f"{explainer._method}: ")


# ---------------------------------------------------------------------------------------------
# loading onto other weights


def test_ttame_load_refuses_the_same_architecture_with_other_weights(tmp_path):
    ttame = _build("ttame", seed=0)
    ttame.fit(_images(4), RECIPE)
    ttame.save(tmp_path / "t")
    other = tiny_models.build(TINY_CNN, torch.float64, 7)  # same architecture
    with pytest.raises(CheckpointError, match="other weights") as err:
        TTAME.load(tmp_path / "t", other)
    _one_line(err)
    same = tiny_models.build(TINY_CNN, torch.float64, 0)
    loaded = TTAME.load(tmp_path / "t", same)
    x = _images(2)
    torch.testing.assert_close(loaded.attribute(x, 1), ttame.attribute(x, 1), rtol=0, atol=0)


@each
def test_both_explainers_record_and_check_the_weights_in_the_base_load(name, tmp_path):
    explainer = _build(name).mark_fitted()
    explainer.save(tmp_path / "e")
    model = tiny_models.build(TINY_CNN, torch.float64, 0)
    with torch.no_grad():
        next(model.parameters()).add_(1e-3)  # one weight differs
    with pytest.raises(CheckpointError, match="other weights"):
        type(explainer).load(tmp_path / "e", model)


# ---------------------------------------------------------------------------------------------
# fit holds the model


class _Slow(Dataset):
    """``data``; the first fetch sets ``started`` and waits a while before returning."""

    def __init__(self, data: Dataset) -> None:
        self.data = data
        self.started = threading.Event()
        self.slept = False

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        if not self.started.is_set():
            self.started.set()
            time.sleep(0.5)
            self.slept = True
        return self.data[i]


@each
def test_an_attribution_on_the_same_model_waits_for_fit(name):
    explainer = _build(name, tiny=TINY_VIT)
    model = explainer.adapter.model
    x = _images(2, tiny=TINY_VIT)
    cdam = CDAM(model)
    expected = cdam.attribute(x, target=1)
    data = _Slow(_labelled(_images(4, tiny=TINY_VIT)))
    errors = []

    def fit():
        try:
            explainer.fit(data, RECIPE)
        except Exception as err:  # reported below
            errors.append(err)

    thread = threading.Thread(target=fit)
    thread.start()
    assert data.started.wait(10)
    got = cdam.attribute(x, target=1)
    waited = data.slept
    thread.join()
    assert not errors, errors
    assert waited, "the attribution ran while fit held the model"
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# the training loop's messages


@each
def test_fit_under_no_grad_trains(name):
    explainer = _build(name)
    before = _state(explainer)
    with torch.no_grad():
        history = explainer.fit(_labelled(_images(4)), RECIPE)
    assert math.isfinite(history[0]["loss"])
    assert explainer.is_fitted and any(
        not torch.equal(v, before[k]) for k, v in explainer.state_dict().items()
    )


@each
def test_fit_under_inference_mode_is_refused_in_one_line(name):
    explainer = _build(name)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode") as err:
        explainer.fit(_labelled(_images(4)), RECIPE)
    assert _one_line(err).startswith(f"{explainer._method}.fit: ")
    assert not explainer.is_fitted


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(lambda x: x, id="tensor"),
        pytest.param(lambda x: TensorDataset(x), id="dataset-1-tensor"),
        pytest.param(lambda x: DataLoader(x, batch_size=4), id="loader-of-tensors"),
        pytest.param(lambda x: (x,), id="1-tuple"),
    ],
)
def test_mhex_data_without_labels_is_refused_in_one_line(data):
    mhex = _build("mhex")
    with pytest.raises(ValueError, match=r"^MHEX.fit: each batch must be \(inputs") as err:
        mhex.fit(data(_images(4)), RECIPE)
    _one_line(err)
    assert not mhex.is_fitted


@pytest.mark.parametrize(
    "val_data",
    [
        pytest.param(lambda x: x, id="tensor"),
        pytest.param(lambda x: (x,), id="1-tuple"),
        pytest.param(lambda x: "val/", id="str"),
    ],
)
def test_mhex_bad_val_data_is_refused_before_training(val_data):
    mhex = _build("mhex")
    before = _state(mhex)
    with pytest.raises((ValueError, TypeError), match=r"^MHEX.fit: val_data must ") as err:
        mhex.fit(_labelled(_images(4)), RECIPE, val_data=val_data(_images(4)))
    _one_line(err)
    _assert_state(mhex, before)


def test_ttame_bad_val_data_is_refused_before_training():
    ttame = _build("ttame")
    with pytest.raises(TypeError, match=r"^TTAME.fit: val_data must ") as err:
        ttame.fit(_images(4), RECIPE, val_data="val/")
    _one_line(err)


class _Stream(IterableDataset):
    def __init__(self, data: TensorDataset) -> None:
        self.data = data

    def __iter__(self):
        return iter(self.data[i] for i in range(len(self.data)))


@each
def test_an_iterable_dataset_trains(name):
    explainer = _build(name)
    history = explainer.fit(_Stream(_labelled(_images(8))), RECIPE)
    assert history[0]["steps"] == 2 and history[0]["images"] == 8
    assert math.isfinite(history[0]["loss"]) and explainer.is_fitted


@each
def test_uint8_images_are_refused_saying_float_images_are_expected(name):
    explainer = _build(name)
    x = (_images(4).clamp(-1, 1) * 100 + 100).to(torch.uint8)
    with pytest.raises(ValueError, match="images must be floating point") as err:
        explainer.fit(_labelled(x), RECIPE)
    assert _one_line(err).startswith(f"{explainer._method}.fit: ")
    assert not explainer.is_fitted


@each
def test_a_folder_name_as_data_is_refused_in_one_line(name):
    explainer = _build(name)
    with pytest.raises(TypeError, match="a Dataset, a DataLoader or a tensor") as err:
        explainer.fit("images/", RECIPE)
    message = _one_line(err)
    assert message.startswith(f"{explainer._method}.fit: ") and "'images/'" in message
    assert "ImageFolder" in message
    with pytest.raises(NotFittedError):
        explainer.attribute(_images(1))


def test_a_checkpoint_without_the_weights_fingerprint_is_refused(tmp_path):
    """A record that cannot be checked against the model's weights is not loaded unchecked."""
    from captum_ext import zoo
    from captum_ext.checkpoint import load_checkpoint, save_checkpoint
    from captum_ext.errors import CheckpointError

    ttame = zoo.load("shapes-cnn-ttame")  # the zoo's records carry the fingerprint
    path = tmp_path / "t"
    ttame.save(path)
    tensors, record = load_checkpoint(path)
    del record["backbone"]["weights_sha256"]
    del record["weights"]
    save_checkpoint(path, tensors, record)
    with pytest.raises(CheckpointError, match="weights_sha256") as err:
        type(ttame).load(path, ttame.adapter.model)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("pool", ["max", "map"])
def test_mhex_model_pooling_refuses_a_pool_it_cannot_follow(pool):
    """pooling='model' on a max/attention-pooled timm ViT would read a patch mean instead."""
    from tiny_models import _timm

    from captum_ext import MHEX
    from captum_ext.errors import UnsupportedModelError

    model = _timm(global_pool=pool).eval()
    with pytest.raises(UnsupportedModelError, match=f"global_pool={pool!r}") as err:
        MHEX(model, pooling="model")
    assert "\n" not in str(err.value) and "pooling='mean'" in str(err.value)
    MHEX(model, pooling="mean")  # the heads' own mean pooling does not claim the model's
