"""The one training loop of the trainable explainers (T-TAME, MHEX).

An explainer brings a trainable module and a *step*: a function that takes the module (wrapped
in ``DistributedDataParallel`` when several processes train) and one batch already on the
device, runs its forward passes and returns its loss terms (``{"loss": total, "ce": ...}``).
:func:`train` does the rest, the same for every explainer:

* data: a ``Dataset``, a ``DataLoader`` or a tensor of inputs, shuffled by a
  ``DistributedSampler`` whose permutation depends on ``(seed, epoch)`` only, in one process as
  in many, so that resuming replays the same order and ``P`` processes with ``batch_size / P``
  images each see, step for step, the images of the one-process run with ``batch_size``;
* optimiser and schedule: SGD (Nesterov momentum; weight decay on weights only, never on
  biases or normalisation parameters) under a one-cycle learning-rate schedule;
* mixed precision: ``torch.autocast`` on CUDA (bfloat16 where supported, else float16 with a
  gradient scaler);
* distributed data parallel: under ``torchrun`` (or an initialised ``torch.distributed``) the
  module is wrapped in ``DistributedDataParallel`` (NCCL on GPUs, gloo on CPU), its BatchNorm
  layers use the statistics of the global batch, the logged loss terms are averaged over the
  processes, and only rank 0 shows progress, validates and writes checkpoints;
* a guard against divergence: a step whose loss is not finite, or after which a parameter
  (or a BatchNorm statistic) is not finite, stops training with the module and the
  optimiser as they were before that step (:class:`FloatingPointError`, one line naming the
  epoch, the step and the likely cause);
* progress (tqdm, with the running loss), a per-epoch history, optional validation;
* checkpoints after every epoch (:mod:`captum_ext.checkpoint`: safetensors + JSON, verified on
  read, never unpickled) and ``resume`` from the latest one.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset, TensorDataset

from captum_ext._scores import progress
from captum_ext.checkpoint import checkpoint_paths, load_checkpoint, save_checkpoint
from captum_ext.distributed import World as _World
from captum_ext.distributed import global_batch_norm as _global_batch_norm
from captum_ext.distributed import world as _world
from captum_ext.errors import CheckpointError
from captum_ext.explainers.base import TrainingRecipe

__all__ = [
    "Step",
    "batch_inputs",
    "frozen_parameters",
    "requires_grad",
    "train",
]

Step = Callable[[nn.Module, Any], Mapping[str, torch.Tensor]]
"""``step(module, batch) -> {"loss": total, **terms}``; ``module`` may be DDP-wrapped."""

Validate = Callable[[nn.Module], Mapping[str, float]]

_CHECKPOINT_KIND = "captum_ext.training-checkpoint"
_EPOCH_FILE = re.compile(r"^epoch-(\d+)\.json$")
_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)


_SCHEDULE = (
    "epochs",
    "batch_size",
    "lr",
    "momentum",
    "nesterov",
    "weight_decay",
    "pct_start",
    "cycle_momentum",
    "seed",
)
"""The fields of a recipe that shape the trained weights; checkpoints record them, and
``resume`` refuses a checkpoint whose values differ."""


def schedule(recipe: TrainingRecipe) -> dict[str, Any]:
    """The recorded part of ``recipe`` (:data:`_SCHEDULE`), as JSON."""
    return {k: getattr(recipe, k) for k in _SCHEDULE}


# ------------------------------------------------------------------------------------------
# small helpers the steps use


def batch_inputs(batch: Any) -> torch.Tensor:
    """The inputs of a batch: the batch itself, or the first item of a tuple, list or dict."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, tuple | list) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    if isinstance(batch, Mapping):
        for key in ("images", "pixel_values", "inputs", "input"):
            if isinstance(batch.get(key), torch.Tensor):
                return batch[key]
    raise TypeError(
        "expected batches that are an input tensor or a tuple whose first item is the inputs; "
        f"got {type(batch).__name__}."
    )


@contextlib.contextmanager
def requires_grad(
    on: Iterable[nn.Parameter] = (), off: Iterable[nn.Parameter] = ()
) -> Iterator[None]:
    """Sets ``requires_grad`` True on ``on`` and False on ``off``; restores every flag in
    ``finally`` (also on exceptions and interrupts)."""
    settings = [(p, True) for p in on] + [(p, False) for p in off]
    flags = [p.requires_grad for p, _ in settings]
    try:
        for p, flag in settings:
            p.requires_grad_(flag)
        yield
    finally:
        for (p, _), flag in zip(settings, flags, strict=True):
            p.requires_grad_(flag)


