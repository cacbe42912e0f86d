"""Operating points (cscr.operating, cscr.operating_run): the table against a brute-force sweep,
choosing a point against brute force over the points, clear errors that say what is reachable,
pool changes, and promised vs realised on held-out prompts (with a control the check must fail)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from cscr.head import Head, HeadConfig
from cscr.operating import (
    NewExpert,
    OperatingPointError,
    OperatingTable,
    at_cost_weight,
    choose,
    compact_rows,
    compute_table,
    for_budget,
    for_quality,
    pool_columns,
    table_rows,
)
from cscr.operating_run import calibrate, default_requests, table_path, verify, verify_run
from cscr.routers.base import RouterContext, RouterError, get_router
from cscr.routers.cscr import CSCRRouter
from cscr.runs.descriptors import compute_probe_outcome
from cscr.runs.inputs import Run
from cscr.synthetic import synthetic_table, write_synthetic_run


@pytest.fixture(scope="module")
def syn():
    """A synthetic table with large val and test splits, and a knn router fitted on its train split."""
    table, emb, _ = synthetic_table(n=5000, n_experts=5, dim=32, seed=3, val_fraction=0.3, probe_size=40,
                                    missing=0.005)
    router = get_router("knn").fit(RouterContext.from_table(table, emb))
    return table, emb, router


def _split(table, emb, split):
    rows, dropped = table_rows(table.quality, table.split_index(split))
    return rows, dropped, emb[rows], table.quality[rows], table.cost[rows]


def _hand_table(cost, quality, m=2):
    n_l = len(cost)
    share = np.zeros((n_l, m))
    share[:, 0] = 1.0
    return OperatingTable(
        lambdas=np.arange(n_l, dtype=float)[::-1].copy(), cost=np.asarray(cost, float),
        quality=np.asarray(quality, float), share=share, cost_sd=np.zeros(n_l), quality_sd=np.zeros(n_l),
        expert_names=tuple(f"e{j}" for j in range(m)), expert_cost=np.linspace(1, 2, m),
        expert_quality=np.linspace(0.5, 0.8, m), cost_unit="usd", split="val", router="hand", variant="hand",
        n_prompts=10, n_dropped=0)


def test_table_matches_a_brute_force_sweep(syn):
    table, emb, router = syn
    rows, dropped, e, q, c = _split(table, emb, "val")
    assert dropped == int(np.isnan(table.quality[table.split_index("val")]).any(axis=1).sum()) > 0
    op = compute_table(router, e, q, c, cost_unit=table.cost_unit, n_dropped=dropped)
    assert len(op.lambdas) > 20 and np.all(np.diff(op.lambdas) > 0)
    for i in range(0, len(op.lambdas), 7):
        choice = router.route(e, float(op.lambdas[i]))
        assert op.cost[i] == pytest.approx(c[np.arange(len(rows)), choice].mean())
        assert op.quality[i] == pytest.approx(q[np.arange(len(rows)), choice].mean())
        np.testing.assert_allclose(op.share[i], np.bincount(choice, minlength=5) / len(rows))
    np.testing.assert_allclose(op.expert_cost, c.mean(axis=0))
    assert op.n_prompts == len(rows) and op.n_dropped == dropped


def test_efficient_points_are_exactly_the_undominated_ones(syn):
    table, emb, router = syn
    _, _, e, q, c = _split(table, emb, "val")
    op = compute_table(router, e, q, c, cost_unit="usd")
    eff = op.efficient
    for i in range(len(op.cost)):
        dominated = any((op.cost[j] <= op.cost[i] and op.quality[j] >= op.quality[i])
                        and (op.cost[j] < op.cost[i] or op.quality[j] > op.quality[i]) for j in range(len(op.cost)))
        duplicate_before = any(op.cost[j] == op.cost[i] and op.quality[j] == op.quality[i] and eff[j]
                               for j in range(len(op.cost)) if j != i)
        assert eff[i] == (not dominated and not duplicate_before)
    env = op.envelope
    assert np.all(np.diff(op.cost[env]) > 0) and np.all(np.diff(op.quality[env]) > 0)
    rows = compact_rows(op, 15)
    assert len(rows) <= 15 and rows[0] == env[0] and rows[-1] == env[-1]


def test_choosing_agrees_with_brute_force_over_the_points():
    rng = np.random.default_rng(0)
    cost, quality = rng.uniform(0, 1, 60), rng.uniform(0, 1, 60)
    op = _hand_table(cost, quality)
    for b in rng.uniform(cost.min(), 1.2, 25):
        p = for_budget(op, b)
        assert p.cost <= b and p.quality == quality[cost <= b].max()
    for t in rng.uniform(0, quality.max(), 25):
        p = for_quality(op, t)
        assert p.quality >= t and p.cost == cost[quality >= t].min()
    rel = for_quality(op, "0.9x")  # 0.9 x the best single expert's quality (0.8)
    assert rel.cost == cost[quality >= 0.72 - 1e-12].min()
    assert choose(op) is None
    assert choose(op, budget=0.5) == for_budget(op, 0.5)
    both = choose(op, budget=1.0, quality_target=0.3)
    assert both == for_quality(op, 0.3)


def test_unreachable_and_conflicting_requests_say_what_is_reachable():
    op = _hand_table([0.2, 0.5, 0.9], [0.4, 0.6, 0.7])
    with pytest.raises(OperatingPointError, match=r"reachable: budget >= 0\.2") as exc:
        for_budget(op, 0.1)
    assert isinstance(exc.value, RouterError) and exc.value.param == "budget"
    assert exc.value.reachable["min_cost"] == 0.2 and exc.value.reachable["max_quality"] == 0.7
    with pytest.raises(OperatingPointError, match=r"reachable: quality <= 0\.7000") as exc:
        for_quality(op, 0.75)
    assert exc.value.code == "quality_unreachable"
    with pytest.raises(OperatingPointError, match="needs 0.9 usd per request, over the budget 0.5; within the "
                                                  "budget the best quality is 0.6000"):
        choose(op, budget=0.5, quality_target=0.65)
    with pytest.raises(OperatingPointError, match="not both"):
        choose(op, cost_weight=0.1, quality_target="0.9x")
    for bad in ("abc", "1.2", "-0.1x", "0", "nanx"):
        with pytest.raises(OperatingPointError, match="quality_target must be"):
            for_quality(op, bad)
    with pytest.raises(OperatingPointError, match="budget must be"):
        for_budget(op, float("nan"))
    err = pickle.loads(pickle.dumps(OperatingPointError("x", "budget", "c", {"min_cost": 1.0})))
    assert (err.param, err.code, err.reachable) == ("budget", "c", {"min_cost": 1.0})


def test_cost_weight_reads_the_grid_point_at_or_below_it(syn):
    table, emb, router = syn
    _, _, e, q, c = _split(table, emb, "val")
    op = compute_table(router, e, q, c, cost_unit="usd")
    for i in (0, 5, len(op.lambdas) - 1):
        p = at_cost_weight(op, float(op.lambdas[i]))
        assert (p.cost, p.quality) == (op.cost[i], op.quality[i])
    with pytest.raises(RouterError, match="lambda must be a finite number"):
        at_cost_weight(op, -1.0)


def test_save_and_load_round_trip(tmp_path, syn):
    table, emb, router = syn
    _, _, e, q, c = _split(table, emb, "val")
    op = compute_table(router, e, q, c, cost_unit="usd", variant="knn")
    path = op.save(tmp_path / "models" / "knn" / "operating_points.json")
    back = OperatingTable.load(path)
    for f in ("lambdas", "cost", "quality", "share", "cost_sd", "quality_sd", "expert_cost", "expert_quality"):
        np.testing.assert_array_equal(getattr(back, f), getattr(op, f))
    assert back.expert_names == op.expert_names and back.variant == "knn" and back.split == "val"
    with pytest.raises(FileNotFoundError, match="cscr calibrate"):
        OperatingTable.load(tmp_path / "none.json")


def test_pool_columns_drop_removed_and_estimate_new_experts_from_the_nearest_descriptor():
    rng = np.random.default_rng(1)
    q, c = rng.uniform(0, 1, (30, 3)), rng.uniform(0, 1, (30, 3))
    desc = {"a": np.array([1.0, 0, 0]), "b": np.array([0, 1.0, 0]), "c": np.array([0, 0, 1.0])}
    new = {"n": NewExpert(np.array([0.1, 0.2, 0.9]), cost=0.25)}
    q2, c2, notes = pool_columns(["c", "n", "a"], q, c, ["a", "b", "c"], desc, new, scale=4.0)
    np.testing.assert_array_equal(q2[:, 0], q[:, 2])
    np.testing.assert_array_equal(q2[:, 1], q[:, 2])  # n is nearest to c
    np.testing.assert_array_equal(c2[:, 1], np.full(30, 1.0))  # c_m 0.25 x scale 4
    np.testing.assert_array_equal(q2[:, 2], q[:, 0])
    assert list(notes) == ["n"] and "copied from c" in notes["n"]
    with pytest.raises(ValueError, match="neither in the table"):
        pool_columns(["z"], q, c, ["a", "b", "c"], desc)


def test_a_live_pool_change_gives_a_table_over_the_new_pool(tmp_path):
    table, emb, _ = synthetic_table(n=600, n_experts=4, dim=16, seed=2, val_fraction=0.3, probe_size=24)
    run = write_synthetic_run(tmp_path / "run", table, emb)
    compute_probe_outcome(run)  # the run's descriptors: each expert's answers on the probe prompts
    desc, kind, basis = Run.of(run).descriptors()
    dim = len(next(iter(desc.values())))
    torch.manual_seed(0)
    router = CSCRRouter.from_parts(Head(HeadConfig(in_dim=16, hidden=16, out_dim=dim)), desc,
                                   Run.of(run).train_costs(), top_k=0, kind=kind, basis_id=basis)
    router.remove_expert("expert-1")
    rng = np.random.default_rng(0)
    new_desc = np.asarray(desc["expert-3"], dtype=np.float64) + 0.05 * rng.standard_normal(dim)
    router.add_expert("newbie", (new_desc / np.linalg.norm(new_desc)).astype(np.float32), 0.5)
    with pytest.raises(ValueError, match="neither in the table"):  # a new expert must be described
        calibrate(run, "cscr", router, save=False)
    op = calibrate(run, "cscr", router, new={"newbie": NewExpert(new_desc, 0.5)})
    assert OperatingTable.load(table_path(run, "cscr")).expert_names == op.expert_names
    assert op.expert_names == ("expert-0", "expert-2", "expert-3", "newbie")
    assert "copied from expert-3" in op.estimated["newbie"]
    rows, _ = table_rows(table.quality, table.split_index("val"))
    assert op.expert_quality[3] == pytest.approx(np.mean(table.quality[rows, 3]))  # expert-3's column
    scale = table.cost[table.split_index("train")].mean(axis=0).max()
    assert op.expert_cost[3] == pytest.approx(0.5 * scale)
    np.testing.assert_allclose(op.share.sum(axis=1), 1.0)


def test_promises_hold_on_held_out_prompts_and_a_wrong_table_fails(syn, tmp_path):
    table, emb, router = syn
    _, _, e, q, c = _split(table, emb, "val")
    op = compute_table(router, e, q, c, cost_unit="usd", variant="knn")
    budgets, targets = default_requests(op)
    assert len(budgets) == 8 and "0.95x" in targets
    _, _, et, qt, ct = _split(table, emb, "test")
    checks = verify(op, router, et, qt, ct, budgets, targets, n_boot=300)
    assert len(checks) == len(budgets) + len(targets)
    for ch in checks:
        assert ch.cost_ci[0] <= ch.realised_cost <= ch.cost_ci[1]
        assert ch.cost_tol > 0 and ch.quality_tol > 0
    # a 95% tolerance per check: nearly all hold (checks share prompts, so misses come together)
    assert sum(ch.ok for ch in checks) >= 0.8 * len(checks), [ch for ch in checks if not ch.ok]
    # control: promises from the train split (where knn has seen the answers) overstate quality
    rows_tr, _, etr, qtr, ctr = _split(table, emb, "train")
    biased = compute_table(router, etr, qtr, ctr, cost_unit="usd")
    bad = verify(biased, router, et, qt, ct, *default_requests(biased), n_boot=300)
    assert sum(not ch.ok for ch in bad) >= len(bad) // 2
    # the run-level helpers: the table stored in the run, then checked on its test split
    run = write_synthetic_run(tmp_path / "run", table, emb)
    stored = calibrate(run, "knn", router)
    assert table_path(run, "knn").is_file()
    assert len(verify_run(run, stored, router, n_boot=100)) == len(checks)


@pytest.mark.parametrize("val_fraction", [0.3, 0.0])
def test_train_writes_the_table_and_a_run_without_val_prompts_still_trains(tmp_path, val_fraction):
    from cscr.config import TrainConfig
    from cscr.training.plain import train_run

    table, emb, _ = synthetic_table(n=400, n_experts=3, dim=16, seed=1, val_fraction=val_fraction, probe_size=20)
    run = write_synthetic_run(tmp_path / "run", table, emb)
    lines: list[str] = []
    train_run(str(run), "cscr", TrainConfig(epochs=1, batch_size=64), log=lines.append)
    path = table_path(run, "cscr")
    if val_fraction:
        stored = OperatingTable.load(path)
        assert stored.split == "val" and stored.n_prompts == table_rows(table.quality, table.split_index("val"))[0].size
        assert any(ln.endswith(f"operating points written to {path}") for ln in lines)
    else:
        assert not path.exists()
        said = [ln for ln in lines if "no operating-point table" in ln]
        assert len(said) == 1 and "no val prompts" in said[0]
