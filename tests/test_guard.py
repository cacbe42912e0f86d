"""The out-of-distribution guard (cscr/guard.py): the shrink, its gate, the search that never reads
the test split, saving and loading with the run's router, serving through it, and the CLI."""

from __future__ import annotations

import dataclasses
import json
import pickle

import numpy as np
import pytest
from cscr.cli import main
from routing_checks import assert_served_as_evaluated

from cscr.config import EvalConfig, TrainConfig
from cscr.experiments.ood import ood_split, run_ood, search_guard
from cscr.guard import (
    GATES,
    GRID,
    Guard,
    GuardError,
    GuardSearch,
    Nearness,
    category_groups,
    load_guard,
    save_guard,
)
from cscr.runs.loader import load_router
from cscr.runs.settings import head_line
from cscr.synthetic import synthetic_table, train_synthetic_head, write_synthetic_run

FAST = TrainConfig(epochs=2, batch_size=128)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A synthetic run (4 topics as categories) with a trained cscr head, as `cscr train` leaves it."""
    table, emb, topic = synthetic_table(n=600, n_experts=5, dim=32, n_clusters=4, seed=5, probe_size=48)
    folder = write_synthetic_run(tmp_path_factory.mktemp("guard") / "run", table, emb)
    train_synthetic_head(folder, table, emb, "cscr", FAST)
    return folder, table, emb, topic


def _reference(n=200, d=8, seed=0):
    """Training prompts near the first axis (plus noise)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 0.05, (n, d)).astype(np.float32)
    x[:, 0] += 1.0
    return x


def test_nearness_and_the_gate_threshold():
    ref = _reference()
    near = Nearness(ref, k=5)
    own = near.own()
    assert own.shape == (200,) and own.min() > 0.9  # all close to each other, each without itself
    far_prompt = np.eye(8, dtype=np.float32)[[3]]  # orthogonal to every training prompt
    assert near(far_prompt)[0] < 0.2 and near(ref[:3]).min() > own.min()  # a training prompt finds itself
    with pytest.raises(GuardError, match="at least 2"):
        Nearness(ref[:1])


def test_apply_shrinks_only_far_prompts_and_keeps_unretrieved_experts_out():
    ref = _reference()
    g = Guard(w=0.5, gate=0.1, threshold=float(np.quantile(Nearness(ref).own(), 0.1)),
              qbar={"a": 0.2, "b": 0.8}, reference=ref)
    emb = np.vstack([ref[:1], np.eye(8, dtype=np.float32)[[3]]])  # one near prompt, one far
    u = np.array([[0.9, 0.1], [0.9, -np.inf]])
    out = g.apply(u, ["a", "b"], emb)
    assert np.array_equal(out[0], u[0])  # near: untouched
    assert out[1, 0] == pytest.approx(0.5 * 0.9 + 0.5 * 0.2) and out[1, 1] == -np.inf
    assert np.array_equal(g.far(emb), [False, True])
    everyone = Guard(0.5, 1.0, float("inf"), {"a": 0.2, "b": 0.8}, ref)  # gate 1: a constant shrink
    assert np.allclose(everyone.apply(u[:1], ["a", "b"], emb[:1]), [[0.55, 0.45]])
    off = Guard(0.0, 0.1, 0.5, {"a": 0.2, "b": 0.8}, ref)
    assert off.apply(u, ["a", "b"], emb) is u
    with pytest.raises(GuardError, match="no mean quality"):
        g.apply(u, ["a", "c"], emb)


def test_fit_takes_label_means_and_the_gate_quantile(trained):
    _, table, emb, _ = trained
    g = Guard.fit(table, emb, 0.4, 0.25)
    train = table.split_index("train")
    assert len(g.reference) == len(train)
    assert g.qbar[table.expert_names[1]] == pytest.approx(float(np.nanmean(table.quality[train, 1])))
    assert np.mean(g.nearness.own() < g.threshold) == pytest.approx(0.25, abs=0.01)  # a quarter of training prompts
    assert 0.05 < np.mean(g.far(emb[table.split_index("val")])) < 0.6  # unseen prompts of the same topics
    with pytest.raises(GuardError, match="w must be"):
        Guard.fit(table, emb, 1.5, 0.1)


