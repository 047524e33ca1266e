"""Pass sizing of TAM: how many shortened rows one forward pass stacks.

:class:`PassSizing` holds the caller's settings; :func:`pass_sizer` turns them
into a :class:`PassSizer` for one call, which gives the rows of every pass
from three caps (token budget, memory cap, Captum's ``perturbations_per_eval``)
and, on CPU with ``max_tokens_per_pass="auto"``, calibrates the token budget on
the first passes and caches it for the process.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

__all__ = ["PassSizing"]

Budget = int | Literal["auto"]

ACCELERATOR_TOKENS = 1 << 19
"""Token budget of ``max_tokens_per_pass="auto"`` on accelerators (CUDA, MPS, ...).

Passes there are as big as the memory cap allows, up to this many tokens
(rows x kept sequence length); nothing is timed.
"""

CPU_CANDIDATE_ELEMENTS = tuple(1 << k for k in range(17, 26))
"""Pass sizes the CPU calibration times, in activation elements (tokens x width), ascending.

Powers of two from 2**17 to 2**25; divided by the model's width they give the
candidate token budgets (:func:`cpu_ladder`).
"""

CPU_MEMORY_BYTES = 2 << 30
"""Default cap on the estimated working memory of one pass on CPU (2 GiB)."""

OTHER_DEVICE_MEMORY_BYTES = 4 << 30
"""Default memory cap on accelerators whose free memory torch cannot report (4 GiB)."""

ACCELERATOR_MEMORY_SHARE = 0.5
"""Share of a CUDA device's free memory one pass may use by default."""

_METHOD = "TokenAblation"  # the method these settings belong to, in error messages
_RISE = 1.1  # the CPU ladder stops at the first size costing 10% more per token than the best
_SAMPLES = 2  # passes timed per candidate size and round; the fastest counts
_CALIBRATED: dict[tuple, int] = {}  # calibration key -> token budget, for the process
_clock = time.perf_counter


def _positive_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


@dataclass(frozen=True)
class PassSizing:
    """How TAM sizes its forward passes: the pass-size arguments of ``attribute``.

    A pass stacks shortened rows; it holds the fewest rows any of the three
    caps allows, and always at least one. None of them changes the maps.

    Attributes:
        perturbations_per_eval: Captum's cap: at most this many removals of
            each example per pass (``B * perturbations_per_eval`` rows).
            ``None``: no such cap.
        max_tokens_per_pass: Token budget of one pass, rows x kept sequence
            length. ``"auto"``: :data:`ACCELERATOR_TOKENS` on accelerators; on
            CPU, calibrated on the first passes and cached per (device,
            threads, dtype, width, sequence length).
        max_memory_bytes: Cap on the estimated working memory of one pass, in
            bytes (:class:`RowCost`). ``None``: :func:`default_memory_cap`.

    Raises:
        ValueError: An argument is out of range (the message names it and
            what it supports).
    """

    perturbations_per_eval: int | None = None
    max_tokens_per_pass: Budget = "auto"
    max_memory_bytes: float | None = None

    def __post_init__(self) -> None:
        ppe, budget, memory = (
            self.perturbations_per_eval,
            self.max_tokens_per_pass,
            self.max_memory_bytes,
        )
        if ppe is not None and not _positive_int(ppe):
            raise ValueError(
                f"{_METHOD}: perturbations_per_eval must be None or a positive int (removals of "
                f"each example per forward pass); got {ppe!r}."
            )
        if budget != "auto" and not _positive_int(budget):
            raise ValueError(
                f"{_METHOD}: max_tokens_per_pass must be 'auto' or a positive int (rows x tokens "
                f"per forward pass); got {budget!r}."
            )
        if memory is not None and not (
            isinstance(memory, int | float)
            and not isinstance(memory, bool)
            and math.isfinite(memory)
            and memory > 0
        ):
            raise ValueError(
                f"{_METHOD}: max_memory_bytes must be None or a positive number of bytes; got "
                f"{memory!r}."
            )

    def rows_cap(self, batch: int) -> int | None:
        """Captum's cap in rows per pass for a batch of ``batch`` examples (``None``: none)."""
        if self.perturbations_per_eval is None:
            return None
        return batch * self.perturbations_per_eval

    def memory_cap(self, device: torch.device) -> float:
        """Bytes one pass may use on ``device``: the given cap or the device default."""
        if self.max_memory_bytes is None:
            return default_memory_cap(device)
        return self.max_memory_bytes


