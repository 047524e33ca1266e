"""The base of the trainable explainers (T-TAME, MHEX): fit once, then explain in one pass.

A trainable explainer wraps the user's model and adds a small module of its own (T-TAME's
attention mechanism over three feature layers; MHEX's attention gates and deep-supervision
heads). :meth:`TrainableExplainer.fit` trains that module; afterwards
:meth:`~TrainableExplainer.attribute` explains a batch with one forward pass. The class is a
Captum ``Attribution`` (``forward_func``, ``attribute(inputs, target, additional_forward_args,
...)`` in Captum's argument order) and a ``torch.nn.Module`` whose submodules are the
explainer's own module only: the wrapped model is held by the adapter, so ``state_dict()``,
``.to()`` and DDP see only what the explainer trains.

The training options every explainer shares (epochs, batch size, learning rate, SGD and
one-cycle schedule, device, mixed precision, checkpoints and resume, data workers,
distributed training, progress bar) are one :class:`TrainingRecipe`; ``fit`` takes it next
to the method's own options (its loss). Checkpoints are written and verified through
:mod:`captum_ext.checkpoint` (safetensors + JSON, never unpickled) from one record:
method, format, configuration and the wrapped model's identity.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import numbers
import os
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import torch
from captum.attr import Attribution
from captum.log import log_usage
from torch import nn

from captum_ext.adapters.base import ModelAdapter, unwrap_model
from captum_ext.attr.base import (
    DocumentedInit,
    check_finite_map,
    check_output,
    check_targets,
    unpack_inputs,
)
from captum_ext.capture import exclusive, model_state, no_checkpointing
from captum_ext.checkpoint import (
    CheckpointPaths,
    checkpoint_paths,
    load_checkpoint,
    model_fingerprint,
    save_checkpoint,
)
from captum_ext.errors import CheckpointError, NotFittedError

__all__ = ["TrainableExplainer", "TrainingRecipe"]

_E = TypeVar("_E", bound="TrainableExplainer")


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _finite_number(value: Any) -> bool:
    """A finite real number (int, float, NumPy scalar; not bool)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class TrainingRecipe:
    """How :meth:`TrainableExplainer.fit` trains: schedule, device, checkpoints, processes.

    SGD (Nesterov momentum, weight decay on weights only, none on biases and normalisation
    parameters) with ``torch.optim.lr_scheduler.OneCycleLR`` peaking at ``lr``. ``epochs``,
    ``batch_size`` and ``lr`` default to ``None``: the explainer's published recipe
    (``TTAME.default_recipe``: 8, 32, 1e-3; ``MHEX.default_recipe``: 4, 128, 0.05).

    Attributes:
        epochs: Passes over the data.
        batch_size: Examples per optimiser step, over all processes together (each of ``P``
            processes takes ``batch_size / P``).
        lr: Peak learning rate.
        momentum: SGD momentum in ``[0, 1)`` (while ``cycle_momentum`` is on,
            ``OneCycleLR`` cycles it 0.95 -> 0.85 -> 0.95 instead).
        nesterov: Nesterov momentum (needs ``momentum > 0``).
        weight_decay: L2 penalty of weights.
        pct_start: Share of the steps spent raising the learning rate, in ``(0, 1)``.
        cycle_momentum: Let ``OneCycleLR`` cycle the momentum (its default).
        seed: Seed of the data order.
        device: Where training runs; ``None`` = the model's device (the model must be there;
            a bare ``"cuda"`` is the current GPU).
        amp: ``torch.autocast`` mixed precision; ``None`` = on for CUDA, off otherwise.
        show_progress: A tqdm bar per epoch with the running loss (rank 0 only).
        checkpoint_dir: Write ``epoch-NNN.safetensors`` + ``.json`` there after every epoch.
        resume: Continue from the newest checkpoint in ``checkpoint_dir`` (start afresh when
            there is none); refused when that checkpoint was made with another recipe or
            explainer.
        keep_checkpoints: Keep only the newest this many epoch checkpoints; ``None`` = all.
        num_workers: ``DataLoader`` workers when ``data`` is a ``Dataset``.
        distributed: ``None`` = DDP when ``torch.distributed`` is initialised or torchrun's
            variables are set; ``True`` requires it; ``False`` trains in this process only.

    Raises:
        ValueError: A value of the wrong type or range (NaN, inf, a string for a number, a
            number for a flag), naming the field and its allowed values.
    """

    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    pct_start: float = 0.3
    cycle_momentum: bool = True
    seed: int = 0
    device: torch.device | str | None = None
    amp: bool | None = None
    show_progress: bool = True
    checkpoint_dir: str | os.PathLike[str] | None = None
    resume: bool = False
    keep_checkpoints: int | None = None
    num_workers: int = 0
    distributed: bool | None = None

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "keep_checkpoints"):
            v = getattr(self, name)
            if v is not None and not _positive_int(v):
                raise ValueError(f"TrainingRecipe: {name} must be a positive int; got {v!r}.")
        if self.lr is not None and not (_finite_number(self.lr) and self.lr > 0):
            raise ValueError(f"TrainingRecipe: lr must be a finite number > 0; got {self.lr!r}.")
        if not (_finite_number(self.momentum) and 0 <= self.momentum < 1):
            raise ValueError(
                f"TrainingRecipe: momentum must be a finite number in [0, 1); got {self.momentum!r}."
            )
        if not (_finite_number(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(
                "TrainingRecipe: weight_decay must be a finite number >= 0; got "
                f"{self.weight_decay!r}."
            )
        if not (_finite_number(self.pct_start) and 0 < self.pct_start < 1):
            raise ValueError(
                f"TrainingRecipe: pct_start must lie in (0, 1); got {self.pct_start!r}."
            )
        for name in ("nesterov", "cycle_momentum", "show_progress", "resume"):
            v = getattr(self, name)
            if not isinstance(v, bool):
                raise ValueError(f"TrainingRecipe: {name} must be True or False; got {v!r}.")
        for name in ("amp", "distributed"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, bool):
                raise ValueError(f"TrainingRecipe: {name} must be True, False or None; got {v!r}.")
        if self.nesterov and self.momentum == 0:
            raise ValueError(
                "TrainingRecipe: nesterov=True needs momentum > 0; got momentum="
                f"{self.momentum!r} (pass nesterov=False for plain SGD)."
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"TrainingRecipe: seed must be an int; got {self.seed!r}.")
        if (
            isinstance(self.num_workers, bool)
            or not isinstance(self.num_workers, int)
            or (self.num_workers < 0)
        ):
            raise ValueError(
                f"TrainingRecipe: num_workers must be an int >= 0; got {self.num_workers!r}."
            )
        if self.resume and self.checkpoint_dir is None:
            raise ValueError("TrainingRecipe: resume=True needs checkpoint_dir.")

    def with_defaults(self, defaults: TrainingRecipe) -> TrainingRecipe:
        """This recipe with ``epochs``, ``batch_size`` and ``lr`` filled from ``defaults``."""
        return dataclasses.replace(
            self,
            **{
                k: getattr(defaults, k)
                for k in ("epochs", "batch_size", "lr")
                if getattr(self, k) is None
            },
        )


class TrainableExplainer(DocumentedInit, Attribution, nn.Module):
    """An explainer with a trained module of its own: ``fit`` (or ``load``), then ``attribute``.

    Subclasses (:class:`~captum_ext.explainers.TTAME`, :class:`~captum_ext.explainers.MHEX`)
    declare their module, their maps and their loss; this class owns the Captum-shaped
    :meth:`attribute` and :meth:`attribute_targets`, the refusal to explain before
    :meth:`fit` or :meth:`load`, and :meth:`save`, :meth:`load` and :meth:`record`.

    An explainer counts as fitted after :meth:`fit`, :meth:`load`, ``load_state_dict`` or
    :meth:`mark_fitted` (for a training loop of your own); before that, :meth:`attribute`
    and :meth:`save` raise :class:`~captum_ext.errors.NotFittedError`.

    ``fit`` holds the explained model's lock (:func:`captum_ext.capture.exclusive`) from
    start to end: another thread's explanation of the same model waits until it returns. It
    trains with gradients enabled also when called under ``torch.no_grad()``, and refuses
    ``torch.inference_mode()`` (which forbids them).

    Attributes:
        adapter: The wrapped model's adapter.
        default_recipe: The method's published ``epochs``, ``batch_size`` and ``lr``.
    """

    _method: ClassVar[str] = ""
    _record_method: ClassVar[str] = ""  # "method" in checkpoint records
    _format: ClassVar[int] = 1
    _outputs: ClassVar[tuple[str, ...]] = ("input", "like_input", "grid")
    default_recipe: ClassVar[TrainingRecipe] = TrainingRecipe()
    adapter: ModelAdapter

    def __init__(self) -> None:
        nn.Module.__init__(self)
        self._fitted = False
        self._fit_thread: int | None = None  # the thread whose fit holds the model's lock

    # ------------------------------------------------------------------ Captum
    @property
    def forward_func(self) -> nn.Module:
        """The explained model (Captum's ``forward_func``)."""
        return self.adapter.model

    @property
    def multiplies_by_inputs(self) -> bool:
        return False

    # ------------------------------------------------------------------ fitted state
    @property
    def is_fitted(self) -> bool:
        """Whether :meth:`fit`, :meth:`load`, ``load_state_dict`` or :meth:`mark_fitted` ran."""
        return self._fitted

    def mark_fitted(self: _E) -> _E:
        """Declares the explainer's module trained (by a loop of your own); returns ``self``."""
        self._fitted = True
        return self

    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False
    ):
        """``nn.Module.load_state_dict``; the explainer then counts as fitted."""
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        self._fitted = True
        return result

    def _check_fitted(self, action: str) -> None:
        if not self._fitted:
            raise NotFittedError(
                f"{self._method} is not fitted: call fit(data) or {self._method}.load(path, "
                f"model) before {action}() (or mark_fitted() after a training loop of your own)."
            )

    # ------------------------------------------------------------------ explaining
    @log_usage()
    def attribute(
        self,
        inputs: torch.Tensor | tuple[torch.Tensor],
        target: Any = None,
        additional_forward_args: Any = None,
        output: str = "input",
    ) -> torch.Tensor | tuple[torch.Tensor]:
        """Explains one class per example with one forward pass.

        Args:
            inputs: Images ``(B, C, H, W)`` (text models: ``input_ids (B, T)``), or a 1-tuple
                of them, as Captum's metrics pass them.
            target: Captum target: an int, a list of B ints, a tensor ``(B,)`` or
                ``(B, 1)``; ``None`` = the predicted class (see the subclass).
            additional_forward_args: Extra positional model arguments, e.g.
                ``(attention_mask,)`` for text.
            output: The layout: ``"input"`` ``(B, 1, H, W)``, ``"like_input"``
                ``(B, C, H, W)``, ``"grid"`` ``(B, 1, h, w)`` at the explainer's own
                resolution; the subclass lists what it supports.

        Returns:
            The maps (a 1-tuple if ``inputs`` was one); scale as the subclass says.

        Raises:
            NotFittedError: Before :meth:`fit` or :meth:`load`.
            ValueError: A bad input, target or ``output``; or maps that would not be finite
                (inputs so large that the model's features overflow, or an explainer whose
                parameters are not finite): never a NaN map.
        """
        self._check_fitted("attribute")
        x, was_tuple = self._checked(inputs, additional_forward_args, output)
        (maps,) = self._explain(x, [target], additional_forward_args, output)
        self._check_finite(maps, x)
        return (maps,) if was_tuple else maps

    def attribute_targets(
        self,
        inputs: torch.Tensor | tuple[torch.Tensor],
        targets: Sequence[Any],
        additional_forward_args: Any = None,
        output: str = "input",
    ) -> torch.Tensor:
        """The maps of K targets from one forward pass of the model, stacked: ``(K, ...)``.

        Args:
            inputs: As in :meth:`attribute`.
            targets: K Captum targets (each an int, a list of B ints or a tensor ``(B,)``).
            additional_forward_args: As in :meth:`attribute`.
            output: As in :meth:`attribute`.

        Raises:
            NotFittedError, ValueError: As in :meth:`attribute`; ``targets`` not a list.
        """
        self._check_fitted("attribute_targets")
        targets = check_targets(targets, self._method)
        x, _ = self._checked(inputs, additional_forward_args, output)
        maps = torch.stack(self._explain(x, targets, additional_forward_args, output))
        self._check_finite(maps, x)
        return maps

    def _check_finite(self, maps: torch.Tensor, x: torch.Tensor) -> None:
        """Refuses maps with NaN or inf entries (one line saying why they arise)."""
        check_finite_map(
            maps,
            x,
            self._method,
            noun="the maps are",
            cause="the model's features overflowed, or the explainer's parameters are not finite,",
        )

    def _checked(self, inputs: Any, extra: Any, output: Any) -> tuple[torch.Tensor, bool]:
        x, was_tuple = unpack_inputs(inputs, self._method)
        check_output(output, self._outputs, self.adapter.modality, self._method)
        self._check_output(output)
        self.adapter.check_inputs(x, self._method, extra)
        return x, was_tuple

    def _check_output(self, output: str) -> None:
        """Subclass refusals of an ``output`` layout beyond :func:`check_output`'s."""

    def _explain(
        self, x: torch.Tensor, targets: list[Any], extra: Any, output: str
    ) -> list[torch.Tensor]:
        """The maps of every target in ``targets`` (``None``: the predicted class), one pass."""
        raise NotImplementedError

    # ------------------------------------------------------------------ the model's lock
    @contextlib.contextmanager
    def _fitting(self) -> Iterator[None]:
        """The section of ``fit`` that trains: the model's lock, gradients on.

        Holds :func:`~captum_ext.capture.exclusive` on the explained model for the whole
        section, so another thread's explanation of the model waits; inside it, this
        explainer's own forward passes (the training step, validation that explains) go
        through :meth:`_model_state`, which does not take the lock again.

        Raises:
            RuntimeError: Under ``torch.inference_mode()``.
            ReentrantCallError: Called from inside another captum_ext call on the model.
        """
        if torch.is_inference_mode_enabled():
            raise RuntimeError(
                f"{self._method}.fit: training needs gradients, which torch.inference_mode() "
                "forbids; call fit() outside inference_mode (torch.no_grad() is fine)."
            )
        with exclusive(self.adapter.model, nested=True), torch.enable_grad():
            self._fit_thread = threading.get_ident()
            try:
                yield
            finally:
                self._fit_thread = None

    def _model_state(
        self, grad: bool = True, model: nn.Module | None = None
    ) -> contextlib.AbstractContextManager[None]:
        """:func:`~captum_ext.capture.model_state` of the explained model (or ``model``, a
        part of it); inside this thread's :meth:`_fitting`, which already holds the lock, the
        same modes without taking it again."""
        model = self.adapter.model if model is None else model
        if self._fit_thread is not None and self._fit_thread == threading.get_ident():
            return _modes_held(model, grad)
        return model_state(model, grad)

    # ------------------------------------------------------------------ training
    def _recipe(self, recipe: TrainingRecipe | None) -> TrainingRecipe:
        """``recipe`` (default: :attr:`default_recipe`) with the method's defaults filled in."""
        if recipe is None:
            return self.default_recipe
        if not isinstance(recipe, TrainingRecipe):
            raise TypeError(
                f"{self._method}.fit: recipe must be a TrainingRecipe; got "
                f"{type(recipe).__name__}. Pass TrainingRecipe(epochs=..., lr=...)."
            )
        return recipe.with_defaults(self.default_recipe)

    def _train(
        self,
        module: nn.Module,
        step: Callable[[nn.Module, Any], Mapping[str, torch.Tensor]],
        data: Any,
        recipe: TrainingRecipe,
        identity: Mapping[str, Any],
        validate: Callable[[nn.Module], Mapping[str, float]] | None,
    ) -> list[dict[str, Any]]:
        """Runs the shared training loop on ``module``; the explainer is fitted afterwards."""
        from captum_ext.explainers._training import train, training_device

        device = training_device(
            self.adapter.model, recipe.device, f"{self._method}.fit", self._move_hint
        )
        if validate is not None:  # validation may explain (T-TAME's AD/IC) before fit returns
            validate = functools.partial(self._validate_while_training, validate)
        history = train(
            module, step, data, recipe, device=device, identity=identity, validate=validate,
            desc=self._label, method=f"{self._method}.fit",
        )  # fmt: skip
        self._fitted = True
        return history

    def _validate_while_training(
        self, validate: Callable[[nn.Module], Mapping[str, float]], module: nn.Module
    ) -> Mapping[str, float]:
        """``validate(module)`` with the explainer counting as fitted (it explains mid-fit)."""
        fitted, self._fitted = self._fitted, True
        try:
            return validate(module)
        finally:
            self._fitted = fitted

    _label: ClassVar[str] = ""  # the progress bar's label
    _move_hint: ClassVar[str] = "move the model there first (model.to"

    # ------------------------------------------------------------------ checkpoints
    def record(self) -> dict[str, Any]:
        """The JSON record a checkpoint carries: ``method``, ``format``, ``config``,
        ``backbone`` (the wrapped model's identity) and the subclass's entries."""
        return {
            "method": self._record_method,
            "format": self._format,
            "config": self._config_record(),
            "backbone": self._backbone_record(),
            **self._extra_record(),
        }

    def _config_record(self) -> dict[str, Any]:
        raise NotImplementedError

    def _backbone_record(self) -> dict[str, Any]:
        raise NotImplementedError

    def _extra_record(self) -> dict[str, Any]:
        return {}

    def _checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors a checkpoint stores (default: the explainer's whole state dict)."""
        return {k: v.detach().clone() for k, v in self.state_dict().items()}

    def save(
        self, path: str | os.PathLike[str], extra: Mapping[str, Any] | None = None
    ) -> CheckpointPaths:
        """Writes ``<path>.safetensors`` + ``<path>.json`` (:mod:`captum_ext.checkpoint`).

        Args:
            path: Base path of the pair.
            extra: More top-level record entries (JSON), e.g. how it was trained; they must
                not replace the entries of :meth:`record` or ``weights``.

        Returns:
            The paths written.

        Raises:
            NotFittedError: Before :meth:`fit` or :meth:`load`.
            ValueError: ``extra`` sets an entry the explainer writes.
        """
        self._check_fitted("save")
        record = self.record()
        clash = set(extra or {}) & {*record, "weights"}
        if clash:
            raise ValueError(
                f"{self._method}.save: extra must not set {sorted(clash)}; the explainer "
                "writes those."
            )
        return save_checkpoint(path, self._checkpoint_tensors(), {**record, **(extra or {})})

    @classmethod
    def load(cls: type[_E], path: str | os.PathLike[str], model: nn.Module, **expected: Any) -> _E:
        """Rebuilds a saved explainer around ``model``; verified, never unpickled.

        Args:
            path: Base path of the checkpoint pair (or either file).
            model: The model it was made for (or its adapter).
            **expected: What the checkpoint must have been made with (the subclass lists
                them, e.g. MHEX's ``layers`` and ``num_classes``).

        Returns:
            The fitted explainer in eval mode, on the model's device.

        Raises:
            CheckpointError: The files are missing, damaged or edited; or the checkpoint is
                not of this method and format, lacks an entry of its record (``config``,
                ``backbone.weights_sha256``), or was made for another model, or for other weights of the same model (the
                record's ``backbone.weights_sha256``, the fingerprint of the model's weights
                when it was saved, differs from the model's).
        """
        where = checkpoint_paths(path).record
        tensors, record = load_checkpoint(path)
        if record.get("method") != cls._record_method or record.get("format") != cls._format:
            raise CheckpointError(
                where,
                f"not a {cls._method} checkpoint of format {cls._format} "
                f"(method={record.get('method')!r}, format={record.get('format')!r})",
                "load it with the class that wrote it",
            )
        try:
            explainer = cls._restore(where, tensors, record, model, **expected)
        except KeyError as err:  # a record without "config", "backbone", ...
            raise CheckpointError(
                where,
                f"record has no {err.args[0]!r} (not a complete {cls._method} checkpoint)",
                f"load a checkpoint written by {cls._method}.save",
            ) from err
        weights = (record.get("backbone") or {}).get("weights_sha256")
        if weights is None:
            raise CheckpointError(
                where,
                "record has no 'backbone.weights_sha256' (the fingerprint of the model's weights "
                "it was fitted on), so it cannot be checked against this model",
                f"fit it again and save it with {cls._method}.save",
            )
        if model_fingerprint(explainer.adapter.model) != weights:
            raise CheckpointError(
                where,
                "made for other weights of this model (the fingerprint of its weights differs)",
                f"load it with the model it was trained for, or fit a new {cls._method} for it",
            )
        explainer._fitted = True
        return explainer.eval()

    @classmethod
    def _restore(
        cls: type[_E],
        where: Any,
        tensors: dict[str, torch.Tensor],
        record: dict[str, Any],
        model: nn.Module,
        **expected: Any,
    ) -> _E:
        """Builds the explainer from a verified record and loads its tensors."""
        raise NotImplementedError


@contextlib.contextmanager
def _modes_held(model: nn.Module, grad: bool) -> Iterator[None]:
    """What :func:`~captum_ext.capture.model_state` does once the lock is held: eval mode,
    checkpointing off, grad on (or off), ``torch.compile``d parts run eagerly; every
    module's mode restored in ``finally``."""
    modules = list(model.modules())
    modes = [m.training for m in modules]
    compiled = any("_orig_mod" in m._modules for m in modules)
    eager = (
        torch.compiler.set_stance("force_eager")
        if compiled and not torch.compiler.is_compiling()
        else contextlib.nullcontext()
    )
    try:
        with no_checkpointing(model), torch.set_grad_enabled(grad), eager:
            if any(modes):
                model.eval()
            yield
    finally:
        for m, mode in zip(modules, modes, strict=True):
            if m.training != mode:
                m.training = mode


def backbone_model(model: nn.Module | ModelAdapter) -> nn.Module:
    """The plain model inside ``model`` (an adapter or a wrapper), as checkpoints record it."""
    return unwrap_model(model.model if isinstance(model, ModelAdapter) else model)


def check_backbone_layout(
    where: Any, recorded: Mapping[str, Any], key: str, model: nn.Module, remedy: str
) -> None:
    """Refuses a model of another class, or with other parameter names or shapes.

    Args:
        where: The record file, for the error.
        recorded: The checkpoint's ``backbone`` entry (``class`` and the layout hash).
        key: The entry of ``recorded`` holding the layout hash.
        model: The plain model (:func:`backbone_model`).
        remedy: What to do, for the error.

    Raises:
        CheckpointError: Naming the class or saying the layout differs.
    """
    if recorded["class"] != type(model).__name__:
        raise CheckpointError(
            where, f"made for a {recorded['class']}, not a {type(model).__name__}", remedy
        )
    if recorded[key] != model_fingerprint(model, values=False):
        raise CheckpointError(
            where,
            f"made for a {recorded['class']} with other parameter names or shapes "
            "(backbone fingerprint differs)",
            remedy,
        )


def load_tensors(
    module: nn.Module,
    tensors: Mapping[str, torch.Tensor],
    where: Any,
    remedy: str,
    what: str,
) -> None:
    """Loads ``tensors`` strictly into ``module``, cast to its device and floating dtype.

    Raises:
        CheckpointError: Missing, unexpected or misshapen tensors (``what`` names them).
    """
    ref = next(module.parameters())
    state = {
        k: v.to(device=ref.device, dtype=ref.dtype if v.is_floating_point() else v.dtype)
        for k, v in tensors.items()
    }
    try:
        nn.Module.load_state_dict(module, state, strict=True)
    except RuntimeError as err:
        raise CheckpointError(where, f"its {what} do not fit ({err})", remedy) from err