def test_category_groups_deal_many_categories_into_max_groups():
    cats = ["a"] * 5 + ["b"] * 4 + ["c"] * 3 + ["d"] * 2 + ["e"] + [""]
    assert category_groups(cats, 8) == {"a": ["a"], "b": ["b"], "c": ["c"], "d": ["d"], "e": ["e"]}
    assert category_groups(cats, 2) == {"group-1": ["a", "c", "e"], "group-2": ["b", "d"]}


def test_search_never_reads_the_test_split(trained):
    _, table, emb, _ = trained
    first = search_guard(table, emb, FAST)
    assert first.mean.shape == (len(GATES), len(GRID)) and len(first.per_group) == 4
    assert first.w in GRID and first.gate in GATES
    assert first.mean[GATES.index(first.gate), GRID.index(first.w)] == first.mean.max()
    spoiled = table.subset()
    test = spoiled.split_index("test")
    rng = np.random.default_rng(1)
    spoiled.quality[test] = rng.random((len(test), len(spoiled.expert_names))).round()
    emb2 = emb.copy()
    emb2[test] = rng.normal(size=emb2[test].shape)
    again = search_guard(spoiled, emb2, FAST)
    assert np.allclose(again.mean, first.mean) and (again.w, again.gate) == (first.w, first.gate)
    assert np.allclose(again.mean_in, first.mean_in)  # the in-distribution rows are validation rows, never test
    # each group's router is the served one: the head with its category prior (w chosen on that split's val rows)
    assert set(first.prior_w) == set(first.per_group) and all(w is not None for w in first.prior_w.values())
    assert first.record()["prior_w"] == first.prior_w
    bare = search_guard(table, emb, dataclasses.replace(FAST, category_prior=False))
    assert set(bare.prior_w.values()) == {None}
    blended = {g for g, w in first.prior_w.items() if w}
    assert blended and blended != set(first.per_group)  # this table: some groups' priors blend, some do not
    for g in set(first.per_group) - blended:  # w = 0 leaves the head as it was
        assert np.array_equal(first.per_group[g], bare.per_group[g]), g
    assert not all(np.array_equal(first.per_group[g], bare.per_group[g]) for g in blended)  # a blend scores otherwise
    # the choice weighs the held-out groups against the in-distribution validation rows (0.5 each by default)
    assert first.far_share == 0.5 and first.mean_in is not None and first.mean_in.shape == first.mean.shape
    assert set(first.per_group_in) == set(first.per_group)
    mix = 0.5 * first.mean + 0.5 * first.mean_in
    assert mix[GATES.index(first.gate), GRID.index(first.w)] == mix.max()
    assert first.record()["far_share"] == 0.5 and first.record()["mean_audc_in"] == first.mean_in.tolist()
    for share, grid in ((1.0, first.mean), (0.0, first.mean_in)):  # one side alone
        w, gate = GuardSearch.choose(first.mean, first.mean_in, share)
        assert grid[GATES.index(gate), GRID.index(w)] == grid.max()
    # a shrink of every prompt costs in distribution: the validation rows score it below no shrink
    assert first.mean_in[GATES.index(1.0), GRID.index(1.0)] < first.mean_in[0, 0]
    with pytest.raises(GuardError, match="far_share"):
        search_guard(table, emb, FAST, far_share=1.5)
    one = table.subset()
    one.categories = np.full(one.n, "only")
    with pytest.raises(GuardError, match="at least 2 groups"):
        search_guard(one, emb, FAST)


