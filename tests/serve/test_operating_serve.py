"""Operating points in the server (issue 11): requests that ask for a budget or a quality target,
the chosen lambda and the table's expected cost and quality in headers and in /v1/route, 400s
that say what is reachable, server-wide defaults, max_cost in the run's unit, per-key spend
budgets (429), the table following live pool changes, and the official openai client over real
HTTP whose realised cost and quality on held-out prompts match the table's promise.

Real parts throughout: a CSCR head trained on a RouterBench slice (``trained_run``: its
operating points are written by ``train_run``), the MiniLM encoder, tiny random LMs behind the
transformers backend answering under the RouterBench experts' names."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from cscr.serve.admin import AdminService
from cscr.serve.budgets import BookLedger, KeyBudgets, RequestWindows
from cscr.serve.completion import CompletionService, CompletionSettings
from cscr.serve.local import LocalExperts, LocalRouter
from cscr.serve.metrics import Tally
from cscr.serve.protocol import ProtocolError
from cscr.serve.routes import EdgeSettings, build_api
from cscr.serve.service import RouterService, ServiceError
from fastapi.testclient import TestClient
from serve_helpers import RB_EXPERTS, free_port

from cscr.operating import OperatingTable, for_budget, for_quality
from cscr.operating_run import check_choices, checks_markdown, split_arrays, table_path
from cscr.runs.inputs import Run

KEY = "plain-key"
MSG = [{"role": "user", "content": "What is 2 + 2?"}]


@pytest.fixture(scope="module")
def backends(tiny_lms):
    """The RouterBench experts' names, answered by the tiny LMs (one token each)."""
    from cscr.serve.experts import build_backend

    from cscr.pool import ExpertSpec

    return {name: build_backend(ExpertSpec(name=name, model=str(tiny_lms["ab"[i % 2]]), max_new_tokens=4))
            for i, name in enumerate(RB_EXPERTS)}


@pytest.fixture(scope="module")
def service(trained_run, encoder) -> RouterService:
    return RouterService.from_run(trained_run, encoder=encoder)


def make_app(service: RouterService, backends, budgets: KeyBudgets | None = None, **edge):
    local = LocalRouter(service)
    experts = LocalExperts(dict(backends))
    completion = CompletionService(local, experts, CompletionSettings(default_max_tokens=1), Tally())
    admin = AdminService(local, experts, completion)
    return build_api(completion, admin, EdgeSettings(**{"api_key": KEY, **edge}), budgets)


def client(service, backends, budgets=None, **edge) -> TestClient:
    return TestClient(make_app(service, backends, budgets, **edge), raise_server_exceptions=False)


