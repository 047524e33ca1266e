"""ERASER rationale metrics for text classifiers (DeYoung et al., ACL 2020).

The model is called as ``model(input_ids, attention_mask)`` (positional) and may return logits
``(B, K)`` or an object with ``.logits``. Token scores are ``(B, T)``; a Captum
``Attribution`` object may be given instead (``attr.attribute(input_ids, target=target,
**attribute_kwargs)``; ``(B, T, D)`` results, e.g. from ``LayerIntegratedGradients`` on the
embeddings, are summed over ``D``).

Tokens that are padding (``attention_mask == 0``) or special (``special_mask``: [CLS], [SEP],
...) are never removed, never kept-only, and never counted in ``k``.

As for the image metrics, an ``nn.Module`` is run in eval mode under its lock and restored
exactly afterwards (:func:`captum_ext.capture.model_state`), an explicit target must lie in
``0 .. K - 1``, and an empty batch gives an empty result without calling the model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ._common import (
    _logits,
    check_finite,
    check_int,
    check_reals,
    check_score,
    check_scores,
    class_scores,
    model_section,
    pick,
    ranks_of,
    register_metric,
    resolve_attributions,
    target_tensor,
)

__all__ = ["ERASER_FRACTIONS", "comprehensiveness", "sufficiency", "token_auprc"]

ERASER_FRACTIONS: tuple[float, ...] = (0.01, 0.05, 0.1, 0.2, 0.5)
"""ERASER's AOPC bins: 1, 5, 10, 20 and 50 % of the valid tokens."""


def _token_scores(
    token_scores: Any,
    input_ids: Tensor,
    target: Tensor,
    attribute_kwargs: dict[str, Any] | None,
    model: Any = None,
) -> Tensor:
    s = resolve_attributions(
        token_scores, input_ids, target, attribute_kwargs, name="token_scores", model=model
    )
    if s.dim() == 3:
        s = s.sum(dim=-1)
    if tuple(s.shape) != tuple(input_ids.shape):
        raise ValueError(
            f"token_scores: expected shape {tuple(input_ids.shape)} (as input_ids), "
            f"got {tuple(s.shape)}"
        )
    s = s if s.is_floating_point() else s.float()
    check_finite(s, "token_scores")
    return s.to(input_ids.device)


def _valid(input_ids: Tensor, attention_mask: Tensor | None, special_mask: Tensor | None):
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    if tuple(mask.shape) != tuple(input_ids.shape):
        raise ValueError(
            f"attention_mask: expected shape {tuple(input_ids.shape)}, got {tuple(mask.shape)}"
        )
    valid = mask.bool()
    if special_mask is not None:
        sm = torch.as_tensor(special_mask, device=input_ids.device)
        if tuple(sm.shape) != tuple(input_ids.shape):
            raise ValueError(
                f"special_mask: expected shape {tuple(input_ids.shape)}, got {tuple(sm.shape)}"
            )
        valid = valid & ~sm.bool()
    return mask, valid


@torch.no_grad()
def _text_logits(model: Callable[..., Any], ids: Tensor, mask: Tensor) -> Tensor:
    logits = _logits(model(ids, mask)).detach()
    check_scores(logits)
    return logits


def _probs(model: Callable[..., Any], ids: Tensor, mask: Tensor, tgt: Tensor, score: str) -> Tensor:
    return pick(class_scores(_text_logits(model, ids, mask), score), tgt).double()


@dataclass(frozen=True)
class _EraserSettings:
    """Settings of an ERASER metric, as given to the public function."""

    attention_mask: Tensor | None
    fractions: Sequence[float]
    replace_id: int
    special_mask: Tensor | None
    score: str
    attribute_kwargs: dict[str, Any] | None
    per_fraction: bool