def test_saved_guard_is_loaded_served_and_pickled(trained, tmp_path, encoder):
    folder, table, emb, _ = trained
    model = folder / "models" / "cscr"
    plain = load_router(folder, "cscr")
    assert plain.guard is None
    save_guard(model, Guard.fit(table, emb, 0.7, 0.25))
    router = load_router(folder, "cscr")
    assert router.guard is not None and router.guard.w == 0.7
    assert load_router(folder, "cscr", guard=False).guard is None
    assert "guard w = 0.7, gate = 0.25" in head_line(folder, "cscr")  # evaluate names what it evaluates
    test = table.split_index("test")
    e = emb[test]
    far = router.guard.far(e)
    assert far.any() and not far.all()
    u0, u1 = plain.utilities(e), router.utilities(e)
    assert np.array_equal(u0[~far], u1[~far]) and not np.allclose(u0[far], u1[far])
    assert_served_as_evaluated(router, encoder, e, table.expert_names[1:4])  # with and without candidates
    # a copy (Ray ships routers pickled) routes the same; the FAISS index is rebuilt
    copy = pickle.loads(pickle.dumps(router))
    assert np.array_equal(copy.utilities(e), u1)
    # an expert that joins by its descriptor gets the head's own mean over the training prompts
    name = table.expert_names[0]
    desc = router.index.vectors()[0]
    router.remove_expert(name)
    router.guard.qbar.pop(name)
    router.add_expert("newcomer", desc, 0.3)
    assert 0.0 < router.guard.qbar["newcomer"] < 1.0 and np.isfinite(router.utilities(e)).all()
    # retraining replaces the model folder, and the guard with it
    train_synthetic_head(folder, table, emb, "cscr", FAST)
    assert load_guard(model) is None and load_router(folder, "cscr").guard is None


def test_cli_search_show_off_and_bad_input(trained, capsys, tmp_path):
    folder, table, emb, _ = trained
    assert main(["guard", "--run", str(folder), "--seed", "0"]) == 0
    out = capsys.readouterr().out
    assert "held-out groups (4" in out and "in distribution (validation rows):" in out and "*" in out
    written = load_guard(folder / "models" / "cscr")
    if written is None:
        assert "no guard written" in out
    else:
        assert written.search["groups"] and written.w > 0 and str(folder / "models" / "cscr" / "guard") in out
        assert main(["guard", "--run", str(folder), "--show"]) == 0
        assert json.loads(capsys.readouterr().out)["w"] == written.w
    save_guard(folder / "models" / "cscr", Guard.fit(table, emb, 0.5, 0.25))
    points = folder / "models" / "cscr" / "operating_points.json"
    points.unlink(missing_ok=True)
    assert main(["guard", "--run", str(folder), "--off"]) == 0
    assert load_guard(folder / "models" / "cscr") is None
    assert points.exists()  # budgets map to the knob of the router as it now routes
    capsys.readouterr()
    assert main(["guard", "--run", str(folder), "--max-groups", "1"]) == 2
    assert "--max-groups" in capsys.readouterr().err
    for bad in ("1.5", "-0.1", "nan"):
        assert main(["guard", "--run", str(folder), "--far-share", bad]) == 2
        assert "--far-share must be in [0, 1]" in capsys.readouterr().err
    t2, e2, _ = synthetic_table(n=300, n_experts=4, dim=16, seed=2, probe_size=30)
    bare = write_synthetic_run(tmp_path / "bare", t2, e2)
    assert main(["guard", "--run", str(bare)]) == 2  # no trained head
    assert "cscr train" in capsys.readouterr().err


def test_ood_experiment_adds_the_guarded_router(trained):
    _, table, emb, topic = trained
    split = ood_split(table, topic <= 2, topic == 3)
    res = run_ood(split, emb, ["cscr", "knn"], FAST, EvalConfig(n_lambdas=20), guard=True)
    assert set(res.routers) == {"cscr", "knn", "cscr+guard"}
    assert set(res.out_of_distribution.routers) >= {"cscr", "cscr+guard"}
    with pytest.raises(ValueError, match="needs 'cscr'"):
        run_ood(split, emb, ["knn"], FAST, EvalConfig(n_lambdas=20), guard=True)
