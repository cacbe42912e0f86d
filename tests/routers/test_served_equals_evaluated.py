"""Served equals evaluated: for every registered router, the decision serving makes
(``Router.rank`` / ``RouterService.decide``) is the choice evaluation sweeps (``route_sweep``)
on the same prompts at the same knob value, with and without candidates.

Routers come from one trained run folder through the one loader (cscr.runs.loader.load_router),
as ``cscr serve`` and ``cscr evaluate`` load them: CSCR (with its category prior) and vanilla from
their trained heads, cscr+category from the CSCR head, every other router fitted on the run's table.
"""

from __future__ import annotations

import numpy as np
import pytest
from cscr.serve.protocol import ProtocolError
from cscr.serve.service import RouterService

from cscr.prior_run import fit_run_prior
from cscr.routers import RouterError, available_routers
from cscr.runs.loader import load_router
from cscr.synthetic import synthetic_table, train_synthetic_head, write_synthetic_run

N_LAMBDAS = 9


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    table, emb, _ = synthetic_table(n=500, n_experts=5, seed=11, probe_size=40)
    folder = write_synthetic_run(tmp_path_factory.mktemp("served") / "run", table, emb)
    for variant in ("cscr", "vanilla"):
        train_synthetic_head(folder, table, emb, variant)
    assert fit_run_prior(folder, "cscr") is not None  # as `cscr train` leaves it (cscr+category needs it)
    return folder, table, emb


@pytest.fixture(scope="module")
def routers(run):
    """Every registered router, loaded once (ranking and sweeping leave a router unchanged)."""
    folder, table, _ = run
    out = {}
    for name in available_routers():
        kwargs = {"expert": table.expert_names[2]} if name == "single" else {}
        out[name] = load_router(folder, name, seed=3, **kwargs)
    return out


def _expected(router, emb, rows, candidates):
    """(knob values, (L, n) expert names) as evaluation sweeps them."""
    grid = router.knob_grid(emb, N_LAMBDAS, rows=rows, candidates=candidates)
    grid = np.unique(np.concatenate([grid, [0.0, float(grid.max()) * 2 + 1.0]]))  # lambda 0 and past the top
    return grid, np.array(router.expert_names)[router.route_sweep(emb, grid, rows=rows, candidates=candidates)]


def test_every_registered_router_is_registered_here():
    assert {"cscr", "vanilla", "oracle", "thompson", "pareto-random", "random", "knn", "umr"} <= set(available_routers())


@pytest.mark.parametrize("with_candidates", [False, True])
def test_rank_makes_the_sweeps_choice_for_every_router(run, routers, with_candidates):
    _, table, emb = run
    rows = table.split_index("test")
    e = emb[rows]
    candidates = [table.expert_names[j] for j in (0, 2, 4)] if with_candidates else None
    checked = []
    for name, router in routers.items():
        grid, want = _expected(router, e, rows, candidates)
        for lam, expected in zip(grid, want, strict=True):
            ranked = router.rank(e, float(lam), candidates, rows=rows)
            got = [r[0].expert for r in ranked]
            assert got == list(expected), f"{name} at lambda={lam}: served {got[:5]} ... evaluated {list(expected[:5])}"
            if candidates is not None:  # the ranked lists hold the candidates only, each once
                assert all(sorted(x.expert for x in r) == sorted(set(x.expert for x in r)) for r in ranked)
                assert all({x.expert for x in r} <= set(candidates) for r in ranked)
        checked.append(name)
    assert set(checked) == set(available_routers())


def test_the_service_decides_what_evaluation_chooses(run, routers, encoder):
    """RouterService.decide (the serving path, minus the encoder) on the test prompts' embeddings:
    the chosen expert is evaluation's choice at every knob value, for every router that routes
    prompts without their table rows; hindsight routers (oracle, thompson) are refused with a 4xx."""
    _, table, emb = run
    e = emb[table.split_index("test")]
    served = []
    for name, router in routers.items():
        service = RouterService(encoder, router)
        try:
            grid, want = _expected(router, e, None, None)
        except RouterError as exc:  # needs the table rows: cannot serve a new prompt
            with pytest.raises(ProtocolError) as err:
                service.decide(e[:2], 0.0)
            assert err.value.status == 400 and str(exc) in str(err.value)
            continue
        for lam, expected in zip(grid, want, strict=True):
            decisions = service.decide(e, float(lam))
            assert [d.chosen for d in decisions] == list(expected), f"{name} at lambda={lam}"
            assert all(d.ranked[0].name == d.chosen for d in decisions)
        served.append(name)
    assert {"cscr", "vanilla", "knn", "pareto-random", "random"} <= set(served)
    assert "oracle" not in served and "thompson" not in served


def test_a_knob_value_is_checked_once_the_same_way_everywhere(run, routers, encoder):
    _, table, emb = run
    e = emb[table.split_index("test")][:3]
    rows = table.split_index("test")[:3]
    for router in routers.values():
        for bad in (-0.5, float("nan"), float("inf")):
            with pytest.raises(RouterError, match="lambda") as err:
                router.rank(e, bad, rows=rows)
            assert err.value.param == "lambda"
            with pytest.raises(RouterError, match="lambda"):
                router.route_sweep(e, [0.0, bad], rows=rows)
    service = RouterService(encoder, routers["cscr"])
    with pytest.raises(ProtocolError, match="lambda") as perr:
        service.decide(e, -1.0)
    assert (perr.value.param, perr.value.code) == ("cost_weight", "invalid_cost_weight")