# ------------------------------------------------------------------ per-device defaults
def row_bytes(length: int, width: int, heads: int, itemsize: int) -> int:
    """Estimated working memory, in bytes, of one row of ``length`` tokens in a forward pass.

    ``itemsize * L * (12 D + 2 H L)``: about a dozen ``(L, D)`` activations
    of a block at its peak and, without fused attention, two ``(H, L, L)``
    score matrices.
    """
    return itemsize * length * (12 * width + 2 * heads * length)


@dataclass(frozen=True)
class RowCost:
    """Bytes of one shortened row of a model: :func:`row_bytes` plus its input row.

    Attributes:
        width: Token width D.
        heads: Attention heads H.
        itemsize: Bytes per element of the tokens.
        input_bytes: Bytes of one example of the model's input.
    """

    width: int
    heads: int
    itemsize: int
    input_bytes: int

    def __call__(self, length: int) -> int:
        return row_bytes(length, self.width, self.heads, self.itemsize) + self.input_bytes


def calibration_key(device: torch.device, dtype: torch.dtype, width: int, length: int) -> tuple:
    """What a calibrated token budget depends on: device, CPU threads, dtype, width, length."""
    threads = torch.get_num_threads() if device.type == "cpu" else 0
    return (device.type, device.index, threads, str(dtype), width, length)


def auto_budget(device: torch.device, key: tuple) -> int | None:
    """Token budget of ``"auto"``: the accelerator default, a cached calibration, or ``None``.

    ``None`` means: calibrate (CPU, not yet measured for ``key``).
    """
    if device.type != "cpu":
        return ACCELERATOR_TOKENS
    return _CALIBRATED.get(key)


def default_memory_cap(device: torch.device) -> float:
    """Memory cap of a pass without ``max_memory_bytes``, in bytes.

    :data:`CPU_MEMORY_BYTES` on CPU; on CUDA :data:`ACCELERATOR_MEMORY_SHARE`
    of the free memory; :data:`OTHER_DEVICE_MEMORY_BYTES` elsewhere and when
    CUDA cannot report its free memory.
    """
    if device.type == "cpu":
        return CPU_MEMORY_BYTES
    if device.type == "cuda":
        try:
            free, _ = torch.cuda.mem_get_info(device)
        except (RuntimeError, AssertionError, AttributeError):
            return OTHER_DEVICE_MEMORY_BYTES
        return ACCELERATOR_MEMORY_SHARE * free
    return OTHER_DEVICE_MEMORY_BYTES


