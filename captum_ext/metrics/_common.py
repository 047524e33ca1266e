"""Shared helpers for :mod:`captum_ext.metrics`.

Everything that more than one metric needs lives here, exactly once:

* :func:`resolve_attributions` turns "a tensor OR a Captum ``Attribution`` object" into a
  detached tensor,
* :func:`as_map` / :func:`as_flat` validate and normalise attribution shapes (and reject
  NaN / infinite values),
* :func:`as_masks` validates ground-truth masks,
* :func:`_logits` and :func:`class_scores` turn model outputs into
  logits and probabilities,
* :func:`target_tensor` normalises ``target`` arguments (range-checked against the model's
  classes when they are known),
* :func:`model_section` runs the model in eval mode under its lock (and restores it),
* :func:`check_int`, :func:`check_real` and :func:`check_reals` validate numeric options,
  :func:`empty_batch` tells when a metric returns its empty result,
* the metric registry (:class:`MetricInfo`, :func:`register_metric`, :func:`metric_info`).
"""

from __future__ import annotations

import contextlib
import math
import numbers
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import torch
from torch import Tensor, nn

from captum_ext._scores import model_output_to_tensor, select_target, target_indices
from captum_ext._scores import progress as _progress
from captum_ext.capture import model_state
from captum_ext.errors import ReentrantCallError

Score = Literal["softmax", "sigmoid", "logit"]
Category = Literal["localisation", "faithfulness", "complexity", "discrimination", "sanity", "text"]

_T = TypeVar("_T")
_F = TypeVar("_F", bound=Callable[..., Any])


# ----------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MetricInfo:
    """Declarative metadata of one metric (Quantus style).

    Attributes:
        name: Public name of the metric (also the key in :data:`METRICS`).
        fn: The metric function.
        higher_is_better: ``True``/``False`` when the direction is fixed, ``None`` when it
            depends on an argument (e.g. ROAD MoRF vs. LeRF) or on the use (similarities).
        category: One of ``"localisation"``, ``"faithfulness"``, ``"complexity"``,
            ``"discrimination"``, ``"sanity"``, ``"text"``.
        reference: The paper the convention follows.
        note: Free-text remark (e.g. how the direction depends on arguments).
    """

    name: str
    fn: Callable[..., Any]
    higher_is_better: bool | None
    category: Category
    reference: str
    note: str = ""


METRICS: dict[str, MetricInfo] = {}
"""Every metric's :class:`MetricInfo` by name, filled by :func:`register_metric`."""


def register_metric(
    name: str,
    *,
    higher_is_better: bool | None,
    category: Category,
    reference: str,
    note: str = "",
) -> Callable[[_F], _F]:
    """Decorator: record a metric in :data:`METRICS` and attach ``fn.metric_info``."""

    def deco(fn: _F) -> _F:
        info = MetricInfo(name, fn, higher_is_better, category, reference, note)
        if name in METRICS and METRICS[name].fn is not fn:
            raise RuntimeError(f"metric {name!r} registered twice")
        METRICS[name] = info
        fn.metric_info = info  # type: ignore[attr-defined]
        return fn

    return deco


def metric_info(name: str) -> MetricInfo:
    """Return the :class:`MetricInfo` of the metric called ``name``.

    Raises:
        KeyError: If no metric of that name exists (the message lists the known names).
    """
    try:
        return METRICS[name]
    except KeyError:
        raise KeyError(f"unknown metric {name!r}; known metrics: {sorted(METRICS)}") from None


# ----------------------------------------------------------------------------------------------
# Model outputs
# ----------------------------------------------------------------------------------------------


def _logits(out: Any) -> Tensor:
    """The logits ``(B, K)`` of a model output (see :func:`captum_ext._scores.model_output_to_tensor`).

    Raises:
        TypeError: No score tensor in the output.
        ValueError: The scores are not ``(B, K)``.
    """
    logits = model_output_to_tensor(out)
    if logits.dim() != 2:
        raise ValueError(f"model logits must have shape (B, K), got {tuple(logits.shape)}")
    return logits


