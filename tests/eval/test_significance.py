"""Paired bootstrap and McNemar's exact test on constructed cases with known answers."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import binomtest

from cscr.eval import metrics as M
from cscr.eval.significance import (
    binom_two_sided_half,
    mcnemar_exact,
    paired_bootstrap_audc,
    point_at_budget,
    resample_weights,
)


@pytest.mark.parametrize("k,n", [(0, 0), (0, 1), (1, 1), (0, 5), (2, 12), (6, 12), (7, 12), (3, 30), (40, 100),
                                 (480, 1000), (1500, 3100)])
def test_exact_binomial_p_matches_scipy(k, n):
    expected = 1.0 if n == 0 else binomtest(k, n, 0.5).pvalue
    assert binom_two_sided_half(k, n) == pytest.approx(expected, rel=1e-9, abs=1e-300)


def test_mcnemar_counts_discordant_pairs_only():
    # 10 prompts only A gets right, 2 only B, 30 both, 8 neither
    a = np.array([1] * 10 + [0] * 2 + [1] * 30 + [0] * 8, dtype=bool)
    b = np.array([0] * 10 + [1] * 2 + [1] * 30 + [0] * 8, dtype=bool)
    r = mcnemar_exact(a, b)
    assert (r.a_only, r.b_only) == (10, 2)
    assert r.p_value == pytest.approx(binomtest(2, 12, 0.5).pvalue)
    assert r.p_value == pytest.approx(2 * (1 + 12 + 66) / 2**12)  # 2 * P(X <= 2), X ~ Bin(12, 1/2)
    same = mcnemar_exact(a, a)
    assert (same.a_only, same.b_only, same.p_value) == (0, 0, 1.0)
    with pytest.raises(ValueError, match="two \\(n,\\) arrays"):
        mcnemar_exact(a, b[:-1])


def test_point_at_budget():
    costs = np.array([1.0, 2.0, 3.0, 2.0])
    quals = np.array([0.5, 0.7, 0.9, 0.7])
    assert point_at_budget(costs, quals, 2.5) == 1  # the best within budget, the cheaper/first on ties
    assert point_at_budget(costs, quals, 3.0) == 2  # at the budget counts
    assert point_at_budget(costs, quals, 0.5) is None


def test_resample_weights_are_counts_over_n():
    w = resample_weights(7, 500, np.random.default_rng(0))
    assert w.shape == (500, 7)
    np.testing.assert_allclose(w.sum(axis=1), 1.0)
    counts = w * 7
    np.testing.assert_allclose(counts, np.round(counts))
    assert abs(counts.mean() - 1.0) < 0.05  # each prompt drawn once per resample on average


def _table(n, m, seed):
    rng = np.random.default_rng(seed)
    q = (rng.random((n, m)) < np.linspace(0.3, 0.9, m)).astype(float)
    c = np.linspace(1, 5, m)[None, :] * rng.uniform(0.5, 1.5, (n, m))
    return q, c


def _sweep(q, c, noise, rng, n_l=15):
    """Choices of a noisy cost-aware rule over a knob grid (few changes per step)."""
    u = q + noise * rng.standard_normal(q.shape)
    lams = np.linspace(0, 2, n_l)
    return np.stack([np.argmax(u - lam * c / c.mean(), axis=1) for lam in lams])


def _audc(choices, q, c):
    x, y = M.operating_points(choices, q, c)
    lo, hi = M.pool_range(c.mean(axis=0))
    return M.audc(M.deferral_curve(x, y), lo, hi)


def test_bootstrap_equals_a_slow_per_resample_reference():
    q, c = _table(40, 4, 0)
    rng = np.random.default_rng(1)
    ca, cb = _sweep(q, c, 0.3, rng), _sweep(q, c, 1.0, rng)
    b = 60
    res = paired_bootstrap_audc(ca, cb, q, c, resamples=b, seed=7)
    assert res.delta == pytest.approx(_audc(ca, q, c) - _audc(cb, q, c), abs=1e-12)
    # the same draws, one resample at a time, through the plain metric functions
    idx = np.random.default_rng(7).integers(0, 40, size=(b, 40), dtype=np.uint32)
    ref = np.array([_audc(ca[:, i], q[i], c[i]) - _audc(cb[:, i], q[i], c[i]) for i in idx])
    lo, hi = np.percentile(ref, [2.5, 97.5])
    assert (res.ci_low, res.ci_high) == (pytest.approx(lo, abs=1e-10), pytest.approx(hi, abs=1e-10))
    assert res.p_one_sided == pytest.approx((ref <= 0).mean())


def test_bootstrap_identical_routers_and_a_dominating_router():
    q, c = _table(60, 4, 2)
    rng = np.random.default_rng(3)
    ca = _sweep(q, c, 0.5, rng)
    same = paired_bootstrap_audc(ca, ca, q, c, resamples=200, seed=0)
    assert (same.delta, same.ci_low, same.ci_high, same.p_one_sided) == (0.0, 0.0, 0.0, 1.0)
    # the hindsight-cheapest-correct rule beats a random expert on every resample
    oracle = _sweep(q, c, 0.0, rng, n_l=30)
    rand = rng.integers(0, 4, (1, 60))
    r = paired_bootstrap_audc(oracle, rand, q, c, resamples=300, seed=0)
    assert r.delta > 0 and r.ci_low > 0 and r.p_one_sided == 0.0
    rev = paired_bootstrap_audc(rand, oracle, q, c, resamples=300, seed=0)
    assert rev.delta == pytest.approx(-r.delta) and rev.p_one_sided == 1.0


def test_bootstrap_chunks_give_the_same_answer_for_one_chunk_size():
    q, c = _table(50, 3, 4)
    rng = np.random.default_rng(5)
    ca, cb = _sweep(q, c, 0.4, rng), _sweep(q, c, 0.8, rng)
    one = paired_bootstrap_audc(ca, cb, q, c, resamples=120, seed=3)
    again = paired_bootstrap_audc(ca, cb, q, c, resamples=120, seed=3)
    assert one == again
    chunked = paired_bootstrap_audc(ca, cb, q, c, resamples=120, seed=3, chunk_elems=50 * 40)
    assert chunked.delta == one.delta and chunked.resamples == 120
    assert abs(chunked.ci_low - one.ci_low) < 0.1  # other draws, same distribution


def test_bootstrap_refuses_missing_cells():
    q, c = _table(10, 3, 0)
    q[0, 0] = np.nan
    with pytest.raises(ValueError, match="missing cells"):
        paired_bootstrap_audc(np.zeros((1, 10), dtype=int), np.zeros((1, 10), dtype=int), q, c, resamples=5)
