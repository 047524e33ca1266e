"""TAM: token ablation maps — the score of a token is the logit drop when it is removed.

``TAM_i = f(x) - f(x without token i)``, with tokens removed after position
embeddings are added and before the first block (the sequence becomes N-1,
the other tokens keep their positions), f the raw target logit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from captum.attr import PerturbationAttribution
from captum.log import log_usage
from torch import nn

from captum_ext._scores import normalise_target, progress
from captum_ext.adapters.base import Point, Readout, TransformerAdapter, as_tuple
from captum_ext.attr._base import OutputKind, TokenMapMethod, check_targets
from captum_ext.attr._precision import accumulation_dtype
from captum_ext.capture import Hook, hooks, model_state, replay

__all__ = ["TAM", "TokenAblation"]

Window = int | tuple[int, int]


class TokenAblation(TokenMapMethod, PerturbationAttribution):
    """Token ablation maps (TAM), the perturbation reference of Brocki & Chung (2023).

    The score of token i is ``TAM_i = f(x) - f(x without token i)``, f the raw
    target logit (pre-softmax), signed: positive when the token supports the
    class. Tokens are removed from the sequence ``(B, N, D)`` at the adapter's
    token point — after position embeddings are added, before the first block
    (timm: ``patch_drop`` output; HF ViT and BERT family: the embeddings
    output) — so the sequence becomes ``N - 1`` tokens and the others keep
    the positions they already carry. Prefix tokens (CLS, DIST, registers)
    are never removed and score 0; for text, the first and last attended
    tokens ([CLS]/<s>, [SEP]/</s>) and padding are never removed and score 0.

    Batching: the clean tokens are computed once per batch; each forward pass
    then runs ``B * perturbations_per_eval`` shortened rows, the token-point
    hook replacing every row's tokens by the clean tokens it keeps. Images
    feed each row its whole image; text feeds ``input_ids`` and the attention
    mask (``additional_forward_args=(attention_mask,)``, and any other
    ``(B, T, ...)`` extra tensor) with the removed positions cut out, so that
    the model's own masks and a wrapper's mean pooling see the shortened
    sequence. Every row is computed independently, so results equal the
    one-token-per-forward loop for every ``perturbations_per_eval`` and every
    batch size (up to floating-point summation order).

    Removal versus masking: with a CLS (or CLS+DIST) readout, deleting token
    i equals masking key i in every attention layer — the token can no longer
    influence any other token and its own row is never read. With mean
    pooling (timm ``global_pool='avg'``, a mean-pooling text wrapper) it does
    not: deletion also takes the token out of the pool, masking would still
    average its row. TAM deletes.

    Grouped removal: ``window=k`` removes non-overlapping ``k x k`` tiles of
    the patch grid (edge tiles are smaller when k does not divide the grid;
    text: runs of k consecutive positions), ``feature_mask`` assigns tokens
    to arbitrary groups as in Captum's ``FeatureAblation``; each group is
    removed together and every token gets its group's score. With global
    average pooling, removal changes the pool as well as the attention.

    Differences from the authors' code (Brocki & Chung, arXiv:2312.02364):
    theirs forks the model and runs one forward per token at batch size 1;
    this one hooks the user's model unchanged, batches many removals per
    forward (``perturbations_per_eval``, exact), supports any batch size,
    text models (word pieces), grouped removal, and several targets from the
    same forward passes (:meth:`attribute_targets`). Cost: the clean pass plus
    about ``N / perturbations_per_eval`` forwards of ``B * perturbations_per_eval``
    rows of ``N - 1`` tokens.

    Args:
        model: A timm ViT, HF ViT, HF BERT-family model, a module wrapping one,
            or a :class:`~captum_ext.adapters.ModelAdapter`.
        readout: Overrides the adapter's readout (not used by TAM itself; kept
            for a uniform constructor).
    """

    _method = "TokenAblation"

    def __init__(
        self, model: nn.Module | TransformerAdapter, readout: Readout | None = None
    ) -> None:
        super().__init__(model, readout)

    @log_usage()
    def attribute(
        self,
        inputs: torch.Tensor | tuple[torch.Tensor],
        target: Any = None,
        additional_forward_args: Any = None,
        perturbations_per_eval: int = 16,
        show_progress: bool = False,
        output: OutputKind = "input",
        feature_mask: torch.Tensor | None = None,
        window: Window | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor]:
        """Computes token ablation scores for one target per example.

        Args:
            inputs: Images ``(B, C, H, W)`` or ``input_ids (B, T)`` (or a 1-tuple).
            target: Captum target: int, list of ints, tensor ``(B,)``, or
                ``None`` for the class predicted on the clean input.
            additional_forward_args: Extra positional model arguments, e.g.
                ``(attention_mask,)`` for text.
            perturbations_per_eval: Removals per example evaluated in one
                forward pass (the pass holds ``B * perturbations_per_eval`` rows).
            show_progress: Show a tqdm progress bar over the forward passes.
            output: ``"input"`` ``(B, 1, H, W)`` / text ``(B, T)``, ``"grid"``
                ``(B, 1, h, w)`` or ``"tokens"`` ``(B, P)``.
            feature_mask: Integer group ids over patch tokens ``(P,)`` or
                ``(B, P)`` (row-major patch order; text: over positions
                ``(T,)`` or ``(B, T)``); each group is removed at once.
                Negative ids mark tokens that are never removed.
            window: Remove ``window x window`` tiles of patches (an int, or
                ``(kh, kw)``); text: runs of ``window`` positions.

        Returns:
            Signed scores in the requested layout (a 1-tuple if ``inputs`` was one).
        """
        (maps,) = self.attribute_targets(
            inputs,
            [target],
            additional_forward_args,
            perturbations_per_eval,
            show_progress,
            output,
            feature_mask,
            window,
        )
        return (maps,) if isinstance(inputs, tuple) else maps

    def attribute_targets(
        self,
        inputs: torch.Tensor | tuple[torch.Tensor],
        targets: Sequence[Any],
        additional_forward_args: Any = None,
        perturbations_per_eval: int = 16,
        show_progress: bool = False,
        output: OutputKind = "input",
        feature_mask: torch.Tensor | None = None,
        window: Window | None = None,
    ) -> torch.Tensor:
        """TAM for several targets from the same ablated forward passes.

        Every forward pass yields the logits of all classes, so K targets cost
        no more passes than one.

        Args:
            inputs: As in :meth:`attribute`.
            targets: K Captum targets (each an int, a list or a tensor ``(B,)``).
            additional_forward_args, perturbations_per_eval, show_progress,
                output, feature_mask, window: As in :meth:`attribute`.

        Returns:
            ``(K, ...)``: the map of each target stacked on a leading axis.
        """
        x, _ = self._inputs(inputs, additional_forward_args)
        targets = check_targets(targets, self._method)
        maps = self._run(
            x,
            targets,
            additional_forward_args,
            perturbations_per_eval,
            show_progress,
            feature_mask,
            window,
            output,
        )
        return torch.stack([self._format(m, x, output) for m in maps])

    # ---------------------------------------------------------------- internals
    def _run(
        self,
        x: torch.Tensor,
        targets: list[Any],
        extra: Any,
        perturbations_per_eval: int,
        show_progress: bool,
        feature_mask: torch.Tensor | None,
        window: Window | None,
        output: OutputKind,
    ) -> list[torch.Tensor]:
        """Token scores ``(B, N)`` for each target."""
        m = self._method
        if (
            not isinstance(perturbations_per_eval, int)
            or isinstance(perturbations_per_eval, bool)
            or perturbations_per_eval < 1
        ):
            raise ValueError(
                f"{m}: perturbations_per_eval must be a positive int; got "
                f"{perturbations_per_eval!r}."
            )
        self._check_output(x, output)
        removal = token_removal(self.adapter, x, extra)
        groups = _group_ids(self.adapter, removal, x, feature_mask, window, m)
        b, n = groups.shape
        point = self.adapter.token_point()
        record = Hook(point)
        embedding = self.adapter.pixel_embedding()
        embedded = [] if embedding is None else [Hook(Point(embedding, "output", None, "embed"))]
        with model_state(self.adapter.model, grad=False):
            with hooks([record, *embedded]):
                clean = self.adapter.forward(x, extra)
            tokens = record.tensor
            if tokens is None or tokens.dim() < 3 or tuple(tokens.shape[:2]) != (b, n):
                raise RuntimeError(
                    f"{m}: expected tokens ({b}, {n}, D) at {point.name}; got "
                    f"{None if tokens is None else tuple(tokens.shape)}. The model's token "
                    "sequence does not match its input; TAM supports plain ViTs and BERT-family "
                    "encoders."
                )
            if clean.dim() == 1:
                clean = clean[:, None]
            clean = clean.to(accumulation_dtype(clean))  # fp32 logit differences (autocast)
            idx = torch.stack([normalise_target(t, clean, m) for t in targets])  # (K, B)
            clean_sel = clean.gather(1, idx.T).T  # (K, B)
            plan = _plan(groups, perturbations_per_eval, m)
            table = clean.new_zeros(len(targets), b, plan.num_ranks)
            with progress(total=len(plan.chunks), show=show_progress, desc=m) as bar:
                for rows, ranks, keep in plan.chunks:
                    rows_in, rows_extra = removal.model_args(rows, keep)
                    swap = Hook(point, _keep_tokens(tokens, rows, keep, removal, m), record=False)
                    with hooks([swap]), _replaying(embedding, embedded, rows, b):
                        out = self.adapter.forward(rows_in, rows_extra)
                    if out.dim() == 1:
                        out = out[:, None]
                    ablated = out.gather(1, idx[:, rows].T)  # (R, K)
                    table[:, rows, ranks] = clean_sel[:, rows] - ablated.T
                    bar.update(1)
        rank = plan.rank  # (B, N), -1 = never removed
        gathered = table.gather(2, rank.clamp(min=0).expand(len(targets), b, n))
        maps = torch.where(rank >= 0, gathered, torch.zeros_like(gathered))
        return list(maps.unbind(0))


TAM = TokenAblation
"""Alias of :class:`TokenAblation` under the paper's name."""