def class_scores(logits: Tensor, score: str) -> Tensor:
    """Turn logits ``(B, K)`` into per-class scores ``(B, K)``.

    Args:
        logits: Logits ``(B, K)``.
        score: ``"softmax"`` (single-label probabilities), ``"sigmoid"`` (independent
            multi-label probabilities) or ``"logit"`` (raw logits).
    """
    if score == "softmax":
        return logits.softmax(dim=-1)
    if score == "sigmoid":
        return logits.sigmoid()
    if score == "logit":
        return logits
    raise ValueError(f"score must be 'softmax', 'sigmoid' or 'logit', got {score!r}")


def check_score(score: str, allowed: Sequence[str]) -> None:
    """Raise ``ValueError`` unless ``score`` is one of ``allowed``."""
    if score not in allowed:
        raise ValueError(f"score must be one of {tuple(allowed)}, got {score!r}")


def target_tensor(
    target: Any,
    batch_size: int,
    device: torch.device | str,
    num_classes: int | None = None,
    *,
    method: str = "target",
) -> Tensor:
    """A ``target`` argument as a ``LongTensor`` ``(B,)`` (see :func:`captum_ext._scores.target_indices`).

    Raises:
        ValueError: Unsupported form or length, or (when ``num_classes`` is given) an index
            outside ``0 .. num_classes - 1``.
    """
    return target_indices(target, batch_size, num_classes, device=device, method=method)


def _module_of(model: Any) -> nn.Module | None:
    """The ``nn.Module`` behind ``model``: itself, or the owner of a bound method."""
    if isinstance(model, nn.Module):
        return model
    owner = getattr(model, "__self__", None)
    return owner if isinstance(owner, nn.Module) else None


@contextlib.contextmanager
def model_section(model: Any) -> Iterator[None]:
    """Run ``model`` inside: eval mode, no gradients, the model's lock held; all restored.

    For an ``nn.Module`` (or a bound method of one, e.g. ``model.forward``) this is
    :func:`captum_ext.capture.model_state` without gradients: every module's ``training`` flag
    is restored exactly in ``finally`` (also when the metric raises), so BatchNorm statistics
    are not updated and Dropout is off. Any other callable is called as it is, under
    ``torch.no_grad()``.

    Raises:
        ReentrantCallError: The metric was called from inside another captum_ext call on the
            same model (a hook or the model's forward).
    """
    module = _module_of(model)
    if module is None:
        with torch.no_grad():
            yield
        return
    with model_state(module, grad=False):
        yield


def forward_logits(
    model: Callable[..., Any], inputs: Tensor, batch_size: int | None = None
) -> Tensor:
    """Run ``model(inputs)`` (in chunks of ``batch_size``) without gradients; return logits.

    Call it inside :func:`model_section`.

    Raises:
        ValueError: The model returned NaN scores (every metric built on them would be NaN).
    """
    with torch.no_grad():
        if batch_size is None or inputs.shape[0] <= batch_size:
            logits = _logits(model(inputs)).detach()
        else:
            outs = [_logits(model(chunk)).detach() for chunk in inputs.split(batch_size)]
            logits = torch.cat(outs)
    check_scores(logits)
    return logits


def check_scores(logits: Tensor) -> None:
    """Raise ``ValueError`` when model scores contain NaN."""
    if logits.is_floating_point() and bool(torch.isnan(logits).any()):
        rows = int(torch.isnan(logits).any(dim=-1).sum()) if logits.dim() > 1 else 1
        raise ValueError(
            f"the model returned NaN scores for {rows} of {logits.shape[0]} (perturbed) inputs; "
            "the metric is undefined: check the model and the inputs (e.g. float16 overflow)"
        )


pick = select_target
"""``scores[i, target[i]]`` for every row ``i``."""


