"""RouterService without Ray: real MiniLM, a CSCR router from parts and from a trained run, a
baseline without a live pool; router errors become protocol errors (4xx) here."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from cscr.serve.protocol import ProtocolError
from cscr.serve.service import (
    RouterService,
    ServiceError,
    check_encoder,
    pool_mismatch,
)

from cscr.config import HeadConfig
from cscr.head import Head
from cscr.routers.cscr import CSCRRouter
from cscr.runs.inputs import Run
from cscr.runs.loader import load_router

PROMPTS = ["What is the capital of France?", "Write a Python function that reverses a list.",
           "Solve 12 * 7 + 3.", "Translate 'good morning' into German."]


@pytest.fixture(scope="module")
def service(encoder) -> RouterService:
    torch.manual_seed(0)
    head = Head(HeadConfig(in_dim=384, hidden=64, out_dim=16))
    rng = np.random.default_rng(0)
    names = ["cheap", "mid", "pricey"]
    desc = {n: rng.standard_normal(16) for n in names}
    router = CSCRRouter.from_parts(head, desc, {"cheap": 0.05, "mid": 0.3, "pricey": 1.0}, top_k=3)
    return RouterService(encoder, router, default_lambda=0.0, max_prompt_chars=200)


def test_decision_ranks_by_similarity_minus_lambda_cost(service):
    emb = service.embed(PROMPTS)
    q = service.router.queries(emb)  # (n, D')
    for lam in (0.0, 0.2, 5.0):
        for i, d in enumerate(service.decide(emb, lam)):
            scores = [r.score for r in d.ranked]
            assert scores == sorted(scores, reverse=True) and d.chosen == d.ranked[0].name
            for r in d.ranked:  # score = q . d_m - lambda * c_m, with the index's own descriptors
                j = service.router.expert_names.index(r.name)
                sim = float(q[i] @ service.router.index.vectors()[j])
                assert r.similarity == pytest.approx(sim, abs=1e-5)
                assert r.score == pytest.approx(sim - lam * r.cost, abs=1e-5)
    # a large lambda always picks the cheapest expert, lambda = 0 the most similar
    assert {d.chosen for d in service.decide(emb, 50.0)} == {"cheap"}
    sims = q @ service.router.index.vectors().T
    assert [d.chosen for d in service.decide(emb, 0.0)] == [service.router.expert_names[j] for j in sims.argmax(1)]


def test_candidates_and_max_cost_restrict_the_choice(service):
    d = service.route(PROMPTS[:1], 0.0, candidates=["mid", "pricey"])[0]
    assert {r.name for r in d.ranked} == {"mid", "pricey"} and d.routing_ms > 0
    d = service.route(PROMPTS[:1], 0.0, max_cost=0.3)[0]
    assert {r.name for r in d.ranked} == {"cheap", "mid"}
    with pytest.raises(ProtocolError, match=r"unknown expert\(s\) \['gpt-9'\] in candidates") as err:
        service.route(PROMPTS[:1], 0.0, candidates=["gpt-9"])
    assert (err.value.status, err.value.code, err.value.param) == (400, "unknown_expert", "candidates")
    with pytest.raises(ProtocolError, match="no candidate expert costs at most max_cost=0.01"):
        service.route(PROMPTS[:1], 0.0, max_cost=0.01)
    with pytest.raises(ProtocolError, match="max_cost must be a finite number >= 0"):
        service.route(PROMPTS[:1], 0.0, max_cost=-1)


def test_bad_prompts_and_knobs(service):
    with pytest.raises(ProtocolError, match="the prompt is empty"):
        service.route(["   "])
    with pytest.raises(ProtocolError, match="201 characters; the limit is 200") as err:
        service.route(["x" * 201])
    assert err.value.code == "prompt_too_long"
    for bad in (-1.0, float("nan")):
        with pytest.raises(ProtocolError, match="lambda") as err:
            service.route(PROMPTS[:1], bad)
        assert (err.value.status, err.value.code, err.value.param) == (400, "invalid_cost_weight", "cost_weight")


def test_live_add_is_chosen_near_its_descriptor_and_remove_is_never_chosen(service):
    emb = service.embed(PROMPTS)
    q = service.router.queries(emb[2:3])[0]
    service.add_expert("newcomer", 0.5, (q * 3.0).tolist())  # any scale: normalised
    try:
        assert service.decide(emb[2:3], 0.0)[0].chosen == "newcomer"
        assert service.expert_costs()["newcomer"] == 0.5
        with pytest.raises(ProtocolError, match="already in the pool"):
            service.add_expert("newcomer", 0.1, q.tolist())
        with pytest.raises(ProtocolError, match="dimension 3; the router's index takes 16"):
            service.add_expert("bad", 0.1, [1.0, 0.0, 0.0])
        with pytest.raises(ProtocolError, match="zero or not finite"):
            service.add_expert("bad", 0.1, [0.0] * 16)
        with pytest.raises(ProtocolError, match="cost of 'bad' must be a finite number >= 0") as err:
            service.add_expert("bad", -0.1, q.tolist())
        assert err.value.param == "cost" and "bad" not in service.expert_names
    finally:
        service.remove_expert("newcomer")
    for lam in (0.0, 0.3, 10.0):
        assert all(r.name != "newcomer" for d in service.decide(emb, lam) for r in d.ranked)
    # a router from parts has no probe prompts: outcomes are refused, nothing is added
    with pytest.raises(ProtocolError, match="takes no probe outcomes") as err:
        service.add_expert("newcomer", 0.5, q.tolist(), outcomes=[1.0, 0.0])
    assert err.value.param == "probe_outcomes" and "newcomer" not in service.expert_names
    with pytest.raises(ProtocolError, match="unknown expert 'newcomer'") as err:
        service.remove_expert("newcomer")
    assert err.value.status == 404


def test_pool_check_names_the_differences(service):
    service.check_pool(["pricey", "cheap", "mid"])
    with pytest.raises(ServiceError, match=r"no descriptor in the index: \['extra'\].*missing from the pool: \['mid'\]"):
        service.check_pool(["cheap", "pricey", "extra"])
    assert pool_mismatch(["a"], ["a"]) is None


def test_from_run_loads_the_trained_router(trained_run, encoder):
    svc = RouterService.from_run(trained_run, encoder=encoder)
    router, table = load_router(trained_run), Run.of(trained_run).table
    assert svc.expert_names == router.expert_names == table.expert_names
    assert svc.router.descriptor_basis is not None and svc.router.descriptor_basis.kind == "probe-outcome"
    # c_m from the train split, the best expert by train quality, raw USD scale
    np.testing.assert_allclose(list(svc.expert_costs().values()), table.expert_costs(table.split_index("train")))
    assert svc.reference.best_expert == "gpt-4-1106-preview" and svc.reference.unit == "usd"
    d = svc.route(["Write a function to add two numbers."], 100.0)[0]
    assert d.chosen == min(svc.expert_costs(), key=svc.expert_costs().get)
    with pytest.raises(ProtocolError, match="probe-outcome descriptors, which cannot be computed"):
        svc.fingerprint_plan()


def on_copy(trained_run: Path, tmp_path: Path, use: bool | None) -> Path:
    """A copy of the trained run whose recorded newcomer-level choice says ``use`` (None: no record)."""
    import shutil

    from cscr.newcomer import LevelChoice, save_choice

    run = Path(shutil.copytree(trained_run, tmp_path / f"run-{use}"))
    model = Run.of(run).paths.model("cscr")
    if use is None:
        (model / "newcomer_levels.json").unlink()
    else:
        save_choice(model, LevelChoice(use, why="set by the test"))
    return run


def test_a_newcomer_with_probe_outcomes_is_calibrated_on_them(trained_run, encoder, tmp_path):
    """The run's probe prompts travel with its router: an expert added with its answers there is
    calibrated on them (cscr/newcomer.py; here the run's recorded choice says they pay); outcomes that
    do not fit are a 400 that changes nothing."""
    svc = RouterService.from_run(on_copy(trained_run, tmp_path, True), encoder=encoder)
    n_probe = len(Run.of(trained_run).table.split_index("probe"))
    assert svc.router.probes is not None and len(svc.router.probes) == n_probe
    emb = svc.embed(PROMPTS)
    desc = svc.router.queries(emb[:1])[0].tolist()
    outcomes = [float(i % 4 == 0) for i in range(n_probe)]  # answers a quarter of the probes well
    for bad, words in (([1.0] * (n_probe + 1), f"the run has {n_probe} probe prompts"),
                       ([2.0] * n_probe, "in [0, 1]"), (["yes"] * n_probe, "numbers in [0, 1]")):
        with pytest.raises(ProtocolError, match=re.escape(words)) as err:
            svc.add_expert("newcomer", 0.1, desc, outcomes=bad)
        assert err.value.param == "probe_outcomes" and "newcomer" not in svc.expert_names
    svc.add_expert("plain", 0.1, desc)
    svc.add_expert("newcomer", 0.1, desc, outcomes=[*outcomes[:-1], None])  # null: a probe not answered
    u = svc.router.utilities(emb)
    plain, new = svc.expert_names.index("plain"), svc.expert_names.index("newcomer")
    assert "newcomer" in svc.router.levels and "plain" not in svc.router.levels
    assert not np.allclose(u[:, new], u[:, plain])  # same descriptor, its own level
    assert abs(u[:, new].mean() - 0.25) < abs(u[:, plain].mean() - 0.25)  # towards what it answered
    svc.remove_expert("newcomer")
    assert "newcomer" not in svc.router.levels


def test_serving_honours_the_newcomer_level_choice_cscr_train_recorded(trained_run, encoder, tmp_path):
    """cscr train records whether newcomers' probe outcomes pay (over the run's own experts); the
    server calibrates a newcomer on them only where it said so, and checks them either way."""
    from cscr.newcomer import load_choice

    recorded = load_choice(Run.of(trained_run).paths.model("cscr"))
    assert recorded is not None and recorded.draws  # the training run made the choice
    assert RouterService.from_run(trained_run, encoder=encoder).router.calibrate_newcomers == recorded.use
    n_probe = len(Run.of(trained_run).table.split_index("probe"))
    outcomes = [float(i % 4 == 0) for i in range(n_probe)]
    for use in (False, None):  # None: no record (a run trained before): the operator's choice
        svc = RouterService.from_run(on_copy(trained_run, tmp_path, use), encoder=encoder)
        desc = svc.router.queries(svc.embed(PROMPTS[:1]))[0].tolist()
        with pytest.raises(ProtocolError, match="in \\[0, 1\\]"):  # checked whatever the choice
            svc.add_expert("newcomer", 0.1, desc, outcomes=[2.0] * n_probe)
        svc.add_expert("newcomer", 0.1, desc, outcomes=outcomes)
        assert ("newcomer" in svc.router.levels) == (use is None) and "newcomer" in svc.expert_names


def test_an_encoder_other_than_the_runs_is_refused(trained_run, encoder):
    check_encoder(trained_run, encoder)

    class Other:
        encoder_id = "some-other-encoder"

        def encode(self, texts):
            return np.zeros((len(texts), 384), dtype=np.float32)

    with pytest.raises(ServiceError, match="embedded with encoder all-MiniLM-L6-v2-.*loaded some-other-encoder"):
        RouterService.from_run(trained_run, encoder=Other())


def test_a_router_without_a_live_pool_serves_and_refuses_pool_changes(trained_run, encoder):
    """Any registered router serves decisions (here knn, from the same run through the same
    loader); live pool changes are refused with a 4xx, not probed for."""
    svc = RouterService.from_run(trained_run, "knn", encoder=encoder)
    emb = svc.embed(PROMPTS)
    router = svc.router
    lam = 0.1
    assert [d.chosen for d in svc.decide(emb, lam)] == [router.expert_names[j] for j in router.route(emb, lam)]
    with pytest.raises(ProtocolError, match="does not support live expert changes") as err:
        svc.remove_expert(svc.expert_names[0])
    assert err.value.code == "unsupported"
    with pytest.raises(ProtocolError, match="does not support live expert changes"):
        svc.add_expert("newcomer", 0.1, [1.0] * 8)
    with pytest.raises(ProtocolError, match="'knn' takes no probe outcomes") as err:
        svc.add_expert("newcomer", 0.1, [1.0] * 8, outcomes=[1.0, 0.0])
    assert err.value.param == "probe_outcomes" and "newcomer" not in svc.expert_names
    with pytest.raises(ProtocolError, match="'knn' takes no expert descriptors"):
        svc.fingerprint_plan()
