# Copyright (c) the dex_monai contributors.
# Licensed under the Apache License, Version 2.0.
"""Statistics of the multi-seed transfer benchmark: the mean of a cell with its 95 % Student-t interval, and the paired
difference of two initialisations (e.g. DEX - dense) over tasks x seeds with its t-interval and the Wilcoxon
signed-rank test (:func:`scipy.stats.wilcoxon`). Every function refuses non-finite scores: a NaN score is a failed
cell, and averaging it away would hide the failure."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats as _scipy_stats

__all__ = ["Interval", "PairedDifference", "check_finite", "mean_interval", "paired_difference", "verdict"]


@dataclass(frozen=True)
class Interval:
    """Mean of ``n`` values and its two-sided t-interval ``[low, high]`` (``low == high == mean`` for ``n == 1``)."""

    mean: float
    low: float
    high: float
    n: int

    def format(self, digits: int = 3) -> str:
        if self.n < 2:
            return f"{self.mean:.{digits}f} (n=1)"
        return f"{self.mean:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]"


@dataclass(frozen=True)
class PairedDifference:
    """The paired difference ``a - b``: its mean with t-interval, the Wilcoxon signed-rank test (two-sided; NaN when
    every difference is zero or fewer than 2 pairs) and the counts of pairs where ``a`` is above, below or equal."""

    interval: Interval
    wilcoxon_statistic: float
    wilcoxon_p: float
    wins: int
    losses: int
    ties: int

    def to_dict(self) -> dict:
        return asdict(self)


def check_finite(values: Sequence[float], what: str = "scores") -> np.ndarray:
    """``values`` as a float64 array ``[N]``; raises ``ValueError`` naming the positions of NaN or infinite values."""
    array = np.asarray(values, dtype=np.float64).reshape(-1)
    bad = np.flatnonzero(~np.isfinite(array))
    if bad.size:
        raise ValueError(f"{what}: {bad.size} non-finite value(s) at position(s) {bad.tolist()} ({array[bad].tolist()})")
    return array


def mean_interval(values: Sequence[float], confidence: float = 0.95, what: str = "scores") -> Interval:
    """Mean of ``values`` ``[N]`` and the two-sided Student-t confidence interval
    ``mean +- t_{(1+confidence)/2, N-1} * s / sqrt(N)`` (``s`` the sample standard deviation)."""
    array = check_finite(values, what)
    if array.size == 0:
        raise ValueError(f"{what}: no values")
    mean = float(array.mean())
    if array.size < 2:
        return Interval(mean, mean, mean, 1)
    half = float(_scipy_stats.t.ppf(0.5 + confidence / 2, array.size - 1) * array.std(ddof=1) / math.sqrt(array.size))
    return Interval(mean, mean - half, mean + half, int(array.size))


def paired_difference(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> PairedDifference:
    """Paired difference ``a - b`` of matched scores ``[N]`` (same task, seed, regime and evaluation at each position)."""
    x, y = check_finite(a, "first scores"), check_finite(b, "second scores")
    if x.shape != y.shape:
        raise ValueError(f"paired scores need the same length, got {x.size} and {y.size}")
    diff = x - y
    statistic, p_value = float("nan"), float("nan")
    if diff.size >= 2 and np.any(diff != 0):
        test = _scipy_stats.wilcoxon(x, y, alternative="two-sided")
        statistic, p_value = float(test.statistic), float(test.pvalue)
    return PairedDifference(
        mean_interval(diff, confidence, "differences"), statistic, p_value,
        int((diff > 0).sum()), int((diff < 0).sum()), int((diff == 0).sum()),
    )


def verdict(result: PairedDifference, first: str = "DEX", second: str = "dense", alpha: float = 0.05) -> str:
    """One plain sentence: ``first`` wins (interval above 0 and Wilcoxon p < alpha), loses (below 0, p < alpha), or the
    two cannot be told apart at this size."""
    iv = result.interval
    summary = (f"{first} - {second} = {iv.mean:+.4f}, 95 % CI [{iv.low:+.4f}, {iv.high:+.4f}] over {iv.n} pairs "
               f"({result.wins} up, {result.losses} down, {result.ties} tied), Wilcoxon p = {result.wilcoxon_p:.3g}")
    significant = not math.isnan(result.wilcoxon_p) and result.wilcoxon_p < alpha and iv.n >= 2
    if significant and iv.low > 0:
        return f"{first} wins: {summary}."
    if significant and iv.high < 0:
        return f"{first} loses: {summary}."
    return f"{first} and {second} cannot be told apart at this size: {summary}."
