"""Deferral-curve metrics: hand-computed cases and properties (SPEC.md section 6)."""

from __future__ import annotations

import numpy as np
import pytest

from cscr.eval import metrics as M


def curve(points):
    x, y = np.array(points, dtype=float).T
    return M.deferral_curve(x, y)


# ---------------------------------------------------------------- operating points

def test_operating_points_by_hand():
    q = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    c = np.array([[1.0, 3.0], [2.0, 4.0], [1.0, 5.0]])
    choices = np.array([[0, 0, 0], [0, 1, 0], [1, 1, 1]])
    x, y = M.operating_points(choices, q, c)
    np.testing.assert_allclose(x, [4 / 3, 2.0, 4.0])
    np.testing.assert_allclose(y, [2 / 3, 1.0, 2 / 3])


def test_operating_points_sparse_path_equals_dense_gather():
    rng = np.random.default_rng(0)
    for t in range(30):
        n, m, l_ = rng.integers(1, 40), rng.integers(1, 6), rng.integers(1, 25)
        choices = rng.integers(0, m, (l_, n))
        if t % 2:
            choices = np.sort(choices, axis=0)  # a sweep: few changes per step
        q, c = (rng.random((n, m)) > 0.5).astype(float), rng.random((n, m))
        x, y = M.operating_points(choices, q, c)
        np.testing.assert_allclose(x, M.gather(c, choices).mean(axis=1), rtol=1e-12)
        assert (y == M.gather(q, choices).mean(axis=1)).all()  # 0/1 quality: exact


def test_operating_points_refuse_bad_shapes_and_missing_cells():
    q, c = np.ones((3, 2)), np.ones((3, 2))
    with pytest.raises(ValueError, match="choices must be"):
        M.operating_points(np.zeros((2, 4), dtype=int), q, c)
    with pytest.raises(ValueError, match="expert indices"):
        M.operating_points(np.full((1, 3), 2), q, c)
    with pytest.raises(ValueError, match="integers"):
        M.operating_points(np.zeros((1, 3)), q, c)
    q[0, 0] = np.nan
    with pytest.raises(ValueError, match="missing cells"):
        M.operating_points(np.zeros((1, 3), dtype=int), q, c)
    with pytest.raises(ValueError, match="cost shape"):
        M.operating_points(np.zeros((1, 3), dtype=int), np.ones((3, 2)), np.ones((3, 3)))


# ---------------------------------------------------------------- curves by hand

def test_non_monotone_points_hull_audc_peak_qnc():
    # knob order is not cost order; (2.5, .2) and (3, .8) are dominated; (0.5, .1) starts the curve
    cv = curve([(1, 0.5), (2, 0.8), (3, 0.8), (2.5, 0.2), (0.5, 0.1)])
    np.testing.assert_allclose(cv.x, [0.5, 1, 2])
    np.testing.assert_allclose(cv.y, [0.1, 0.5, 0.8])
    # area on [0, 4]: 0.5*(0.1+0.5)/2 + 1*(0.5+0.8)/2 + 2*0.8 = 0.15 + 0.65 + 1.6 = 2.4
    assert M.audc(cv, 0.0, 4.0) == pytest.approx(2.4 / 4)
    assert M.peak(cv) == (pytest.approx(0.8), pytest.approx(2.0))
    assert M.qnc(cv, 0.65) == pytest.approx(1.5)  # halfway up the (1, .5)-(2, .8) segment
    assert M.qnc(cv, 0.05) == pytest.approx(0.5)  # reached at the first point


def test_point_below_the_chord_is_not_a_vertex():
    cv = curve([(1, 0.2), (2, 0.3), (3, 0.8)])  # chord at 2 is 0.5 > 0.3: a mixture beats (2, .3)
    np.testing.assert_allclose(cv.x, [1, 3])
    assert M.audc(cv, 1.0, 3.0) == pytest.approx((0.2 + 0.8) / 2)
    assert M.qnc(cv, 0.5) == pytest.approx(2.0)


def test_ties_in_cost_and_quality():
    # same cost: the better point starts the curve; same quality: the cheaper is the peak
    cv = curve([(1, 0.2), (1, 0.6), (2, 0.9), (3, 0.9), (2, 0.9)])
    np.testing.assert_allclose(cv.x, [1, 2])
    np.testing.assert_allclose(cv.y, [0.6, 0.9])
    assert M.peak(cv) == (pytest.approx(0.9), pytest.approx(2.0))
    # all points equal: one vertex
    cv = curve([(2, 0.5)] * 4)
    assert len(cv.x) == 1 and M.audc(cv, 2.0, 4.0) == pytest.approx(0.5)
    # a router tying the best expert exactly reaches it: QNC = its cost, not "not reached"
    cv = curve([(1, 0.3), (2, 0.7)])
    assert M.qnc(cv, 0.7) == pytest.approx(2.0)