# ------------------------------------------------------------------ token removal
@dataclass(frozen=True)
class TokenRemoval:
    """Model arguments for copies of a batch with tokens removed.

    Attributes:
        inputs: The batch: images ``(B, C, H, W)`` or ``input_ids (B, T)``.
        additional_forward_args: The extra positional model arguments.
        removable: ``(B, N)`` bool, the tokens at the token point that may be
            removed (never prefix tokens, special text tokens or padding).
        slice_tokens: ``True`` (text) when ``inputs`` and the ``(B, T, ...)``
            extra tensors are cut along the token axis like the tokens;
            ``False`` (images) when each row gets its whole example.
    """

    inputs: torch.Tensor
    additional_forward_args: tuple
    removable: torch.Tensor
    slice_tokens: bool

    def model_args(
        self, rows: torch.Tensor, keep_index: torch.Tensor
    ) -> tuple[torch.Tensor, tuple]:
        """Inputs and extra arguments for R shortened rows.

        Args:
            rows: ``(R,)`` example of each row.
            keep_index: ``(R, L)`` ascending token positions each row keeps.

        Returns:
            ``(inputs, additional_forward_args)`` with R rows: tensors whose
            first axis is the batch are indexed with ``rows`` (and, when
            ``slice_tokens``, those of shape ``(B, T, ...)`` are cut to
            ``keep_index``); other arguments are passed unchanged.
        """
        b = self.inputs.shape[0]
        t = self.inputs.shape[1] if self.slice_tokens else -1

        def pick(v: Any) -> Any:
            if not isinstance(v, torch.Tensor) or v.dim() == 0 or v.shape[0] != b:
                return v
            rows_v = rows.to(v.device)
            if self.slice_tokens and v.dim() >= 2 and v.shape[1] == t:
                return v[rows_v[:, None], keep_index.to(v.device)]
            return v[rows_v]

        return pick(self.inputs), tuple(pick(v) for v in self.additional_forward_args)