def _eraser(
    kind: str,
    model: Callable[..., Any],
    input_ids: Tensor,
    token_scores: Any,
    target: Any,
    cfg: _EraserSettings,
) -> Tensor:
    """ERASER ``kind`` (``"comprehensiveness"`` or ``"sufficiency"``) per example."""
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2:
        shape = tuple(input_ids.shape) if isinstance(input_ids, Tensor) else type(input_ids)
        raise ValueError(f"input_ids must have shape (B, T), got {shape}")
    fr = check_reals(cfg.fractions, "fractions", 0.0, 1.0, low_open=True)
    replace_id = check_int(cfg.replace_id, "replace_id", 0)
    check_score(cfg.score, ("softmax", "sigmoid", "logit"))
    mask, valid = _valid(input_ids, cfg.attention_mask, cfg.special_mask)
    b = input_ids.shape[0]
    if b == 0:
        if target is not None:
            target_tensor(target, 0, input_ids.device, method=kind)
        _token_scores(token_scores, input_ids, None, cfg.attribute_kwargs)  # shape check only
        shape = (0, len(fr)) if cfg.per_fraction else (0,)
        return torch.zeros(shape, dtype=torch.float64, device=input_ids.device)
    with model_section(model):
        clean = _text_logits(model, input_ids, mask)
    if target is None:
        tgt = clean.argmax(dim=1)
    else:
        tgt = target_tensor(target, b, input_ids.device, clean.shape[1], method=kind)
    s = _token_scores(token_scores, input_ids, tgt, cfg.attribute_kwargs, model)
    s = s.masked_fill(~valid, float("-inf"))
    ranks = ranks_of(s, descending=True)
    n_valid = valid.sum(dim=1)
    p_orig = pick(class_scores(clean, cfg.score), tgt).double()
    cols = []
    with model_section(model):
        for f in fr:
            k = torch.clamp(torch.ceil(f * n_valid.double() - 1e-9).long(), max=n_valid)
            top = (ranks < k.view(-1, 1)) & valid
            drop = top if kind == "comprehensiveness" else valid & ~top
            ids = input_ids.masked_fill(drop, replace_id)
            m = mask.masked_fill(drop, 0)
            cols.append(p_orig - _probs(model, ids, m, tgt, cfg.score))
    out = torch.stack(cols, dim=1)
    return out if cfg.per_fraction else out.mean(dim=1)


@register_metric(
    "comprehensiveness",
    higher_is_better=True,
    category="text",
    reference="DeYoung et al., ERASER: A Benchmark to Evaluate Rationalized NLP Models, ACL 2020",
)
def comprehensiveness(
    model: Callable[..., Any],
    input_ids: Tensor,
    token_scores: Any,
    target: Any = None,
    attention_mask: Tensor | None = None,
    fractions: Sequence[float] = ERASER_FRACTIONS,
    replace_id: int = 0,
    special_mask: Tensor | None = None,
    score: str = "softmax",
    *,
    attribute_kwargs: dict[str, Any] | None = None,
    per_fraction: bool = False,
) -> Tensor:
    """ERASER comprehensiveness (AOPC over ``fractions``).

    For each fraction ``f`` the top ``k = ceil(f * n)`` tokens (``n`` = number of valid,
    non-special, non-padding tokens; at least one token for any ``f > 0``; stable descending
    sort, ties by position) are removed -- their ids replaced by ``replace_id`` and their
    attention mask set to 0 -- and ``p(orig) - p(removed)`` is recorded. The result is the mean
    over the fractions (ERASER's AOPC bins are 1, 5, 10, 20, 50 %). Higher is better.

    Args:
        model: Called as ``model(input_ids, attention_mask)``.
        input_ids: ``(B, T)`` token ids.
        token_scores: ``(B, T)`` scores or a Captum ``Attribution`` object.
        target: Class (int or ``(B,)``) in ``0 .. K - 1``; ``None`` = predicted class.
        attention_mask: ``(B, T)`` (1 = real token); ``None`` = all ones.
        fractions: Fractions of the valid tokens: a non-empty sequence of numbers in
            ``(0, 1]``.
        replace_id: Id written into removed positions, an integer >= 0 (0 = BERT's [PAD]).
        special_mask: ``(B, T)`` bool, ``True`` for tokens never to remove or count.
        score: ``"softmax"``, ``"sigmoid"`` or ``"logit"``.
        attribute_kwargs: Extra keyword arguments for ``.attribute``.
        per_fraction: Return ``(B, len(fractions))`` instead of the mean.

    Returns:
        ``(B,)`` float64 (or ``(B, F)`` with ``per_fraction``); ``B`` may be 0.

    Raises:
        TypeError, ValueError: An option of the wrong type or out of its range (named in the
            message), shapes that do not match ``input_ids``, NaN / infinite token scores, a
            target outside ``0 .. K - 1``, NaN model scores.
    """
    cfg = _EraserSettings(
        attention_mask, fractions, replace_id, special_mask, score, attribute_kwargs, per_fraction
    )
    return _eraser("comprehensiveness", model, input_ids, token_scores, target, cfg)


