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
import difflib
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from captum_ext.adapters.base import ModelAdapter, Point, Readout, TransformerAdapter
from captum_ext.errors import ReentrantCallError

__all__ = [
    "Hook",
    "as_leaf",
    "check_feature_layers",
    "exclusive",
    "grad_hooks",
    "hooks",
    "layer_shapes",
    "model_state",
    "no_checkpointing",
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
        enable_grad: Switch grad mode on here, before the transform, for the rest of
            the forward pass (:func:`hooks` restores the mode on exit). With
            ``model_state(model, grad="from_hook")`` the layers before the point run
            without building a graph (a gradient w.r.t. an :func:`as_leaf` tensor
            never reaches them).
        foreign: Calls of the module from other threads than the one that entered
            :func:`hooks` (a plain ``model(x)`` elsewhere, another method's call on a
            model containing this one); they are neither transformed nor recorded, and
            :func:`hooks` raises on exit when there were any.
    """

    point: Point
    transform: Transform | None = None
    record: bool = True
    tensors: list[torch.Tensor | None] = field(default_factory=list)
    enable_grad: bool = False
    foreign: int = 0
    _owner: int | None = field(default=None, repr=False)

    def _mine(self) -> bool:
        """Whether this call comes from the thread that registered the hook (else counted)."""
        if self._owner is None or threading.get_ident() == self._owner:
            return True
        self.foreign += 1
        return False

    @property
    def tensor(self) -> torch.Tensor:
        """The tensor of the single call of the module; clear errors otherwise."""
        if self.foreign:
            raise RuntimeError(_foreign_message(self))
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
        if self.enable_grad:
            torch.set_grad_enabled(True)  # until hooks() exits, which restores the mode
        if t is not None and self.transform is not None:
            t = self.transform(t)
            value = t if idx is None else (*value[:idx], t, *value[idx + 1 :])
        if self.record:
            self.tensors.append(t)
        return value


def _foreign_message(h: Hook) -> str:
    name = h.point.name or type(h.point.module).__name__
    return (
        f"a forward pass of the model ran in another thread during this captum_ext call "
        f"({name} was called {h.foreign} time(s) from another thread, e.g. a plain model(x) "
        "or a method explaining a model that contains this one); those calls were left "
        "unchanged and this call's result is discarded: run them one after another (wrap the "
        "other calls in `with captum_ext.capture.exclusive(model):`)."
    )


def _output_hook(h: Hook):
    def fn(module: nn.Module, args: Any, output: Any) -> Any:
        if not h._mine():
            return None
        new = h._apply(output)
        return new if h.transform is not None else None

    return fn


def _input_hook(h: Hook):
    def fn(module: nn.Module, args: tuple, kwargs: dict) -> Any:
        if not h._mine():
            return None
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
    the forward pass, after a bad target. The grad mode of entry is restored in
    ``finally`` too (a hook with ``enable_grad`` switches it on mid-forward).

    The hooks act only on calls from the thread that entered: a forward pass of
    the model run meanwhile by another thread goes through untouched, and the
    body's result is refused on exit.

    Raises:
        RuntimeError: (on exit) A hooked module was called from another thread
            inside the section; the message says so.
    """
    handles = []
    grad_mode = torch.is_grad_enabled()
    owner = threading.get_ident()
    try:
        for h in specs:
            h.tensors.clear()
            h.foreign = 0
            h._owner = owner
            if h.point.where == "output":
                handles.append(h.point.module.register_forward_hook(_output_hook(h)))
            else:
                handles.append(
                    h.point.module.register_forward_pre_hook(_input_hook(h), with_kwargs=True)
                )
        yield specs
        for h in specs:
            if h.foreign:
                raise RuntimeError(_foreign_message(h))
    finally:
        for handle in handles:
            handle.remove()
        torch.set_grad_enabled(grad_mode)


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
    the clean patch embedding for every shortened copy of an image). Only the
    calling thread sees the replay; other threads compute. The module's own
    hooks still run; the instance attribute that shadows
    ``forward`` is removed (or the previous one put back) in ``finally``.
    """
    had = "forward" in vars(module)
    previous = vars(module).get("forward")
    owner = threading.get_ident()
    compute = previous if had else type(module).forward.__get__(module)

    def forward(*args: Any, **kwargs: Any) -> torch.Tensor:
        if threading.get_ident() != owner:  # another thread's forward computes as usual
            return compute(*args, **kwargs)
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
def exclusive(model: nn.Module, *, nested: bool = False) -> Iterator[None]:
    """Holds ``model``'s lock: other threads wait; the same thread re-entering raises.

    Args:
        model: The model to hold.
        nested: Let this thread enter one further section on ``model`` while this one is held
            (a trainable explainer's ``fit`` holds the model and runs a metric or its own
            ``attribute`` inside). The inner section is re-entered without waiting; a
            section nested in that one (a method called from a hook) raises again.

    Raises:
        ReentrantCallError: This thread already holds the model (a method
            called from a hook or forward of another method's call).
    """
    held: dict[int, bool] = _HELD.__dict__.setdefault("models", {})
    key = id(model)
    if key in held:
        if not held[key]:
            raise ReentrantCallError(
                f"captum_ext was called on {type(model).__name__} from inside another "
                "captum_ext call on the same model (from a hook or the model's forward); "
                "re-entrant calls are not supported: call it after the outer call returns."
            )
        held[key] = False  # one level only
        try:
            yield
        finally:
            held[key] = True
        return
    with _LOCKS_GUARD:
        lock = _LOCKS.setdefault(model, threading.Lock())
    with lock:
        held[key] = nested
        try:
            yield
        finally:
            held.pop(key, None)


_CHECKPOINT_FLAGS = ("grad_checkpointing", "gradient_checkpointing")


@contextlib.contextmanager
def model_state(model: nn.Module, grad: bool | Literal["from_hook"] = True) -> Iterator[None]:
    """Holds the model (:func:`exclusive`); eval mode, checkpointing off, grad on (or off).

    Every module's ``training`` flag and every checkpointing flag is restored
    exactly in ``finally``, so models with mixed modes (e.g. frozen BatchNorm)
    come back as they were. Grad is enabled because ``captum.metrics.
    sensitivity_max`` calls ``attribute`` under ``torch.no_grad()``. Enter it
    first, so that the lock covers every other change (hooks, attention
    switches) made inside. ``grad="from_hook"``: grad off until a :class:`Hook`
    with ``enable_grad`` switches it on (the method still needs gradients).
    """
    if grad and torch.is_inference_mode_enabled():
        raise RuntimeError(
            "captum_ext needs gradients, which torch.inference_mode() forbids; call attribute() "
            "outside inference_mode (torch.no_grad() is fine)."
        )
    with exclusive(model), _modes_restored(model, grad is True):
        yield


def _eager(modules: list[nn.Module]) -> contextlib.AbstractContextManager[None]:
    """``torch.compile``d submodules run eagerly inside: hooks see every module, no recompiles.

    A compiled top-level model is unwrapped to its ``_orig_mod`` by the adapter lookup; this
    covers compiled parts inside a user's wrapper (an ``OptimizedModule`` holds its eager
    module as the child ``_orig_mod``). The compiler's stance is switched only when such a
    part exists.
    """
    if not any("_orig_mod" in m._modules for m in modules) or torch.compiler.is_compiling():
        return contextlib.nullcontext()
    return torch.compiler.set_stance("force_eager")


@contextlib.contextmanager
def _modes_restored(model: nn.Module, grad: bool) -> Iterator[None]:
    modules = _all_modules(model)
    modes = [m.training for m in modules]
    try:
        with _checkpointing_off(modules):
            if any(modes):  # eval() walks every module; skip it when nothing is training
                model.eval()
            with torch.set_grad_enabled(grad), _eager(modules):
                yield
    finally:
        for m, mode in zip(modules, modes):
            if m.training != mode:  # Module.__setattr__ is slow; touch only what changed
                m.training = mode


def no_checkpointing(model: nn.Module) -> contextlib.AbstractContextManager[None]:
    """Switches off timm's ``grad_checkpointing`` and HF's ``gradient_checkpointing`` flags
    inside, on every submodule that has them on; restores each in ``finally``.

    Checkpointed blocks are called around their hooks (timm's ``checkpoint_seq``) and
    recomputed without them, so a method that hooks the model runs it without.
    """
    return _checkpointing_off(_all_modules(model))


@contextlib.contextmanager
def _checkpointing_off(modules: list[nn.Module]) -> Iterator[None]:
    flags = []
    try:
        for m in modules:
            attrs = vars(m)  # plain bool attributes live here (getattr would walk nn.Module's)
            for name in _CHECKPOINT_FLAGS:
                if attrs.get(name) is True:
                    flags.append((m, name))
                    setattr(m, name, False)
        yield
    finally:
        for m, name in flags:
            setattr(m, name, True)


def _all_modules(model: nn.Module) -> list[nn.Module]:
    """``list(model.modules())`` as a set, in breadth-first order, without building names.

    Called on every method call: ``Module.modules()`` walks ``named_modules``,
    which formats a prefix string per module, several times slower.
    """
    out = [model]
    seen = {id(model)}
    for m in out:  # grows while iterating: breadth first
        for child in m._modules.values():
            if child is not None and id(child) not in seen:
                seen.add(id(child))
                out.append(child)
    return out


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


@dataclass
class _Probe(Hook):
    """A hook that only looks: never replaces the tensor and never raises on a non-tensor.

    Appends to :attr:`shapes` the shape of each call's tensor (``None`` for a non-tensor
    output) and, when ``record``, the tensor itself (or ``None``) to :attr:`tensors`.
    """

    shapes: list[tuple[int, ...] | None] = field(default_factory=list)

    def _apply(self, value: Any) -> Any:
        t = value
        idx = self.point.index
        if idx is not None and isinstance(value, tuple | list) and len(value) > idx:
            t = value[idx]
        is_tensor = isinstance(t, torch.Tensor)
        self.shapes.append(tuple(t.shape) if is_tensor else None)
        if self.record:
            self.tensors.append(t if is_tensor else None)
        return value


def layer_shapes(
    adapter: ModelAdapter,
    inputs: torch.Tensor,
    names: Sequence[str] | None = None,
    additional_forward_args: Any = None,
) -> list[tuple[str, tuple[int, ...] | None]]:
    """The output shape of named modules, from one forward pass of ``inputs``.

    One read-only hook per module (through :func:`hooks`, removed in ``finally``, also when
    the forward raises), in eval mode without grad (:func:`model_state`); nothing is kept but
    the shapes.

    Args:
        adapter: The model's adapter.
        inputs: Inputs of the model, e.g. images ``(B, C, H, W)``; a single example is enough.
        names: Module names (as in ``model.named_modules()``); ``None``: every submodule.
        additional_forward_args: Passed to the model after ``inputs``.

    Returns:
        ``(name, shape)`` in ``names`` order (``None``: in ``named_modules()`` order). ``shape``
        is the full output shape, batch first, of a module that ran exactly once with a tensor
        output; otherwise ``None`` (not called, called several times, or a tuple output: not
        usable as a feature point). With ``names=None`` those are left out.

    Raises:
        ValueError: A name that is not a module of the model.
    """
    modules = dict(adapter.model.named_modules())
    wanted = [n for n in modules if n] if names is None else list(names)
    unknown = [n for n in wanted if not n or n not in modules]
    if unknown:
        raise ValueError(
            f"{type(adapter.model).__name__} has no module named {unknown[0]!r}; "
            "layer_shapes(adapter, inputs) lists them all."
        )
    probes = [_Probe(Point(modules[n], "output", None, n), record=False) for n in wanted]
    with model_state(adapter.model, grad=False), hooks(probes):
        adapter.forward(inputs, additional_forward_args)
    out = [(n, p.shapes[0] if len(p.shapes) == 1 else None) for n, p in zip(wanted, probes)]
    return out if names is not None else [(n, s) for n, s in out if s is not None]


def check_feature_layers(
    adapter: ModelAdapter,
    inputs: torch.Tensor,
    layers: Sequence[str | int] | None = None,
    method: str = "captum_ext",
    additional_forward_args: Any = None,
) -> list[Point]:
    """The feature points of ``layers``, checked to give maps ``(B, C, h, w)`` on ``inputs``.

    For the trainable explainers (T-TAME, MHEX), which read one feature map per branch. A
    layer is what :meth:`~captum_ext.adapters.ModelAdapter.feature_point` takes: a module
    name (its output must be ``(B, C, h, w)``), or for transformers a block index (its
    pre-attention tokens, turned into a map by
    :meth:`~captum_ext.adapters.ModelAdapter.feature_map`). One forward pass of the first
    example checks every point (hooks removed in ``finally``); when a layer is wrong, a
    second one lists the candidates.

    Args:
        adapter: The model's adapter.
        inputs: Inputs of the model, e.g. images ``(B, C, H, W)``.
        layers: Layer names or indices; ``None``: the adapter's presets
            (:meth:`~captum_ext.adapters.ModelAdapter.default_feature_layers`).
        method: Name used in error messages.
        additional_forward_args: Passed to the model after ``inputs``.

    Returns:
        One :class:`~captum_ext.adapters.Point` per layer, in the order given.

    Raises:
        ValueError: No preset and no ``layers``, an unknown module name, or a layer whose
            output is not a map ``(B, C, h, w)`` (or is not computed exactly once); the
            message lists the model's modules whose output is a map, as ``name: (C, h, w)``
            for this input size.
    """
    adapter.check_inputs(inputs, method, additional_forward_args)
    probe = inputs[:1] if additional_forward_args is None else inputs

    def fail(problem: str, near: str = "") -> ValueError:
        listing = _map_candidates(adapter, probe, additional_forward_args, near)
        prefix = "" if problem.startswith(f"{method}: ") else f"{method}: "
        return ValueError(f"{prefix}{problem} {listing}")

    if layers is None:
        try:
            layers = adapter.default_feature_layers()
        except ValueError as err:
            raise fail(str(err)) from err
    layers = list(layers)
    if not layers:
        raise fail("layers is empty; pass at least one layer.")
    modules = dict(adapter.model.named_modules())
    points = []
    for layer in layers:
        if isinstance(layer, str) and (not layer or layer not in modules):
            raise fail(f"{type(adapter.model).__name__} has no module named {layer!r}.", layer)
        try:
            points.append(adapter.feature_point(layer, method))
        except (TypeError, ValueError) as err:
            raise fail(str(err), layer if isinstance(layer, str) else "") from err
    probes = [_Probe(p) for p in points]
    with model_state(adapter.model, grad=False), hooks(probes):
        adapter.forward(probe, additional_forward_args)
    for layer, p in zip(layers, probes):
        calls = len(p.tensors)
        if calls != 1 or p.tensors[0] is None:
            what = {0: "is not called in the forward pass", 1: "does not output a tensor"}
            problem = what.get(calls, f"runs {calls} times in one forward pass")
            raise fail(f"layer {layer!r} {problem}; a feature layer runs once and outputs a map.")
        try:
            adapter.feature_map(p.tensors[0], probe)
        except ValueError as err:
            raise fail(f"layer {layer!r}: {err}") from err
    return points


def _map_candidates(
    adapter: ModelAdapter,
    inputs: torch.Tensor,
    additional_forward_args: Any,
    near: str = "",
    limit: int = 40,
) -> str:
    """The modules whose output is a map, as ``name: (C, h, w)``, for an error message.

    Listed: first, at any depth, up to 8 names closest to ``near`` (the name the user gave;
    :func:`difflib.get_close_matches`), then the shallow ones (module depth at most one below
    the shallowest map).
    """
    try:
        shapes = layer_shapes(adapter, inputs, None, additional_forward_args)
    except Exception as err:  # the listing must not hide the error it explains
        return f"(Could not list the modules by output shape: {type(err).__name__}: {err}.)"
    maps = [(n, s) for n, s in shapes if s is not None and len(s) == 4]
    if not maps:
        return "No module of the model outputs a map (B, C, h, w)."
    shape = dict(maps)
    close = difflib.get_close_matches(near, list(shape), n=8, cutoff=0.6) if near else []
    top = min(n.count(".") for n in shape) + 1
    shown = [(n, shape[n]) for n in close]
    shown += [(n, s) for n, s in maps if n.count(".") <= top and n not in close]
    more = len(shown) - limit
    text = ", ".join(f"{n}: {tuple(s[1:])}" for n, s in shown[:limit])
    if more > 0:
        text += f", ... and {more} more (captum_ext.capture.layer_shapes lists every module)"
    h, w = inputs.shape[-2:] if inputs.dim() >= 3 else (None, None)
    size = f" for a {h}x{w} input" if h is not None else ""
    return f"Modules whose output is a map, as name: (C, h, w){size}: {text}."
