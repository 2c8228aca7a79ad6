"""The paired tests of `rvhub eval` against answers worked out by hand."""

from __future__ import annotations

import pytest

from rvhub._stats import binom_cdf_half, mcnemar, paired_bootstrap, paired_test


def _pairs(both: int, a_only: int, b_only: int, neither: int) -> tuple[list[int], list[int]]:
    a = [1] * both + [1] * a_only + [0] * b_only + [0] * neither
    b = [1] * both + [0] * a_only + [1] * b_only + [0] * neither
    return a, b


def test_mcnemar_by_hand():
    # 8 right only with a, 2 right only with b: X ~ Bin(10, 1/2), P[X <= 2] = (1 + 10 + 45) / 1024
    a, b = _pairs(20, 8, 2, 10)
    r = mcnemar(a, b)
    assert (r.a_only, r.b_only, r.n) == (8, 2, 40)
    assert r.p_value == 2 * 56 / 1024 == 0.109375
    assert r.mid_p == 2 * 56 / 1024 - 45 / 1024 == 0.0654296875
    assert r.diff == pytest.approx(6 / 40)
    # 5 to 0: p = 2 / 32, mid-p = 1 / 32
    r = mcnemar(*_pairs(0, 5, 0, 3))
    assert (r.p_value, r.mid_p) == (0.0625, 0.03125)
    # symmetric or no discordant pairs: no evidence at all
    assert mcnemar(*_pairs(4, 3, 3, 4)).p_value == 1.0 == mcnemar(*_pairs(4, 3, 3, 4)).mid_p
    assert mcnemar(*_pairs(4, 0, 0, 4)).p_value == 1.0


def test_binomial_cdf():
    assert binom_cdf_half(0, 3) == 1 / 8 and binom_cdf_half(1, 3) == 4 / 8 and binom_cdf_half(3, 3) == 1.0
    assert binom_cdf_half(-1, 3) == 0.0


def test_paired_bootstrap():
    a = [0.5, 1.25, 2.0, 0.75, 1.5] * 4
    same = paired_bootstrap(a, a, iters=500)
    assert same.p_value == 1.0 and same.diff == 0.0
    # a constant shift: every centred resample has mean 0, none reaches the observed 1.0
    shifted = paired_bootstrap([x + 1.0 for x in a], a, iters=500)
    assert shifted.diff == pytest.approx(1.0) and shifted.p_value == 1 / 501
    noisy = [x + (0.3 if i % 2 else -0.25) for i, x in enumerate(a)]
    p1, p2 = paired_bootstrap(noisy, a, iters=2000, seed=3), paired_bootstrap(noisy, a, iters=2000, seed=3)
    assert p1 == p2 and 0.0 < p1.p_value < 1.0
    assert paired_test(noisy, a).method == "bootstrap" and paired_test(*_pairs(1, 2, 0, 1)).method == "mcnemar"
