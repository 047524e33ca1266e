"""Attention rollout (Abnar & Zuidema, ACL 2020): the gradient-free product of attention maps."""

from __future__ import annotations

from typing import Any

import torch
from captum.attr import Attribution
from torch import nn

from captum_ext.adapters.base import Readout, TransformerAdapter
from captum_ext.attr._attention import readout_row, require_attention, resolve_start_layer
from captum_ext.attr._precision import accumulation_dtype, full_precision
from captum_ext.attr.base import TokenMapMethod
from captum_ext.capture import Hook, hooks, model_state

__all__ = ["AttentionRollout", "rollout_matrix"]


class AttentionRollout(TokenMapMethod, Attribution):
    """Attention rollout (Abnar & Zuidema, "Quantifying Attention Flow in Transformers", ACL 2020).

    For every block b from ``start_layer`` on, with post-softmax attention
    ``A_b (B, H, N, N)``, the residual-aware attention is
    ``Â_b = rownorm(mean_h A_b + I)`` (:func:`rollout_matrix`), and the
    rollout is ``R = Â_{L-1} ... Â_start`` (forward order: ``R ← Â_b R``).
    The map is the readout row ``r = w^T R`` with ``w (N,)`` the adapter's
    readout weights (CLS row; mean of CLS and DIST rows for distilled DeiT;
    mean of the patch rows for average-pooled models); prefix columns are
    dropped for images. It is class-agnostic: every target gives the same map.

    The row is computed right to left, ``v ← v Â_b`` from the last block
    down, under ``torch.no_grad``: one forward pass that keeps one
    ``(B, N, N)`` matrix per block (the head mean, not the ``(B, H, N, N)``
    probabilities) and ``B·N²`` work per block instead of the ``B·N³`` of the
    full matrix product.

    Differences from the authors' code: theirs takes attention from a forked
    model one example at a time and forms the full ``(N, N)`` product; here
    the user's model is hooked as it is (fused attention is switched off for
    the call and restored), batches of any size are exact per example, and
    only the readout row is formed.

    Text models: padding columns are left as they come out (masked keys
    receive no attention, so they are near zero); with ``readout="mean"``
    the readout row averages the attended positions only (the attention
    mask from ``additional_forward_args``), as a mean-pooling model does.

    Args:
        model: A timm ViT, HF ViT, HF BERT-family model, a module wrapping
            one, or a :class:`~captum_ext.adapters.ModelAdapter`.
        start_layer: First block included (negatives count from the end);
            0 (default) rolls out through every block.
        readout: Overrides the adapter's readout (``"cls"``, ``"cls_dist"``,
            ``"mean"``).
    """

    _method = "AttentionRollout"
    _reads_readout = True

    def __init__(
        self,
        model: nn.Module | TransformerAdapter,
        start_layer: int = 0,
        readout: Readout | None = None,
    ) -> None:
        super().__init__(model, readout)
        self.start_layer = resolve_start_layer(start_layer, self.adapter, self._method)

    def _token_scores(self, x: torch.Tensor, target: Any, extra: Any) -> torch.Tensor:
        """The rollout's readout row ``(B, N)``; ``target`` unused (class-agnostic)."""
        mats = self._rollout_matrices(x, extra)
        v = readout_row(self.adapter, mats[-1], x, extra)
        with full_precision(v):  # the matrices are float32 at least; keep autocast off bmm
            while mats:  # right to left; each matrix is released once used
                v = torch.bmm(v[:, None], mats.pop())[:, 0]
        return v

    def _rollout_matrices(self, x: torch.Tensor, extra: Any) -> list[torch.Tensor]:
        """``Â_b (B, N, N)`` for blocks ``start_layer .. L-1`` in forward order, without grad."""
        layers = range(self.start_layer, self.adapter.num_layers)
        stores: list[list[torch.Tensor]] = [[] for _ in layers]
        specs = [
            Hook(self.adapter.attention_point(b), _collect(store), record=False)
            for b, store in zip(layers, stores)
        ]
        with (
            model_state(self.adapter.model, grad=False),
            self.adapter.attention_probabilities(),
            hooks(specs),
        ):
            self.adapter.forward(x, extra)
        return [
            require_attention(Hook(h.point, tensors=store))[:, 0] for h, store in zip(specs, stores)
        ]


def rollout_matrix(attn: torch.Tensor) -> torch.Tensor:
    """``Â = rownorm(mean_h A + I)``: attention plus the residual path, rows summing to 1.

    Args:
        attn: Post-softmax attention ``(B, H, N, N)``.

    Returns:
        ``(B, N, N)``, each row non-negative and summing to 1, in float32 at least
        (half-precision probabilities from autocast are accumulated in float32).
    """
    a = attn.mean(1, dtype=accumulation_dtype(attn))
    a.diagonal(dim1=-2, dim2=-1).add_(1.0)  # + I, in place on the fresh head mean
    return a.div_(a.sum(-1, keepdim=True))


def _collect(store: list[torch.Tensor]):
    """A transform that stores ``rollout_matrix(A)`` as ``(B, 1, N, N)`` and passes A on."""

    def fn(t: torch.Tensor) -> torch.Tensor:
        store.append(rollout_matrix(t)[:, None] if t.dim() == 4 else t)
        return t

    return fn