@register_metric(
    "sufficiency",
    higher_is_better=False,
    category="text",
    reference="DeYoung et al., ERASER, ACL 2020",
)
def sufficiency(
    model: Callable[..., Any],
    input_ids: Tensor,
    token_scores: Any,
    target: Any = None,
    attention_mask: Tensor | None = None,
    fractions: Sequence[float] = ERASER_FRACTIONS,
    replace_id: int = 0,
    special_mask: Tensor | None = None,
    score: str = "softmax",
    *,
    attribute_kwargs: dict[str, Any] | None = None,
    per_fraction: bool = False,
) -> Tensor:
    """ERASER sufficiency (AOPC over ``fractions``): ``p(orig) - p(top-k tokens only)``.

    Keeps the top ``k`` valid tokens (same ``k`` as :func:`comprehensiveness`), plus special
    tokens, and removes every other valid token. Lower is better. Arguments as in
    :func:`comprehensiveness`.

    Returns:
        ``(B,)`` float64 (or ``(B, F)`` with ``per_fraction``).
    """
    cfg = _EraserSettings(
        attention_mask, fractions, replace_id, special_mask, score, attribute_kwargs, per_fraction
    )
    return _eraser("sufficiency", model, input_ids, token_scores, target, cfg)


def _average_precision(scores: Tensor, labels: Tensor, valid: Tensor) -> Tensor:
    """Average precision of every row of ``scores (B, T)`` against ``labels``, valid tokens only.

    Invalid tokens are sorted last (score ``-inf``, label 0), so they add nothing; tied scores
    enter together: each tie group's positives are credited at the group's precision. One
    batched pass on the scores' device (no per-example host round trip).
    """
    s = scores.double().masked_fill(~valid, float("-inf"))
    y = (labels & valid).double()
    order = torch.sort(s, dim=1, descending=True, stable=True).indices
    s, y = s.gather(1, order), y.gather(1, order)
    n_pos = y.sum(1)
    tp = y.cumsum(1)
    last = torch.ones_like(s, dtype=torch.bool)  # last position of each tie group
    last[:, :-1] = s[:, 1:] != s[:, :-1]
    seen = torch.arange(1, s.shape[1] + 1, device=s.device, dtype=torch.float64)
    ends = torch.where(last, tp, torch.zeros_like(tp)).cummax(dim=1).values
    before = torch.cat([torch.zeros_like(ends[:, :1]), ends[:, :-1]], dim=1)
    gained = torch.where(last, tp - before, torch.zeros_like(tp))  # positives of each group
    ap = (gained * (tp / seen)).sum(1) / n_pos
    return ap.masked_fill(n_pos == 0, math.nan)


@register_metric(
    "token_auprc",
    higher_is_better=True,
    category="text",
    reference="DeYoung et al., ERASER, ACL 2020 (soft-score AUPRC)",
)
def token_auprc(
    token_scores: Any,
    rationale: Any,
    valid_mask: Any = None,
    *,
    inputs: Tensor | None = None,
    target: Any = None,
    attribute_kwargs: dict[str, Any] | None = None,
) -> Tensor:
    """Per-example area under the precision-recall curve of token scores vs. a rationale.

    Computed as (non-interpolated) average precision, ``AP = sum_n (R_n - R_{n-1}) P_n`` over
    the distinct score thresholds (tied scores enter together), which is what
    ``sklearn.metrics.average_precision_score`` computes. (ERASER's reference script integrates
    the PR curve with the trapezoid rule instead, which is slightly more optimistic.)

    Args:
        token_scores: ``(B, T)`` scores (or an ``Attribution`` object with ``inputs``).
        rationale: ``(B, T)`` bool human rationale.
        valid_mask: ``(B, T)`` bool, ``True`` for the tokens to count (exclude padding and
            special tokens here); ``None`` = all.
        inputs: Model inputs, only for the ``Attribution`` path.
        target: Target passed to ``.attribute``.
        attribute_kwargs: Extra keyword arguments for ``.attribute``.

    Returns:
        ``(B,)`` float64 in ``[0, 1]``; ``NaN`` where the rationale has no valid token.
    """
    s = resolve_attributions(token_scores, inputs, target, attribute_kwargs, name="token_scores")
    if s.dim() == 3:
        s = s.sum(dim=-1)
    if s.dim() != 2:
        raise ValueError(f"token_scores must have shape (B, T), got {tuple(s.shape)}")
    s = s if s.is_floating_point() else s.float()
    check_finite(s, "token_scores")
    r = torch.as_tensor(rationale, device=s.device)
    if tuple(r.shape) != tuple(s.shape):
        raise ValueError(f"rationale: expected shape {tuple(s.shape)}, got {tuple(r.shape)}")
    v = torch.ones_like(r, dtype=torch.bool) if valid_mask is None else valid_mask
    v = torch.as_tensor(v, device=s.device)
    if tuple(v.shape) != tuple(s.shape):
        raise ValueError(f"valid_mask: expected shape {tuple(s.shape)}, got {tuple(v.shape)}")
    r, v = r.bool(), v.bool()
    return _average_precision(s, r, v)