# ----------------------------------------------------------------------------------------------
# Attributions
# ----------------------------------------------------------------------------------------------


def is_attribution_object(obj: Any) -> bool:
    """``True`` for anything with a callable ``.attribute`` method (Captum ``Attribution``)."""
    return not isinstance(obj, Tensor) and callable(getattr(obj, "attribute", None))


def _manages_model_state(obj: Any) -> bool:
    """``True`` for captum_ext methods (and Captum wrappers around one, e.g. ``NoiseTunnel``):
    they put the model in eval mode under its lock themselves."""
    for _ in range(8):
        if obj is None:
            return False
        if any(c.__module__.split(".")[0] == "captum_ext" for c in type(obj).__mro__):
            return True
        obj = getattr(obj, "attribution_method", None)
    return False


def _run_attribute(obj: Any, inputs: Tensor, target: Any, kwargs: dict[str, Any], model: Any):
    """``obj.attribute(inputs, target=target, **kwargs)``, the model in eval mode.

    captum_ext methods manage the model themselves; any other object (e.g. a plain Captum
    method) is called inside :func:`~captum_ext.capture.model_state` of the metric's model, or
    else of the object's ``forward_func``. An object that turns out to call captum_ext itself
    (a re-entrant call) is called again outside, after the model has been restored.
    """
    module = _module_of(model) or _module_of(getattr(obj, "forward_func", None))
    if module is None or _manages_model_state(obj):
        return obj.attribute(inputs, target=target, **kwargs)
    with model_state(module, grad=not torch.is_inference_mode_enabled()):
        try:
            return obj.attribute(inputs, target=target, **kwargs)
        except ReentrantCallError:
            pass  # it runs a captum_ext method on this model: that one manages the model
    return obj.attribute(inputs, target=target, **kwargs)


def resolve_attributions(
    attributions: Any,
    inputs: Tensor | None = None,
    target: Any = None,
    attribute_kwargs: dict[str, Any] | None = None,
    *,
    name: str = "attributions",
    model: Any = None,
) -> Tensor:
    """Return attributions as a detached tensor.

    Args:
        attributions: A tensor, or a Captum ``Attribution`` object (anything with an
            ``.attribute`` method). In the latter case
            ``attributions.attribute(inputs, target=target, **attribute_kwargs)`` is called
            with the model in eval mode: captum_ext methods see to it themselves, any other
            object is called under :func:`~captum_ext.capture.model_state` of ``model`` (or of
            its ``forward_func``), which restores the model afterwards. For an empty batch of
            ``inputs`` the object is not called: the result is an empty float tensor of the
            shape of ``inputs``.
        inputs: Model inputs; required for the ``Attribution`` path.
        target: Target passed to ``.attribute``.
        attribute_kwargs: Extra keyword arguments for ``.attribute``.
        name: Argument name used in error messages.
        model: The metric's model, if it has one.

    Returns:
        The attribution tensor, detached (shape as produced; see :func:`as_map`).
    """
    if isinstance(attributions, Tensor):
        return attributions.detach()
    if is_attribution_object(attributions):
        if inputs is None:
            raise ValueError(
                f"{name} is an Attribution object, so `inputs` are needed to compute it"
            )
        if isinstance(inputs, Tensor) and inputs.dim() > 0 and inputs.shape[0] == 0:
            dtype = inputs.dtype if inputs.is_floating_point() else torch.get_default_dtype()
            return torch.zeros(inputs.shape, dtype=dtype, device=inputs.device)
        out = _run_attribute(attributions, inputs, target, attribute_kwargs or {}, model)
        if isinstance(out, (tuple, list)):
            if len(out) != 1:
                raise ValueError(
                    f"{name}.attribute returned {len(out)} tensors; only single-input "
                    "attributions are supported"
                )
            out = out[0]
        if not isinstance(out, Tensor):
            raise TypeError(f"{name}.attribute returned {type(out).__name__}, expected a Tensor")
        return out.detach()
    raise TypeError(
        f"{name} must be a Tensor or an object with an `.attribute` method, "
        f"got {type(attributions).__name__}"
    )