def cpu_ladder(width: int) -> tuple[int, ...]:
    """Candidate token budgets of the CPU calibration for tokens of width ``width``, ascending."""
    return tuple(max(1, e // width) for e in CPU_CANDIDATE_ELEMENTS)


def pass_sizer(
    sizing: PassSizing, tokens: torch.Tensor, heads: int | None, input_bytes: int
) -> PassSizer:
    """The sizer of one call.

    Args:
        sizing: The caller's settings.
        tokens: The clean tokens ``(B, N, D)`` at the token point.
        heads: Attention heads of the model; ``None``: estimated as ``D // 64``.
        input_bytes: Bytes of one example of the model's input.

    Returns:
        A sizer with a fixed budget (an int, a cached calibration, the
        accelerator default) or, on CPU with ``"auto"`` and nothing cached, one
        that calibrates.
    """
    b, n, width = tokens.shape[0], tokens.shape[1], tokens.shape[-1]
    heads = max(1, width // 64) if heads is None else heads
    cost = RowCost(width, heads, tokens.element_size(), input_bytes)
    device = tokens.device
    cap, per_pass = sizing.memory_cap(device), sizing.rows_cap(b)
    if sizing.max_tokens_per_pass != "auto":
        return PassSizer(cost, cap, per_pass, budget=sizing.max_tokens_per_pass)
    key = calibration_key(device, tokens.dtype, width, n)
    budget = auto_budget(device, key)
    if budget is not None:
        return PassSizer(cost, cap, per_pass, budget=budget)
    return PassSizer(cost, cap, per_pass, candidates=cpu_ladder(width), key=key)


# ------------------------------------------------------------------ the sizer
@dataclass
class PassSizer:
    """Rows of each forward pass of one call: the caps, and on CPU the budget's calibration.

    With ``budget`` given, every pass of kept length L holds
    ``min(budget // L, memory_cap // row_cost(L), per_pass)`` rows (at least
    one). With ``candidates`` (ascending token budgets), the first passes
    time them on real rows: the smallest twice, then each larger one against
    the best so far, alternating (new, best, new, best) so that a change of
    load on a shared machine hits both alike; each counts its faster pass.
    The ladder stops at the first candidate costing ``_RISE`` times the best
    per token, at its end, or when a cap or the remaining work keeps the next
    candidate from being measured; the best candidate is then the budget for
    the rest, cached under ``key`` when the ladder stopped on its own.

    Attributes:
        row_cost: Bytes of one row of kept length L (e.g. a :class:`RowCost`).
        memory_cap: Bytes one pass may use.
        per_pass: Captum's cap in rows, or ``None``.
        budget: Token budget; ``None`` while calibrating, ``inf`` when there
            was too little work to time anything.
        candidates: Token budgets to calibrate over, ascending.
        key: Cache key of the calibration (:func:`calibration_key`).
        best: Index of the best candidate so far.
    """

    row_cost: Callable[[int], int]
    memory_cap: float
    per_pass: int | None = None
    budget: float | None = None
    candidates: tuple[int, ...] = ()
    key: tuple | None = None
    best: int | None = None
    _trying: int = 0  # index of the candidate being measured
    _queue: list[int] = field(default_factory=list)  # candidates of the passes left to time
    _samples: dict[int, list[float]] = field(default_factory=dict)  # seconds per token

    def __post_init__(self) -> None:
        if self.calibrating:
            self._queue = [0] * _SAMPLES

    @property
    def calibrating(self) -> bool:
        return self.budget is None

    def rows(self, length: int, budget: float) -> tuple[int, bool]:
        """Rows per pass of kept length ``length`` under ``budget``; and whether a cap bound."""
        want = max(1, int(budget // length)) if math.isfinite(budget) else math.inf
        limit = min(
            math.inf if self.per_pass is None else self.per_pass,
            max(1, int(self.memory_cap // self.row_cost(length))),
        )
        if want <= limit:
            return int(want), False
        return int(limit), True

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

    @contextlib.contextmanager
    def next_pass(self, length: int, left: int, available: int) -> Iterator[int]:
        """Rows of the next pass, timed for the calibration when it asks.

        Yields ``min(rows, available)`` (``available``: rows left in the
        current bucket; ``left``: in all); the caller runs the pass inside the
        block. The time is recorded only when the block completes.
        """
        size, timed = self.next_rows(length, left)
        count = min(size, available)
        began = _clock()
        yield count
        if timed:
            self.record(count, length, _clock() - began)

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

    def passes(self, counts: Sequence[tuple[int, int]], done: int = 0) -> int:
        """Passes left after the first ``done`` rows, at the current sizes.

        Args:
            counts: ``(kept length, rows)`` of each bucket, in the order run.
            done: Rows already run.
        """
        budget = self.candidates[self._queue[0]] if self.calibrating else self.budget
        total = 0
        for length, rows in counts:
            count = max(0, rows - done)
            done = max(0, done - rows)
            total += -(-count // self.rows(length, budget)[0])
        return total
