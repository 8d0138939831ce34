"""Paired statistics of a sweep: t-interval, exact Wilcoxon signed-rank, Fisher's exact test.

The t-interval and Fisher's test are ``scipy.stats``'. The Wilcoxon p-value is the *exact conditional*
one: the null distribution of ``W+`` given the observed mid-ranks (ties) is enumerated by dynamic
programming. ``scipy.stats.wilcoxon(method="exact")`` uses the tie-free distribution instead (its p differs
when differences tie, as nested-score differences often do), and its exact permutation method enumerates
all ``2^n`` sign patterns (infeasible for the 32–48 pairs pooled here); the tests check this function
against that enumeration on small samples with ties and against ``method="exact"`` without ties.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from scipy import stats

PURE_NESTED = 0.9
"""A seed whose nested score is above this has learned the NESTED algorithm."""


def t_interval(differences: Sequence[float]) -> tuple[float, float, float]:
    """Mean of ``differences`` and its 95 % Student-t interval ``(mean, low, high)`` (NaN bounds if n < 2)."""
    n = len(differences)
    mean = sum(differences) / n
    if n < 2:
        return mean, math.nan, math.nan
    sd = math.sqrt(sum((d - mean) ** 2 for d in differences) / (n - 1))
    half = float(stats.t.ppf(0.975, n - 1)) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def wilcoxon_signed_rank(differences: Sequence[float]) -> tuple[float, float]:
    """``(W+, two-sided exact p)`` of the Wilcoxon signed-rank test (zeros dropped, mid-ranks for ties).

    ``p = 2·min(P(W+ ≤ w), P(W+ ≥ w))`` (capped at 1) under the null that each non-zero difference's sign is
    ± with probability ½, its rank fixed; the distribution is counted exactly over doubled (integer)
    mid-ranks. p = 1 when no non-zero differences remain.
    """
    d = [x for x in differences if x != 0]
    if not d:
        return 0.0, 1.0
    order = sorted(range(len(d)), key=lambda i: abs(d[i]))
    ranks2 = [0] * len(d)  # 2 × mid-rank
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and abs(d[order[j + 1]]) == abs(d[order[i]]):
            j += 1
        for k in range(i, j + 1):
            ranks2[order[k]] = i + j + 2  # (i+1 + j+1) = 2 × mid-rank
        i = j + 1
    w2 = sum(r for r, x in zip(ranks2, d, strict=True) if x > 0)
    counts = {0: 1}
    for r in ranks2:
        new: dict[int, int] = dict(counts)
        for s, c in counts.items():
            new[s + r] = new.get(s + r, 0) + c
        counts = new
    total = 2 ** len(d)
    low = sum(c for s, c in counts.items() if s <= w2) / total
    high = sum(c for s, c in counts.items() if s >= w2) / total
    return w2 / 2, min(1.0, 2 * min(low, high))


def fisher_exact(a: int, b: int, c: int, d: int) -> float:
    """Two-sided Fisher exact p of the 2×2 table ``[[a, b], [c, d]]`` (``scipy.stats.fisher_exact``)."""
    return float(stats.fisher_exact([[a, b], [c, d]], alternative="two-sided").pvalue)


def nested_counts_fisher(
    arm: Sequence[float], baseline: Sequence[float], above: float
) -> tuple[int, int, float]:
    """Seeds scoring above ``above`` in ``arm`` and in ``baseline`` (paired, same length), and the two-sided
    Fisher exact p of the 2×2 table (NESTED or not) × (arm or baseline)."""
    n = len(arm)
    in_arm = sum(score > above for score in arm)
    in_baseline = sum(score > above for score in baseline)
    return in_arm, in_baseline, fisher_exact(in_arm, n - in_arm, in_baseline, n - in_baseline)
