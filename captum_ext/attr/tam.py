"""TAM: token ablation maps — the score of a token is the logit drop when it is removed.

``TAM_i = f(x) - f(x without token i)``, with tokens removed after position
embeddings are added and before the first block (the sequence becomes N-1,
the other tokens keep their positions), f the raw target logit.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

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
Budget = int | Literal["auto"]


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
    keeps. How many rows a pass stacks is set by a token budget (rows x kept
    sequence length, ``max_tokens_per_pass``), a cap on the estimated working
    memory of the pass (``max_memory_bytes``) and, optionally, Captum's
    ``perturbations_per_eval`` (at most ``B * perturbations_per_eval`` rows);
    the smallest of the three wins, and a pass always holds at least one row.
    ``max_tokens_per_pass="auto"`` (the default) picks the budget per device:
    on CPU, where big stacks fall out of cache (ViT-S/16 at 224 px, 2
    threads: 39 ms per row at 8 rows, 55 ms at 128), the first passes of the
    first call time a ladder of pass sizes (their rows are real work, nothing
    is computed twice), the cheapest per token is kept for the rest and
    cached per (device, threads, dtype, width, sequence length) for the
    process; on accelerators (CUDA, MPS), where launches dominate, the budget
    is :data:`ACCELERATOR_TOKENS` without timing, bounded by the memory cap
    (default: half the device's free memory). Images
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
    ``B * N`` shortened rows of ``N - 1`` tokens, stacked into passes as above.

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
                sequence length (a pass of single removals on ViT-S/16 holds
                ``budget // 196`` rows). ``"auto"``: measured per device (see
                the class docstring). A budget below one row's length runs
                one row per pass. Maps do not depend on it.
            max_memory_bytes: Cap on the estimated working memory of one pass
                (activations of its rows, about ``itemsize * L * (12 D + 2 H L)``
                bytes per row of L tokens, width D, H heads, plus its input
                row). ``None``: 2 GiB on CPU, half the free memory on CUDA,
                4 GiB on other devices. One row is always run.

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
            max_tokens_per_pass,
            max_memory_bytes,
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
            additional_forward_args, perturbations_per_eval, show_progress,
                output, feature_mask, window, max_tokens_per_pass,
                max_memory_bytes: As in :meth:`attribute`.

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
            max_tokens_per_pass,
            max_memory_bytes,
        )
        return torch.stack([self._format(m, x, output) for m in maps])

    # ---------------------------------------------------------------- internals
    def _run(
        self,
        x: torch.Tensor,
        targets: list[Any],
        extra: Any,
        perturbations_per_eval: int | None,
        show_progress: bool,
        feature_mask: torch.Tensor | None,
        window: Window | None,
        output: OutputKind,
        max_tokens_per_pass: Budget = "auto",
        max_memory_bytes: float | None = None,
    ) -> list[torch.Tensor]:
        """Token scores ``(B, N)`` for each target."""
        m = self._method
        _check_pass_args(perturbations_per_eval, max_tokens_per_pass, max_memory_bytes, m)
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
            plan = _plan(groups, m)
            sizer = self._sizer(
                x, tokens, perturbations_per_eval, max_tokens_per_pass, max_memory_bytes
            )
            table = clean.new_zeros(len(targets), b, plan.num_ranks)

            def run(rows: torch.Tensor, ranks: torch.Tensor, keep: torch.Tensor) -> None:
                rows_in, rows_extra = removal.model_args(rows, keep)
                swap = Hook(point, _keep_tokens(tokens, rows, keep, removal, m), record=False)
                with hooks([swap]), _replaying(embedding, embedded, rows, b):
                    out = self.adapter.forward(rows_in, rows_extra)
                if out.dim() == 1:
                    out = out[:, None]
                ablated = out.gather(1, idx[:, rows].T)  # (R, K)
                table[:, rows, ranks] = clean_sel[:, rows] - ablated.T

            left = plan.num_rows
            with progress(total=sizer.passes(plan.buckets), show=show_progress, desc=m) as bar:
                for length, rows, ranks, keep in plan.buckets:
                    start = 0
                    while start < len(rows):
                        calibrating = sizer.calibrating
                        size, timed = sizer.next_rows(length, left)
                        stop = min(start + size, len(rows))
                        began = _clock()
                        run(rows[start:stop], ranks[start:stop], keep[start:stop])
                        if timed:
                            sizer.record(stop - start, length, _clock() - began)
                        left -= stop - start
                        start = stop
                        bar.update(1)
                        if calibrating:  # the pass size may have changed: re-estimate
                            bar.total = bar.n + sizer.passes(plan.buckets, plan.num_rows - left)
                            bar.refresh()
        rank = plan.rank  # (B, N), -1 = never removed
        gathered = table.gather(2, rank.clamp(min=0).expand(len(targets), b, n))
        maps = torch.where(rank >= 0, gathered, torch.zeros_like(gathered))
        return list(maps.unbind(0))

    def _sizer(
        self,
        x: torch.Tensor,
        tokens: torch.Tensor,
        perturbations_per_eval: int | None,
        max_tokens_per_pass: Budget,
        max_memory_bytes: float | None,
    ) -> _PassSizer:
        """The pass sizing of one call: caps from the arguments, the budget per device."""
        b, n, width = tokens.shape[0], tokens.shape[1], tokens.shape[-1]
        try:
            heads = int(self.adapter.num_heads)
        except (NotImplementedError, AttributeError, TypeError):
            heads = max(1, width // 64)
        input_row = x[0].numel() * x.element_size()
        itemsize = tokens.element_size()

        def row_bytes(length: int) -> int:
            return _row_bytes(length, width, heads, itemsize) + input_row

        device = tokens.device
        cap = _default_memory_cap(device) if max_memory_bytes is None else max_memory_bytes
        per_pass = None if perturbations_per_eval is None else b * perturbations_per_eval
        if max_tokens_per_pass != "auto":
            return _PassSizer(row_bytes, cap, per_pass, budget=max_tokens_per_pass)
        key = _calibration_key(device, tokens.dtype, width, n)
        budget = _auto_budget(device, key)
        if budget is not None:
            return _PassSizer(row_bytes, cap, per_pass, budget=budget)
        ladder = tuple(max(1, e // width) for e in CPU_CANDIDATE_ELEMENTS)
        return _PassSizer(row_bytes, cap, per_pass, candidates=ladder, key=key)


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


# ------------------------------------------------------------------ pass sizing
ACCELERATOR_TOKENS = 1 << 19
"""Token budget of ``max_tokens_per_pass="auto"`` on accelerators (CUDA, MPS, ...).

