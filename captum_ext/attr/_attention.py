"""Attention helpers shared by the attention-based methods (AM, rollout, relevance).

Capturing post-softmax probabilities in one gradient-free forward, the clear
error when a model never forms them, the readout row and layer indices.
Hooks themselves stay in :mod:`captum_ext.capture`.
"""

from __future__ import annotations

from typing import Any

import torch

from captum_ext.adapters.base import TransformerAdapter
from captum_ext.capture import Hook, hooks, model_state
from captum_ext.errors import MissingAttentionError

__all__ = ["capture_attention", "readout_row", "require_attention", "resolve_start_layer"]


def capture_attention(
    adapter: TransformerAdapter, x: torch.Tensor, extra: Any, layers: list[int]
) -> list[torch.Tensor]:
    """Post-softmax attention ``(B, H, N, N)`` of the given blocks, in one gradient-free forward."""
    specs = [Hook(adapter.attention_point(i)) for i in layers]
    with model_state(adapter.model, grad=False), adapter.attention_probabilities(), hooks(specs):
        adapter.forward(x, extra)
    return [require_attention(h) for h in specs]


def require_attention(h: Hook) -> torch.Tensor:
    """The captured probabilities, or a clear error when the model did not form them.

    A point that was never called (timm's fused kernel skips ``attn_drop``) or
    that returned ``None`` (HF SDPA) is a :class:`MissingAttentionError`.
    """
    t = h.tensors[0] if len(h.tensors) == 1 else (h.tensor if h.tensors else None)
    if t is None or t.dim() != 4:
        raise MissingAttentionError(
            f"{h.point.name} returned no attention probabilities (got "
            f"{None if t is None else tuple(t.shape)}). The model runs a fused attention kernel "
            "(SDPA/flash) that never forms them; captum_ext switches timm and HuggingFace models "
            "to eager attention — for other attention implementations, use eager attention."
        )
    return t


def readout_row(
    adapter: TransformerAdapter, like: torch.Tensor, x: torch.Tensor, extra: Any
) -> torch.Tensor:
    """The readout weights ``(B, N)`` for a ``like (B, ..., N, N)``, in its dtype.

    With a mean readout on text, padding positions (attention mask 0) get no
    weight, so the mean is over the attended tokens as the model pools them.
    """
    mask = adapter.attention_mask(x, extra)
    w = adapter.readout_weights(like.shape[-1], like.device, like.dtype, mask=mask)
    return w if w.dim() == 2 else w.expand(like.shape[0], -1)


def resolve_start_layer(start_layer: int, adapter: TransformerAdapter, method: str) -> int:
    """``start_layer`` as an index in ``0 .. L-1`` (negatives count from the end)."""
    return adapter.check_layer_index(start_layer, method, what="start_layer")