def check_finite(t: Tensor, name: str, what: str = "attribution maps") -> None:
    """Raise ``ValueError`` if ``t`` contains NaN or infinite values (``what``: for the message)."""
    if t.is_floating_point() or t.is_complex():
        nan = torch.isnan(t)
        if bool(nan.any()):
            count = "only NaN" if bool(nan.all()) else f"{int(nan.sum())} NaN value(s)"
            raise ValueError(f"{name} contains {count}; {what} must be finite")
        if bool(torch.isinf(t).any()):
            raise ValueError(f"{name} contains infinite values; {what} must be finite")


def as_map(
    attributions: Tensor,
    *,
    name: str = "attributions",
    batch_size: int | None = None,
    spatial: tuple[int, int] | None = None,
) -> Tensor:
    """Validate an image attribution map and return it as ``(B, H, W)`` float tensor.

    Accepted shapes: ``(B, H, W)``, ``(B, 1, H, W)`` and ``(B, C, H, W)``; in the last case the
    map is reduced by **summing over channels** (the usual Captum convention for pixel
    attributions). NaN or infinite values raise ``ValueError``.

    Args:
        attributions: The map.
        name: Argument name used in error messages.
        batch_size: If given, the expected ``B``.
        spatial: If given, the expected ``(H, W)``. Maps of a different resolution are
            rejected; upsample them first (e.g. ``captum.attr.LayerAttribution.interpolate``).
    """
    a = attributions
    if not isinstance(a, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(a).__name__}")
    if a.dim() == 4:
        a = a.sum(dim=1)
    elif a.dim() != 3:
        raise ValueError(
            f"{name} must have shape (B, H, W), (B, 1, H, W) or (B, C, H, W), "
            f"got {tuple(attributions.shape)}"
        )
    if not a.is_floating_point():
        a = a.float()
    _check_elements(a, name)
    if batch_size is not None and a.shape[0] != batch_size:
        raise ValueError(f"{name}: expected batch size {batch_size}, got shape {tuple(a.shape)}")
    if spatial is not None and tuple(a.shape[-2:]) != tuple(spatial):
        raise ValueError(
            f"{name}: expected spatial size (H, W) = {tuple(spatial)}, got "
            f"{tuple(a.shape[-2:])} (full shape {tuple(attributions.shape)}); "
            "upsample low-resolution maps first"
        )
    check_finite(a, name)
    return a


def as_flat(attributions: Tensor, *, name: str = "attributions") -> Tensor:
    """Validate an attribution map of any layout and flatten it to ``(B, N)``.

    ``(B, P)`` token maps and ``(B, H, W)`` maps are flattened as they are; 4-D maps
    ``(B, C, H, W)`` are first summed over channels (see :func:`as_map`).
    """
    a = attributions
    if not isinstance(a, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(a).__name__}")
    if a.dim() < 2:
        raise ValueError(f"{name} must have a batch dimension, got shape {tuple(a.shape)}")
    if a.dim() == 4:
        a = a.sum(dim=1)
    if not a.is_floating_point():
        a = a.float()
    _check_elements(a, name)
    check_finite(a, name)
    return a.flatten(1)


def _check_elements(a: Tensor, name: str) -> None:
    """Refuse maps with no elements per example (nothing to rank or normalise)."""
    if math.prod(a.shape[1:]) == 0:
        raise ValueError(f"{name} has no elements per example (shape {tuple(a.shape)})")


def as_masks(masks: Any, shape: Sequence[int], *, name: str = "masks") -> Tensor:
    """Validate ground-truth masks and return them as a bool tensor of ``shape`` (B, H, W).

    ``(B, 1, H, W)`` masks are squeezed. Non-bool masks must contain only 0 and 1.
    """
    m = torch.as_tensor(masks)
    if m.dim() == 4 and m.shape[1] == 1:
        m = m[:, 0]
    if tuple(m.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(m.shape)}")
    if m.dtype != torch.bool:
        if not bool(((m == 0) | (m == 1)).all()):
            raise ValueError(f"{name} must be boolean (or contain only 0/1)")
        m = m.bool()
    return m