def auth(key: str = KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def mid_budget(table: OperatingTable) -> float:
    """A budget between the cheapest and the best efficient point (not on a point)."""
    env = table.envelope
    return float(table.cost[env[len(env) // 2]] * 1.0001)


def relative_target(table: OperatingTable, want: float = 0.95) -> str:
    """``"0.95x"`` when the router reaches 95% of the best expert's quality, else the largest
    reachable multiple (a router can fall short of always using the best expert)."""
    top = table.reachable()["max_quality"] / table.best_expert_quality
    return f"{want}x" if want <= top else f"{np.floor(top * 1000) / 1000}x"


def test_cscr_train_wrote_the_table_the_service_holds(trained_run, service):
    stored = OperatingTable.load(table_path(trained_run, "cscr"))
    assert list(stored.expert_names) == service.expert_names == RB_EXPERTS
    assert service.table is not None and np.array_equal(service.table.lambdas, stored.lambdas)
    assert stored.split == "val" and stored.cost_unit == Run.of(trained_run).table.cost_unit


def test_budget_and_quality_target_pick_lambda_and_report_the_point(service, backends):
    c, table = client(service, backends), service.table
    b = mid_budget(table)
    want = for_budget(table, b)
    r = c.post("/v1/route", headers=auth(), json={"prompt": "Solve 12 * 7 + 3.", "budget": b})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["cost_weight"] == want.lam and body["expected_cost"] == pytest.approx(want.cost)
    assert body["expected_quality"] == pytest.approx(want.quality) and body["cost_unit"] == table.cost_unit
    assert want.cost <= b and float(r.headers["x-cscr-cost-weight"]) == want.lam
    assert float(r.headers["x-cscr-expected-cost"]) == pytest.approx(want.cost)
    # the decision is the router's at that lambda
    emb = service.embed(["Solve 12 * 7 + 3."])
    assert body["chosen"] == service.router.rank(emb, want.lam)[0][0].expert

    rel = relative_target(table)
    q = for_quality(table, rel)
    r = c.post("/v1/chat/completions", headers=auth(), json={"model": "cscr", "messages": MSG,
                                                              "quality_target": rel})
    assert r.status_code == 200, r.text
    assert float(r.headers["x-cscr-cost-weight"]) == q.lam and q.quality >= float(rel[:-1]) * table.best_expert_quality - 1e-12
    assert float(r.headers["x-cscr-expected-quality"]) == pytest.approx(q.quality)
    assert r.headers["x-cscr-cost-unit"] == table.cost_unit
    info = r.json()["cscr"]
    assert info["expected_quality"] == pytest.approx(q.quality) and info["cost_weight"] == q.lam
    # a plain cost_weight shows the table's estimate at that lambda
    r = c.post("/v1/route", headers=auth(), json={"prompt": "hi", "cost_weight": float(table.lambdas[3])})
    assert r.json()["expected_cost"] == pytest.approx(float(table.cost[3]))


def error(r, status: int, code: str, param: str | None) -> dict:
    assert r.status_code == status, r.text
    e = r.json()["error"]
    assert {"message", "type", "param", "code"} <= set(e) and (e["code"], e["param"]) == (code, param), e
    return e


def test_unreachable_and_conflicting_requests_get_a_400_saying_what_is_reachable(service, backends):
    c, table = client(service, backends), service.table
    reach = table.reachable()
    e = error(c.post("/v1/route", headers=auth(), json={"prompt": "hi", "budget": reach["min_cost"] / 10}),
              400, "budget_unreachable", "budget")
    assert e["reachable"]["min_cost"] == pytest.approx(reach["min_cost"]) and f"{reach['min_cost']:.6g}" in e["message"]
    e = error(c.post("/v1/chat/completions", headers=auth(), json={"model": "cscr", "messages": MSG,
                                                                   "quality_target": "1.5x"}),
              400, "quality_unreachable", "quality_target")
    assert f"{reach['max_quality']:.4f}" in e["message"] and e["reachable"]["max_quality"] == reach["max_quality"]
    error(c.post("/v1/route", headers=auth(), json={"prompt": "hi", "budget": 1.0, "cost_weight": 0.2}),
          400, "conflicting_request", "cost_weight")
    error(c.post("/v1/route", headers=auth(), json={"prompt": "hi", "model": "cscr:0.3", "budget": 1.0}),
          400, "conflicting_request", "cost_weight")
    if reach["min_cost"] < reach["cost_at_max_quality"]:  # a budget below what the best quality costs
        e = error(c.post("/v1/route", headers=auth(), json={
            "prompt": "hi", "budget": reach["min_cost"], "quality_target": reach["max_quality"]}),
            400, "conflicting_request", "quality_target")
        assert "within the budget the best quality is" in e["message"]
    for bad in ({"budget": True}, {"quality_target": True}, {"budget": "cheap"}, {"quality_target": [1]}):
        error(c.post("/v1/route", headers=auth(), json={"prompt": "hi", **bad}), 400, "invalid_request",
              next(iter(bad)))
    error(c.post("/v1/route", headers=auth(), json={"prompt": "hi", "quality_target": "most"}),
          400, "invalid_quality_target", "quality_target")
    error(c.post("/v1/route", headers=auth(), json={"prompt": "hi", "budget": -1}), 400, "invalid_budget", "budget")


def test_server_defaults_pick_lambda_for_requests_that_ask_for_nothing(trained_run, encoder, backends, service):
    table = service.table
    b = mid_budget(table)
    svc = RouterService.from_run(trained_run, encoder=encoder, default_budget=b)
    assert svc.default_lambda == for_budget(table, b).lam
    r = client(svc, backends).post("/v1/route", headers=auth(), json={"prompt": "hi"})
    assert r.json()["cost_weight"] == for_budget(table, b).lam
    assert r.json()["expected_cost"] == pytest.approx(for_budget(table, b).cost)
    rel = relative_target(table, 0.9)
    svc = RouterService.from_run(trained_run, encoder=encoder, default_quality_target=rel)
    assert svc.default_lambda == for_quality(table, rel).lam
    with pytest.raises(ServiceError, match="the server default cannot be met: budget"):
        RouterService.from_run(trained_run, encoder=encoder, default_budget=table.reachable()["min_cost"] / 10)


def test_max_cost_is_a_hard_cap_in_the_runs_unit(service, backends):
    raw = {n: c * service.reference.scale for n, c in service.expert_costs().items()}
    cheapest = min(raw.values())
    c = client(service, backends)
    r = c.post("/v1/route", headers=auth(), json={"prompt": "hi", "max_cost": cheapest})
    assert {x["name"] for x in r.json()["ranked"]} == {n for n, v in raw.items() if v <= cheapest * (1 + 1e-9)}
    e = error(c.post("/v1/route", headers=auth(), json={"prompt": "hi", "max_cost": cheapest / 2}),
              400, "no_candidate", "max_cost")
    assert service.reference.unit in e["message"]
    # a budget among the allowed experts: the table of that narrowed pool
    allowed = [n for n, v in raw.items() if v <= cheapest * (1 + 1e-9)]
    r = c.post("/v1/route", headers=auth(), json={"prompt": "hi", "max_cost": cheapest, "budget": 1e9})
    narrowed = service.table_for(allowed)
    assert r.status_code == 200 and set(narrowed.point(narrowed.envelope[-1]).share) <= set(allowed)
    own = [service.table.expert_cost[service.table.expert_names.index(n)] for n in allowed]  # their val mean cost
    assert min(own) - 1e-12 <= r.json()["expected_cost"] <= max(own) + 1e-12


def test_per_key_budgets_are_tallied_and_enforced_with_a_429(service, backends):
    table = service.table
    cheap = min(service.expert_costs().values()) * service.reference.scale
    budgets = KeyBudgets.from_entries([{"key": "sk-team-a", "name": "team-a", "budget": cheap * 1.5},
                                       {"key": "sk-team-b", "name": "team-b", "budget": 1e9}])
    c = client(service, backends, budgets)
    ask = {"model": "cscr", "messages": MSG, "max_cost": cheap}  # the cheapest expert answers
    assert c.post("/v1/chat/completions", headers=auth("sk-team-a"), json=ask).status_code == 200
    assert budgets.ledger.book.get("team-a") == pytest.approx(cheap)
    assert c.post("/v1/chat/completions", headers=auth("sk-team-a"), json=ask).status_code == 200  # 1 < 1.5
    e = error(c.post("/v1/chat/completions", headers=auth("sk-team-a"), json=ask), 429, "budget_exhausted", None)
    assert e["type"] == "insufficient_quota" and "team-a" in e["message"] and table.cost_unit in e["message"]
    assert budgets.ledger.book.get("team-a") == pytest.approx(2 * cheap)  # the refused request is not charged
    # the other keys are unaffected; a direct request is charged its expert's cost
    r = c.post("/v1/completions", headers=auth("sk-team-b"), json={"model": RB_EXPERTS[2], "prompt": "hi"})
    assert r.status_code == 200, r.text
    assert budgets.ledger.book.get("team-b") == pytest.approx(service.expert_costs()[RB_EXPERTS[2]]
                                                          * service.reference.scale)
    assert c.post("/v1/chat/completions", headers=auth(), json=ask).status_code == 200  # the plain key: no budget
    error(c.post("/v1/chat/completions", headers=auth("sk-nobody"), json=ask), 401, "invalid_api_key", None)
    # declared keys only (no plain key): anything else is refused
    c = client(service, backends, KeyBudgets.from_entries([{"key": "k1", "name": "a", "budget": 1.0}]), api_key=None)
    error(c.post("/v1/chat/completions", json=ask), 401, "invalid_api_key", None)
    with pytest.raises(ValueError, match="budget must be a number"):
        KeyBudgets.from_entries([{"key": "k", "name": "a", "budget": True}])
    with pytest.raises(ValueError, match="unique"):
        KeyBudgets.from_entries([{"key": "k", "name": "a", "budget": 1}, {"key": "k", "name": "b", "budget": 1}])


def test_request_windows_admit_rpm_in_any_minute():
    now = [0.0]
    w = RequestWindows(clock=lambda: now[0])
    for t in (0.0, 10.0, 20.0):
        now[0] = t
        assert w.take("a", 3) == 0.0
    assert w.take("a", 3) == 40.0 and w.take("b", 3) == 0.0  # full until the first leaves; another key: its own
    now[0] = 59.9
    assert w.take("a", 3) == pytest.approx(0.1)  # a refused request is not recorded
    now[0] = 60.0
    assert w.take("a", 3) == 0.0 and w.take("a", 3) == 10.0  # the first left, one came in: full until 70 s
    assert w.take("a", 4) == 0.0  # a key whose limit was raised takes one more at once


def test_a_keys_request_rate_is_enforced_with_a_429_and_retry_after(service, backends):
    now = [0.0]
    ledger = BookLedger(windows=RequestWindows(clock=lambda: now[0]))
    budgets = KeyBudgets.from_entries([{"key": "sk-slow", "name": "slow", "budget": 1e9, "rpm": 2},
                                       {"key": "sk-free", "name": "free", "budget": 1e9}], ledger=ledger)
    c = client(service, backends, budgets)
    ask = {"model": RB_EXPERTS[0], "prompt": "hi", "max_tokens": 2}
    assert [c.post("/v1/completions", headers=auth("sk-slow"), json=ask).status_code for _ in range(2)] == [200, 200]
    spent = ledger.book.get("slow")
    now[0] = 15.5
    r = c.post("/v1/completions", headers=auth("sk-slow"), json={**ask, "stream": True})
    e = error(r, 429, "rate_limit_exceeded", None)
    assert e["type"] == "requests" and "2 requests a minute" in e["message"] and r.headers["retry-after"] == "45"
    assert ledger.book.get("slow") == spent  # refused before anything ran: not charged
    assert c.post("/v1/completions", headers=auth("sk-free"), json=ask).status_code == 200  # no limit
    assert c.post("/v1/completions", headers=auth(), json=ask).status_code == 200  # the plain key: no limit
    now[0] = 60.0  # the first two left the window
    assert [c.post("/v1/completions", headers=auth("sk-slow"), json=ask).status_code for _ in range(2)] == [200, 200]
    import openai

    oc = openai.OpenAI(base_url="http://testserver/v1", api_key="sk-slow", http_client=c, max_retries=0)
    with pytest.raises(openai.RateLimitError) as err:  # what the openai client sees
        oc.completions.create(**ask)
    assert err.value.code == "rate_limit_exceeded" and err.value.response.headers["retry-after"] == "60"
    assert [k.get("rpm") for k in asyncio.run(budgets.usage())] == [2, None]  # the admin report's "keys"


def test_the_table_follows_live_pool_changes(trained_run, encoder):
    svc = RouterService.from_run(trained_run, encoder=encoder)
    before = svc.table
    basis = svc.router.descriptor_basis
    desc, names, _ = Run.of(trained_run).descriptors(basis.kind, basis.basis_id)
    near = np.asarray(desc[RB_EXPERTS[1]], dtype=np.float64)
    svc.add_expert("newcomer", 0.02, (near + 0.01 * np.random.default_rng(0).standard_normal(near.size)).tolist())
    assert list(svc.table.expert_names) == [*RB_EXPERTS, "newcomer"]
    assert f"quality copied from {RB_EXPERTS[1]}" in svc.table.estimated["newcomer"]
    j = svc.table.expert_names.index("newcomer")
    assert svc.table.expert_cost[j] == pytest.approx(0.02 * svc.reference.scale)
    svc.remove_expert("newcomer")
    assert list(svc.table.expert_names) == RB_EXPERTS and svc.table.estimated == {}
    assert np.allclose(svc.table.cost, before.cost) and np.allclose(svc.table.quality, before.quality)


def test_no_table_refuses_budgets_but_serves_cost_weight(encoder, backends, trained_run):
    from cscr.runs.loader import load_router

    svc = RouterService(encoder, load_router(trained_run))
    c = client(svc, backends)
    error(c.post("/v1/route", headers=auth(), json={"prompt": "hi", "budget": 1.0}), 400, "no_operating_points",
          "budget")
    r = c.post("/v1/route", headers=auth(), json={"prompt": "hi", "cost_weight": 0.1})
    assert r.status_code == 200 and r.json()["expected_cost"] is None and "x-cscr-expected-cost" not in r.headers
    with pytest.raises(ServiceError, match="needs the run's operating-point table"):
        RouterService(encoder, load_router(trained_run), default_budget=1.0)
    with pytest.raises(ProtocolError):
        svc.operating_point(svc.expert_names, budget=1.0)


@pytest.fixture(scope="module")
def iid_run(tmp_path_factory, shared_data) -> Path:
    """A CSCR run on a random (i.i.d.) slice of RouterBench, so that validation and test prompts
    come from one distribution: at most 400 train, 250 val and 250 test prompts among those of at
    most 3,000 characters (the tiny LMs' context holds them). About 30 s here."""
    from cscr.config import DataConfig, IndexConfig, TrainConfig
    from cscr.data import load_dataset
    from cscr.encoder import Encoder, embed_table
    from cscr.runs.paths import RunPaths
    from cscr.training.plain import train_run

    table = load_dataset("routerbench", DataConfig(data_dir=str(shared_data), probe_size=16))
    short = np.array([len(str(t)) <= 3000 for t in table.texts])
    rng = np.random.default_rng(0)
    rows = []
    for split, k in (("train", 400), ("val", 250), ("probe", 16), ("test", 250)):
        idx = table.split_index(split)
        idx = idx[short[idx]] if split != "probe" else idx
        rows.append(rng.choice(idx, min(k, idx.size), replace=False))
    sub = table.subset(np.sort(np.concatenate(rows)), RB_EXPERTS)
    # RouterBench's validation prompts come from the upstream train files and its test prompts from
    # the test files, whose difficulty differs (the best expert: about 0.05 apart); split afresh, half
    # and half within each task (quality depends on the task mix), the two are one distribution, as
    # the promise assumes
    for cat in np.unique(sub.categories):
        held = np.flatnonzero(np.isin(sub.splits, ["val", "test"]) & (sub.categories == cat))
        sub.splits[rng.permutation(held)] = np.where(np.arange(held.size) % 2 == 0, "val", "test")
    paths = RunPaths.of(tmp_path_factory.mktemp("iid-run") / "run")
    sub.save(paths.table)
    embed_table(sub, Encoder(), paths.embeddings, progress=None)
    train_run(str(paths.root), "cscr", TrainConfig(epochs=3, batch_size=64, index=IndexConfig(top_k=3)), log=None)
    return paths.root


def _asks(table: OperatingTable) -> list[tuple[str, float | str]]:
    return [("budget", mid_budget(table)), ("quality_target", relative_target(table))]


def test_openai_client_gets_the_tables_point_and_the_routers_choices(iid_run, encoder, backends):
    """Over real HTTP (uvicorn on loopback), the official client asks for a budget and for
    "0.95x" (``extra_body``) on held-out test prompts of an i.i.d. slice: every answer reports the
    lambda and the promise the table gives for the request, and the experts that answered are the
    router's choices at that lambda (so the promise check below, on the router's choices, is the
    served one)."""
    import uvicorn
    from openai import OpenAI

    service = RouterService.from_run(iid_run, encoder=encoder)
    table = service.table
    assert table is not None and table.n_prompts >= 150
    held = split_arrays(iid_run, service.router, "test")
    n = 60  # prompts sent per request kind (two answers each: about a minute here)
    texts = [str(t) for t in Run.of(iid_run).table.texts[held.rows[:n]]]
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(make_app(service, backends), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
            time.sleep(0.05)
        oa = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0, timeout=60)
        for field, value in _asks(table):
            point = for_budget(table, value) if field == "budget" else for_quality(table, value)  # type: ignore[arg-type]
            served, shown = [], set()
            for text in texts:
                raw = oa.chat.completions.with_raw_response.create(
                    model="cscr", messages=[{"role": "user", "content": text}], max_tokens=1,
                    extra_body={field: value})
                served.append(service.expert_names.index(raw.parse().model))
                shown.add((float(raw.headers["x-cscr-cost-weight"]), float(raw.headers["x-cscr-expected-cost"]),
                           float(raw.headers["x-cscr-expected-quality"])))
            assert shown == {(point.lam, point.cost, point.quality)}
            assert served == list(service.router.route_sweep(held.emb[:n], np.array([point.lam]))[0])
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_served_choices_realise_the_promise_on_held_out_prompts(iid_run, encoder):
    """The promised-vs-realised check (``cscr.operating_run.check_choices``, z = 1.96 on the sampling
    errors of both means) of the requests above on every held-out test prompt of the slice, with
    the router's choices at the chosen lambda (the served ones, as the test above shows)."""
    service = RouterService.from_run(iid_run, encoder=encoder)
    table = service.table
    held = split_arrays(iid_run, service.router, "test")
    picks = [(f"{f}={v}", for_budget(table, v) if f == "budget" else for_quality(table, v))  # type: ignore[arg-type]
             for f, v in _asks(table)]
    chosen = service.router.route_sweep(held.emb, np.array([p.lam for _, p in picks]))
    checks = check_choices(table, picks, chosen, held.quality, held.cost)
    print(checks_markdown(checks, table.cost_unit))  # the promised-vs-realised table (pytest -s)
    for ch in checks:
        assert ch.ok, (ch.request, ch.cost_error, ch.cost_tol, ch.quality_error, ch.quality_tol)


def test_the_keys_file_and_the_serve_flags(tmp_path):
    from cscr.cli.commands.serve import quality_target
    from cscr.serve.app import ServeArgs

    good = tmp_path / "keys.yaml"
    good.write_text("keys:\n  - {key: sk-a, name: team-a, budget: 5.0}\n  - {key: sk-b, name: team-b, budget: 0}\n")
    entries = KeyBudgets.load_entries(good)
    budgets = KeyBudgets.from_entries(entries)
    assert [k.name for k in budgets.keys] == ["team-a", "team-b"]
    assert budgets.identify("Bearer sk-a").name == "team-a" and budgets.identify("Bearer sk-c") is None
    with pytest.raises(ProtocolError, match="budget of key 'team-b' is exhausted") as err:
        asyncio.run(budgets.admit(budgets.keys[1]))  # a zero budget admits nothing
    assert (err.value.status, err.value.type) == (429, "insufficient_quota")
    for text, message in (("keys: []\n", "expected a list"), ("- {key: k, name: a}\n", r"expected \{key, name, budget\}"),
                          ("- {key: k, name: a, budget: -1}\n", "finite number >= 0"),
                          ("- {key: k, name: a, budget: 1, rps: 2}\n", "optionally rpm"),
                          ("- {key: k, name: a, budget: 1, rpm: 0}\n", "rpm must be a whole number"),
                          ("- {key: k, name: a, budget: 1, rpm: 1.5}\n", "rpm must be a whole number"),
                          ("- {key: k, name: a, budget: 1, rpm: true}\n", "rpm must be a whole number")):
        bad = tmp_path / "bad.yaml"
        bad.write_text(text)
        with pytest.raises(ValueError, match=message):
            KeyBudgets.load_entries(bad)
    args = ServeArgs(run="r", pool="p", default_budget=0.001, default_quality_target="0.95x", keys=str(good))
    assert (args.default_budget, args.default_quality_target, args.keys) == (0.001, "0.95x", str(good))
    assert quality_target("0.95x") == "0.95x" and quality_target("0.7") == 0.7 and quality_target(None) is None
    with pytest.raises(ValueError, match="--default-quality-target"):
        quality_target("high")
