"""Newcomer levels (cscr/newcomer.py): the Platt map on a newcomer's probe outcomes, the router
applying it to that expert only, and the unseen-experts experiment choosing it on the seen experts'
validation answers (never the test split)."""

from __future__ import annotations

import dataclasses
import pickle

import numpy as np
import pytest

from cscr.config import EvalConfig, TrainConfig
from cscr.experiments.common import (
    costs_of,
    cscr_router,
    default_descriptors,
    set_levels,
    train_cscr,
)
from cscr.experiments.unseen import run_unseen
from cscr.newcomer import apply_level, choose_levels, fit_level
from cscr.routers.base import RouterError
from cscr.synthetic import synthetic_table

FAST = TrainConfig(epochs=2, batch_size=128)


def test_fit_level_recovers_a_known_map_and_refuses_what_it_cannot_fit():
    rng = np.random.default_rng(0)
    z = rng.normal(0.0, 1.5, 4000)
    u = 1.0 / (1.0 + np.exp(-z))  # the head's expected quality
    y = (rng.random(4000) < 1.0 / (1.0 + np.exp(-(2.0 * z - 1.0)))).astype(float)  # the expert's answers
    a, b = fit_level(u, y)
    assert a == pytest.approx(2.0, abs=0.2) and b == pytest.approx(-1.0, abs=0.15)
    out = apply_level(np.array([u[0], -np.inf]), (a, b))
    assert out[1] == -np.inf and 0.0 < out[0] < 1.0
    assert apply_level(np.array([0.3, 0.8]), (1.0, 0.0)) == pytest.approx([0.3, 0.8], abs=1e-6)  # identity
    assert fit_level(u[:10], np.ones(10)) is None  # outcomes that do not vary: nothing to fit
    assert fit_level(u[:3], np.array([1.0, np.nan, np.nan])) is None  # fewer than two answers
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        fit_level(u[:3], np.array([0.0, 2.0, 1.0]))
    with pytest.raises(ValueError, match="alike"):
        fit_level(u[:3], np.ones(4))


def test_choose_levels_uses_the_maps_only_when_the_draws_gain_on_average():
    picks = [["a"], ["b"], ["c"]]
    gains = {"a": 0.01, "b": -0.02, "c": 0.0}
    off = choose_levels(lambda d: gains[d[0]], picks)
    assert not off.use and off.gains == [0.01, -0.02, 0.0] and off.draws == picks
    gains["b"] = -0.005
    on = choose_levels(lambda d: gains[d[0]], picks)
    assert on.use and on.record()["use"] is True and "gain on average" in on.why
    assert not choose_levels(lambda d: None, picks).use  # a draw without answers: off
    assert not choose_levels(lambda d: 1.0, []).use  # nobody to play a newcomer


@pytest.fixture(scope="module")
def synthetic():
    table, emb, _ = synthetic_table(n=900, n_experts=6, dim=32, n_clusters=4, seed=3, probe_size=96)
    return table, emb


def test_the_router_calibrates_a_newcomer_only_on_its_probe_outcomes(synthetic):
    table, emb = synthetic
    names = table.expert_names
    seen, new = names[:4], names[4]
    desc = default_descriptors(table)
    head = train_cscr(table.subset(experts=seen), emb, desc, "cscr", FAST)
    router = cscr_router("cscr", head, {n: desc[n] for n in names}, costs_of(table, table.split_index("train")))
    probe, test = table.split_index("probe"), table.split_index("test")
    before = router.utilities(emb[test])
    assert router.set_level(new, emb[probe], table.quality[probe, table.expert_index(new)])
    after = router.utilities(emb[test])
    j = router.expert_names.index(new)
    others = [i for i in range(len(names)) if i != j]
    assert np.array_equal(after[:, others], before[:, others])  # the trained experts keep their utilities
    assert not np.allclose(after[:, j], before[:, j])
    # the newcomer's mean expected quality on held-out prompts moves towards its true mean there
    truth = np.nanmean(table.quality[test, table.expert_index(new)])
    assert abs(after[:, j].mean() - truth) < abs(before[:, j].mean() - truth) + 0.02
    copy = pickle.loads(pickle.dumps(router))  # a pickled copy (Ray) routes alike
    assert np.array_equal(copy.utilities(emb[test]), after)
    with pytest.raises(RouterError, match="unknown expert"):
        router.set_level("nobody", emb[probe], np.zeros(len(probe)))
    router.remove_expert(new)
    assert new not in router.levels
    # set_levels calibrates the experts the given table holds probe outcomes for, and only those
    assert set_levels(router, table.subset(experts=[names[5]]), emb) == [names[5]] and list(router.levels) == [names[5]]


def test_the_experiment_chooses_on_the_seen_experts_and_never_reads_the_test_split(synthetic):
    table, emb = synthetic
    names = table.expert_names
    seen, unseen = names[:4], names[4:]
    res = run_unseen(table, emb, ["cscr", "umr"], seen, unseen, FAST, EvalConfig(bootstrap=1))
    rec = res.levels["cscr"]
    # one of 4 seen experts plays the newcomer: 4 distinct draws at most, fewer than the 6 asked for
    assert FAST.newcomer_draws == 6 and len(rec["gains"]) == 4 and len(rec["draws"]) == 4
    assert all(set(d) <= set(seen) and d for d in rec["draws"])  # pseudo-newcomers are seen experts
    assert len({tuple(d) for d in rec["draws"]}) == 4  # distinct draws
    assert rec["use"] == (np.mean(rec["gains"]) > 0) and rec["over"] == "the pseudo-newcomers alone"
    if rec["use"]:
        assert rec["calibrated"] == list(unseen)
    # the test split's answers scrambled: the same choice from the same gains
    scrambled = dataclasses.replace(table, quality=table.quality.copy())
    test = table.split_index("test")
    scrambled.quality[test] = np.random.default_rng(1).permutation(scrambled.quality[test])
    again = run_unseen(scrambled, emb, ["cscr"], seen, unseen, FAST, EvalConfig(bootstrap=1))
    assert again.levels["cscr"]["gains"] == rec["gains"] and again.levels["cscr"]["use"] == rec["use"]
    off = run_unseen(table, emb, ["cscr"], seen, unseen, dataclasses.replace(FAST, newcomer_levels=False),
                     EvalConfig(bootstrap=1))
    assert off.levels == {}
