"""evaluate_routers and the report: the oracle ceiling, dropped prompts, single experts,
significance, and the files written."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from cscr.config import EvalConfig
from cscr.data.table import Expert, RoutingTable
from cscr.eval import evaluate_routers
from cscr.eval import metrics as M
from cscr.eval.report import format_table, write_report
from cscr.routers import RouterContext, get_router
from cscr.routers.base import Router


class NoisyRouter(Router):
    """Utilities = true quality + noise: a stand-in for a learned router (a knob router)."""

    def __init__(self, noise: float, seed: int) -> None:
        super().__init__()
        self.noise, self.seed = noise, seed

    def fit(self, ctx: RouterContext) -> NoisyRouter:
        super().fit(ctx)
        rng = np.random.default_rng(self.seed)
        self.u = np.nan_to_num(ctx.table.quality) + self.noise * rng.standard_normal(ctx.table.quality.shape)
        return self

    def utilities(self, emb, rows=None):
        return self.u[rows]


def random_table(n, m, seed, missing=0.0, graded=False):
    rng = np.random.default_rng(seed)
    skill = rng.uniform(0.2, 0.9, m)
    q = rng.random((n, m)) if graded else (rng.random((n, m)) < skill).astype(float)
    if missing:
        q[rng.random((n, m)) < missing] = np.nan
    c = rng.uniform(0.1, 3.0, m)[None, :] * rng.uniform(0.3, 1.7, (n, m))
    splits = np.where(rng.random(n) < 0.5, "train", "test")
    splits[:2], splits[2:4] = "train", "test"
    emb = rng.standard_normal((n, 6)).astype(np.float32)
    t = RoutingTable(prompt_ids=[f"p{i}" for i in range(n)], texts=[f"t{i}" for i in range(n)], splits=splits,
                     categories=[""] * n, experts=[Expert(f"e{j}") for j in range(m)], quality=q, cost=c,
                     source="random")
    return t, emb


def fit_all(table, emb, seed=0):
    ctx = RouterContext.from_table(table, emb, seed=seed)
    routers = {name: get_router(name).fit(ctx) for name in ["oracle", "random", "pareto-random", "knn"]}
    for e in table.expert_names:
        routers[f"single:{e}"] = get_router("single", expert=e).fit(ctx)
    routers["noisy"] = NoisyRouter(0.5, seed).fit(ctx)
    return routers


def test_oracle_is_at_or_above_every_router_at_every_budget():
    for seed in range(8):
        n, m = 40 + 5 * seed, 2 + seed % 4
        table, emb = random_table(n, m, seed, missing=0.05 * (seed % 2), graded=seed % 3 == 0)
        res = evaluate_routers(fit_all(table, emb, seed), table, emb, table.split_index("test"), EvalConfig(n_lambdas=200))
        oracle = res.routers["oracle"]
        budgets = np.linspace(0, res.pool_hi * 1.5, 600)
        for name, r in res.routers.items():
            assert (oracle.curve.value(budgets) >= r.curve.value(budgets) - 1e-12).all(), (seed, name)
            assert oracle.audc >= r.audc - 1e-12
            assert oracle.peak >= r.peak - 1e-12
        assert oracle.qnc is not None and oracle.qnc <= res.best_cost + 1e-12


def test_result_fields_single_experts_and_dropped_prompts():
    table, emb = random_table(120, 4, 0, missing=0.05)
    test = table.split_index("test")
    has_nan = np.isnan(table.quality[test]).any(axis=1)
    assert has_nan.any()
    res = evaluate_routers(fit_all(table, emb), table, emb, test, EvalConfig(n_lambdas=50))
    assert res.n_dropped == int(has_nan.sum()) and len(res.rows) == int((~has_nan).sum())
    kept = test[~has_nan]
    np.testing.assert_allclose(res.expert_cost, table.cost[kept].mean(axis=0))
    np.testing.assert_allclose(res.expert_quality, table.quality[kept].mean(axis=0))
    assert (res.pool_lo, res.pool_hi) == (res.expert_cost.min(), res.expert_cost.max())
    assert res.best_expert == table.expert_names[M.best_expert(res.expert_quality, res.expert_cost)]
    for j, e in enumerate(table.expert_names):
        r = res.routers[f"single:{e}"]
        assert r.choices.shape == (1, len(kept)) and (r.choices == j).all()
        assert (r.peak, r.cost_at_peak) == (pytest.approx(res.expert_quality[j]), pytest.approx(res.expert_cost[j]))
        width = res.pool_hi - res.pool_lo
        assert r.audc == pytest.approx(res.expert_quality[j] * (res.pool_hi - res.expert_cost[j]) / width)
    best = res.routers[f"single:{res.best_expert}"]
    assert best.qnc == pytest.approx(res.best_cost) and best.qnc_ratio == pytest.approx(1.0)
    r = res.routers["noisy"]
    assert r.choices.shape == (len(r.lambdas), len(kept))
    x, y = M.operating_points(r.choices, table.quality[kept], table.cost[kept])
    np.testing.assert_allclose(r.costs, x)
    np.testing.assert_allclose(r.qualities, y)


def test_significance_section_and_report_files(tmp_path):
    table, emb = random_table(160, 4, 3)
    routers = fit_all(table, emb)
    res = evaluate_routers(routers, table, emb, table.split_index("test"), EvalConfig(n_lambdas=60, bootstrap=300),
                           compare="noisy")
    (sig,) = res.significance
    strongest = max((r for r in res.routers.values() if r.name not in ("noisy", "oracle")), key=lambda r: r.audc)
    assert sig.a == "noisy" and sig.b == strongest.name
    assert sig.bootstrap.delta == pytest.approx(res.routers["noisy"].audc - strongest.audc)
    assert sig.bootstrap.ci_low <= sig.bootstrap.delta <= sig.bootstrap.ci_high
    assert sig.budget == pytest.approx(res.best_cost)
    if sig.mcnemar is not None:
        pa = res.routers["noisy"].costs[sig.point_a]
        assert pa <= sig.budget * (1 + 1e-12)
    with pytest.raises(ValueError, match="not among the evaluated routers"):
        evaluate_routers(routers, table, emb, table.split_index("test"), compare="nope")

    # a router that never reaches the best single expert is reported as such
    res.routers["random"].qnc = None
    res.routers["random"].qnc_ratio = None
    files = write_report(res, tmp_path / "eval")
    assert sorted(files) == ["deferral.png", "metrics.csv", "metrics.json", "report.md"]
    assert sorted(p.name for p in (tmp_path / "eval").iterdir()) == sorted(files)  # no temporary files left
    assert files["deferral.png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads(files["metrics.json"].read_text())
    assert set(data["routers"]) == set(res.routers)
    assert data["routers"]["random"]["qnc"] is None and data["routers"]["random"]["qnc_reached"] is False
    assert data["routers"]["oracle"]["audc"] == pytest.approx(res.routers["oracle"].audc)
    for name, r in res.routers.items():  # the second ruler: the write-up's AUDC of the raw points
        assert data["routers"][name]["audc_paper"] == pytest.approx(
            M.audc_paper(r.costs, r.qualities, res.pool_lo, res.pool_hi))
    assert data["best_expert"]["name"] == res.best_expert
    assert data["significance"][0]["a"] == "noisy"
    rows = list(csv.DictReader(files["metrics.csv"].open()))
    assert {r["router"] for r in rows} == set(res.routers)
    assert next(r for r in rows if r["router"] == "random")["qnc"] == ""
    assert float(next(r for r in rows if r["router"] == "oracle")["audc_paper"]) == pytest.approx(
        res.routers["oracle"].audc_paper)
    assert "AUDC (write-up)" in format_table(res) and "AUDC (write-up)" in files["report.md"].read_text()
    md = files["report.md"].read_text()
    assert "not reached" in md and "noisy vs" in md and "deferral.png" in md
    table_text = format_table(res)
    for name in res.routers:
        assert name in table_text


def test_bad_inputs():
    table, emb = random_table(30, 3, 0)
    routers = fit_all(table, emb)
    with pytest.raises(ValueError, match="embeddings have"):
        evaluate_routers(routers, table, emb[:-1], table.split_index("test"))
    with pytest.raises(ValueError, match="no routers"):
        evaluate_routers({}, table, emb, table.split_index("test"))
    q = table.quality.copy()
    q[table.split_index("test"), 0] = np.nan
    bad = RoutingTable(table.prompt_ids, table.texts, table.splits, table.categories, table.experts, q, table.cost)
    with pytest.raises(ValueError, match="no evaluable prompts"):
        evaluate_routers(routers, bad, emb, bad.split_index("test"))


def test_candidates_restrict_routing_and_the_pool():
    table, emb = random_table(150, 5, 6, missing=0.03)
    cand = ["e1", "e3", "e4"]
    ctx = RouterContext.from_table(table, emb)
    routers = {n: get_router(n).fit(ctx) for n in ["oracle", "random", "pareto-random", "knn"]}
    routers["noisy"] = NoisyRouter(0.4, 0).fit(ctx)
    res = evaluate_routers(routers, table, emb, table.split_index("test"), EvalConfig(n_lambdas=100, bootstrap=50),
                           compare="noisy", candidates=cand)
    idx = [table.expert_names.index(e) for e in cand]
    for r in res.routers.values():
        assert np.isin(r.choices, idx).all()
    test = table.split_index("test")
    ok = test[~np.isnan(table.quality[np.ix_(test, idx)]).any(axis=1)]
    np.testing.assert_array_equal(res.rows, ok)  # a gap in a non-candidate column keeps the prompt
    assert res.expert_names == cand
    np.testing.assert_allclose(res.expert_cost, table.cost[np.ix_(ok, idx)].mean(axis=0))
    assert res.best_expert in cand
    # the oracle over candidates is the oracle of the smaller pool
    sub = table.subset(experts=cand)
    sub_res = evaluate_routers({"oracle": get_router("oracle").fit(RouterContext.from_table(sub, emb))}, sub, emb,
                               sub.split_index("test"), EvalConfig(n_lambdas=100))
    assert res.routers["oracle"].audc == pytest.approx(sub_res.routers["oracle"].audc, abs=1e-12)
    assert res.significance[0].bootstrap.resamples == 50
    with pytest.raises(ValueError, match="non-empty subset"):
        evaluate_routers(routers, table, emb, test, candidates=["zz"])
