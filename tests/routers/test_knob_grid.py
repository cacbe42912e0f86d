"""The knob grid: exact breakpoints of the prompts' envelopes, so the sweep is not limited by it."""

from __future__ import annotations

import numpy as np

from cscr.routers.envelope import breakpoints, knob_grid_values, sweep_choices


def _random(seed):
    rng = np.random.default_rng(seed)
    n, m = rng.integers(1, 30), rng.integers(1, 6)
    u = rng.random((n, m))
    u[rng.random((n, m)) < 0.2] = -np.inf
    u[np.isinf(u).all(axis=1), 0] = 0.5
    pen = rng.random(m) if seed % 2 else rng.random((n, m))
    return u, pen


def test_the_grid_reaches_every_distinct_choice_set_and_ends_at_the_cheapest():
    for seed in range(60):
        u, pen = _random(seed)
        lams = knob_grid_values(u, pen, 10_000)
        assert lams[0] == 0.0 and (np.diff(lams) > 0).all()
        got = {tuple(c) for c in sweep_choices(u, pen, lams)}
        bp = breakpoints(u, pen)
        dense = np.concatenate([[0.0], np.linspace(0, bp.max() * 1.5 if bp.size else 1.0, 20_001)[1:]])
        want = {tuple(c) for c in sweep_choices(u, pen, dense) }
        assert want <= got  # no operating point of a dense sweep is missed
        last = sweep_choices(u, pen, lams[-1:])[0]
        cheapest = np.argmin(np.where(np.isfinite(u), np.broadcast_to(pen, u.shape), np.inf), axis=1)
        p = np.broadcast_to(pen, u.shape)
        np.testing.assert_allclose(p[np.arange(len(last)), last], p[np.arange(len(last)), cheapest])


def test_a_small_budget_keeps_zero_the_end_and_rank_spaced_midpoints():
    rng = np.random.default_rng(3)
    u, pen = rng.random((300, 8)), rng.random(8)
    full = knob_grid_values(u, pen, 100_000)
    assert len(full) == breakpoints(u, pen).size + 1  # 0, one per gap, one past the end
    few = knob_grid_values(u, pen, 50)
    assert len(few) <= 50 and few[0] == 0.0 and few[-1] == full[-1] and np.isin(few, full).all()
    assert knob_grid_values(np.ones((3, 1)), np.ones(1), 50).tolist() == [0.0]  # nothing to sweep