def token_removal(
    adapter: TransformerAdapter, inputs: torch.Tensor, additional_forward_args: Any = None
) -> TokenRemoval:
    """Which tokens may be removed, and what to feed the model when they are.

    Tokens are removed at the adapter's token point (after position
    embeddings, before the first block) by a hook; this describes the rest.
    Every position the adapter does not call special may go (images: all
    but the prefix tokens; text: all attended positions but the first and
    last). Images feed each shortened row its whole image (the hook replaces
    its tokens); text (``adapter.slices_extra_args``) feeds ``input_ids`` and
    every ``(B, T, ...)`` extra argument (the attention mask) with the
    removed positions cut out, so that the model's own shapes (its attention
    mask, a wrapper's pooling) agree with the shortened sequence.
    """
    removable = ~adapter.special_tokens(inputs, additional_forward_args)
    return TokenRemoval(
        inputs, as_tuple(additional_forward_args), removable, adapter.slices_extra_args
    )


# ------------------------------------------------------------------ helpers
@contextlib.contextmanager
def _replaying(
    module: nn.Module | None, embedded: list[Hook], rows: torch.Tensor, batch: int
) -> Iterator[None]:
    """Skips the pixel embedding of shortened copies: they reuse the clean one's rows.

    Only the tokens after position embeddings matter to a shortened copy (the
    token-point hook replaces them), so recomputing the embedding from pixels
    is wasted work; replaying it is exact. Falls back to computing when the
    module ran other than once or returned something other than a batch tensor.
    """
    seen = embedded[0].tensors if embedded else []
    out = seen[0] if len(seen) == 1 else None
    if module is None or not isinstance(out, torch.Tensor) or out.shape[:1] != (batch,):
        yield
        return
    with replay(module, out[rows]):
        yield