def test_router_that_never_reaches_the_best_expert():
    cv = curve([(1, 0.3), (2, 0.5), (4, 0.6)])
    assert M.qnc(cv, 0.61) is None
    assert M.peak(cv)[0] == pytest.approx(0.6)


def test_single_point_router():
    cv = curve([(2.0, 0.7)])
    assert M.peak(cv) == (pytest.approx(0.7), pytest.approx(2.0))
    # no area left of its point: 0.7 over [2, 5] of the pool range [1, 5]
    assert M.audc(cv, 1.0, 5.0) == pytest.approx(0.7 * 3 / 4)
    assert M.qnc(cv, 0.7) == pytest.approx(2.0)
    assert M.qnc(cv, 0.71) is None
    assert M.audc(cv, 1.0, 2.0) == 0.0  # the most expensive expert itself: no width left
    assert M.audc(cv, 0.5, 1.5) == 0.0  # entirely right of the pool range


def test_router_cheaper_than_the_pool_is_clipped_at_the_pool():
    # an oracle-like curve starting left of the cheapest expert: only [lo, hi] counts
    cv = curve([(0.2, 0.9)])
    assert M.audc(cv, 1.0, 3.0) == pytest.approx(0.9)
    cv = curve([(0.0, 0.5), (2.0, 0.9)])
    # on [1, 3]: from (1, .7) to (2, .9), then flat .9 -> (0.8 + 0.9) / 2
    assert M.audc(cv, 1.0, 3.0) == pytest.approx((0.8 + 0.9) / 2)


def test_curve_continuing_right_of_the_pool_is_cut_there():
    cv = curve([(1, 0.5), (5, 1.0)])
    # on [1, 3] the chord goes from .5 to .75
    assert M.audc(cv, 1.0, 3.0) == pytest.approx((0.5 + 0.75) / 2)
    assert M.peak(cv) == (pytest.approx(1.0), pytest.approx(5.0))


def test_degenerate_pool_range_uses_the_value_at_the_pool_cost():
    cv = curve([(1, 0.4), (3, 0.8)])
    assert M.audc(cv, 2.0, 2.0) == pytest.approx(0.6)
    assert M.audc(cv, 0.5, 0.5) == 0.0


def test_pool_range_and_best_expert_ties():
    ec = np.array([3.0, 1.0, 2.0])
    eq = np.array([0.8, 0.5, 0.8])
    assert M.pool_range(ec) == (1.0, 3.0)
    assert M.best_expert(eq, ec) == 2  # the cheaper of the two best


# ---------------------------------------------------------------- properties

def test_constant_quality_curve_has_audc_equal_to_that_quality():
    rng = np.random.default_rng(1)
    for _ in range(50):
        lo, hi = sorted(rng.random(2) * 10)
        q = rng.random()
        x = np.concatenate([[lo], lo + rng.random(rng.integers(0, 20)) * (hi - lo) * 2])
        cv = M.deferral_curve(x, np.full(len(x), q))
        assert M.audc(cv, lo, hi) == pytest.approx(q, abs=1e-12)


def test_audc_between_zero_and_peak_and_curve_above_every_point():
    rng = np.random.default_rng(2)
    for _ in range(100):
        k = rng.integers(1, 30)
        x, y = rng.random(k) * 3, rng.random(k)
        cv = M.deferral_curve(x, y)
        lo, hi = sorted(rng.random(2) * 3)
        a = M.audc(cv, lo, hi)
        assert -1e-12 <= a <= M.peak(cv)[0] + 1e-12
        # the curve is non-decreasing, concave and at or above every operating point
        assert (np.diff(cv.x) > 0).all() and (np.diff(cv.y) > 0).all()
        if len(cv.x) > 2:
            slopes = np.diff(cv.y) / np.diff(cv.x)
            assert (np.diff(slopes) <= 1e-9).all()
        assert (cv.value(x) >= y - 1e-12).all()
        assert cv.x[0] == x.min() and cv.y[-1] == y.max()


