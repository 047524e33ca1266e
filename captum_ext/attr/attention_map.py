"""Attention map (AM): the readout query's attention in the final layer, a gradient-free baseline."""

from __future__ import annotations

from typing import Any, Literal

import torch
from captum.attr import Attribution
from captum.log import log_usage
from torch import nn

from captum_ext.adapters.base import ModelAdapter, Readout, adapter_for
from captum_ext.attr._common import OutputKind, format_token_map, pack_output, unpack_inputs
from captum_ext.capture import Hook, hooks, model_state
from captum_ext.errors import MissingAttentionError

__all__ = ["AttentionMap", "capture_attention"]


class AttentionMap(Attribution):
    """Final-layer attention of the readout query (CLS row), the baseline of every paper.

    ``AM_j = mean_h A[h, r, j]`` with A ``(B, H, N, N)`` the post-softmax
    attention of the final block and r the readout row (CLS; the mean of the
    CLS and DIST rows for distilled DeiT; the mean of patch rows for
    average-pooled models). Prefix columns are dropped for images. It is
    class-agnostic: every target gives the same map.

    Args:
        model: A supported transformer, a wrapper of one, or an adapter.
        heads: ``"mean"`` (default) averages heads; ``"all"`` keeps them, giving
            ``(B, H, ...)`` maps.
        layer: Index of the block whose attention is read (default: the last).
        readout: Overrides the adapter's readout.
    """

    _method = "AttentionMap"

    def __init__(
        self,
        model: nn.Module | ModelAdapter,
        heads: Literal["mean", "all"] = "mean",
        layer: int = -1,
        readout: Readout | None = None,
    ) -> None:
        self.adapter = adapter_for(model, readout=readout, method=self._method)
        if heads not in ("mean", "all"):
            raise ValueError(f"heads must be 'mean' or 'all'; got {heads!r}.")
        self.heads = heads
        self.layer = layer
        super().__init__(self.adapter.model)

    @property
    def multiplies_by_inputs(self) -> bool:
        return False

    def has_convergence_delta(self) -> bool:
        return False

    @log_usage()
    def attribute(
        self,
        inputs: torch.Tensor | tuple[torch.Tensor],
        target: Any = None,
        additional_forward_args: Any = None,
        output: OutputKind = "input",
    ) -> torch.Tensor | tuple[torch.Tensor]:
        """Computes the attention map.

        Args:
            inputs: Images ``(B, C, H, W)`` or ``input_ids (B, T)`` (or a 1-tuple).
            target: Ignored (the map is class-agnostic); accepted for Captum
                pipelines.
            additional_forward_args: Extra positional model arguments.
            output: ``"input"``, ``"grid"`` or ``"tokens"`` (see :class:`~captum_ext.CDAM`).

        Returns:
            ``(B, 1, H, W)`` (or ``(B, H_heads, H, W)`` with ``heads="all"``) for
            images, ``(B, T)`` (or ``(B, H_heads, T)``) for text.
        """
        x, was_tuple = unpack_inputs(inputs, self._method)
        self.adapter.check_inputs(x, self._method)
        (attn,) = capture_attention(self.adapter, x, additional_forward_args, [self.layer])
        w = self.adapter.readout_weights(attn.shape[-1], attn.device, attn.dtype)
        rows = torch.einsum("n,bhnm->bhm", w, attn)
        scores = rows.mean(1) if self.heads == "mean" else rows
        return pack_output(
            format_token_map(scores, self.adapter, x, output, self._method), was_tuple
        )


def capture_attention(
    adapter: ModelAdapter, x: torch.Tensor, extra: Any, layers: list[int]
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
