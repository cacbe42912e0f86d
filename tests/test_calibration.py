"""Calibrated utilities (cscr/calibration.py): monotone maps from router scores to expected quality."""

from __future__ import annotations

import numpy as np
import pytest

from cscr.calibration import Calibration, MonotoneMap, isotonic_fit, logistic_fit


def test_isotonic_by_hand_pools_violators():
    # y at sorted s: 0, 1, 0, 1 -> blocks {0}, {1, 0} pooled to .5, {1}
    xs, ys = isotonic_fit(np.array([0.1, 0.2, 0.3, 0.4]), np.array([0.0, 1.0, 0.0, 1.0]))
    np.testing.assert_allclose(xs, [0.1, 0.25, 0.4])
    np.testing.assert_allclose(ys, [0.0, 0.5, 1.0])
    m = MonotoneMap.fit(np.array([0.4, 0.1, 0.3, 0.2]), np.array([1.0, 0.0, 0.0, 1.0]))  # order-free
    np.testing.assert_allclose(m(np.array([0.0, 0.1, 0.175, 0.25, 0.4, 9.0, -np.inf])),
                               [0.0, 0.0, 0.25, 0.5, 1.0, 1.0, -np.inf])


def test_logistic_recovers_a_known_slope_and_never_decreases():
    rng = np.random.default_rng(0)
    s = rng.uniform(-1, 1, 20000)
    y = (rng.random(s.size) < 1 / (1 + np.exp(-(3.0 * s - 0.5)))).astype(float)
    a, b = logistic_fit(s, y)
    assert a == pytest.approx(3.0, rel=0.1) and b == pytest.approx(-0.5, abs=0.1)
    a2, _ = logistic_fit(s, 1.0 - y)  # quality falls with the score: clipped to a flat map
    assert a2 == 0.0


def test_per_expert_maps_with_a_shared_fallback_for_a_new_expert():
    rng = np.random.default_rng(1)
    v = 400
    s = rng.uniform(0, 1, (v, 2))
    q = np.stack([(rng.random(v) < s[:, 0]).astype(float), (rng.random(v) < 0.5 * s[:, 1]).astype(float)], axis=1)
    q[:390, 1] = np.nan  # expert b: only 10 answers -> the shared map
    s[0, 0] = -np.inf  # not scored: left out
    for method in ("isotonic", "logistic"):
        cal = Calibration.fit(s, q, ["a", "b"], method=method, min_count=30)
        assert set(cal.per_expert) == {"a"} and cal.per_expert["a"].n == v - 1
        grid = np.tile(np.linspace(0, 1, 11)[:, None], (1, 3))
        out = cal.apply(grid, ["a", "b", "new"])
        assert (np.diff(out, axis=0) >= -1e-12).all()  # non-decreasing in the score
        np.testing.assert_allclose(out[:, 1], out[:, 2])  # b and a new expert: the shared map
        assert abs(out[-1, 0] - 1.0) < 0.2 and abs(out[0, 0]) < 0.2  # P(correct) ~ s for expert a
        again = Calibration.from_dict(cal.to_dict())
        np.testing.assert_allclose(again.apply(grid, ["a", "b", "new"]), out)
        assert np.isneginf(cal.apply(np.array([[-np.inf, 0.5]]), ["a", "b"])[0, 0])


def test_bad_input_gets_one_clear_error():
    with pytest.raises(ValueError, match="one shape"):
        Calibration.fit(np.zeros((3, 2)), np.zeros((3, 1)), ["a", "b"])
    with pytest.raises(ValueError, match="nothing to calibrate on"):
        Calibration.fit(np.full((3, 1), -np.inf), np.zeros((3, 1)), ["a"])
    with pytest.raises(ValueError, match="method must be one of"):
        Calibration.fit(np.zeros((3, 1)), np.zeros((3, 1)), ["a"], method="platt")
    with pytest.raises(ValueError, match="scores must be"):
        Calibration.fit(np.zeros((3, 1)), np.zeros((3, 1)), ["a"]).apply(np.zeros((2, 2)), ["a"])