def test_hull_batch_equals_one_curve_at_a_time():
    rng = np.random.default_rng(3)
    x, y = rng.random((40, 25)), rng.random((40, 25))
    x[:, 5] = x[:, 4]  # ties in cost
    y[:, 7] = y[:, 6]  # ties in quality
    vx, vy, count = M.hull_batch(x, y)
    lo, hi = rng.random(40) * 0.3, 0.6 + rng.random(40) * 0.5
    batch = M.audc_batch(vx, vy, count, lo, hi)
    for b in range(40):
        cv = M.deferral_curve(x[b], y[b])
        np.testing.assert_allclose(vx[b, : count[b]], cv.x)
        assert batch[b] == pytest.approx(M.audc(cv, lo[b], hi[b]), abs=1e-14)


def test_audc_matches_numerical_integration_of_the_best_mixture():
    # brute force: best mean quality over all two-point mixtures with mean cost <= b
    rng = np.random.default_rng(4)
    for _ in range(10):
        k = rng.integers(1, 8)
        x, y = rng.random(k), rng.random(k)
        lo, hi = 0.2, 0.9
        grid = np.linspace(lo, hi, 4001)
        t = np.linspace(0, 1, 201)[None, None, :]
        cx = (t * x[:, None, None] + (1 - t) * x[None, :, None]).ravel()  # every two-point mixture
        cy = (t * y[:, None, None] + (1 - t) * y[None, :, None]).ravel()
        order = np.argsort(cx)
        running = np.maximum.accumulate(cy[order])  # best quality at mean cost <= cx
        pos = np.searchsorted(cx[order], grid, side="right")
        best = np.where(pos > 0, running[np.maximum(pos - 1, 0)], 0.0)
        brute = np.trapezoid(best, grid) / (hi - lo)
        assert M.audc(M.deferral_curve(x, y), lo, hi) == pytest.approx(brute, abs=2e-3)


# ---------------------------------------------------------------- the second ruler (the write-up's AUDC)

def test_audc_paper_by_hand_raw_points_no_hull():
    # raw points sorted by cost: (2, .5), (3, .4), (4, .8); grid 1, 2, 3, 4, 5 over the pool [1, 5]
    # values .5 (flat left), .5, .4 (a point under the hull counts as it is), .8, .8 (flat right)
    x, y = np.array([4.0, 2.0, 3.0]), np.array([0.8, 0.5, 0.4])
    want = ((0.5 + 0.5) + (0.5 + 0.4) + (0.4 + 0.8) + (0.8 + 0.8)) / 2 / 4  # 0.5875
    assert M.audc_paper(x, y, 1.0, 5.0, n_grid=5) == pytest.approx(want, abs=1e-12)
    # the hull would interpolate (2, .5)-(4, .8) at cost 3: 0.65, not 0.4
    assert M.deferral_curve(x, y).value(3.0)[0] == pytest.approx(0.65)


def test_audc_paper_flat_left_credit_repeated_cost_and_degenerate_pool():
    # one point right of the pool's cheapest expert: credited flat to its left (the first ruler is not)
    assert M.audc_paper(np.array([3.0]), np.array([0.6]), 1.0, 5.0) == pytest.approx(0.6)
    assert M.audc(M.deferral_curve(np.array([3.0]), np.array([0.6])), 1.0, 5.0) == pytest.approx(0.6 * 2 / 4)
    # a repeated cost keeps its best quality
    x, y = np.array([2.0, 2.0, 4.0]), np.array([0.1, 0.5, 0.8])
    assert M.audc_paper(x, y, 1.0, 5.0, n_grid=5) == pytest.approx(((0.5 + 0.5) + (0.5 + 0.65) + (0.65 + 0.8)
                                                                     + (0.8 + 0.8)) / 2 / 4)
    assert M.audc_paper(x, y, 3.0, 3.0) == pytest.approx(0.65)  # hi == lo: the value there


def test_audc_paper_default_grid_and_checks():
    assert M.PAPER_GRID == 25
    # a straight line from (0, 0) to (1, 1) is integrated exactly by trapezoids: area 0.5
    assert M.audc_paper(np.array([0.0, 1.0]), np.array([0.0, 1.0]), 0.0, 1.0) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="non-empty"):
        M.audc_paper(np.array([]), np.array([]), 0.0, 1.0)
    with pytest.raises(ValueError, match="one shape"):
        M.audc_paper(np.array([1.0, 2.0]), np.array([1.0]), 0.0, 1.0)
    with pytest.raises(ValueError, match="finite"):
        M.audc_paper(np.array([np.nan]), np.array([1.0]), 0.0, 1.0)
    with pytest.raises(ValueError, match="hi >= lo"):
        M.audc_paper(np.array([1.0]), np.array([1.0]), 2.0, 1.0)
    with pytest.raises(ValueError, match="n_grid"):
        M.audc_paper(np.array([1.0]), np.array([1.0]), 0.0, 1.0, n_grid=1)