Launches dominate there, so passes are as big as the memory cap allows, up
to this many tokens: 2674 rows of ViT-S/16's 196 tokens per pass, over 300x
the rows of the one-token-per-forward loop at batch 8.
"""

CPU_CANDIDATE_ELEMENTS = tuple(1 << k for k in range(17, 26))
"""Pass sizes the CPU calibration times, in activation elements (tokens x width), ascending.

Powers of two from 2**17 to 2**25; divided by the model's width they give the
candidate token budgets: ViT-S/16 (width 384, 196 tokens per row) tries 1, 3,
6, 13, 27, 55, 111, 222 and 445 rows per pass, stopping at the first that
costs clearly more per token than the best so far.
"""

CPU_MEMORY_BYTES = 2 << 30
"""Default cap on the estimated working memory of one pass on CPU (2 GiB)."""

OTHER_DEVICE_MEMORY_BYTES = 4 << 30
"""Default memory cap on accelerators whose free memory torch cannot report (4 GiB)."""

ACCELERATOR_MEMORY_SHARE = 0.5
"""Share of a CUDA device's free memory one pass may use by default."""

_RISE = 1.1  # the CPU ladder stops at the first size costing 10% more per token than the best
_SAMPLES = 2  # passes timed per candidate size and round; the fastest counts
_CALIBRATED: dict[tuple, int] = {}  # calibration key -> token budget, for the process
_clock = time.perf_counter


def _row_bytes(length: int, width: int, heads: int, itemsize: int) -> int:
    """Estimated working memory of one shortened row of ``length`` tokens in a forward pass.

    A block holds about a dozen ``(L, D)`` activations at its peak (input,
    norm, qkv, attention output, the MLP's 4D hidden layer and its
    activation, residuals) and, without fused attention, two ``(H, L, L)``
    score matrices.
    """
    return itemsize * length * (12 * width + 2 * heads * length)


def _calibration_key(device: torch.device, dtype: torch.dtype, width: int, length: int) -> tuple:
    """What a calibrated token budget depends on: device, CPU threads, dtype, width, length."""
    threads = torch.get_num_threads() if device.type == "cpu" else 0
    return (device.type, device.index, threads, str(dtype), width, length)


def _auto_budget(device: torch.device, key: tuple) -> int | None:
    """Token budget of ``"auto"``: a cached calibration, the accelerator default, or ``None``.

    ``None`` means: calibrate (CPU, not yet measured for this key).
    """
    if device.type != "cpu":
        return ACCELERATOR_TOKENS
    return _CALIBRATED.get(key)


def _default_memory_cap(device: torch.device) -> float:
    """Memory cap of a pass when ``max_memory_bytes`` is not given."""
    if device.type == "cpu":
        return CPU_MEMORY_BYTES
    if device.type == "cuda":
        try:
            free, _ = torch.cuda.mem_get_info(device)
        except (RuntimeError, AssertionError, AttributeError):
            return OTHER_DEVICE_MEMORY_BYTES
        return ACCELERATOR_MEMORY_SHARE * free
    return OTHER_DEVICE_MEMORY_BYTES


