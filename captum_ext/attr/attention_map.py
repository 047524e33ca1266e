"""Attention map (AM): the readout query's attention in the final layer, a gradient-free baseline."""

from __future__ import annotations

from typing import Any, Literal

import torch
from captum.attr import Attribution
from torch import nn

from captum_ext.adapters.base import Readout, TransformerAdapter
from captum_ext.attr._attention import capture_attention, readout_row
from captum_ext.attr._precision import accumulation_dtype, full_precision
from captum_ext.attr.base import TokenMapMethod

__all__ = ["AttentionMap"]


class AttentionMap(TokenMapMethod, Attribution):
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
        layer: Index of the block whose attention is read (default: the last;
            negatives count from the end), checked here.
        readout: Overrides the adapter's readout.
    """

    _method = "AttentionMap"
    _reads_readout = True

    def __init__(
        self,
        model: nn.Module | TransformerAdapter,
        heads: Literal["mean", "all"] = "mean",
        layer: int = -1,
        readout: Readout | None = None,
    ) -> None:
        super().__init__(model, readout)
        if heads not in ("mean", "all"):
            raise ValueError(f"heads must be 'mean' or 'all'; got {heads!r}.")
        self.heads = heads
        self.layer = self.adapter.check_layer_index(layer, self._method)

    def _token_scores(self, x: torch.Tensor, target: Any, extra: Any) -> torch.Tensor:
        """Readout-row attention ``(B, N)`` (``(B, H, N)`` with ``heads="all"``); ``target`` unused."""
        (attn,) = capture_attention(self.adapter, x, extra, [self.layer])
        attn = attn.to(accumulation_dtype(attn))  # float32 at least, also under autocast
        w = readout_row(self.adapter, attn, x, extra)
        with full_precision(attn):
            rows = torch.einsum("bn,bhnm->bhm", w, attn)
        return rows.mean(1) if self.heads == "mean" else rows
