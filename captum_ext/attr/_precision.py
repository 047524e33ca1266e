"""Accumulation precision under ``torch.autocast``.

Under autocast, matrix products (``bmm``, ``einsum``, ``matmul``) run in bfloat16/float16
and a model's attention probabilities and logits may come out in half precision. Chained
products (rollout, relevance propagation) and small differences of logits (TAM) lose most
of their digits that way, so the methods accumulate in :func:`accumulation_dtype` inside
:func:`full_precision`, whatever precision the model ran in.
"""

from __future__ import annotations

import contextlib

import torch

__all__ = ["accumulation_dtype", "full_precision"]


def accumulation_dtype(t: torch.Tensor) -> torch.dtype:
    """float32 for half-precision (and integer) tensors; float32/float64 stay as they are."""
    return torch.promote_types(t.dtype, torch.float32)


def full_precision(t: torch.Tensor) -> contextlib.AbstractContextManager[None]:
    """Switches autocast off on ``t``'s device for the block (a no-op when it is off).

    Inside, products run in the dtype of their operands, so cast them with
    :func:`accumulation_dtype` first.
    """
    device_type = t.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()