def resolve_map(
    attributions: Any,
    inputs: Tensor | None,
    target: Any,
    attribute_kwargs: dict[str, Any] | None,
    *,
    name: str = "attributions",
    batch_size: int | None = None,
    spatial: tuple[int, int] | None = None,
    model: Any = None,
) -> Tensor:
    """:func:`resolve_attributions` followed by :func:`as_map`; returns ``(B, H, W)``."""
    a = resolve_attributions(attributions, inputs, target, attribute_kwargs, name=name, model=model)
    return as_map(a, name=name, batch_size=batch_size, spatial=spatial)


def check_image_inputs(inputs: Any, name: str = "inputs") -> Tensor:
    """Require a finite ``(B, C, H, W)`` tensor.

    Raises:
        ValueError: Another shape, or NaN / infinite values.
    """
    if not isinstance(inputs, Tensor) or inputs.dim() != 4:
        shape = tuple(inputs.shape) if isinstance(inputs, Tensor) else type(inputs).__name__
        raise ValueError(f"{name} must be a (B, C, H, W) tensor, got {shape}")
    check_finite(inputs, name, "images")
    return inputs


def empty_batch(inputs: Tensor) -> bool:
    """``True`` when ``inputs`` hold no example: the metric returns its empty result.

    Every metric returns one value (row) per example, so an empty batch gives an empty result
    of the documented shape; arguments are still checked, but neither the model nor an
    ``Attribution`` object is called.
    """
    return inputs.shape[0] == 0


def default_target(
    model: Callable[..., Any],
    inputs: Tensor,
    target: Any,
    batch_size: int | None = None,
    *,
    method: str = "target",
) -> tuple[Tensor, Tensor]:
    """Clean logits ``(B, K)`` and the target ``(B,)`` (predicted class when ``target`` is None).

    Call it inside :func:`model_section`.

    Raises:
        ValueError: ``target`` is malformed or outside ``0 .. K - 1``.
    """
    logits = forward_logits(model, inputs, batch_size)
    if target is None:
        return logits, logits.argmax(dim=1)
    k = logits.shape[1]
    return logits, target_tensor(target, inputs.shape[0], inputs.device, k, method=method)


def clean_pass(
    model: Callable[..., Any],
    inputs: Tensor,
    target: Any,
    batch_size: int | None,
    method: str,
) -> tuple[Tensor, Tensor]:
    """:func:`default_target` inside :func:`model_section`.

    For an empty batch the model is not called: the logits are ``(0, 0)`` and the target (its
    form still checked) ``(0,)``.
    """
    if empty_batch(inputs):
        if target is not None:
            target_tensor(target, 0, inputs.device, method=method)
        return inputs.new_zeros(0, 0), torch.zeros(0, dtype=torch.long, device=inputs.device)
    with model_section(model):
        return default_target(model, inputs, target, batch_size, method=method)


# ----------------------------------------------------------------------------------------------
# Numeric options
# ----------------------------------------------------------------------------------------------


def check_int(value: Any, name: str, minimum: int | None = None, *, odd: bool = False) -> int:
    """``value`` as a Python ``int``; refuse bools, floats, strings and values below ``minimum``.

    Raises:
        TypeError: Not an integer.
        ValueError: Below ``minimum`` (or even when ``odd``).
    """
    if isinstance(value, Tensor) and value.dim() == 0 and not value.is_floating_point():
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        rng = f" >= {minimum}" if minimum is not None else ""
        raise TypeError(f"{name} must be an integer{rng}, got {value!r}")
    v = int(value)
    if minimum is not None and v < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {v}")
    if odd and v % 2 != 1:
        raise ValueError(f"{name} must be an odd integer >= {minimum}, got {v}")
    return v


