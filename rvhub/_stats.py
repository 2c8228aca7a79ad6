"""Paired tests on per-example results of two runs over the same examples (no scipy).

- 0/1 metrics (accuracy, exact match): McNemar's test on the discordant pairs. With b examples right only in
  run A and c right only in run B, under H0 each discordant pair goes either way with probability ½, so
  min(b, c) is Binomial(b + c, ½): exact two-sided p = min(1, 2·P[X ≤ min(b, c)]); the mid-p variant
  is 2·P[X ≤ min(b, c)] − P[X = min(b, c)] (less conservative, closer to nominal level).
- other metrics: a paired bootstrap of the mean difference, seeded. The differences are centred (H0: mean
  difference 0) and resampled; p = (1 + #{|mean*| ≥ |observed|}) / (1 + B).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

ALPHA = 0.05  # a difference counts as distinguishable from noise when p < ALPHA


@dataclass(frozen=True)
class PairedResult:
    method: Literal["mcnemar", "bootstrap"]
    n: int  # paired examples
    diff: float  # mean(a) − mean(b)
    p_value: float
    mid_p: float | None = None  # McNemar only
    a_only: int | None = None  # McNemar: examples right in a, wrong in b
    b_only: int | None = None


def binom_cdf_half(k: int, n: int) -> float:
    """P[X ≤ k] for X ~ Binomial(n, ½), exactly (integer sums, one division)."""
    if k < 0:
        return 0.0
    if k >= n:
        return 1.0
    return float(sum(math.comb(n, i) for i in range(k + 1)) / 2**n)


def mcnemar(a: Sequence[float], b: Sequence[float]) -> PairedResult:
    """McNemar's exact test (and mid-p) for paired 0/1 outcomes."""
    if len(a) != len(b):
        raise ValueError("paired samples must have the same length")
    a_only = sum(1 for x, y in zip(a, b, strict=True) if x and not y)
    b_only = sum(1 for x, y in zip(a, b, strict=True) if y and not x)
    m = a_only + b_only
    k = min(a_only, b_only)
    if m == 0:
        p, mid = 1.0, 1.0
    else:
        cdf = binom_cdf_half(k, m)
        pmf = math.comb(m, k) / 2**m
        p, mid = min(1.0, 2 * cdf), min(1.0, 2 * cdf - pmf)
    n = len(a)
    diff = (sum(a) - sum(b)) / n if n else 0.0
    return PairedResult("mcnemar", n, diff, p, mid, a_only, b_only)


def paired_bootstrap(a: Sequence[float], b: Sequence[float], iters: int = 10000, seed: int = 0) -> PairedResult:
    """Two-sided paired bootstrap test of mean(a − b) = 0."""
    import numpy as np

    if len(a) != len(b):
        raise ValueError("paired samples must have the same length")
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    n = d.size
    if n == 0:
        return PairedResult("bootstrap", 0, 0.0, 1.0)
    observed = float(d.mean())
    centred = d - observed
    rng = np.random.default_rng(seed)
    hits = 0
    done = 0
    while done < iters:  # in batches: bounded memory for large n
        k = min(1000, iters - done)
        idx = rng.integers(0, n, size=(k, n))
        means = centred[idx].mean(axis=1)
        hits += int((np.abs(means) >= abs(observed) - 1e-12).sum())
        done += k
    return PairedResult("bootstrap", n, observed, (1 + hits) / (1 + iters))


def is_binary(values: Sequence[float]) -> bool:
    return all(v in (0, 1) for v in values)


def paired_test(a: Sequence[float], b: Sequence[float], seed: int = 0, iters: int = 10000) -> PairedResult:
    """McNemar for 0/1 outcomes, else the paired bootstrap."""
    if is_binary(a) and is_binary(b):
        return mcnemar(a, b)
    return paired_bootstrap(a, b, iters, seed)
