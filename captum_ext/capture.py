"""The hook engine: forward hooks that read (or replace) tensors, always removed.

Methods never register hooks themselves. They describe what they need as
:class:`Hook` objects (a :class:`~captum_ext.adapters.Point` plus an optional
transform) and run the model inside :func:`hooks` and :func:`model_state`.
Gradients are taken with ``torch.autograd.grad`` on captured tensors, never
with module backward hooks (full backward hooks silently do not fire when the
module input does not require grad).

Concurrency: :func:`model_state` holds a per-model lock for the whole section
that changes the model (modes, checkpointing flags, attention switches,
hooks), so calls from several threads on one model run one after another and
always leave it as they found it. A call made on the same model from inside
such a section (from a hook or a forward of the same thread) would deadlock
or corrupt the state, and raises :class:`ReentrantCallError` instead.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from captum_ext.adapters.base import Point, Readout, TransformerAdapter
from captum_ext.errors import ReentrantCallError

__all__ = [
    "Hook",
    "as_leaf",
    "exclusive",
    "grad_hooks",
    "hooks",
    "model_state",
    "probe_readout",
    "replay",
]

Transform = Callable[[torch.Tensor], torch.Tensor]

_HIDDEN_KWARGS = ("hidden_states", "x", "input")


def as_leaf(t: torch.Tensor) -> torch.Tensor:
    """A detached copy that requires grad: the gradient root of a method.

    Substituting it for a model tensor makes every later tensor require grad
    even when all parameters are frozen and the input does not require grad,
    and ``torch.autograd.grad`` w.r.t. it is the total derivative of the score
    w.r.t. that tensor.
    """
    return t.detach().requires_grad_(True)


@dataclass
class Hook:
    """What to do at a point: optionally transform the tensor, and record it.

    Attributes:
        point: Where the tensor is.
        transform: Applied to the tensor; the result replaces it in the
            forward pass (e.g. :func:`as_leaf`, noise, token removal).
        record: Keep the (transformed) tensor in :attr:`tensors`.
        tensors: One entry per call of the module in the last forward pass.
    """

    point: Point
    transform: Transform | None = None
    record: bool = True
    tensors: list[torch.Tensor | None] = field(default_factory=list)

    @property
    def tensor(self) -> torch.Tensor:
        """The tensor of the single call of the module; clear errors otherwise."""
        if not self.tensors:
            raise RuntimeError(
                f"{self.point.name or type(self.point.module).__name__} was not called during "
                "the forward pass; pass a layer that the model uses."
            )
        if len(self.tensors) > 1:
            raise RuntimeError(
                f"{self.point.name or type(self.point.module).__name__} was called "
                f"{len(self.tensors)} times in one forward pass; pass a layer that runs once."
            )
        return self.tensors[0]

    def _apply(self, value: Any) -> Any:
        """Reads/replaces the tensor inside ``value`` (tensor or tuple); returns the new value."""
        idx = self.point.index
        if idx == 0 and isinstance(value, torch.Tensor):
            idx = None  # "first element of a tuple output": some versions return the tensor
        t = value if idx is None else value[idx]
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(
                f"{self.point.name}: expected a tensor, got {type(t).__name__}; pass the module "
                "whose output are the tokens (B, N, D)."
            )
        if t is not None and self.transform is not None:
            t = self.transform(t)
            value = t if idx is None else (*value[:idx], t, *value[idx + 1 :])
        if self.record:
            self.tensors.append(t)
        return value


def _output_hook(h: Hook):
    def fn(module: nn.Module, args: Any, output: Any) -> Any:
        new = h._apply(output)
        return new if h.transform is not None else None

    return fn


def _input_hook(h: Hook):
    def fn(module: nn.Module, args: tuple, kwargs: dict) -> Any:
        if args:
            new0 = h._apply(args[0])
            return ((new0, *args[1:]), kwargs) if h.transform is not None else None
        for key in _HIDDEN_KWARGS:
            if key in kwargs:
                kwargs = dict(kwargs)
                kwargs[key] = h._apply(kwargs[key])
                return (args, kwargs) if h.transform is not None else None
        raise RuntimeError(f"{h.point.name}: the module was called without a tensor input.")

    return fn


@contextlib.contextmanager
def hooks(specs: Sequence[Hook]) -> Iterator[Sequence[Hook]]:
    """Registers the forward hooks of ``specs``; removes every handle on exit.

    Handles are removed in ``finally``: after success, after an exception in
    the forward pass, after a bad target.
    """
    handles = []
    try:
        for h in specs:
            h.tensors.clear()
            if h.point.where == "output":
                handles.append(h.point.module.register_forward_hook(_output_hook(h)))
            else:
                handles.append(
                    h.point.module.register_forward_pre_hook(_input_hook(h), with_kwargs=True)
                )
        yield specs
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def grad_hooks(
    pairs: Sequence[tuple[torch.Tensor, Callable[[torch.Tensor], None]]],
) -> Iterator[None]:
    """Registers ``fn`` as a gradient hook on each ``tensor``; removes them all on exit.

    Each ``fn(grad)`` runs when the backward pass reaches its tensor (used to
    stream a result through the backward pass instead of keeping every
    gradient). Removed in ``finally``, also when the backward pass raises.
    """
    handles = []
    try:
        for tensor, fn in pairs:
            handles.append(tensor.register_hook(fn))
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def replay(module: nn.Module, output: torch.Tensor) -> Iterator[None]:
    """Makes ``module`` return ``output`` instead of computing, for the duration.

    Used to skip an expensive module whose result is already known (TAM reuses
    the clean patch embedding for every shortened copy of an image). The
    module's own hooks still run; the instance attribute that shadows
    ``forward`` is removed (or the previous one put back) in ``finally``.
    """
    had = "forward" in vars(module)
    previous = vars(module).get("forward")

    def forward(*args: Any, **kwargs: Any) -> torch.Tensor:
        return output

    try:
        module.forward = forward
        yield
    finally:
        if had:
            module.forward = previous
        else:
            del module.forward


_LOCKS: weakref.WeakKeyDictionary[nn.Module, threading.Lock] = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()
_HELD = threading.local()


@contextlib.contextmanager
def exclusive(model: nn.Module) -> Iterator[None]:
    """Holds ``model``'s lock: other threads wait; the same thread re-entering raises.

    Raises:
        ReentrantCallError: This thread already holds the model (a method
            called from a hook or forward of another method's call).
    """
    held: set[int] = _HELD.__dict__.setdefault("models", set())
    if id(model) in held:
        raise ReentrantCallError(
            f"captum_ext was called on {type(model).__name__} from inside another captum_ext "
            "call on the same model (from a hook or the model's forward); re-entrant calls "
            "are not supported: call it after the outer call returns."
        )
    with _LOCKS_GUARD:
        lock = _LOCKS.setdefault(model, threading.Lock())
    with lock:
        held.add(id(model))
        try:
            yield
        finally:
            held.discard(id(model))


_CHECKPOINT_FLAGS = ("grad_checkpointing", "gradient_checkpointing")


@contextlib.contextmanager
def model_state(model: nn.Module, grad: bool = True) -> Iterator[None]:
    """Holds the model (:func:`exclusive`); eval mode, checkpointing off, grad on (or off).

    Every module's ``training`` flag and every checkpointing flag is restored
    exactly in ``finally``, so models with mixed modes (e.g. frozen BatchNorm)
    come back as they were. Grad is enabled because ``captum.metrics.
    sensitivity_max`` calls ``attribute`` under ``torch.no_grad()``. Enter it
    first, so that the lock covers every other change (hooks, attention
    switches) made inside.
    """
    if grad and torch.is_inference_mode_enabled():
        raise RuntimeError(
            "captum_ext needs gradients, which torch.inference_mode() forbids; call attribute() "
            "outside inference_mode (torch.no_grad() is fine)."
        )
    with exclusive(model), _modes_restored(model, grad):
        yield


@contextlib.contextmanager
def _modes_restored(model: nn.Module, grad: bool) -> Iterator[None]:
    modules = list(model.modules())
    modes = [m.training for m in modules]
    flags = []
    try:
        for m in modules:
            attrs = vars(m)  # plain bool attributes live here (getattr would walk nn.Module's)
            for name in _CHECKPOINT_FLAGS:
                if attrs.get(name) is True:
                    flags.append((m, name))
                    setattr(m, name, False)
        if any(modes):  # eval() walks every module; skip it when nothing is training
            model.eval()
        with torch.set_grad_enabled(grad):
            yield
    finally:
        for m, name in flags:
            setattr(m, name, True)
        for m, mode in zip(modules, modes):
            if m.training != mode:  # Module.__setattr__ is slow; touch only what changed
                m.training = mode


def probe_readout(adapter: TransformerAdapter) -> Readout | None:
    """Which rows of the last block's output the model's scores read.

    Runs the adapter's dummy inputs (:meth:`TransformerAdapter.probe_inputs`)
    forward and takes the gradient of the summed scores w.r.t. the last
    block's output ``(1, T, D)``: only the first row non-zero -> ``"cls"``;
    every row the same -> ``"mean"``; anything else (or a model that cannot
    run the dummy inputs) -> ``None``.
    """
    inputs, extra = adapter.probe_inputs()
    leaf = Hook(Point(adapter.blocks[-1], "output", 0, "last block output"), as_leaf)
    try:
        with model_state(adapter.model), hooks([leaf]):
            out = adapter.forward(inputs, extra)
            (grad,) = torch.autograd.grad(out.float().sum(), leaf.tensor, allow_unused=True)
    except ReentrantCallError:
        raise
    except Exception:  # a wrapper with another signature: the caller assumes and warns
        return None
    if grad is None:
        return None
    g = grad[0]
    rows = g.abs().sum(-1)
    if rows[0] > 0 and bool((rows[1:] == 0).all()):
        return "cls"
    if bool((rows > 0).all()) and torch.allclose(g, g[:1].expand_as(g), rtol=1e-4, atol=1e-7):
        return "mean"
    return None