def check_batch_size(value: Any, name: str = "batch_size") -> int | None:
    """``None`` or an integer ``>= 1``."""
    return None if value is None else check_int(value, name, 1)


def _interval(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    lo = "(-inf" if low is None else ("(" if low_open else "[") + f"{low:g}"
    hi = "inf)" if high is None else f"{high:g}" + (")" if high_open else "]")
    return f"{lo}, {hi}"


def _real(value: Any, name: str, where: str) -> float:
    if isinstance(value, Tensor) and value.dim() == 0 and not value.is_complex():
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a finite number in {where}, got {value!r}")
    return float(value)


def check_real(
    value: Any,
    name: str,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """``value`` as a finite ``float`` in the interval (``*_open``: the bound is excluded).

    Raises:
        TypeError: Not a real number (strings, bools, ``None``).
        ValueError: NaN, infinite or outside the interval.
    """
    where = _interval(low, high, low_open, high_open)
    v = _real(value, name, where)
    bad = not math.isfinite(v)
    bad = bad or (low is not None and (v <= low if low_open else v < low))
    bad = bad or (high is not None and (v >= high if high_open else v > high))
    if bad:
        raise ValueError(f"{name} must be a finite number in {where}, got {value!r}")
    return v


def check_reals(
    values: Any,
    name: str,
    low: float,
    high: float,
    *,
    low_open: bool = False,
    high_open: bool = False,
    increasing: bool = False,
) -> list[float]:
    """A non-empty sequence of finite numbers in the interval, as a list of floats.

    Raises:
        TypeError: Not a sequence of real numbers (a string is not one).
        ValueError: Empty, NaN / infinite / out-of-range values, or (``increasing``) not sorted.
    """
    where = _interval(low, high, low_open, high_open)
    order = "increasing " if increasing else ""
    what = f"{name} must be a non-empty sequence of {order}finite numbers in {where}"
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise TypeError(f"{what}, got {values!r}")
    vals = list(values.tolist() if isinstance(values, Tensor) else values)
    if not vals:
        raise ValueError(f"{what}, got {tuple(vals)}")
    out = []
    for v in vals:
        try:
            out.append(check_real(v, name, low, high, low_open=low_open, high_open=high_open))
        except TypeError:
            raise TypeError(f"{what}, got {tuple(vals)}") from None
        except ValueError:
            raise ValueError(f"{what}, got {tuple(vals)}") from None
    if increasing and out != sorted(out):
        raise ValueError(f"{what}, got {tuple(vals)}")
    return out


# ----------------------------------------------------------------------------------------------
# Misc
# ----------------------------------------------------------------------------------------------


def progress(
    iterable: Iterable[_T], show: bool, desc: str | None = None, total: int | None = None
) -> Iterable[_T]:
    """``iterable`` behind a tqdm bar when ``show`` is true (see :func:`captum_ext._scores.progress`)."""
    return iterable if not show else _progress(iterable, show, desc=desc, total=total)


def stable_order(values: Tensor, descending: bool) -> Tensor:
    """Indices sorting each row of ``values`` (B, N); ties keep row-major (index) order."""
    return torch.sort(values, dim=1, descending=descending, stable=True).indices


def ranks_of(values: Tensor, descending: bool) -> Tensor:
    """Position (0 = first) of every element of each row in the stable sort order."""
    order = stable_order(values, descending)
    ranks = torch.empty_like(order)
    ar = torch.arange(values.shape[1], device=values.device).expand_as(order)
    ranks.scatter_(1, order, ar)
    return ranks


def trapezoid(y: Tensor, x: Tensor) -> Tensor:
    """Trapezoid integral of ``y`` (B, N) over ``x`` (N,) along the last dimension."""
    return torch.trapezoid(y, x.to(y.dtype), dim=-1)
