"""Percentile bootstrap intervals that resample whole groups (a cluster bootstrap)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["bootstrap_ci"]


def bootstrap_ci(
    values: Any,
    groups: Any = None,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> tuple[float, float, float]:
    """Mean and percentile bootstrap interval of ``values``, resampling whole groups.

    Groups (e.g. the image a value belongs to) are drawn with replacement; each resample's
    statistic is the mean over all values of the drawn groups. Without ``groups`` every value is
    its own group (the ordinary bootstrap). NaN values are dropped first.

    Args:
        values: ``(N,)`` numbers.
        groups: ``(N,)`` group ids, or ``None``.
        n_boot: Number of resamples; ``0`` gives a NaN interval.
        seed: Seed of the resampling (NumPy ``default_rng``).
        alpha: ``1 - alpha`` is the coverage of the interval.

    Returns:
        ``(mean, lo, hi)``; all NaN when no value is finite.
    """
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    g = np.arange(v.size) if groups is None else np.asarray(groups).reshape(-1)
    if g.shape != v.shape:
        raise ValueError(f"groups: expected shape {v.shape} (as values), got {g.shape}")
    keep = ~np.isnan(v)
    v, g = v[keep], g[keep]
    if v.size == 0:
        return math.nan, math.nan, math.nan
    mean = float(v.mean())
    if n_boot <= 0:
        return mean, math.nan, math.nan
    if float(np.ptp(v)) == 0.0:
        return mean, mean, mean
    _, inv = np.unique(g, return_inverse=True)
    sums = np.bincount(inv, weights=v)
    counts = np.bincount(inv).astype(np.float64)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, sums.size, size=(n_boot, sums.size))
    stats = sums[idx].sum(axis=1) / counts[idx].sum(axis=1)
    lo, hi = np.percentile(stats, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return mean, float(lo), float(hi)
