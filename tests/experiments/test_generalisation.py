"""OOD and unseen-expert experiment logic (cscr/experiments) on generated tables with known structure."""

from __future__ import annotations

import numpy as np
import pytest

from cscr.config import EvalConfig, TrainConfig
from cscr.data.table import Expert, RoutingTable, TableError
from cscr.experiments.ood import (
    LLMROUTER_TASK_GROUPS,
    STEM_SUBJECTS,
    leave_one_group_out,
    ood_split,
    run_ood,
    stem_vs_rest,
)
from cscr.experiments.unseen import EXCLUDED, run_unseen, split_experts
from cscr.synthetic import synthetic_table

FAST = TrainConfig(epochs=2, batch_size=128)
EVAL = EvalConfig(n_lambdas=30)


@pytest.fixture(scope="module")
def synth():
    return synthetic_table(n=600, n_experts=6, dim=32, n_clusters=4, seed=0, probe_size=48)


def test_ood_split_moves_the_held_out_group_to_test(synth):
    table, _, topic = synth
    split = ood_split(table, topic <= 1, topic == 2, "t01", "t2")
    t = split.table
    assert t.n == int((topic <= 2).sum()) and split.counts["dropped"] == int((topic == 3).sum())
    held = np.isin(t.categories, ["topic-2"])
    assert (t.splits[held] == "test").all() and set(split.ood_rows) == set(np.flatnonzero(held))
    # the train group keeps its own splits; its test rows are the in-distribution set
    orig = table.splits[split.emb_rows]
    assert (t.splits[~held] == orig[~held]).all()
    assert set(split.id_rows) == set(np.flatnonzero(~held & (orig == "test")))
    assert not np.isin(t.splits[held], ["train", "val", "probe"]).any()
    with pytest.raises(TableError, match="in both"):
        ood_split(table, topic <= 1, topic >= 1)
    with pytest.raises(TableError, match="no probe rows"):
        ood_split(table, (topic == 0) & (table.splits != "probe"), topic == 1)


def test_stem_vs_rest_on_mmlu_subjects():
    cats = ["abstract_algebra", "college_physics", "philosophy", "anatomy", "gsm8k", "machine_learning"] * 20
    n = len(cats)
    splits = np.repeat(["train", "val", "probe", "test"], n // 4)  # every category in every split
    table = RoutingTable(prompt_ids=[f"p{i}" for i in range(n)], texts=["q"] * n, splits=splits,
                         categories=cats, experts=[Expert("a"), Expert("b")], quality=np.ones((n, 2)),
                         cost=np.ones((n, 2)))
    split = stem_vs_rest(table)
    t = split.table
    assert set(t.categories[split.ood_rows]) == {"philosophy", "anatomy"}  # anatomy is "health" in MMLU's map
    assert "gsm8k" not in set(t.categories)
    assert set(t.categories[t.splits == "train"]) == {"abstract_algebra", "college_physics", "machine_learning"}
    assert len(STEM_SUBJECTS) == 18


def test_leave_one_group_out(synth):
    table, _, _ = synth
    groups = {"a": ["topic-0", "topic-1"], "b": ["topic-2"], "c": ["topic-3"], "absent": ["topic-9"]}
    splits = leave_one_group_out(table, groups)
    assert [s.test_group for s in splits] == ["a", "b", "c"]
    for s in splits:
        assert set(s.table.categories[s.ood_rows]) == set(groups[s.test_group])
        assert not np.isin(s.table.categories[s.table.splits == "train"], groups[s.test_group]).any()
    with pytest.raises(TableError, match="in no group"):
        leave_one_group_out(table, {"a": ["topic-0"]})
    assert {c for cats in LLMROUTER_TASK_GROUPS.values() for c in cats} >= {"math", "mbpp", "mmlu", "commongen"}


def test_run_ood_evaluates_every_router_on_both_sets(synth):
    table, emb, topic = synth
    split = ood_split(table, topic <= 1, topic >= 2)
    names = ["cscr", "umr", "knn", "thompson", "parametric", "oracle"]
    res = run_ood(split, emb, names, FAST, EVAL)
    for ev in (res.in_distribution, res.out_of_distribution):
        assert list(ev.routers) == names
        for r in names:  # the oracle is the ceiling on both sets
            assert ev.routers["oracle"].audc >= ev.routers[r].audc - 1e-9
    assert len(res.out_of_distribution.rows) == len(split.ood_rows)


def test_split_experts_is_seeded_and_spans_costs(synth):
    table, _, _ = synth  # 6 experts, cost rising with the index
    seen, unseen = split_experts(table, seed=0)
    assert len(unseen) == 2 and sorted(seen + unseen) == sorted(table.expert_names)
    idx = sorted(table.expert_names.index(n) for n in unseen)
    assert idx[0] <= 2 < idx[1]  # one from the cheap half, one from the dear half
    assert split_experts(table, seed=0) == (seen, unseen)
    with pytest.raises(TableError, match="cannot hold out"):
        split_experts(table, frac_unseen=0.01)


def test_unseen_experts_never_use_their_train_answers(synth):
    table, emb, _ = synth
    seen, unseen = split_experts(table, seed=1)
    names = ["cscr", "umr", "knn", "pareto-random", "thompson", "oracle", "random", "parametric"]
    res = run_unseen(table, emb, names, seen, unseen, FAST, EVAL)
    assert res.evaluation.expert_names == unseen
    assert set(res.excluded) == {"parametric"} and res.excluded["parametric"] == EXCLUDED["parametric"]
    assert set(res.how) == set(names) - {"parametric"}
    # the report says how many of the held-out experts' answers each router read
    n_probe, n_val = len(table.split_index("probe")), len(table.split_index("val"))
    assert f"the {n_probe} probe prompts" in res.how["cscr"] and f"the {n_val} validation prompts" in res.how["umr"]
    # blanking the held-out experts' train answers changes nothing: nobody read them
    blank = table.subset()
    cols = [blank.expert_index(n) for n in unseen]
    train = blank.split_index("train")
    blank.quality[np.ix_(train, cols)] = np.nan
    res2 = run_unseen(blank, emb, names, seen, unseen, FAST, EVAL)
    for r in res.how:
        assert np.array_equal(res.evaluation.routers[r].choices, res2.evaluation.routers[r].choices), r