@dataclass
class _PassSizer:
    """Rows of each forward pass: the caps, and on CPU the calibration of the token budget.

    With ``budget`` given, every pass of kept length L holds
    ``min(budget // L, memory_cap // row_bytes(L), per_pass)`` rows (at least
    one). With ``candidates`` (ascending token budgets), the first passes
    time them on real rows: the smallest twice, then each larger one against
    the best so far, alternating (new, best, new, best) so that a change of
    load on a shared machine hits both alike; each counts its faster pass.
    The ladder stops at the first candidate costing ``_RISE`` times the best
    per token, at its end, or when a cap or the remaining work keeps the next
    candidate from being measured; the best candidate is then the budget for
    the rest, cached under ``key`` when the ladder stopped on its own.
    """

    row_bytes: Callable[[int], int]
    memory_cap: float
    per_pass: int | None = None
    budget: float | None = None
    candidates: tuple[int, ...] = ()
    key: tuple | None = None
    best: int | None = None  # index of the best candidate so far
    _trying: int = 0  # index of the candidate being measured
    _queue: list[int] = field(default_factory=list)  # candidates of the passes left to time
    _samples: dict[int, list[float]] = field(default_factory=dict)  # seconds per token

    def __post_init__(self) -> None:
        if self.calibrating:
            self._queue = [0] * _SAMPLES

    def rows(self, length: int, budget: float) -> tuple[int, bool]:
        """Rows per pass of kept length ``length`` under ``budget``; and whether a cap bound."""
        want = max(1, int(budget // length)) if math.isfinite(budget) else math.inf
        limit = min(
            math.inf if self.per_pass is None else self.per_pass,
            max(1, int(self.memory_cap // self.row_bytes(length))),
        )
        if want <= limit:
            return int(want), False
        return int(limit), True

    @property
    def calibrating(self) -> bool:
        return self.budget is None

    def next_rows(self, length: int, left: int) -> tuple[int, bool]:
        """Rows of the next pass (``left`` rows remain in all) and whether to time it."""
        if self.calibrating:
            capped = self.rows(length, self.candidates[self._trying])[1]
            need = sum(self.rows(length, self.candidates[k])[0] for k in self._queue)
            if capped or left < need:  # the candidate can't be measured as asked
                self._finish(cache=False)
            else:
                return self.rows(length, self.candidates[self._queue[0]])[0], True
        return self.rows(length, self.budget)[0], False

    def record(self, rows: int, length: int, seconds: float) -> None:
        """Adds the time of a calibration pass (the one :meth:`next_rows` asked for)."""
        k = self._queue.pop(0)
        self._samples.setdefault(k, []).append(seconds / (rows * length))
        if self._queue:
            return
        new = self._trying
        if self.best is None:
            self.best = new
        else:
            cost, best = min(self._samples[new]), min(self._samples[self.best])
            if cost > _RISE * best:
                self._finish(cache=True)
                return
            if cost < best:
                self.best = new
        self._samples = {}
        self._trying += 1
        if self._trying == len(self.candidates):
            self._finish(cache=True)
            return
        self._queue = [self._trying, self.best] * _SAMPLES

    def _finish(self, cache: bool) -> None:
        if self.best is None:  # too little work to time: everything the caps allow per pass
            self.budget = math.inf
            return
        self.budget = self.candidates[self.best]
        if cache and self.key is not None:
            _CALIBRATED[self.key] = self.budget

    def passes(self, buckets: list, done: int = 0) -> int:
        """Passes left for ``buckets`` after their first ``done`` rows, at the current sizes."""
        budget = self.candidates[self._queue[0]] if self.calibrating else self.budget
        total = 0
        for length, rows, _, _ in buckets:
            count = max(0, len(rows) - done)
            done = max(0, done - len(rows))
            total += -(-count // self.rows(length, budget)[0])
        return total


def _check_pass_args(
    perturbations_per_eval: Any, max_tokens_per_pass: Any, max_memory_bytes: Any, method: str
) -> None:
    def positive_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 1

    if perturbations_per_eval is not None and not positive_int(perturbations_per_eval):
        raise ValueError(
            f"{method}: perturbations_per_eval must be None or a positive int (removals of each "
            f"example per forward pass); got {perturbations_per_eval!r}."
        )
    if max_tokens_per_pass != "auto" and not positive_int(max_tokens_per_pass):
        raise ValueError(
            f"{method}: max_tokens_per_pass must be 'auto' or a positive int (rows x tokens per "
            f"forward pass); got {max_tokens_per_pass!r}."
        )
    if max_memory_bytes is not None and not (
        isinstance(max_memory_bytes, int | float)
        and not isinstance(max_memory_bytes, bool)
        and math.isfinite(max_memory_bytes)
        and max_memory_bytes > 0
    ):
        raise ValueError(
            f"{method}: max_memory_bytes must be None or a positive number of bytes; got "
            f"{max_memory_bytes!r}."
        )


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
