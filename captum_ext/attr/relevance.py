"""Relevance propagation with the generic rule of Chefer, Gur & Wolf (ICCV 2021)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
from captum.attr import GradientAttribution
from torch import nn

from captum_ext._scores import normalise_target, select_target
from captum_ext.adapters.base import Readout, TransformerAdapter
from captum_ext.attr._attention import readout_row, require_attention, resolve_start_layer
from captum_ext.attr._precision import accumulation_dtype, full_precision
from captum_ext.attr.base import TokenMapMethod
from captum_ext.capture import Hook, as_leaf, grad_hooks, hooks, model_state

__all__ = ["RelevancePropagation", "relevance_increment"]

Heads = Literal["mean", "all"]


class RelevancePropagation(TokenMapMethod, GradientAttribution):
    """Relevance propagation for self-attention, generic rule (Chefer, Gur & Wolf, ICCV 2021).

    "Generic Attention-model Explainability for Interpreting Bi-Modal and
    Encoder-Decoder Transformers", self-attention rule. With ``A_b (B, H, N, N)``
    the post-softmax attention of block b and ``∇A_b = ∂f/∂A_b`` for the raw
    target logit f:

    - ``Ā_b = mean_h ReLU(∇A_b ⊙ A_b)`` (clamped per head, then averaged;
      :func:`relevance_increment`),
    - ``R = I``; for b = start_layer .. L-1 in forward order:
      ``R ← R + Ā_b R``, i.e. ``R = (I + Ā_{L-1}) ... (I + Ā_start)``,
    - map ``r = w^T R``, with ``w (N,)`` the adapter's readout weights (CLS
      row; mean of the CLS and DIST rows for distilled DeiT; mean of the
      patch rows for average-pooled models). Prefix columns are dropped for
      images; text keeps every position (padding columns are left as they
      come out; a mean readout averages the attended rows only, see
      :class:`~captum_ext.attr.rollout.AttentionRollout`).

    Every quantity is per example: the batch gradient is the gradient of
    ``sum_b f_b``, and examples do not interact in eval mode.

    Streaming (default): only the readout row is needed, so it is
    accumulated right to left during the backward pass. ``v`` ``(B, N)``
    starts as ``w``; a tensor hook on each ``A_b`` receives ``∇A_b`` as the
    backward pass reaches block b (blocks arrive in order L-1 .. start) and
    updates ``v ← v + v Ā_b``; the gradient is then released. Beyond
    autograd's own buffers this keeps ``O(B·N)`` instead of ``L`` gradients
    of size ``B·H·N·N`` and costs ``B·N²`` per block instead of ``B·N³``.
    ``streaming=False`` takes all gradients at once and forms R explicitly
    (a cross-check and the memory baseline).

    ``heads="all"`` gives one map per head ``(B, H, ...)``: the head mean is
    skipped in the last block only, ``r_h = w^T (I + Ā_{L-1}^h) R_{L-2}``
    with ``Ā_{L-1}^h = ReLU(∇A_{L-1}^h ⊙ A_{L-1}^h)`` and ``R_{L-2}`` the
    head-averaged product of the earlier blocks. The mean over heads of
    these maps is exactly the ``heads="mean"`` map.

    Differences from the authors' code: theirs forks the model to store
    attention and its gradient in module attributes, works for batch size 1
    (its head mean mixes batch and heads), and keeps every block's
    ``(H, N, N)`` gradient. Here the user's model is hooked as it is (fused
    attention is switched off for the call and restored), any batch size is
    exact per example, gradients exist even with frozen parameters, and the
    streaming path keeps none of the per-block gradients.

    Args:
        model: A timm ViT, HF ViT, HF BERT-family model, a module wrapping
            one, or a :class:`~captum_ext.adapters.ModelAdapter`.
        start_layer: First block included (negatives count from the end);
            0 (default) uses every block.
        readout: Overrides the adapter's readout (``"cls"``, ``"cls_dist"``,
            ``"mean"``).
        heads: ``"mean"`` (default) or ``"all"`` (per-head maps, see above).
        streaming: Accumulate the readout row during the backward pass
            (``True``, default) or form all gradients and R explicitly
            (``False``); anything but a bool is a ``TypeError``.
    """

    _method = "RelevancePropagation"
    _reads_readout = True
    _multiplies_by_inputs = True

    def __init__(
        self,
        model: nn.Module | TransformerAdapter,
        start_layer: int = 0,
        readout: Readout | None = None,
        heads: Heads = "mean",
        streaming: bool = True,
    ) -> None:
        super().__init__(model, readout)
        self.start_layer = resolve_start_layer(start_layer, self.adapter, self._method)
        if heads not in ("mean", "all"):
            raise ValueError(f"heads must be 'mean' or 'all'; got {heads!r}.")
        self.heads = heads
        if not isinstance(streaming, bool):
            raise TypeError(f"{self._method}: streaming must be True or False; got {streaming!r}.")
        self.streaming = streaming

    # ---------------------------------------------------------------- internals
    def _token_scores(self, x: torch.Tensor, target: Any, extra: Any) -> torch.Tensor:
        """Readout row ``(B, N)`` (``(B, H, N)`` with ``heads="all"``) over all tokens."""
        ad = self.adapter
        root = Hook(ad.token_point(), as_leaf, record=False)
        probs = [Hook(ad.attention_point(b)) for b in range(self.start_layer, ad.num_layers)]
        with model_state(ad.model), ad.attention_probabilities(), hooks([root, *probs]):
            out = ad.forward(x, extra)
            attn = [require_attention(h) for h in probs]
            for h in probs:  # autograd keeps what it needs; hold no references here
                h.tensors.clear()
            if not all(a.requires_grad for a in attn):
                raise RuntimeError(
                    f"{self._method}: the attention probabilities do not depend on the tokens "
                    f"at {root.point.name}; the model detaches them."
                )
            score = select_target(out, normalise_target(target, out, self._method)).sum()
            del out
            w = readout_row(ad, attn[-1], x, extra)
            w = w.to(accumulation_dtype(w))  # R accumulates in float32 at least (autocast)
            if self.streaming:
                return self._streamed(score, attn, w)
            return self._naive(score, attn, w)

    def _streamed(
        self, score: torch.Tensor, attn: list[torch.Tensor], w: torch.Tensor
    ) -> torch.Tensor:
        """``w^T (I + Ā_{L-1}) ... (I + Ā_start)`` accumulated right to left in the backward pass."""
        state: dict[str, torch.Tensor] = {"v": w}
        fired: list[int] = []
        last = len(attn) - 1

        def on_grad(k: int, a: torch.Tensor) -> Callable[[torch.Tensor], None]:
            held = [a]

            def fn(grad: torch.Tensor) -> None:
                fired.append(k)
                inc = relevance_increment(held.pop(), grad)  # (B, H, N, N)
                v = state["v"]
                with full_precision(v):
                    if k == last and self.heads == "all":
                        state["v"] = v[:, None] + torch.einsum("bn,bhnm->bhm", v, inc)
                    elif v.dim() == 3:
                        state["v"] = v + torch.einsum("bhn,bnm->bhm", v, inc.mean(1))
                    else:
                        state["v"] = v + torch.bmm(v[:, None], inc.mean(1))[:, 0]

            return fn

        with grad_hooks([(a, on_grad(k, a.detach())) for k, a in enumerate(attn)]):
            first = attn[0]
            attn.clear()  # the hooks hold the detached probabilities until they fire
            torch.autograd.grad(score, [first])
            del first
        expected = list(range(last, -1, -1))
        if fired != expected:
            raise RuntimeError(
                f"{self._method}: attention gradients arrived for blocks "
                f"{[self.start_layer + k for k in fired]}, expected each of "
                f"{[self.start_layer + k for k in expected]} once in backward order; the model "
                "reuses attention probabilities across blocks, which the streaming rule cannot "
                "handle. Use streaming=False."
            )
        return state["v"]

    def _naive(
        self, score: torch.Tensor, attn: list[torch.Tensor], w: torch.Tensor
    ) -> torch.Tensor:
        """All gradients at once, then ``R ← R + Ā_b R`` in forward order with explicit R."""
        grads = torch.autograd.grad(score, attn)
        incs = [relevance_increment(a.detach(), g) for a, g in zip(attn, grads)]
        b, n = w.shape
        eye = torch.eye(n, dtype=w.dtype, device=w.device).expand(b, n, n)
        r = eye
        with full_precision(w):
            for inc in incs[:-1]:
                r = r + torch.bmm(inc.mean(1), r)
            if self.heads == "all":
                last = eye[:, None] + incs[-1]  # (B, H, N, N)
                return torch.einsum("bn,bhnm,bmk->bhk", w, last, r)
            r = r + torch.bmm(incs[-1].mean(1), r)
            return torch.bmm(w[:, None], r)[:, 0]


def relevance_increment(attn: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``ReLU(∇A ⊙ A)`` per head: the generic rule's relevance update before the head mean.

    Args:
        attn: Post-softmax attention ``(B, H, N, N)``.
        grad: ``∂f/∂A`` ``(B, H, N, N)``.

    Returns:
        ``(B, H, N, N)``, non-negative, in float32 at least (half-precision inputs
        from autocast are promoted so that the chained updates accumulate in float32).
    """
    acc = torch.promote_types(accumulation_dtype(attn), grad.dtype)
    return (grad.to(acc) * attn.to(acc)).clamp_min(0)
