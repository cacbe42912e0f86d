"""Baselines behind the router interface: oracle, random, pareto-random, single experts, kNN;
and the shared knob sweep (per-prompt envelopes) against the plain per-lambda argmax."""

from __future__ import annotations

import numpy as np
import pytest

from cscr.data.table import Expert, RoutingTable
from cscr.routers import RouterContext, RouterError, get_router
from cscr.routers.envelope import breakpoints, sweep_choices
from cscr.routers.simple import upper_hull_experts


def make_table(q, c, splits=None, emb=None, seed=0):
    q, c = np.asarray(q, float), np.asarray(c, float)
    n, m = q.shape
    splits = np.array(["train"] * n) if splits is None else np.asarray(splits)
    table = RoutingTable(prompt_ids=[f"p{i}" for i in range(n)], texts=[f"t{i}" for i in range(n)], splits=splits,
                         categories=[""] * n, experts=[Expert(f"e{j}") for j in range(m)], quality=q, cost=c)
    if emb is None:
        emb = np.random.default_rng(seed).standard_normal((n, 8)).astype(np.float32)
    return table, emb, RouterContext.from_table(table, emb, seed=seed)


def random_table(n=80, m=4, seed=0):
    rng = np.random.default_rng(seed)
    q = (rng.random((n, m)) < np.linspace(0.3, 0.9, m)).astype(float)
    c = np.linspace(1, 4, m)[None, :] * rng.uniform(0.5, 1.5, (n, m))
    splits = np.where(np.arange(n) < n // 2, "train", "test")
    return make_table(q, c, splits, seed=seed)


# ---------------------------------------------------------------- the shared sweep

def test_sweep_choices_equal_the_per_lambda_argmax():
    rng = np.random.default_rng(0)
    for t in range(200):
        n, m = rng.integers(1, 40), rng.integers(1, 7)
        u = rng.integers(0, 3, (n, m)).astype(float) if t % 3 == 0 else rng.random((n, m))  # ties too
        u[rng.random((n, m)) < 0.2] = -np.inf
        u[np.isinf(u).all(axis=1), 0] = 0.5
        pen = rng.random(m) if t % 2 else rng.random((n, m))
        if t % 5 == 0:
            pen = np.round(pen, 1)
        lams = np.concatenate([[0.0], rng.random(20) * 3, rng.random(4) * 50])
        got = sweep_choices(u, pen, lams)
        ref = np.stack([np.argmax(u - lam * pen, axis=1) for lam in lams])
        scores = u[None] - lams[:, None, None] * np.broadcast_to(pen, u.shape)[None]  # (L, n, M)
        np.testing.assert_allclose(np.take_along_axis(scores, got[..., None], 2),
                                   np.take_along_axis(scores, ref[..., None], 2))  # same best score (ties: either)
        assert (got[lams == 0] == ref[lams == 0]).all()  # lambda = 0: np.argmax's first best


def test_breakpoints_by_hand():
    # prompt 0: expert 1 (u .9, p 1) until lambda = (.9 - .5) / (1 - .2) = .5, then expert 0 (u .5, p .2)
    u = np.array([[0.5, 0.9], [1.0, 0.0]])
    pen = np.array([0.2, 1.0])
    np.testing.assert_allclose(breakpoints(u, pen), [0.5])
    np.testing.assert_array_equal(sweep_choices(u, pen, np.array([0.4, 0.6, 0.1])), [[1, 0], [0, 0], [1, 0]])


# ---------------------------------------------------------------- oracle

def test_oracle_uses_hindsight_and_never_picks_a_missing_cell():
    q = [[0, 1, 1], [1, np.nan, 0], [0, 0, 0]]
    c = [[1, 2, 3], [1, 2, 3], [1, 2, 3]]
    table, emb, ctx = make_table(q, c)
    oracle = get_router("oracle").fit(ctx)
    rows = np.arange(3)
    with pytest.raises(RouterError, match="needs the prompts' table rows"):
        oracle.route(emb, 0.0)
    lams = oracle.knob_grid(emb, 50, rows=rows)
    choices = oracle.route_sweep(emb, lams, rows=rows)
    assert not (choices[:, 1] == 1).any()
    small = choices[1]  # the smallest positive knob value: the cheapest correct expert
    np.testing.assert_array_equal(small, [1, 0, 0])
    np.testing.assert_array_equal(choices[-1], [0, 0, 0])  # past the last breakpoint: the cheapest


def test_oracle_grid_finds_every_vertex_of_the_hindsight_hull():
    # 0/1 quality: the hull's vertices are "switch prompts to their cheapest expert in order of
    # quality lost per cost saved"; all of them must be among the oracle's operating points
    table, emb, ctx = random_table(n=30, m=3, seed=1)
    oracle = get_router("oracle").fit(ctx)
    rows = np.arange(table.n)
    choices = oracle.route_sweep(emb, oracle.knob_grid(emb, 200, rows=rows), rows=rows)
    q, ck = table.quality, table.cost
    best = np.argmin(np.where(q == q.max(1, keepdims=True), ck, np.inf), axis=1)  # cheapest correct
    cheap = np.argmin(ck, axis=1)
    saved = ck[rows, best] - ck[rows, cheap]  # cost saved by giving up the prompt (0: nothing to give up)
    cur = best.copy()
    point = lambda ch: (float(ck[rows, ch].mean()), float(q[rows, ch].mean()))  # noqa: E731
    want = [point(cur)]
    for i in np.argsort(-saved, kind="stable"):  # greedy: the most cost saved per quality lost first
        cur[i] = cheap[i]
        want.append(point(cur))
    got = [point(ch) for ch in choices]
    from cscr.eval.metrics import deferral_curve

    want_curve = deferral_curve(*np.array(want).T)
    got_curve = deferral_curve(*np.array(got).T)
    np.testing.assert_allclose(got_curve.value(want_curve.x), want_curve.y, atol=1e-12)


# ---------------------------------------------------------------- random

def test_random_is_seeded_uniform_and_one_point():
    table, emb, ctx = random_table(n=4000, m=4, seed=0)
    r1 = get_router("random").fit(ctx)
    assert not r1.has_knob
    np.testing.assert_array_equal(r1.knob_grid(emb, 200), [0.0])
    a = r1.route(emb, 0.0)
    np.testing.assert_array_equal(a, get_router("random").fit(ctx).route(emb, 0.0))  # same seed
    assert (a != get_router("random", seed=5).fit(ctx).route(emb, 0.0)).any()
    freq = np.bincount(a, minlength=4) / len(a)
    assert np.abs(freq - 0.25).max() < 0.03
    np.testing.assert_array_equal(r1.route(emb, 3.0), a)  # the knob does nothing
    only = r1.route(emb, 0.0, candidates=["e1", "e3"])
    assert set(np.unique(only)) == {1, 3}


# ---------------------------------------------------------------- pareto-random

def test_upper_hull_experts_by_hand():
    cost = np.array([1.0, 2.0, 3.0, 4.0, 2.0, 5.0])
    qual = np.array([0.2, 0.3, 0.75, 0.8, 0.6, 0.75])
    # (2, .3) is below (2, .6); (2, .6) is on the hull; (4, .8) is the best; (5, .75) is past the top
    np.testing.assert_array_equal(upper_hull_experts(cost, qual), [0, 4, 2, 3])
    qual[2] = 0.7  # (3, .7) now on the segment from (2, .6) to (4, .8): not a vertex
    np.testing.assert_array_equal(upper_hull_experts(cost, qual), [0, 4, 3])
    cost = np.array([1.0, 2.0, 3.0])
    qual = np.array([0.2, 0.3, 0.9])  # (2, .3) under the chord from (1, .2) to (3, .9)
    np.testing.assert_array_equal(upper_hull_experts(cost, qual), [0, 2])


def test_pareto_random_walks_the_train_hull():
    n = 6000
    q = np.tile([0.2, 0.3, 0.7, 0.9], (n, 1))  # expert 1 is under the hull
    c = np.tile([1.0, 2.0, 3.0, 5.0], (n, 1))
    table, emb, ctx = make_table(q, c)
    r = get_router("pareto-random").fit(ctx)
    np.testing.assert_array_equal(r.hull(), [0, 2, 3])
    lams = r.knob_grid(emb, 11)
    assert lams[0] == 0 and lams[-1] == 1
    ch = r.route_sweep(emb, lams)
    assert (ch[0] == 3).all() and (ch[-1] == 0).all()
    assert not (ch == 1).any()
    mean_cost = c[0][ch].mean(axis=1)
    np.testing.assert_allclose(mean_cost, 5 - lams * 4, atol=0.06)  # the knob walks the cost range
    # coupled draws: moving the knob only moves prompts to cheaper experts
    assert (np.diff(c[0][ch], axis=0) <= 0).all()
    assert (r.route_sweep(emb, np.array([7.0])) == 0).all()  # above 1 means 1
    np.testing.assert_array_equal(r.hull(["e0", "e1"]), [0, 1])
    assert set(np.unique(r.route_sweep(emb, lams, candidates=["e0", "e1"]))) == {0, 1}


# ---------------------------------------------------------------- single experts

def test_single_expert_router():
    table, emb, ctx = random_table(n=20, m=3)
    r = get_router("single", expert="e2").fit(ctx)
    assert r.label == "single:e2" and not r.has_knob
    ch = r.route_sweep(emb, r.knob_grid(emb, 200))
    assert ch.shape == (1, 20) and (ch == 2).all()
    with pytest.raises(RouterError, match="needs an expert"):
        get_router("single")
    with pytest.raises(RouterError, match="unknown expert 'nope'"):
        get_router("single", expert="nope").fit(ctx)
    with pytest.raises(RouterError, match="exclude 'e2'"):
        r.route(emb, 0.0, candidates=["e0"])


# ---------------------------------------------------------------- kNN

def test_knn_equals_a_brute_force_cosine_neighbour_mean():
    rng = np.random.default_rng(0)
    n, m, k = 120, 4, 7
    q = (rng.random((n, m)) < 0.5).astype(float)
    q[rng.random((n, m)) < 0.1] = np.nan
    c = np.tile([1.0, 2.0, 3.0, 4.0], (n, 1))
    emb = rng.standard_normal((n, 16)).astype(np.float32) * rng.uniform(0.5, 3, (n, 1)).astype(np.float32)
    splits = np.where(np.arange(n) < 90, "train", "test")
    table, emb, ctx = make_table(q, c, splits, emb=emb)
    r = get_router("knn", k=k).fit(ctx)
    test = np.flatnonzero(splits == "test")
    u = r.utilities(emb[test])
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    train = np.flatnonzero(splits == "train")
    sims = unit[test] @ unit[train].T
    nn = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    qt = q[train]
    prior = np.nanmean(qt, axis=0)
    for i in range(len(test)):
        neigh = qt[nn[i]]
        seen = ~np.isnan(neigh)
        want = np.where(seen.any(0), np.nansum(neigh, 0) / np.maximum(seen.sum(0), 1), prior)
        np.testing.assert_allclose(u[i], want, atol=2e-6)


def test_knn_routes_by_topic_and_trades_off_cost():
    rng = np.random.default_rng(1)
    n = 200
    topic = np.arange(n) % 2
    centres = np.eye(8)[:2] * 5
    emb = (centres[topic] + rng.standard_normal((n, 8)) * 0.3).astype(np.float32)
    q = np.stack([topic == 0, topic == 1, np.ones(n, bool)], axis=1).astype(float)  # e2 always right
    c = np.tile([1.0, 1.0, 10.0], (n, 1))
    splits = np.where(np.arange(n) < 150, "train", "test")
    table, emb, ctx = make_table(q, c, splits, emb=emb)
    r = get_router("knn").fit(ctx)
    test = np.flatnonzero(splits == "test")
    np.testing.assert_array_equal(r.route(emb[test], 0.01), topic[test])  # the cheap expert of the topic
    assert (r.route(emb[test], 0.0, candidates=["e2"]) == 2).all()
    with pytest.raises(RouterError, match="k must be >= 1"):
        get_router("knn", k=0)
    with pytest.raises(RouterError, match="embeddings must be"):
        r.utilities(np.zeros((2, 3), np.float32))


def test_knn_breaks_exact_ties_towards_the_better_expert_overall():
    # topic A: e0 and e1 both always right (neighbour means tie at 1); topic B: only e1 right.
    # On a topic-A prompt the table order would pick e0; the tie goes to e1, better overall.
    rng = np.random.default_rng(2)
    n = 120
    topic = np.arange(n) % 2
    emb = (np.eye(8)[topic] * 5 + rng.standard_normal((n, 8)) * 0.3).astype(np.float32)
    q = np.stack([topic == 0, np.ones(n, bool)], axis=1).astype(float)
    c = np.ones((n, 2))
    splits = np.where(np.arange(n) < 90, "train", "test")
    table, emb, ctx = make_table(q, c, splits, emb=emb)
    r = get_router("knn", k=5).fit(ctx)
    a = np.flatnonzero((splits == "test") & (topic == 0))
    u = r.utilities(emb[a])
    np.testing.assert_allclose(u[:, 0], u[:, 1], atol=1e-5)  # a tie up to the tie-break term
    assert (r.route(emb[a], 0.0) == 1).all()
