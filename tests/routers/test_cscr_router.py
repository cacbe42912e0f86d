"""The CSCR router: top-k then similarity minus lambda * cost, candidates, live pool updates,
loading trained heads from a run folder (cscr.runs.loader), evaluation through the shared interface."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cscr.config import EvalConfig, HeadConfig, LossConfig, TrainConfig
from cscr.eval import evaluate_routers
from cscr.fingerprints.probe_outcome import probe_outcome_descriptors
from cscr.head import Head
from cscr.routers import RouterContext, RouterError, get_router
from cscr.routers.cscr import CSCRRouter, VanillaRouter
from cscr.runs.descriptors import compute_probe_outcome
from cscr.runs.loader import load_router
from cscr.runs.paths import RunError, RunPaths
from cscr.synthetic import synthetic_table, train_synthetic_head, write_synthetic_run
from cscr.training import fit_head, prepare_arrays


def random_parts(m=6, d_out=8, d_in=16, seed=0):
    torch.manual_seed(seed)
    head = Head(HeadConfig(in_dim=d_in, hidden=32, out_dim=d_out))
    rng = np.random.default_rng(seed)
    desc = rng.standard_normal((m, d_out)).astype(np.float32)
    desc /= np.linalg.norm(desc, axis=1, keepdims=True)
    names = [f"e{j}" for j in range(m)]
    costs = np.linspace(0.0, 1.0, m)
    emb = rng.standard_normal((40, d_in)).astype(np.float32)
    return head, dict(zip(names, desc, strict=True)), dict(zip(names, costs, strict=True)), emb


def test_utilities_are_similarities_on_the_top_k_and_minus_inf_elsewhere():
    head, desc, costs, emb = random_parts()
    router = CSCRRouter.from_parts(head, desc, costs, top_k=3, encoder_dim=16)
    u = router.utilities(emb)
    sims = router.queries(emb) @ np.stack(list(desc.values())).T  # brute force q . d_m
    assert (np.isfinite(u).sum(axis=1) == 3).all()
    top3 = np.sort(sims, axis=1)[:, ::-1][:, :3]
    np.testing.assert_allclose(np.sort(np.where(np.isfinite(u), u, -9), axis=1)[:, ::-1][:, :3], top3, rtol=1e-5, atol=1e-6)
    # lambda = 0 picks the most similar; a huge lambda the cheapest of the top-k
    assert (router.route(emb, 0.0) == sims.argmax(axis=1)).all()
    cheap = np.array([min(np.flatnonzero(np.isfinite(r)), key=lambda j: router.costs[j]) for r in u])
    assert (router.route(emb, 1e6) == cheap).all()
    # routing at lambda is argmax of sim - lambda * c over the top-k
    lam = 0.3
    expected = np.argmax(np.where(np.isfinite(u), sims - lam * router.costs[None, :], -np.inf), axis=1)
    assert (router.route(emb, lam) == expected).all()


def test_candidates_search_top_k_within_them():
    head, desc, costs, emb = random_parts()
    router = CSCRRouter.from_parts(head, desc, costs, top_k=2)
    sims = router.queries(emb) @ np.stack(list(desc.values())).T
    worst = int(np.argmin(sims[0]))  # outside prompt 0's global top-2
    cands = [f"e{worst}", f"e{(worst + 1) % 6}"]
    u, _ = router.scored(emb, candidates=cands)
    assert np.isfinite(u[0, worst])  # searched within the candidates, not filtered afterwards
    assert set(np.flatnonzero(np.isfinite(u[0]))) == {worst, (worst + 1) % 6}
    assert set(router.route_sweep(emb, np.array([0.0, 1.0, 100.0]), candidates=cands).ravel()) <= {worst, (worst + 1) % 6}
    with pytest.raises(RouterError, match="unknown expert"):
        router.route(emb, 0.0, candidates=["nope"])


def test_a_removed_expert_is_never_chosen():
    head, desc, costs, emb = random_parts()
    router = CSCRRouter.from_parts(head, desc, costs, top_k=4)
    favourite = np.bincount(router.route(emb, 0.0)).argmax()
    name = router.expert_names[favourite]
    router.remove_expert(name)
    assert name not in router.expert_names and len(router.costs) == 5
    lambdas = router.knob_grid(emb, 50)
    chosen = {router.expert_names[j] for j in np.unique(router.route_sweep(emb, lambdas))}
    assert name not in chosen
    assert name not in {e.expert for r in router.rank(emb, 0.2) for e in r}
    with pytest.raises(RouterError, match="unknown expert"):
        router.remove_expert(name)


def test_an_added_expert_is_chosen_for_prompts_near_it_without_retraining():
    """Train with the pool, take an expert out (never chosen), then add it back under a new name
    from its descriptor alone: the newcomer takes exactly the prompts the expert had, at every
    knob value, and the head is untouched."""
    table, emb, topic = synthetic_table(n=900, n_experts=5, seed=5, probe_size=64)
    desc = probe_outcome_descriptors(table)
    # similarity utilities (SPEC section 5), so that "near" below is the lambda = 0 choice; the quality
    # head's version of this property is tests/test_quality_head.py's
    similarity = TrainConfig(epochs=2, batch_size=128, lr=2e-4, head=HeadConfig(), loss=LossConfig(bce_weight=0.0))
    res = fit_head(prepare_arrays(table, emb, desc), similarity, log=None)
    costs = dict(zip(table.expert_names, table.expert_costs(), strict=True))
    router = CSCRRouter.from_parts(res.head, desc, costs)
    weights = {k: v.clone() for k, v in router.head.state_dict().items()}
    test = table.split_index("test")
    lambdas = router.knob_grid(emb[test], 40)
    before = np.array(router.expert_names)[router.route_sweep(emb[test], lambdas)]  # (L, n) names
    counts = {n: int((before == n).sum()) for n in router.expert_names}
    name = max(counts, key=lambda n: counts[n] if costs[n] < 1 else -1)  # a frequently chosen, not the dearest
    assert 0 < counts[name] < before.size

    router.remove_expert(name)
    without = np.array(router.expert_names)[router.route_sweep(emb[test], lambdas)]
    assert name not in without

    router.add_expert("newcomer", desc[name], cost=costs[name])
    after = np.array(router.expert_names)[router.route_sweep(emb[test], lambdas)]
    assert ((after == "newcomer") == (before == name)).all()
    assert (after[before != name] == before[before != name]).all()
    # prompts near the newcomer's descriptor: those whose query is most similar to it
    q = router.queries(emb[test])
    sims = q @ router.index.vectors().T  # (n, M)
    near = sims.argmax(axis=1) == router.expert_names.index("newcomer")
    assert near.any() and (np.array(router.expert_names)[router.route(emb[test][near], 0.0)] == "newcomer").all()
    for k, v in router.head.state_dict().items():  # nothing was retrained
        torch.testing.assert_close(v, weights[k])
    with pytest.raises(RouterError, match="already in the index"):
        router.add_expert("newcomer", desc[name], 0.1)
    with pytest.raises(RouterError, match="cost of 'x'"):
        router.add_expert("x", desc[name], -1.0)


def test_rank_orders_by_score_and_bad_inputs_are_refused():
    head, desc, costs, emb = random_parts()
    router = CSCRRouter.from_parts(head, desc, costs, top_k=3)
    ranked = router.rank(emb[:2], lam=0.5)
    assert len(ranked[0]) == 6  # the top-3 scored, then the other three as fallbacks, cheapest first
    scored, fallbacks = ranked[0][:3], ranked[0][3:]
    scores = [e.score for e in scored]
    assert scores == sorted(scores, reverse=True)
    for e in scored:
        assert e.score == pytest.approx(e.utility - 0.5 * e.cost)
    assert all(e.utility is None and e.score is None for e in fallbacks)
    assert [e.cost for e in fallbacks] == sorted(e.cost for e in fallbacks)
    assert ranked[0][0].expert == router.expert_names[router.route(emb[:1], 0.5)[0]]
    # with candidates: only they, the top-k searched within them
    ranked = router.rank(emb[:4], 0.1, candidates=["e1", "e4"])
    assert all({e.expert for e in r} == {"e1", "e4"} for r in ranked)
    for bad in (-1, float("nan"), float("inf")):
        with pytest.raises(RouterError, match="lambda") as err:
            router.rank(emb[:2], lam=bad)
        assert err.value.param == "lambda"
    with pytest.raises(RouterError, match="lambda"):
        router.route_sweep(emb[:2], [0.1, -0.1])
    with pytest.raises(RouterError, match="unknown expert") as err:
        router.rank(emb[:2], 0.0, candidates=["e1", "zz"])
    assert (err.value.param, err.value.code) == ("candidates", "unknown_expert")
    with pytest.raises(RouterError, match=r"prompt embeddings must be \(n, 16\)"):
        router.route(emb[:, :5])
    with pytest.raises(RouterError, match="encoder gives 384"):
        CSCRRouter.from_parts(head, desc, costs, encoder_dim=384)
    with pytest.raises(RouterError, match="dimension 3, the head outputs 8"):
        CSCRRouter.from_parts(head, {"a": np.ones(3)}, {"a": 0.1})
    with pytest.raises(RouterError, match="not fitted"):
        CSCRRouter().route(emb)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    table, emb, _ = synthetic_table(n=700, n_experts=5, seed=7, probe_size=48)
    run = write_synthetic_run(tmp_path_factory.mktemp("cscr") / "run", table, emb)
    for v in ("cscr", "vanilla"):
        train_synthetic_head(run, table, emb, v)
    return table, emb, run


def test_load_router_builds_the_trained_heads_and_evaluates_beside_baselines(trained_run):
    table, emb, run = trained_run
    routers = {n: load_router(run, n) for n in ("cscr", "vanilla", "random")}
    assert isinstance(routers["vanilla"], VanillaRouter) and routers["vanilla"].name == "vanilla"
    assert routers["cscr"].expert_names == table.expert_names and routers["cscr"].top_k == TrainConfig().index.top_k
    np.testing.assert_allclose(routers["cscr"].costs, table.expert_costs(table.split_index("train")))
    basis = routers["cscr"].descriptor_basis
    assert basis is not None and basis.kind == "probe-outcome" and basis.basis_id.startswith("probe:48:")
    result = evaluate_routers(routers, table, emb, table.split_index("test"), EvalConfig(n_lambdas=40, bootstrap=50),
                              compare="cscr")
    assert result.routers["cscr"].audc > result.routers["random"].audc
    assert result.significance[0].a == "cscr"
    # a different k than the one trained with
    one = load_router(run, "cscr", top_k=1)
    assert one.top_k == 1 and (np.isfinite(one.utilities(emb[:5])).sum(1) == 1).all()


def test_loading_without_a_head_or_descriptors_says_what_to_run(tmp_path, trained_run):
    table, emb, _ = synthetic_table(n=200, n_experts=3, seed=8, probe_size=20)
    run = write_synthetic_run(tmp_path / "run", table, emb)
    with pytest.raises(FileNotFoundError, match="cscr train --run .* --variant vanilla"):
        load_router(run, "vanilla")
    with pytest.raises(RouterError, match="load_router"):  # a CSCR router is built, never fitted
        get_router("cscr").fit(RouterContext.from_table(table, emb))
    # a trained head whose descriptors were removed: loading computes nothing, it names the command
    train_synthetic_head(run, table, emb, "cscr")
    RunPaths.of(run).descriptors.unlink()
    with pytest.raises(FileNotFoundError, match=r"no 'probe-outcome' descriptors .*`cscr train --run"):
        load_router(run, "cscr")
    assert not RunPaths.of(run).descriptors.exists()  # loading wrote nothing


def test_loading_refuses_descriptors_of_another_basis(tmp_path):
    table, emb, _ = synthetic_table(n=200, n_experts=3, seed=9, probe_size=20)
    run = write_synthetic_run(tmp_path / "run", table, emb)
    train_synthetic_head(run, table, emb, "cscr")
    # the probe split changes (the table re-prepared) and the descriptors are recomputed: the
    # head was trained on the old coordinates
    splits = table.splits.copy()
    probe = np.flatnonzero(splits == "probe")
    train = np.flatnonzero(splits == "train")
    splits[probe[0]], splits[train[0]] = "train", "probe"
    table.splits = splits
    table.save(RunPaths.of(run).table)
    compute_probe_outcome(run)
    with pytest.raises(RunError, match="not the ones the head was trained with.*retrain"):
        load_router(run, "cscr")