def frozen_parameters(model: nn.Module) -> contextlib.AbstractContextManager[None]:
    """``requires_grad=False`` on every parameter of ``model``, restored in ``finally``.

    The frozen model then builds no graph for its own weights: gradients flow through it to its
    input (the mask) only, and its ``.grad`` fields are never touched.
    """
    return requires_grad(off=model.parameters())


def training_device(
    model: nn.Module, device: torch.device | str | None, method: str, move_hint: str
) -> torch.device:
    """The device ``fit`` trains on: ``device`` (bare ``"cuda"``: the current GPU) or the model's.

    Args:
        model: The explained model (its first parameter's device is where it is).
        device: What the caller asked for; ``None`` means the model's device.
        method: The calling ``fit`` for the error (``"TTAME.fit"``).
        move_hint: How to move it, for the error (``"move the model there first (model.to"``).

    Raises:
        ValueError: ``device`` is not where the model's parameters are.
    """
    param = next(model.parameters(), None)
    here = param.device if param is not None else torch.device("cpu")
    if device is None:
        return here
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    if param is not None and here != dev:
        raise ValueError(
            f"{method}(device={str(dev)!r}) but the model is on {here}; {move_hint}({str(dev)!r}))."
        )
    return dev


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, tuple | list):
        return type(batch)(_to_device(b, device) for b in batch)
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch


# ------------------------------------------------------------------------------------------
# distributed


def _average(terms: Mapping[str, torch.Tensor], world: _World) -> dict[str, float]:
    """The loss terms as floats, averaged over the processes."""
    names = list(terms)
    values = torch.stack([terms[k].detach().double().reshape(()) for k in names])
    if world.size > 1:
        dist.all_reduce(values)
        values = values / world.size
    return dict(zip(names, values.tolist(), strict=True))


# ------------------------------------------------------------------------------------------
# data


def _loader(
    data: Any, recipe: TrainingRecipe, world: _World, num_workers: int, method: str = "fit"
) -> tuple[DataLoader | Any, DistributedSampler | None]:
    """A loader whose order depends on ``(seed, epoch)``; each process gets its share."""
    if isinstance(data, str | bytes | os.PathLike):
        raise TypeError(
            f"{method}: data must be a Dataset, a DataLoader or a tensor of inputs; got "
            f"{type(data).__name__} ({data!r}). For a folder of images, pass a Dataset of it, "
            "e.g. torchvision.datasets.ImageFolder(folder, transform=<the model's preprocessing>)."
        )
    if isinstance(data, torch.Tensor):
        data = TensorDataset(data)
    if isinstance(data, DataLoader):
        sampler = data.sampler if isinstance(data.sampler, DistributedSampler) else None
        if sampler is not None or world.size == 1 or isinstance(data.dataset, IterableDataset):
            if world.size > 1 and sampler is None:
                raise ValueError(
                    "an iterable-style DataLoader cannot be split over processes; pass a "
                    "map-style Dataset (or a DataLoader with a DistributedSampler)."
                )
            return data, sampler
        per_process = _share(data.batch_size or 1, world)
        shuffle = not isinstance(data.sampler, torch.utils.data.SequentialSampler)
        sampler = DistributedSampler(
            data.dataset, world.size, world.rank, shuffle=shuffle, seed=recipe.seed
        )
        return DataLoader(
            data.dataset,
            batch_size=per_process,
            sampler=sampler,
            num_workers=data.num_workers,
            collate_fn=data.collate_fn,
            pin_memory=data.pin_memory,
            drop_last=data.drop_last,
        ), sampler
    if isinstance(data, IterableDataset):
        if world.size > 1:
            raise ValueError("an IterableDataset cannot be split over processes; pass a Dataset.")
        return DataLoader(data, batch_size=recipe.batch_size, num_workers=num_workers), None
    if not isinstance(data, Dataset) and not hasattr(data, "__getitem__"):
        raise TypeError(
            f"{method}: data must be a Dataset, a DataLoader or a tensor of inputs; got "
            f"{type(data).__name__}."
        )
    sampler = DistributedSampler(data, world.size, world.rank, shuffle=True, seed=recipe.seed)
    return DataLoader(
        data, batch_size=_share(recipe.batch_size, world), sampler=sampler, num_workers=num_workers
    ), sampler


