"""Timing helpers shared by the benchmark scripts (median wall time of repeated calls)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def median_time(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time in seconds of ``fn()`` over ``repeats`` calls, after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def table(rows: list[tuple[str, float]], base: dict[str, float]) -> str:
    """Markdown table of seconds and ratios against each named baseline."""
    names = list(base)
    head = "| method | seconds | " + " | ".join(f"× {n}" for n in names) + " |"
    sep = "|---|---:|" + "---:|" * len(names)
    lines = [head, sep]
    for name, sec in rows:
        ratios = " | ".join(f"{sec / base[n]:.2f}" for n in names)
        lines.append(f"| {name} | {sec:.4f} | {ratios} |")
    return "\n".join(lines)
