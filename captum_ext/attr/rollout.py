"""Attention rollout (Abnar & Zuidema, ACL 2020): the gradient-free product of attention maps."""

from __future__ import annotations

from typing import Any

import torch
from captum.attr import Attribution
from captum.log import log_usage
from torch import nn

from captum_ext.adapters.base import ModelAdapter, Readout, adapter_for
from captum_ext.attr._common import OutputKind, format_token_map, pack_output, unpack_inputs
from captum_ext.attr.attention_map import require_attention
from captum_ext.capture import Hook, hooks, model_state

__all__ = ["AttentionRollout", "rollout_matrix"]


class AttentionRollout(Attribution):
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

    Text models: padding positions are left as they come out. Masked keys
    receive no attention, so with a CLS readout their columns are (near)
    zero; with ``readout="mean"`` the readout also averages over padding rows
    (the adapter's readout does not know the mask). Mask them yourself if
    that matters.

    Args:
        model: A timm ViT, HF ViT, HF BERT-family model, a module wrapping
            one, or a :class:`~captum_ext.adapters.ModelAdapter`.
        start_layer: First block included (negatives count from the end);
            0 (default) rolls out through every block.
        readout: Overrides the adapter's readout (``"cls"``, ``"cls_dist"``,
            ``"mean"``).
    """

    _method = "AttentionRollout"

    def __init__(
        self,
        model: nn.Module | ModelAdapter,
        start_layer: int = 0,
        readout: Readout | None = None,
    ) -> None:
        self.adapter = adapter_for(model, readout=readout, method=self._method)
        self.start_layer = _resolve_start_layer(start_layer, self.adapter.num_layers, self._method)
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
        """Computes the rollout map.

        Args:
            inputs: Images ``(B, C, H, W)`` or ``input_ids (B, T)`` (or a 1-tuple).
            target: Ignored (rollout is class-agnostic); accepted for Captum
                pipelines.
            additional_forward_args: Extra positional model arguments, e.g.
                ``(attention_mask,)`` for text.
            output: ``"input"`` ``(B, 1, H, W)`` / text ``(B, T)``, ``"grid"``
                ``(B, 1, h, w)`` or ``"tokens"`` ``(B, P)``.

        Returns:
            Non-negative scores in the requested layout (a 1-tuple if
            ``inputs`` was one).
        """
        x, was_tuple = unpack_inputs(inputs, self._method)
        self.adapter.check_inputs(x, self._method)
        mats = self._rollout_matrices(x, additional_forward_args)
        v = _readout_row(self.adapter, mats[-1])
        while mats:  # right to left; each matrix is released once used
            v = torch.bmm(v[:, None], mats.pop())[:, 0]
        return pack_output(format_token_map(v, self.adapter, x, output, self._method), was_tuple)

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
        ``(B, N, N)``, each row non-negative and summing to 1.
    """
    a = attn.mean(1)
    a.diagonal(dim1=-2, dim2=-1).add_(1.0)  # + I, in place on the fresh head mean
    return a.div_(a.sum(-1, keepdim=True))


def _collect(store: list[torch.Tensor]):
    """A transform that stores ``rollout_matrix(A)`` as ``(B, 1, N, N)`` and passes A on."""

    def fn(t: torch.Tensor) -> torch.Tensor:
        store.append(rollout_matrix(t)[:, None] if t.dim() == 4 else t)
        return t

    return fn


def _readout_row(adapter: ModelAdapter, like: torch.Tensor) -> torch.Tensor:
    """The adapter's readout weights ``(B, N)`` for a ``like (B, ..., N, N)``, in its dtype."""
    w = adapter.readout_weights(like.shape[-1], like.device, like.dtype)
    return w.expand(like.shape[0], -1)


def _resolve_start_layer(start_layer: int, num_layers: int, method: str) -> int:
    """``start_layer`` as an index in ``0 .. L-1`` (negatives count from the end)."""
    if isinstance(start_layer, bool) or not isinstance(start_layer, int):
        raise TypeError(f"{method}: start_layer must be an int; got {type(start_layer).__name__}.")
    if not -num_layers <= start_layer < num_layers:
        raise ValueError(
            f"{method}: start_layer {start_layer} is out of range for a model with {num_layers} "
            f"blocks (valid: {-num_layers}..{num_layers - 1})."
        )
    return start_layer % num_layers
