"""TAM: token ablation maps — the score of a token is the logit drop when it is removed.

``TAM_i = f(x) - f(x without token i)``, with tokens removed after position
embeddings are added and before the first block (the sequence becomes N-1,
the other tokens keep their positions), f the raw target logit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from captum.attr import PerturbationAttribution
from captum.log import log_usage
from torch import nn

from captum_ext._scores import normalise_target, progress
from captum_ext.adapters.base import Point, Readout, TransformerAdapter, as_tuple
from captum_ext.attr._precision import accumulation_dtype
from captum_ext.attr._tam_sizing import ACCELERATOR_MEMORY_SHARE as ACCELERATOR_MEMORY_SHARE
from captum_ext.attr._tam_sizing import ACCELERATOR_TOKENS as ACCELERATOR_TOKENS
from captum_ext.attr._tam_sizing import CPU_CANDIDATE_ELEMENTS as CPU_CANDIDATE_ELEMENTS
from captum_ext.attr._tam_sizing import CPU_MEMORY_BYTES as CPU_MEMORY_BYTES
from captum_ext.attr._tam_sizing import OTHER_DEVICE_MEMORY_BYTES as OTHER_DEVICE_MEMORY_BYTES
from captum_ext.attr._tam_sizing import Budget, PassSizer, PassSizing, pass_sizer
from captum_ext.attr.base import OutputKind, TokenMapMethod, check_targets
from captum_ext.capture import Hook, hooks, model_state, replay

__all__ = ["TAM", "PassSizing", "TokenAblation"]

Window = int | tuple[int, int]
RunRows = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]


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
    then runs a stack of shortened rows (any examples, any removals), the
    token-point hook replacing every row's tokens by the clean tokens it
    keeps. How many rows a pass stacks is set by :class:`PassSizing`: a token
    budget (rows x kept sequence length, ``max_tokens_per_pass``), a cap on
    the estimated working memory of the pass (``max_memory_bytes``) and,
    optionally, Captum's ``perturbations_per_eval`` (at most
    ``B * perturbations_per_eval`` rows); the smallest of the three wins, and
    a pass always holds at least one row. ``max_tokens_per_pass="auto"`` (the
    default) picks the budget per device: on CPU the first passes of the
    first call time a ladder of pass sizes (their rows are real work, nothing
    is computed twice), the cheapest per token is kept for the rest and
    cached per (device, threads, dtype, width, sequence length) for the
    process; on accelerators (CUDA, MPS) the budget is
    :data:`ACCELERATOR_TOKENS` without timing, bounded by the memory cap
    (default: half the device's free memory). Images feed each row its whole
    image; text feeds ``input_ids`` and the attention mask
    (``additional_forward_args=(attention_mask,)``, and any other
    ``(B, T, ...)`` extra tensor) with the removed positions cut out, so that
    the model's own masks and a wrapper's mean pooling see the shortened
    sequence. Every row is computed independently, so results equal the
    one-token-per-forward loop for every pass size and every batch size (up
    to floating-point summation order).

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
    forward (exact), supports any batch size, text models (word pieces),
    grouped removal, and several targets from the same forward passes
    (:meth:`attribute_targets`). Cost: the clean pass plus ``B * N``
    shortened rows of ``N - 1`` tokens, stacked into passes as above.

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
        perturbations_per_eval: int | None = None,
        show_progress: bool = False,
        output: OutputKind = "input",
        feature_mask: torch.Tensor | None = None,
        window: Window | None = None,
        max_tokens_per_pass: Budget = "auto",
        max_memory_bytes: float | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor]:
        """Computes token ablation scores for one target per example.

        Args:
            inputs: Images ``(B, C, H, W)`` or ``input_ids (B, T)`` (or a 1-tuple).
            target: Captum target: int, list of ints, tensor ``(B,)``, or
                ``None`` for the class predicted on the clean input.
            additional_forward_args: Extra positional model arguments, e.g.
                ``(attention_mask,)`` for text.
            perturbations_per_eval: Captum's cap: at most this many removals
                of each example per forward pass (at most
                ``B * perturbations_per_eval`` rows). ``None`` (default): no
                such cap, the token budget and the memory cap size the passes.
                When given, all three caps apply.
            show_progress: Show a tqdm progress bar over the forward passes.
            output: ``"input"`` ``(B, 1, H, W)`` / text ``(B, T)``, ``"grid"``
                ``(B, 1, h, w)`` or ``"tokens"`` ``(B, P)``.
            feature_mask: Integer group ids over patch tokens ``(P,)`` or
                ``(B, P)`` (row-major patch order; text: over positions
                ``(T,)`` or ``(B, T)``); each group is removed at once.
                Negative ids mark tokens that are never removed.
            window: Remove ``window x window`` tiles of patches (an int, or
                ``(kh, kw)``); text: runs of ``window`` positions.
            max_tokens_per_pass: Token budget of one forward pass: rows x kept
                sequence length (single removals on ViT-S/16: ``budget // 196``
                rows). ``"auto"``: chosen per device (see the class docstring).
                Below one row's length: one row per pass. Maps do not depend on it.
            max_memory_bytes: Cap on the estimated working memory of one pass
                (activations of its rows, about ``itemsize * L * (12 D + 2 H L)``
                bytes per row of L tokens, width D, H heads, plus its input
                row). ``None``: 2 GiB on CPU, half the free memory on CUDA,
                4 GiB on other devices. One row is always run.

        Returns:
            Signed scores in the requested layout (a 1-tuple if ``inputs`` was one).

        Raises:
            ValueError: A bad argument (pass sizes: :class:`PassSizing`), or a
                group that covers every token of an example.
            RuntimeError: The tokens at the token point do not match the
                input (not a plain ViT or BERT-family encoder).
        """
        sizing = PassSizing(perturbations_per_eval, max_tokens_per_pass, max_memory_bytes)
        grouping = _Grouping(feature_mask, window)
        (maps,) = self._attribute(
            inputs, [target], additional_forward_args, sizing, grouping, output, show_progress
        )
        return (maps,) if isinstance(inputs, tuple) else maps

    def attribute_targets(
        self,
        inputs: torch.Tensor | tuple[torch.Tensor],
        targets: Sequence[Any],
        additional_forward_args: Any = None,
        perturbations_per_eval: int | None = None,
        show_progress: bool = False,
        output: OutputKind = "input",
        feature_mask: torch.Tensor | None = None,
        window: Window | None = None,
        max_tokens_per_pass: Budget = "auto",
        max_memory_bytes: float | None = None,
    ) -> torch.Tensor:
        """TAM for several targets from the same ablated forward passes.

        Every forward pass yields the logits of all classes, so K targets cost
        no more passes than one.

        Args:
            inputs: As in :meth:`attribute`.
            targets: K Captum targets (each an int, a list or a tensor ``(B,)``).
            additional_forward_args: As in :meth:`attribute`; so are
                ``perturbations_per_eval``, ``show_progress``, ``output``,
                ``feature_mask``, ``window``, ``max_tokens_per_pass`` and
                ``max_memory_bytes``.

        Returns:
            ``(K, ...)``: the map of each target stacked on a leading axis.

        Raises:
            ValueError, RuntimeError: As in :meth:`attribute`; ``targets`` not
                a list of targets.
        """
        sizing = PassSizing(perturbations_per_eval, max_tokens_per_pass, max_memory_bytes)
        grouping = _Grouping(feature_mask, window)
        return self._attribute(
            inputs, targets, additional_forward_args, sizing, grouping, output, show_progress
        )

    # ---------------------------------------------------------------- internals
    def _attribute(
        self,
        inputs: torch.Tensor | tuple[torch.Tensor],
        targets: Sequence[Any],
        extra: Any,
        sizing: PassSizing,
        grouping: _Grouping,
        output: OutputKind,
        show_progress: bool,
    ) -> torch.Tensor:
        """Maps ``(K, ...)`` of K targets in the ``output`` layout."""
        x, _ = self._inputs(inputs, extra)
        targets = check_targets(targets, self._method)
        self._check_output(x, output)
        maps = self._scores(x, extra, targets, grouping, sizing, show_progress)
        return torch.stack([self._format(m, x, output) for m in maps])

    def _scores(
        self,
        x: torch.Tensor,
        extra: Any,
        targets: list[Any],
        grouping: _Grouping,
        sizing: PassSizing,
        show_progress: bool,
    ) -> list[torch.Tensor]:
        """Token scores ``(B, N)`` for each target; 0 for tokens never removed."""
        m = self._method
        removal = token_removal(self.adapter, x, extra)
        groups = grouping.ids(self.adapter, removal, x, m)
        with model_state(self.adapter.model, grad=False):
            clean = self._clean_pass(x, extra, groups.shape)
            idx = torch.stack([normalise_target(t, clean.logits, m) for t in targets])  # (K, B)
            clean_sel = clean.logits.gather(1, idx.T).T  # (K, B) f(x) of each target
            plan = _plan(groups, m)
            sizer = self._sizer(x, clean.tokens, sizing)
            table = clean.logits.new_zeros(len(targets), groups.shape[0], plan.num_ranks)

            def run_rows(rows: torch.Tensor, ranks: torch.Tensor, keep: torch.Tensor) -> None:
                ablated = self._ablated_logits(clean, removal, rows, keep)
                table[:, rows, ranks] = _tam_score(clean_sel[:, rows], ablated, idx[:, rows])

            _in_passes(plan, sizer, run_rows, show_progress, m)
        return list(plan.spread(table).unbind(0))

    def _clean_pass(self, x: torch.Tensor, extra: Any, shape: torch.Size) -> _CleanPass:
        """The forward pass on the unmodified batch, recording its tokens ``(B, N, D)``.

        Raises:
            RuntimeError: The tokens at the token point are not ``shape + (D,)``.
        """
        point = self.adapter.token_point()
        record = Hook(point)
        embedding = self.adapter.pixel_embedding()
        embedded = [] if embedding is None else [Hook(Point(embedding, "output", None, "embed"))]
        with hooks([record, *embedded]):
            logits = self.adapter.forward(x, extra)
        tokens = record.tensor
        if tokens is None or tokens.dim() < 3 or tuple(tokens.shape[:2]) != tuple(shape):
            raise RuntimeError(
                f"{self._method}: expected tokens ({shape[0]}, {shape[1]}, D) at {point.name}; "
                f"got {None if tokens is None else tuple(tokens.shape)}. The model's token "
                "sequence does not match its input; TAM supports plain ViTs and BERT-family "
                "encoders."
            )
        if logits.dim() == 1:
            logits = logits[:, None]
        logits = logits.to(accumulation_dtype(logits))  # fp32 logit differences (autocast)
        return _CleanPass(point, tokens, logits, embedding, embedded)

    def _ablated_logits(
        self, clean: _CleanPass, removal: TokenRemoval, rows: torch.Tensor, keep: torch.Tensor
    ) -> torch.Tensor:
        """Logits ``(R, C)`` of R shortened rows: example ``rows``, tokens ``keep`` ``(R, L)``."""
        rows_in, rows_extra = removal.model_args(rows, keep)
        swap = Hook(
            clean.point,
            _keep_tokens(clean.tokens, rows, keep, removal, self._method),
            record=False,
        )
        batch = clean.tokens.shape[0]
        with hooks([swap]), _replaying(clean.embedding, clean.embedded, rows, batch):
            out = self.adapter.forward(rows_in, rows_extra)
        return out[:, None] if out.dim() == 1 else out

    def _sizer(self, x: torch.Tensor, tokens: torch.Tensor, sizing: PassSizing) -> PassSizer:
        """The pass sizer of one call, for this model's heads and input rows."""
        try:
            heads = int(self.adapter.num_heads)
        except (NotImplementedError, AttributeError, TypeError):
            heads = None
        return pass_sizer(sizing, tokens, heads, x[0].numel() * x.element_size())