def _share(batch_size: int, world: _World) -> int:
    if batch_size % world.size:
        raise ValueError(
            f"batch_size {batch_size} is the global batch and must divide evenly over "
            f"{world.size} processes; use a multiple of {world.size}."
        )
    return batch_size // world.size


# ------------------------------------------------------------------------------------------
# optimiser


def _optimiser(module: nn.Module, recipe: TrainingRecipe, steps: int) -> tuple[Any, Any]:
    """SGD over ``module``'s parameters and its one-cycle schedule over ``steps`` per epoch."""
    optimizer = torch.optim.SGD(
        _param_groups(module, recipe.weight_decay),
        lr=recipe.lr,
        momentum=recipe.momentum,
        nesterov=recipe.nesterov,
    )
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=recipe.lr,
        total_steps=recipe.epochs * steps,
        pct_start=recipe.pct_start,
        cycle_momentum=recipe.cycle_momentum,
    )
    return optimizer, scheduler


def _param_groups(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weights with decay; biases and normalisation parameters without."""
    decay, no_decay = [], []
    for m in module.modules():
        for name, p in m.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            (no_decay if name == "bias" or isinstance(m, _NORM_TYPES) else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def _amp(device: torch.device, amp: bool | None) -> tuple[bool, torch.dtype | None, bool]:
    """(autocast on, its dtype, gradient scaler on)."""
    use = device.type == "cuda" if amp is None else bool(amp)
    if not use:
        return False, None, False
    if device.type != "cuda":
        raise ValueError(f"amp=True needs a CUDA device; the run is on {device}.")
    if torch.cuda.is_bf16_supported():
        return True, torch.bfloat16, False
    return True, torch.float16, True


# ------------------------------------------------------------------------------------------
# checkpoints


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def _save(
    directory: Path,
    epoch: int,
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: torch.amp.GradScaler,
    record: dict[str, Any],
    keep: int | None,
) -> None:
    tensors = {f"module.{k}": v for k, v in module.state_dict().items()}
    tensors.update(_rng_states(next(iter(tensors.values()), torch.empty(0)).device))
    opt = optimizer.state_dict()
    scalars: dict[str, dict[str, Any]] = {}
    for idx, state in opt["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{idx}.{key}"] = value
            else:
                scalars.setdefault(str(idx), {})[key] = value
    record = {
        **record,
        "optimizer": {"param_groups": opt["param_groups"], "state": scalars},
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
    }
    save_checkpoint(directory / f"epoch-{epoch:03d}", tensors, _json_safe(record))
    if keep is not None:
        for old in _epochs(directory)[:-keep]:
            for p in checkpoint_paths(directory / f"epoch-{old:03d}"):
                p.unlink(missing_ok=True)


def _epochs(directory: Path) -> list[int]:
    if not directory.is_dir():
        return []
    found = (_EPOCH_FILE.match(p.name) for p in directory.iterdir())
    return sorted(int(m.group(1)) for m in found if m)


def _resume(
    directory: Path,
    expect: dict[str, Any],
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: torch.amp.GradScaler,
    device: torch.device,
    single_process: bool,
) -> tuple[int, list[dict[str, Any]]]:
    """Loads the latest epoch checkpoint of ``directory``; ``(epochs done, history)``.

    One process also gets the random generators' states back (several processes keep their
    own: the checkpoint holds rank 0's only)."""
    epochs = _epochs(directory)
    if not epochs:
        return 0, []
    base = directory / f"epoch-{epochs[-1]:03d}"
    tensors, record = load_checkpoint(base, expect=expect, device=device)
    state = {k.removeprefix("module."): v for k, v in tensors.items() if k.startswith("module.")}
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise CheckpointError(
            base, f"its module tensors do not fit ({err})", "resume with the same explainer"
        ) from err
    opt_state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, idx, name = key.split(".", 2)
            opt_state.setdefault(int(idx), {})[name] = value
    for idx, extra in record["optimizer"]["state"].items():
        opt_state.setdefault(int(idx), {}).update(extra)
    optimizer.load_state_dict(
        {"state": opt_state, "param_groups": record["optimizer"]["param_groups"]}
    )
    scheduler.load_state_dict(record["scheduler"])
    if record["scaler"]:
        scaler.load_state_dict(record["scaler"])
    if single_process:
        _restore_rng(tensors, device)
    return int(record["epoch"]), list(record["history"])


def _rng_states(device: torch.device) -> dict[str, torch.Tensor]:
    """The random generators' states (CPU, and the CUDA device trained on): dropout and other
    random layers draw the same after ``resume`` as they would have without interruption."""
    states = {"rng.cpu": torch.get_rng_state()}
    if device.type == "cuda":
        states["rng.cuda"] = torch.cuda.get_rng_state(device)
    return states


def _restore_rng(tensors: Mapping[str, torch.Tensor], device: torch.device) -> None:
    if "rng.cpu" in tensors:
        torch.set_rng_state(tensors["rng.cpu"].cpu())
    if "rng.cuda" in tensors and device.type == "cuda":
        torch.cuda.set_rng_state(tensors["rng.cuda"].cpu(), device)


# ------------------------------------------------------------------------------------------
# the loop


def train(
    module: nn.Module,
    step: Step,
    data: Any,
    recipe: TrainingRecipe,
    *,
    device: torch.device | str,
    identity: Mapping[str, Any] | None = None,
    validate: Validate | None = None,
    desc: str = "training",
    method: str = "fit",
) -> list[dict[str, Any]]:
    """Trains ``module`` with ``step``'s loss; returns one history entry per epoch.

    Args:
        module: The trainable module (only its parameters are optimised).
        step: ``step(module, batch) -> {"loss": total, **terms}``, called under autocast with
            the batch on ``device``; it must call the module it is given (the DDP wrapper
            under torchrun) for the forward pass whose gradients are synchronised.
        data: A ``Dataset``, a ``DataLoader`` or a tensor of inputs. A ``Dataset`` (or a
            tensor) is shuffled with ``recipe.seed`` and cut into ``recipe.batch_size``
            batches; a ``DataLoader`` is used as it is in one process and, under DDP, rebuilt
            with a ``DistributedSampler`` and its batch size split over the processes (unless
            it already has a ``DistributedSampler``). An ``IterableDataset`` (or a loader of
            one) without ``len()`` is read once more before training to count its batches
            (the one-cycle schedule needs the number of steps); it must be finite and give as
            many batches every epoch.
        recipe: Schedule, device handling, checkpoints, workers, processes and progress
            (:class:`~captum_ext.explainers.TrainingRecipe`, its defaults filled in).
        device: Where the module and the batches go.
        identity: JSON describing what is trained (explainer, model, loss); checkpoints record
            it and ``resume`` refuses a checkpoint with another identity or schedule.
        validate: Called on rank 0 after every epoch with the module in eval mode; its
            numbers join the epoch's history entry.
        desc: Label of the progress bar.
        method: The calling ``fit`` (``"TTAME.fit"``), the prefix of the errors.

    Returns:
        ``[{"epoch": 1, "loss": ..., <terms>..., "lr": ..., "steps": ..., "images": ...,
        "time_s": ..., <validation>...}, ...]`` with the terms averaged over the epoch's steps
        (and processes).

    Raises:
        FloatingPointError: A step's loss is not finite, or the optimiser step made a
            parameter or a buffer of a module in train mode not finite: ``module`` (parameters
            and buffers) and the optimiser are put back as they were before that step, and the
            message names the epoch, the step and the likely cause (inputs far outside the
            model's range, a learning rate too high).
        TypeError: ``data`` is not a Dataset, a DataLoader or a tensor (a folder name, say).
        ValueError: Empty data; an iterable dataset that gives more batches than counted.
    """
    device = torch.device(device)
    use_amp, amp_dtype, use_scaler = _amp(device, recipe.amp)
    directory = Path(recipe.checkpoint_dir) if recipe.checkpoint_dir is not None else None
    with _world(device, recipe.distributed) as world:
        loader, sampler = _loader(data, recipe, world, recipe.num_workers, method)
        steps = _count(loader)
        if steps == 0:
            raise ValueError(f"{method}: the training data is empty.")
        module.to(device)
        optimizer, scheduler = _optimiser(module, recipe, steps)
        scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
        expect = {
            "kind": _CHECKPOINT_KIND,
            "identity": _json_safe(dict(identity or {})),
            "recipe": schedule(recipe),
            "steps_per_epoch": steps,
        }
        start, history = 0, []
        if recipe.resume and directory is not None:
            start, history = _resume(
                directory, expect, module, optimizer, scheduler, scaler, device, world.size == 1
            )
        wrapped: nn.Module = module
        if world.size > 1:
            ids = [device.index] if device.type == "cuda" and device.index is not None else None
            wrapped = nn.parallel.DistributedDataParallel(module, device_ids=ids)
        sync = _global_batch_norm(module, world.sync_group) if world.size > 1 else None
        with sync or contextlib.nullcontext():
            for epoch in range(start, recipe.epochs):
                if sampler is not None:
                    sampler.set_epoch(epoch)
                entry = _epoch(
                    wrapped, step, loader, optimizer, scheduler, scaler, device, world,
                    (use_amp, amp_dtype), recipe.show_progress,
                    f"{desc} {epoch + 1}/{recipe.epochs}",
                    _Guard(module, optimizer, method, epoch + 1, recipe.lr, steps),
                )  # fmt: skip
                entry = {"epoch": epoch + 1, **entry}
                if validate is not None and world.main:
                    module.eval()
                    entry.update(validate(module))
                history.append(_json_safe(entry))
                if directory is not None and world.main:
                    record = {**expect, "epoch": epoch + 1, "history": history}
                    _save(
                        directory, epoch + 1, module, optimizer, scheduler, scaler, record,
                        recipe.keep_checkpoints,
                    )  # fmt: skip
                if world.size > 1:
                    dist.barrier()
        module.eval()
    return history


def _count(loader: Any) -> int:
    """``len(loader)``; for an iterable dataset without ``len()``, its batches counted."""
    try:
        return len(loader)
    except TypeError:
        return sum(1 for _ in loader)


class _Guard:
    """Stops training at the first non-finite loss or update, the state put back first.

    Before every step it copies the module's trained parameters, the buffers of its modules
    in train mode (BatchNorm statistics, which the forward pass updates) and the optimiser's
    state into buffers kept between steps; a step whose loss is not finite, or after which
    one of those tensors is not finite, puts them back and raises one line.
    """

    def __init__(
        self,
        module: nn.Module,
        optimizer: torch.optim.Optimizer,
        method: str,
        epoch: int,
        lr: float,
        steps: int,
    ) -> None:
        self.module, self.optimizer, self.method = module, optimizer, method
        self.epoch, self.lr, self.steps = epoch, lr, steps
        self.step = 0
        self.live: list[torch.Tensor] = []
        self.names: list[str] = []
        self.saved: list[torch.Tensor] = []
        self.opt_saved: dict[Any, dict[str, Any]] = {}

    def start_epoch(self) -> None:
        """Lists the tensors to guard (after ``train()``: the modes decide the buffers)."""
        params = {id(p) for g in self.optimizer.param_groups for p in g["params"]}
        live, names = [], []
        for prefix, m in self.module.named_modules():
            for name, p in m.named_parameters(prefix=prefix, recurse=False):
                if id(p) in params:
                    live.append(p)
                    names.append(name)
            if m.training:
                for name, b in m.named_buffers(prefix=prefix, recurse=False):
                    if b is not None:
                        live.append(b)
                        names.append(name)
        self.live, self.names = live, names
        self.saved = [t.detach().clone() for t in live]

    def before_step(self, step: int) -> None:
        """Copies the guarded tensors and the optimiser's state (step ``step`` is next)."""
        if step > self.steps:
            raise ValueError(
                f"{self.method}: the data gave more than the {self.steps} batches counted "
                f"before training (epoch {self.epoch}); an iterable dataset must give as many "
                "batches every epoch."
            )
        self.step = step
        with torch.no_grad():
            for saved, t in zip(self.saved, self.live, strict=True):
                saved.copy_(t)
            kept: dict[Any, dict[str, Any]] = {}
            for p, state in self.optimizer.state.items():
                old = self.opt_saved.get(p, {})
                new = {}
                for k, v in state.items():
                    if isinstance(v, torch.Tensor):
                        prev = old.get(k)
                        if isinstance(prev, torch.Tensor) and prev.shape == v.shape:
                            new[k] = prev.copy_(v)
                        else:
                            new[k] = v.detach().clone()
                    else:
                        new[k] = v
                kept[p] = new
            self.opt_saved = kept

    def _restore(self) -> None:
        with torch.no_grad():
            for saved, t in zip(self.saved, self.live, strict=True):
                t.copy_(saved)
            for p in list(self.optimizer.state):
                if p not in self.opt_saved:
                    del self.optimizer.state[p]
            for p, state in self.opt_saved.items():
                live = self.optimizer.state[p]
                for k in [k for k in live if k not in state]:
                    del live[k]
                for k, v in state.items():
                    if isinstance(v, torch.Tensor) and isinstance(live.get(k), torch.Tensor):
                        live[k].copy_(v)
                    else:
                        live[k] = v.clone() if isinstance(v, torch.Tensor) else v
        self.optimizer.zero_grad(set_to_none=True)

    def _inputs(self, batch: Any) -> str:
        try:
            x = batch_inputs(batch)
        except TypeError:
            return ""
        if not x.is_floating_point() or x.numel() == 0:
            return ""
        return f"; this batch's largest |input| is {float(x.detach().abs().max()):.3g}"

    def check_loss(self, loss: float, batch: Any) -> None:
        """Restores and raises when the (process-averaged) loss is not finite."""
        if math.isfinite(loss):
            return
        self._restore()
        raise FloatingPointError(
            f"{self.method}: the loss is not finite ({loss}) at epoch {self.epoch}, step "
            f"{self.step}; the explainer is left as it was before that step. Likely causes: "
            "inputs far outside the model's range (unnormalised or overflowing images"
            f"{self._inputs(batch)}) or a learning rate too high (lr={self.lr})."
        )

    def check_update(self, batch: Any) -> None:
        """Restores and raises when the optimiser step made a guarded tensor not finite."""
        if not self.live:
            return
        ok = torch.stack([torch.isfinite(t).all() for t in self.live]).tolist()
        if all(ok):
            return
        bad = self.names[ok.index(False)]
        self._restore()
        raise FloatingPointError(
            f"{self.method}: {bad} is not finite after the training step at epoch {self.epoch}, "
            f"step {self.step}; the explainer is left as it was before that step. Likely "
            f"causes: a learning rate too high (lr={self.lr}) or inputs far outside the "
            f"model's range (unnormalised or overflowing images{self._inputs(batch)})."
        )


def _epoch(
    wrapped: nn.Module,
    step: Step,
    loader: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: torch.amp.GradScaler,
    device: torch.device,
    world: _World,
    amp: tuple[bool, torch.dtype | None],
    show_progress: bool,
    desc: str,
    guard: _Guard,
) -> dict[str, float]:
    start = time.perf_counter()
    wrapped.train()
    guard.start_epoch()
    sums: dict[str, float] = {}
    n_steps = n_images = 0
    bar = progress(loader, show=show_progress and world.main, desc=desc, leave=False)
    try:
        for batch in bar:
            guard.before_step(n_steps + 1)
            batch = _to_device(batch, device)
            with torch.autocast(device.type, dtype=amp[1], enabled=amp[0]):
                terms = step(wrapped, batch)
            if "loss" not in terms:
                raise KeyError("a training step must return its total under the key 'loss'.")
            logged = _average(terms, world)  # the same on every process: all stop together
            guard.check_loss(logged["loss"], batch)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(terms["loss"]).backward()
            scaler.step(optimizer)
            guard.check_update(batch)
            scaler.update()
            scheduler.step()
            for k, v in logged.items():
                sums[k] = sums.get(k, 0.0) + v
            n_steps += 1
            n_images += batch_inputs(batch).shape[0] * world.size
            bar.set_postfix(loss=f"{sums['loss'] / n_steps:.4f}")
    finally:
        bar.close()
    return {
        **{k: v / n_steps for k, v in sums.items()},
        "lr": scheduler.get_last_lr()[0],
        "steps": n_steps,
        "images": n_images,
        "time_s": round(time.perf_counter() - start, 3),
    }
