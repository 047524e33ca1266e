"""Processes of a run: one process, or several launched by ``torchrun``.

:func:`world` joins (or creates from torchrun's variables) the process group of a run and
says which process this is; :func:`local_device` is the device a bare ``"cuda"`` means in
each process; :func:`global_batch_norm` makes BatchNorm layers normalise with the statistics
of the batches of every process.
"""

from __future__ import annotations

import atexit
import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "World",
    "global_batch_norm",
    "local_device",
    "torchrun_env",
    "world",
]


@dataclass
class World:
    """The processes of a run, as one of them sees them.

    Attributes:
        rank: This process's rank (0 without a process group).
        size: Number of processes (1 without a process group).
        sync_group: Process group for the BatchNorm statistics (:func:`global_batch_norm`);
            ``None`` with one process.
    """

    rank: int = 0
    size: int = 1
    sync_group: Any = None

    @property
    def main(self) -> bool:
        """Whether this is rank 0."""
        return self.rank == 0


def torchrun_env() -> bool:
    """Whether torchrun's variables (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``,
    ``MASTER_PORT``) are all set."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def local_device(device: str | torch.device) -> torch.device:
    """The device ``device`` means in this process.

    A bare ``"cuda"`` under torchrun (``LOCAL_RANK`` set) is the process's own GPU,
    ``cuda:LOCAL_RANK``; every other device is returned as it is.

    Args:
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or a ``torch.device``.

    Returns:
        The device, as a ``torch.device``.
    """
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None and "LOCAL_RANK" in os.environ:
        dev = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return dev


@contextlib.contextmanager
def world(device: torch.device, distributed: bool | None, keep: bool = False) -> Iterator[World]:
    """The process group of the run: joined (or created from torchrun's variables), or none.

    A group created here uses NCCL when ``device`` is a GPU (made the current one) and gloo
    otherwise. It is destroyed when the block exits; with ``keep``, when the process exits
    instead, so that several runs in one process share it. A group the caller created is
    left as it is.

    Args:
        device: The device of this process.
        distributed: ``None``: join a group when one is initialised or torchrun's variables
            are set, else run alone; ``True``: require that; ``False``: run alone.
        keep: Keep a group created here until the process exits.

    Yields:
        The :class:`World` of this process (rank 0 of 1 when alone).

    Raises:
        RuntimeError: ``distributed=True`` and there is neither an initialised group nor
            torchrun's variables.
    """
    if distributed is False:
        yield World()
        return
    ready = dist.is_available() and dist.is_initialized()
    if not ready and not torchrun_env():
        if distributed:
            raise RuntimeError(
                "distributed=True but torch.distributed is not initialised and no torchrun "
                "variables (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) are set; launch with "
                "torchrun or call torch.distributed.init_process_group first."
            )
        yield World()
        return
    created = False
    if not ready:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        created = not keep
        if keep:
            atexit.register(_leave)
    try:
        size = dist.get_world_size()
        group = dist.new_group() if size > 1 else None
        yield World(dist.get_rank(), size, group)
    finally:
        if created:
            dist.destroy_process_group()


def _leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


class _AllReduceSum(torch.autograd.Function):
    """Sum over the processes of ``group``; the gradient is summed likewise."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        y = x.clone()
        dist.all_reduce(y, group=group)
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def _synced_batch_norm(bn: nn.modules.batchnorm._BatchNorm, group: Any, x: torch.Tensor):
    """Batch norm over the batches of every process of ``group`` (training mode), with grads.

    Same result as ``bn`` applied in one process to the concatenated batch, on any device and
    backend (``nn.SyncBatchNorm`` needs GPUs). Two differentiable all-reduces: the sum (with
    the count), then the sum of squared deviations.
    """
    if not bn.training:
        return nn.modules.batchnorm._BatchNorm.forward(bn, x)
    x = x.to(torch.promote_types(x.dtype, torch.float32))  # float32 at least, also under autocast
    dims = [0, *range(2, x.dim())]
    shape = [1, -1] + [1] * (x.dim() - 2)
    count = torch.tensor([x.numel() / x.shape[1]], dtype=x.dtype, device=x.device)
    total = _AllReduceSum.apply(torch.cat([x.sum(dims), count]), group)
    n = total[-1]
    mean = total[:-1] / n
    sq = _AllReduceSum.apply((x - mean.view(shape)).pow(2).sum(dims), group)
    var = sq / n
    y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + bn.eps)
    if bn.affine:
        y = y * bn.weight.view(shape) + bn.bias.view(shape)
    if bn.track_running_stats and bn.running_mean is not None:
        with torch.no_grad():
            bn.num_batches_tracked.add_(1)
            m = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
            bn.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
            unbiased = var.detach() * (n / (n - 1)).clamp(min=0)
            bn.running_var.mul_(1 - m).add_(unbiased, alpha=m)
    return y


@contextlib.contextmanager
def global_batch_norm(module: nn.Module, group: Any) -> Iterator[None]:
    """Every BatchNorm of ``module`` normalises with the statistics of the global batch.

    Inside the block, each BatchNorm layer in training mode gives what it would give in one
    process on the batches of every process of ``group`` concatenated (statistics, running
    estimates and gradients alike); in eval mode it is unchanged. The layers are restored
    when the block exits.

    Args:
        module: The module whose BatchNorm layers are synchronised.
        group: The process group (:attr:`World.sync_group`); every process of it must run
            the same forward passes.
    """
    bns = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    try:
        for bn in bns:
            bn.forward = lambda x, bn=bn: _synced_batch_norm(bn, group, x)
        yield
    finally:
        for bn in bns:
            vars(bn).pop("forward", None)