TAM = TokenAblation
"""Alias of :class:`TokenAblation` under the paper's name."""


def _tam_score(clean: torch.Tensor, ablated: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The TAM formula, ``TAM_i = f(x) - f(x without token i)``, f a raw target logit.

    Args:
        clean: ``(K, R)`` f(x): the clean logit of target k for the example of row r.
        ablated: ``(R, C)`` logits of the R shortened rows (x without token i).
        target: ``(K, R)`` class index of target k for the example of row r.

    Returns:
        ``(K, R)`` logit drops, in logit units: positive when the removed
        token supported the class.
    """
    return clean - ablated.gather(1, target.T).T


@dataclass(frozen=True, eq=False)
class _CleanPass:
    """What the shortened rows reuse from the clean forward pass.

    Attributes:
        point: The token point.
        tokens: ``(B, N, D)`` the clean tokens there.
        logits: ``(B, C)`` clean logits in the accumulation dtype.
        embedding: The pixel-embedding module, or ``None``.
        embedded: The hook that recorded its output (empty without one).
    """

    point: Point
    tokens: torch.Tensor
    logits: torch.Tensor
    embedding: nn.Module | None
    embedded: list[Hook]


def _in_passes(plan: _Plan, sizer: PassSizer, run_rows: RunRows, show: bool, desc: str) -> None:
    """Runs every row of ``plan`` through ``run_rows(rows, ranks, keep)``, pass by pass.

    ``sizer`` picks the rows of each pass; a tqdm bar (``show``) counts the
    passes, its total re-estimated after every pass of a calibration.
    """
    left = plan.num_rows
    with progress(total=sizer.passes(plan.counts), show=show, desc=desc) as bar:
        for length, rows, ranks, keep in plan.buckets:
            start = 0
            while start < len(rows):
                calibrating = sizer.calibrating
                with sizer.next_pass(length, left, len(rows) - start) as count:
                    stop = start + count
                    run_rows(rows[start:stop], ranks[start:stop], keep[start:stop])
                left -= count
                start = stop
                bar.update(1)
                if calibrating:  # the pass size may have changed: re-estimate
                    bar.total = bar.n + sizer.passes(plan.counts, plan.num_rows - left)
                    bar.refresh()


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
    """The removals of one call, as rows to stack into forward passes.

    Attributes:
        rank: ``(B, N)`` index of each token's group within its example, -1
            for tokens never removed.
        num_ranks: Largest number of groups of one example (at least 1).
        buckets: ``(L, rows (R,), ranks (R,), keep (R, L))`` per kept length
            L, longest first; within a bucket, removal 0 of every example,
            then removal 1, ...
    """

    rank: torch.Tensor
    num_ranks: int
    buckets: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]]

    @property
    def num_rows(self) -> int:
        return sum(len(rows) for _, rows, _, _ in self.buckets)

    @property
    def counts(self) -> list[tuple[int, int]]:
        """``(kept length, rows)`` of each bucket."""
        return [(length, len(rows)) for length, rows, _, _ in self.buckets]

    def spread(self, table: torch.Tensor) -> torch.Tensor:
        """Scores per group ``(K, B, num_ranks)`` to scores per token ``(K, B, N)``, 0 if kept."""
        k, (b, n) = table.shape[0], self.rank.shape
        gathered = table.gather(2, self.rank.clamp(min=0).expand(k, b, n))
        return torch.where(self.rank >= 0, gathered, torch.zeros_like(gathered))


def _plan(groups: torch.Tensor, method: str) -> _Plan:
    """One removal per (example, group), bucketed by kept length."""
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
    out = []
    for length in sorted(buckets, reverse=True):
        rows = torch.cat([r for r, _, _ in buckets[length]])
        ranks = torch.cat([k for _, k, _ in buckets[length]])
        keep = torch.cat([k for _, _, k in buckets[length]])
        order = torch.argsort(ranks * b + rows)  # removal 0 of every example, then 1, ...
        out.append((length, rows[order], ranks[order], keep[order]))
    return _Plan(rank, num_ranks, out)


@dataclass(frozen=True, eq=False)
class _Grouping:
    """Which tokens are removed together: ``feature_mask`` or ``window`` (see ``attribute``)."""

    feature_mask: torch.Tensor | None = None
    window: Window | None = None

    def ids(
        self, adapter: TransformerAdapter, removal: TokenRemoval, x: torch.Tensor, method: str
    ) -> torch.Tensor:
        """Group id ``(B, N)`` of every token at the token point; -1 = never removed.

        Raises:
            ValueError: Both ``feature_mask`` and ``window``, or either is malformed.
        """
        feature_mask, window = self.feature_mask, self.window
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
