"""The category prior (cscr/prior.py): the blend, the classifier and its table, the weight chosen on
validation only, `cscr train` fitting and saving it, the loader attaching it so that evaluation,
serving and a pickled copy route alike, a new expert by its descriptor alone, and the experiments."""

from __future__ import annotations

import dataclasses
import json
import pickle
import shutil

import numpy as np
import pytest
from routing_checks import assert_served_as_evaluated

from cscr.config import EvalConfig, TrainConfig
from cscr.data.table import RoutingTable
from cscr.experiments.common import cscr_router, default_descriptors, experiment_prior, train_cscr
from cscr.experiments.unseen import run_unseen
from cscr.guard import Guard, save_guard
from cscr.prior import GRID, CategoryPrior, PriorError, choose_w, load_prior, save_prior
from cscr.prior_run import fit_run_prior
from cscr.runs.loader import load_router
from cscr.runs.settings import head_line
from cscr.synthetic import synthetic_table, train_synthetic_head, write_synthetic_run

FAST = TrainConfig(epochs=2, batch_size=128)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A synthetic run whose 4 topics are its categories (each expert's quality depends on the
    topic), with a briefly trained cscr head and its prior, as `cscr train` leaves them."""
    table, emb, topic = synthetic_table(n=800, n_experts=5, dim=32, n_clusters=4, seed=7, probe_size=48)
    folder = write_synthetic_run(tmp_path_factory.mktemp("prior") / "run", table, emb)
    train_synthetic_head(folder, table, emb, "cscr", FAST)
    prior = fit_run_prior(folder, "cscr")
    return folder, table, emb, topic, prior


def test_apply_blends_finite_entries_and_w_zero_changes_nothing():
    weight = np.array([[4.0, -4.0], [-4.0, 4.0]], dtype=np.float32)  # prompt axis 0 -> category 0
    prior = CategoryPrior(0.5, ["x", "y"], weight, np.zeros(2, np.float32),
                          {"a": np.array([0.9, 0.1]), "b": np.array([0.2, 0.8])},
                          np.eye(2, dtype=np.float32), np.array([0, 1]))
    emb = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    p = prior.proba(emb)
    assert np.allclose(p.sum(1), 1.0) and p[0, 0] > 0.99 and p[1, 1] > 0.99
    u = np.array([[0.5, 0.5], [0.5, -np.inf]])
    out = prior.apply(u, ["a", "b"], emb)
    assert out[0] == pytest.approx([0.5 * 0.5 + 0.5 * 0.9, 0.5 * 0.5 + 0.5 * 0.2], abs=1e-3)
    assert out[1, 1] == -np.inf  # an expert the index did not return stays out
    assert prior.apply(u, ["a", "b"], emb, w=0.0) is u
    with np.errstate(invalid="raise"):  # a full blend never multiplies an excluded expert's -inf by 0
        full = prior.apply(u, ["a", "b"], emb, w=1.0)
        mixed = dataclasses.replace(prior, w_given=1.0).apply_hinted(u, ["a", "b"], emb, np.array([-1, 0]))
    assert full[0] == pytest.approx([0.9, 0.2], abs=1e-3) and full[1, 1] == -np.inf
    assert mixed[0] == pytest.approx(out[0]) and mixed[1, 0] == pytest.approx(0.9) and mixed[1, 1] == -np.inf
    with pytest.raises(PriorError, match="no per-category quality"):
        prior.apply(u, ["a", "c"], emb)
    with pytest.raises(PriorError, match="must be"):
        prior.proba(np.ones((1, 3), np.float32))
    # a new expert's per-category means over the reference prompts
    assert prior.category_means_of(np.array([0.3, 0.7])) == pytest.approx([0.3, 0.7])
    assert prior.with_means({"c": [0.4, 0.6]}).table["c"] == pytest.approx([0.4, 0.6]) and "c" not in prior.table


def test_fit_reads_the_category_from_the_prompt_and_tabulates_train_quality(trained):
    _, table, emb, topic, _ = trained
    prior = CategoryPrior.fit(table, emb)
    train, test = table.split_index("train"), table.split_index("test")
    assert prior.categories == sorted(set(table.categories[train]))
    code = {c: i for i, c in enumerate(prior.categories)}
    truth = np.array([code[c] for c in table.categories[test]])
    assert np.mean(prior.proba(emb[test]).argmax(1) == truth) > 0.9  # well-separated synthetic topics
    for j, name in enumerate(table.expert_names):
        for c, cat in enumerate(prior.categories):
            rows = train[table.categories[train] == cat]
            assert prior.table[name][c] == pytest.approx(np.nanmean(table.quality[rows, j]))
    assert len(prior.reference) == len(prior.reference_codes) <= len(train)
    # an expert without a single train answer gets no table row (the router fills in the head's means)
    q = table.quality.copy()
    q[train, 0] = np.nan
    assert table.expert_names[0] not in CategoryPrior.fit(dataclasses.replace(table, quality=q), emb).table
    one = dataclasses.replace(table, categories=np.array(["same"] * table.n))
    with pytest.raises(PriorError, match="at least 2 train categories"):
        CategoryPrior.fit(one, emb)


def test_the_weight_is_chosen_on_validation_and_never_reads_the_test_split(trained):
    folder, table, emb, _, _ = trained
    router = load_router(folder, "cscr", prior=False)
    prior = CategoryPrior.fit(table, emb)
    chosen = choose_w(prior, router.utilities, router.expert_names, router.costs, table, emb)
    scores = chosen.search["val_audc"]
    assert len(scores) == len(GRID) and chosen.w == GRID[int(np.argmax(np.round(scores, 10)))]
    # the same choice with every test outcome and cost scrambled
    scrambled = dataclasses.replace(table)
    q, c = table.quality.copy(), table.cost.copy()
    test = table.split_index("test")
    rng = np.random.default_rng(0)
    q[test] = rng.random(q[test].shape) < 0.5
    c[test] = rng.random(c[test].shape)
    scrambled.quality, scrambled.cost = q, c
    again = choose_w(prior, router.utilities, router.expert_names, router.costs, scrambled, emb)
    assert again.w == chosen.w and again.search["val_audc"] == scores
    # no usable validation prompt: no blend
    none = dataclasses.replace(table, splits=np.where(table.splits == "val", "train", table.splits))
    assert choose_w(prior, router.utilities, router.expert_names, router.costs, none, emb).w == 0.0


def test_a_given_category_takes_the_place_of_the_one_read_from_the_prompt():
    prior = CategoryPrior(0.5, ["x", "y"], np.array([[4.0, -4.0], [-4.0, 4.0]], dtype=np.float32),
                          np.zeros(2, np.float32), {"a": np.array([0.9, 0.1]), "b": np.array([0.2, 0.8])},
                          np.eye(2, dtype=np.float32), np.array([0, 1]))
    emb = np.array([[1.0, 0.0], [1.0, 0.0]], dtype=np.float32)  # both read as category x
    assert prior.codes(["y", "x", "unknown"]).tolist() == [1, 0, -1]
    read = prior.expected(["a", "b"], emb)
    given = prior.expected(["a", "b"], emb, np.array([1, -1]))
    assert given[0] == pytest.approx([0.1, 0.8])  # the table's row of the given category, exactly
    assert given[1] == pytest.approx(read[1])  # -1: not given, read from the prompt
    u = np.full((2, 2), 0.5)
    assert prior.apply(u, ["a", "b"], emb, 1.0, np.array([1, 1])) == pytest.approx(np.array([[0.1, 0.8]] * 2))
    with pytest.raises(PriorError, match="given categories"):
        prior.expected(["a", "b"], emb, np.array([0, 2]))


def test_cscr_handed_the_category_chooses_its_own_weight_on_validation(trained):
    from cscr.routers import available_routers
    from cscr.routers.base import RouterError

    folder, table, emb, _, _ = trained
    assert "cscr+category" in available_routers()
    router = load_router(folder, "cscr+category")
    inner = router.inner
    assert inner is not None and inner.prior is not None and inner.guard is None
    scores = router.search["val_audc"]
    assert len(scores) == len(GRID) and router.w == GRID[int(np.argmax(np.round(scores, 10)))]
    test = table.split_index("test")
    truth = inner.prior.codes(table.categories[test])
    u = router.utilities(emb[test], test)
    np.testing.assert_allclose(u, inner.prior.apply(inner._raw_utilities(emb[test], None), router.expert_names,
                                                    emb[test], router.w, truth))
    if router.w > 0:  # handed the label, the blend is the table row of the prompt's category
        plain = inner._raw_utilities(emb[test], None)
        rows = inner.prior.expected(router.expert_names, emb[test], truth)
        np.testing.assert_allclose(u, (1 - router.w) * plain + router.w * rows)
    assert router.route_sweep(emb[test], [0.0, 1.0], rows=test).shape == (2, len(test))
    with pytest.raises(RouterError, match="table row"):
        router.utilities(emb[test])
    # the test split's outcomes and costs do not move the choice
    q, c = table.quality.copy(), table.cost.copy()
    rng = np.random.default_rng(1)
    q[test], c[test] = rng.random(q[test].shape) < 0.5, rng.random(c[test].shape)
    again = choose_w(inner.prior, lambda e: inner._raw_utilities(e, None), router.expert_names, router.costs,
                     dataclasses.replace(table, quality=q, cost=c), emb, given=True)
    assert again.w == router.w and again.search["val_audc"] == scores


def test_a_category_a_caller_gives_is_routed_as_cscr_plus_category_evaluates_it(trained):
    from cscr.routers.base import RouterError

    folder, table, emb, _, prior = trained
    assert prior is not None and prior.w_given is not None  # `cscr train` chose it beside w
    assert len(prior.search["val_audc_given"]) == len(GRID)
    test = table.split_index("test")
    e, cats = emb[test], [str(c) for c in table.categories[test]]

    def hinted_as_evaluated(guarded: bool):
        """The run's cscr router handed the test prompts' categories picks what cscr+category picks."""
        served, evaluated = load_router(folder, "cscr"), load_router(folder, "cscr+category")
        assert evaluated.inner is not None
        assert (served.guard is not None) == (evaluated.inner.guard is not None) == guarded
        assert served.prior is not None and served.prior.w_given == evaluated.w == prior.w_given
        for lam in (0.0, 0.3, 2.0):
            got = [r[0].expert for r in served.rank(e, lam, categories=cats)]
            want = np.array(evaluated.expert_names)[evaluated.route_sweep(e, [lam], rows=test)[0]]
            assert got == list(want), lam
        return served

    model = folder / "models" / "cscr"
    save_guard(model, Guard.fit(table, emb, w=0.5, gate=1.0))  # a guard on every prompt: both apply it
    try:
        hinted_as_evaluated(guarded=True)
    finally:
        shutil.rmtree(model / "guard")
    served = hinted_as_evaluated(guarded=False)
    # the hint is what decides: each prompt handed the next category routes as that one's prompts do
    cs = prior.categories
    other = [cs[(cs.index(c) + 1) % len(cs)] for c in cats]
    moved = [r[0].expert for r in served.rank(e, 0.0, categories=other)]
    assert sum(a != b for a, b in zip(moved, [r[0].expert for r in served.rank(e, 0.0)], strict=True)) > len(e) // 10
    # a batch where some callers gave a category: those rows as hinted, the others as read from the prompt
    some = [c if i % 2 else None for i, c in enumerate(other)]
    mixed, hinted, plain = (served.scored(e, None, None, c)[0] for c in (some, other, None))
    np.testing.assert_allclose(mixed[1::2], hinted[1::2])
    np.testing.assert_allclose(mixed[0::2], plain[0::2])
    np.testing.assert_allclose(served.scored(e, None, None, [None] * len(e))[0], plain)
    plain_ranked = served.rank(e, 0.3)
    with pytest.raises(RouterError, match="unknown category 'no-such-task'") as err:
        served.rank(e[:1], 0.0, categories=["no-such-task"])
    assert err.value.param == "category" and err.value.code == "unknown_category"
    with pytest.raises(RouterError, match="categories for"):
        served.rank(e[:2], 0.0, categories=cats[:1])
    with pytest.raises(RouterError, match="no category prior") as err:
        load_router(folder, "cscr", prior=False).rank(e[:1], 0.0, categories=cats[:1])
    assert err.value.code == "unsupported"
    with pytest.raises(RouterError, match="takes no category hint"):
        load_router(folder, "knn").rank(e[:1], 0.0, categories=cats[:1])
    # a prior recorded before hints existed refuses them, and routes as before without
    old = dataclasses.replace(prior, w_given=None)
    served.set_prior(old)
    with pytest.raises(RouterError, match="fitted before category hints"):
        served.rank(e[:1], 0.0, categories=cats[:1])
    assert [x.expert for x in served.rank(e, 0.3)[0]] == [x.expert for x in plain_ranked[0]]
    assert "w_given" not in {k for k, v in old.record().items() if v is not None}


def test_the_service_hands_a_callers_category_to_the_router(trained, encoder):
    from cscr.serve.protocol import ProtocolError
    from cscr.serve.service import RouterService

    folder, table, emb, _, prior = trained
    router = load_router(folder, "cscr")
    service = RouterService(encoder, router)
    rows = table.split_index("test")[:8]
    cat = prior.categories[1]
    got = service.decide(emb[rows], 0.0, category=cat)
    want = router.rank(emb[rows], 0.0, categories=[cat] * len(rows))
    assert [d.chosen for d in got] == [r[0].expert for r in want] and {d.category for d in got} == {cat}
    assert {d.category for d in service.decide(emb[rows], 0.0)} == {None}
    with pytest.raises(ProtocolError) as err:  # refused before the prompt is encoded
        service.route(["a prompt"], 0.0, category="no-such-task")
    assert err.value.status == 400 and err.value.param == "category"


def test_train_saves_it_and_the_loader_serves_it(trained, encoder):
    folder, table, emb, _, prior = trained
    model = folder / "models" / "cscr"
    assert prior is not None and (model / "prior" / "prior.json").exists()
    rec = json.loads((model / "prior" / "prior.json").read_text())
    assert rec["w"] == prior.w and len(rec["search"]["val_audc"]) == len(GRID)
    router = load_router(folder, "cscr")
    assert router.prior is not None and router.prior.w == prior.w
    assert f"category prior w = {prior.w:g}" in (head_line(folder, "cscr") or "")  # evaluate names it
    plain = load_router(folder, "cscr", prior=False)
    assert plain.prior is None
    e = emb[table.split_index("test")]
    forced = load_prior(model)
    assert forced is not None
    router.set_prior(dataclasses.replace(forced, w=0.5))  # a visible blend, whatever w was chosen
    u0, u1 = plain.utilities(e), router.utilities(e)
    np.testing.assert_allclose(u1, router.prior.apply(u0, router.expert_names, e))
    assert not np.allclose(u0, u1)
    assert_served_as_evaluated(router, encoder, e, table.expert_names[1:4])  # with and without candidates
    copy = pickle.loads(pickle.dumps(router))  # Ray ships routers pickled
    assert np.array_equal(copy.utilities(e), u1)
    # an expert that joins by its descriptor gets the head's own per-category means
    name = table.expert_names[0]
    desc = router.index.vectors()[router.expert_names.index(name)]
    router.remove_expert(name)
    router.add_expert("newcomer", desc, 0.3)
    means = router.prior.table["newcomer"]
    assert means.shape == (len(router.prior.categories),) and ((means > 0) & (means < 1)).all()
    assert np.isfinite(router.utilities(e)).all()
    # a damaged prior is one clear error; retraining replaces the model folder and the prior with it
    save_prior(model, forced)
    (model / "prior" / "arrays.npz").write_bytes(b"not an npz")
    with pytest.raises(PriorError, match="unreadable category prior"):
        load_router(folder, "cscr")
    train_synthetic_head(folder, table, emb, "cscr", FAST)
    assert load_prior(model) is None
    off = dataclasses.replace(FAST, category_prior=False)
    train_synthetic_head(folder, table, emb, "cscr", off)
    assert fit_run_prior(folder, "cscr") is None and load_prior(model) is None


def test_old_records_mean_no_prior():
    d = dataclasses.asdict(TrainConfig())
    assert TrainConfig.from_nested(d).category_prior is True
    d.pop("category_prior")
    assert TrainConfig.from_nested(d).category_prior is False


def test_the_experiments_carry_it_for_seen_and_unseen_experts(trained):
    _, table, emb, _, _ = trained
    desc = default_descriptors(table)
    result = train_cscr(table, emb, desc, "cscr", FAST)
    router = cscr_router("cscr", result, desc, dict(zip(table.expert_names, table.expert_costs().tolist(), strict=True)))
    prior = experiment_prior(result, router, table, emb)
    assert prior is not None and prior.search["n_val"] > 0
    off = dataclasses.replace(result, config=dataclasses.replace(FAST, category_prior=False))
    assert experiment_prior(off, router, table, emb) is None
    seen, unseen = table.expert_names[:3], table.expert_names[3:]
    res = run_unseen(table, emb, ["cscr"], seen, unseen, FAST, EvalConfig(bootstrap=1))
    assert np.isfinite(res.evaluation.routers["cscr"].audc)


def test_a_table_without_categories_trains_without_a_prior(tmp_path):
    table, emb, _ = synthetic_table(n=300, n_experts=3, dim=16, seed=1, probe_size=24)
    flat = RoutingTable(table.prompt_ids, table.texts, table.splits, np.array([""] * table.n), table.experts,
                        table.quality, table.cost, source="synthetic", cost_unit="usd")
    folder = write_synthetic_run(tmp_path / "run", flat, emb)
    train_synthetic_head(folder, flat, emb, "cscr", FAST)
    lines: list[str] = []
    assert fit_run_prior(folder, "cscr", lines.append) is None
    assert any("fewer than 2 train categories" in s for s in lines)
    assert load_router(folder, "cscr").prior is None
    from cscr.routers.base import RouterError

    with pytest.raises(RouterError, match="needs a trained cscr head with a category prior"):
        load_router(folder, "cscr+category")