def _keep_tokens(
    tokens: torch.Tensor,
    rows: torch.Tensor,
    keep: torch.Tensor,
    removal: TokenRemoval,
    method: str,
):
    """Hook transform: replaces the model's tokens by the clean tokens each row keeps."""
    kept = tokens[rows[:, None], keep]  # (R, L, D)
    expected = keep.shape[1] if removal.slice_tokens else tokens.shape[1]

    def transform(t: torch.Tensor) -> torch.Tensor:
        if t.dim() < 2 or t.shape[0] != kept.shape[0] or t.shape[1] != expected:
            raise RuntimeError(
                f"{method}: the token point saw shape {tuple(t.shape)} where "
                f"({kept.shape[0]}, {expected}, ...) was expected; the model must compute its "
                "tokens once per forward pass from the inputs."
            )
        return kept

    return transform


@dataclass
class _Plan:
    """The removals of one call, chunked into forward passes.

    Attributes:
        rank: ``(B, N)`` index of each token's group within its example, -1
            for tokens never removed.
        num_ranks: Largest number of groups of one example (at least 1).
        chunks: ``(rows (R,), ranks (R,), keep (R, L))`` per forward pass.
    """

    rank: torch.Tensor
    num_ranks: int
    chunks: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def _plan(groups: torch.Tensor, per_eval: int, method: str) -> _Plan:
    """One removal per (example, group), bucketed by kept length and chunked."""
    b, n = groups.shape
    device = groups.device
    rank = torch.full_like(groups, -1)
    buckets: dict[int, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {}
    num_ranks = 1
    for i in range(b):
        g = groups[i]
        sel = g >= 0
        if not sel.any():
            continue
        uniq = torch.unique(g[sel])  # sorted
        rank[i, sel] = torch.searchsorted(uniq, g[sel])
        num_ranks = max(num_ranks, len(uniq))
        member = g[None, :] == uniq[:, None]  # (G, N)
        lengths = n - member.sum(1)
        if (lengths == 0).any():
            raise ValueError(
                f"{method}: a group covers every token of example {i}; removing it leaves an "
                "empty sequence. Use smaller groups or mark some tokens as never removed "
                "(negative ids in feature_mask)."
            )
        for length in lengths.unique().tolist():
            pick = (lengths == length).nonzero().squeeze(1)
            keep = (~member[pick]).nonzero()[:, 1].reshape(len(pick), length)
            rows = torch.full((len(pick),), i, dtype=torch.long, device=device)
            buckets.setdefault(length, []).append((rows, pick, keep))
    chunks = []
    size = b * per_eval
    for length in sorted(buckets, reverse=True):
        rows = torch.cat([r for r, _, _ in buckets[length]])
        ranks = torch.cat([k for _, k, _ in buckets[length]])
        keep = torch.cat([k for _, _, k in buckets[length]])
        order = torch.argsort(ranks * b + rows)  # removal 0 of every example, then 1, ...
        rows, ranks, keep = rows[order], ranks[order], keep[order]
        for s in range(0, len(rows), size):
            chunks.append((rows[s : s + size], ranks[s : s + size], keep[s : s + size]))
    return _Plan(rank, num_ranks, chunks)


def _group_ids(
    adapter: TransformerAdapter,
    removal: TokenRemoval,
    x: torch.Tensor,
    feature_mask: torch.Tensor | None,
    window: Window | None,
    method: str,
) -> torch.Tensor:
    """Group id ``(B, N)`` of every token at the token point; -1 = never removed."""
    removable = removal.removable
    b, n = removable.shape
    if adapter.modality == "image":
        prefix = adapter.num_prefix_tokens
        h, w = adapter.grid_size(x)
        where = f"the {h}x{w} patch grid ({h * w} patch tokens)"
    else:
        prefix, h, w = 0, 1, n
        where = f"the {n} token positions"
    p = n - prefix
    if feature_mask is not None and window is not None:
        raise ValueError(f"{method}: pass feature_mask or window, not both.")
    if feature_mask is not None:
        ids = _check_feature_mask(feature_mask, b, p, where, method).to(x.device)
    elif window is not None:
        kh, kw = _check_window(window, adapter.modality, h, w, method)
        r = torch.arange(h, device=x.device)[:, None] // kh
        c = torch.arange(w, device=x.device)[None, :] // kw
        ids = (r * (-(-w // kw)) + c).reshape(1, p).expand(b, p)
    else:
        ids = torch.arange(p, device=x.device).expand(b, p)
    groups = torch.full((b, n), -1, dtype=torch.long, device=x.device)
    groups[:, prefix:] = ids
    groups[~removable.to(x.device)] = -1
    return groups


def _check_window(window: Any, modality: str, h: int, w: int, method: str) -> tuple[int, int]:
    def ok(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 1

    if modality == "text":
        if not ok(window):
            raise ValueError(
                f"{method}: for text, window must be a positive int (consecutive positions "
                f"removed together); got {window!r}."
            )
        if window > w:
            raise ValueError(
                f"{method}: window {window} is longer than the sequence of {w} tokens."
            )
        return 1, window
    if ok(window):
        window = (window, window)
    if not (isinstance(window, tuple | list) and len(window) == 2 and all(map(ok, window))):
        raise ValueError(
            f"{method}: window must be a positive int k (k x k patches) or a pair (kh, kw); "
            f"got {window!r}."
        )
    kh, kw = window
    if kh > h or kw > w:
        raise ValueError(
            f"{method}: window {kh}x{kw} is larger than the {h}x{w} patch grid; pass a window "
            f"of at most {h}x{w} patches."
        )
    return kh, kw


def _check_feature_mask(feature_mask: Any, b: int, p: int, where: str, method: str) -> torch.Tensor:
    if not isinstance(feature_mask, torch.Tensor):
        raise ValueError(
            f"{method}: feature_mask must be an integer tensor; got {type(feature_mask).__name__}."
        )
    if (
        feature_mask.is_floating_point()
        or feature_mask.is_complex()
        or feature_mask.dtype == (torch.bool)
    ):
        raise ValueError(
            f"{method}: feature_mask must hold integer group ids; got {feature_mask.dtype}."
        )
    fm = feature_mask
    if fm.dim() == 1:
        fm = fm[None]
    if fm.dim() != 2 or fm.shape[1] != p or fm.shape[0] not in (1, b):
        raise ValueError(
            f"{method}: feature_mask has shape {tuple(feature_mask.shape)}; expected ({p},) or "
            f"({b}, {p}), one group id per token of {where} (row-major patch order)."
        )
    return fm.long().expand(b, p)
