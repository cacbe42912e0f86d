"""Two Router and two Ingress replicas on a simulated two-node Ray cluster (ray.cluster_utils.Cluster):
every replica follows the one versioned pool record, decisions agree whichever replica serves them,
a live add or remove reaches all of them before the admin call answers, admin adds are bounded,
the durable record carries its pool's operating-point table, a key's spend budget is one tally
shared by both ingress replicas (kept by the pool controller, persisted beside the record), and so
are a key's request window (rpm) and the breakers' circuits: a failing expert is called once for
the server, not once per replica.

The router is a real trained CSCR run on a RouterBench slice; the three experts are tiny random
GPT-2s, each in its own Serve application (as under `cscr serve`)."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import yaml
from cscr.serve.service import RouterService
from serve_helpers import RB_EXPERTS, app_clients, free_port

pytestmark = pytest.mark.slow

KEY, ADMIN = "k-replicas", "admin-replicas"
TEAM = "sk-team-tiny"  # a declared key whose budget one answer exhausts
PACED = "sk-team-paced"  # a declared key limited to 3 requests a minute
PROMPTS = ["What is the capital of France?", "Solve for x: 3x + 5 = 20.",
           "Write a function to compute the n-th Fibonacci number.", "Explain why the sky is blue."]


def write_pool(path, tiny_lms):
    path.write_text(yaml.safe_dump({"name": "replicas", "experts": [
        {"name": name, "kind": "open-weights", "source": {"model": str(tiny_lms["ab"[i % 2]])},
         "cost": {"n_params": n}} for i, (name, n) in enumerate(zip(RB_EXPERTS, (7.0, 46.7, 1000.0), strict=True))]}))
    return path


@pytest.fixture(scope="module")
def cluster(trained_run, tiny_lms, tmp_path_factory, encoder):
    import ray
    from cscr.serve.app import ExpertLauncher, ServeArgs, launch_expert_apps, plan_app
    from ray import serve as ray_serve
    from ray.cluster_utils import Cluster

    tmp = tmp_path_factory.mktemp("replicas")
    state_dir = tmp / "state"
    keys = tmp / "keys.yaml"
    keys.write_text(yaml.safe_dump({"keys": [{"key": TEAM, "name": "team", "budget": 1e-12},
                                             {"key": PACED, "name": "paced", "budget": 1e9, "rpm": 3}]}))
    refusing = free_port()  # an upstream with nothing listening: every call to it fails at once
    args = ServeArgs(allow_upstreams=[f"http://127.0.0.1:{refusing}/v1"], breaker_failures=1, breaker_cooldown_s=120,
                     keys=str(keys), run=str(trained_run), pool=str(write_pool(tmp / "pool.yaml", tiny_lms)), api_key=KEY,
                     admin_key=ADMIN, state_dir=str(state_dir), router_replicas=2, ingress_replicas=2,
                     expert_apps=True, expert_num_cpus=0.1, router_num_cpus=0.1, ingress_num_cpus=0.1,
                     default_max_tokens=4, expert_deploy_timeout_s=300,
                     model_roots=[str(tiny_lms["a"].parent)])  # admin adds may load the tiny LMs' folder
    app, record, a = plan_app(args)
    if ray.is_initialized():
        ray.shutdown()
    # the proxy (head node) would send every request to the ingress replica on its own node;
    # these tests need both replicas to take requests, as proxies on every node would
    with pytest.MonkeyPatch.context() as env:
        env.setenv("RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING", "0")
        c = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
        c.add_node(num_cpus=2)
        port = free_port()
        try:
            ray.init(address=c.address, log_to_driver=False)
            ray_serve.start(http_options={"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly")
            launch_expert_apps(record, ExpertLauncher(deploy_timeout_s=300))
            ray_serve.run(app, name="cscr", route_prefix="/")
            base = f"http://127.0.0.1:{port}"
            yield app_clients(base, KEY, ADMIN, state_dir=state_dir, refusing=refusing,
                              local=RouterService.from_run(trained_run, encoder=encoder))
        finally:
            ray_serve.shutdown()
            ray.shutdown()
            c.shutdown()


def replicas(cl, want_version: int, timeout: float = 60.0) -> dict:
    """The replicas the pool controller sees, once all four serve ``want_version``."""
    deadline, seen = time.time() + timeout, {}
    while time.time() < deadline:
        seen = cl.admin.get("/healthz").json()["replicas"]
        roles = sorted(r["role"] for r in seen.values() if r["version"] == want_version)
        if roles == ["Ingress", "Ingress", "Router", "Router"]:
            return seen
        time.sleep(1)
    raise AssertionError(f"replicas did not converge on version {want_version}: {seen}")


def routes(cl, prompt: str, lam: float, n: int = 24) -> list[httpx.Response]:
    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(lambda _: cl.http.post("/v1/route", json={"prompt": prompt, "cost_weight": lam}),
                             range(n)))


def test_every_replica_serves_the_first_version(cluster):
    seen = replicas(cluster, 1)
    assert len(seen) == 4
    health = cluster.admin.get("/healthz").json()
    assert health["pool_version"] == 1 and set(health["experts"]) == set(RB_EXPERTS)
    stored = json.loads((cluster.state_dir / "pool.json").read_text())
    assert stored["version"] == 1 and sorted(e["spec"]["name"] for e in stored["experts"]) == sorted(RB_EXPERTS)
    # the record carries its pool's operating-point table: the run's own, attached by a Router replica
    table = stored["operating_points"]
    assert [p["name"] for p in table["pool"]] == list(cluster.local.table.expert_names) and table["split"] == "val"
    assert health["operating_points"]["experts"] == list(cluster.local.table.expert_names)


def test_decisions_agree_across_replicas(cluster):
    for prompt in PROMPTS[:2]:
        for lam in (0.0, 1000.0):
            want = cluster.local.route([prompt], lam)[0]
            got = routes(cluster, prompt, lam)
            assert all(r.status_code == 200 for r in got)
            assert {r.json()["chosen"] for r in got} == {want.chosen}
            assert {tuple(x["name"] for x in r.json()["ranked"]) for r in got} == {tuple(x.name for x in want.ranked)}
            assert {r.headers["x-cscr-pool-version"] for r in got} == {"1"}
            assert {r.json()["pool_version"] for r in got} == {1}
    r = cluster.http.post("/v1/chat/completions", json={"model": "cscr:1000", "max_tokens": 3,
                                                        "messages": [{"role": "user", "content": PROMPTS[0]}]})
    assert r.status_code == 200 and r.headers["x-cscr-pool-version"] == "1" and r.json()["cscr"]["pool_version"] == 1


def test_live_add_and_remove_reach_every_replica(cluster, tiny_lms):
    from ray import serve as ray_serve

    prompt = PROMPTS[2]
    query = cluster.local.router.queries(cluster.local.embed([prompt]))[0].tolist()
    spec = {"name": "newcomer", "model": str(tiny_lms["a"]), "num_cpus": 0.1}
    apps_before = set(ray_serve.status().applications)
    added = cluster.admin.post("/v1/experts", json={"expert": spec, "cost": 0.0, "descriptor": query})
    assert added.status_code == 201, added.text
    body = added.json()
    assert body["pool_version"] == 2 and body["replicas"]["lagging"] == [] and len(body["replicas"]["serving"]) == 4
    got = routes(cluster, prompt, 0.0)  # the admin call answered: every replica routes with it already
    assert {r.json()["chosen"] for r in got} == {"newcomer"} and {r.headers["x-cscr-pool-version"] for r in got} == {"2"}
    r = cluster.http.post("/v1/chat/completions", json={"model": "cscr", "max_tokens": 3,
                                                        "messages": [{"role": "user", "content": prompt}]})
    assert r.status_code == 200 and r.json()["model"] == "newcomer"
    stored = json.loads((cluster.state_dir / "pool.json").read_text())
    assert stored["version"] == 2  # durable, with the table of the new pool (the newcomer estimated)
    pool = {p["name"]: p for p in stored["operating_points"]["pool"]}
    assert set(pool) == {*RB_EXPERTS, "newcomer"} and "quality copied from" in pool["newcomer"]["estimated"]
    new_apps = set(ray_serve.status().applications) - apps_before
    assert len(new_apps) == 1 and next(iter(new_apps)).startswith("cscr-expert-newcomer")

    gone = cluster.admin.delete("/v1/experts/newcomer")
    assert gone.status_code == 200 and gone.json()["pool_version"] == 3 and gone.json()["replicas"]["lagging"] == []
    got = routes(cluster, prompt, 0.0)
    assert all("newcomer" not in [x["name"] for x in r.json()["ranked"]] for r in got)
    assert {r.headers["x-cscr-pool-version"] for r in got} == {"3"}
    assert set(ray_serve.status().applications) == apps_before  # DELETE removed its application
    replicas(cluster, 3)
    stored = json.loads((cluster.state_dir / "pool.json").read_text())
    assert sorted(p["name"] for p in stored["operating_points"]["pool"]) == sorted(RB_EXPERTS)


def test_a_keys_budget_is_one_tally_across_ingress_replicas(cluster):
    team = httpx.Client(base_url=cluster.base, headers={"Authorization": f"Bearer {TEAM}"}, timeout=300)
    ask = {"model": RB_EXPERTS[0], "prompt": "hi", "max_tokens": 2}
    first = team.post("/v1/completions", json=ask)
    assert first.status_code == 200, first.text  # admitted at 0 spent; its cost exhausts the budget
    # concurrent requests spread over both ingress replicas: every one sees the shared tally
    with ThreadPoolExecutor(8) as pool:
        later = list(pool.map(lambda _: team.post("/v1/completions", json=ask), range(16)))
    assert [r.status_code for r in later] == [429] * 16, [r.text for r in later if r.status_code != 429]
    assert {r.json()["error"]["code"] for r in later} == {"budget_exhausted"}
    reports = [cluster.admin.get("/healthz").json()["keys"] for _ in range(8)]  # either replica answers
    spent = {k[0]["spent"] for k in reports}
    assert len(spent) == 1 and next(iter(spent)) > 0 and reports[0][0]["name"] == "team"
    deadline = time.time() + 10
    while time.time() < deadline and not (cluster.state_dir / "spend.json").exists():
        time.sleep(0.2)
    on_disk = json.loads((cluster.state_dir / "spend.json").read_text())["spent"]["team"]
    assert on_disk == pytest.approx(next(iter(spent)))  # a restart keeps the tally


def test_a_keys_request_rate_is_one_window_across_ingress_replicas(cluster):
    paced = httpx.Client(base_url=cluster.base, headers={"Authorization": f"Bearer {PACED}"}, timeout=300)
    ask = {"model": RB_EXPERTS[0], "prompt": "hi", "max_tokens": 2}
    with ThreadPoolExecutor(4) as pool:  # spread over both replicas: 3 in all, not 3 each
        got = list(pool.map(lambda _: paced.post("/v1/completions", json=ask), range(16)))
    assert sorted(r.status_code for r in got) == [200] * 3 + [429] * 13, [r.text for r in got]
    refused = [r for r in got if r.status_code == 429]
    assert {r.json()["error"]["code"] for r in refused} == {"rate_limit_exceeded"}
    assert all(1 <= int(r.headers["retry-after"]) <= 60 for r in refused)
    keys = {k["name"]: k for k in cluster.admin.get("/healthz").json()["keys"]}
    assert keys["paced"]["rpm"] == 3 and keys["paced"]["spent"] > 0


def test_admin_adds_are_bounded(cluster, tiny_lms):
    from ray import serve as ray_serve

    apps_before = set(ray_serve.status().applications)
    version = cluster.admin.get("/healthz").json()["pool_version"]
    t0 = time.perf_counter()
    r = cluster.admin.post("/v1/experts", json={"expert": {"name": "huge", "model": str(tiny_lms["a"]),
                                                           "num_cpus": 1000}, "cost": 0.1, "descriptor": [1.0] * 64})
    assert r.status_code == 400 and r.json()["error"]["code"] in ("insufficient_resources", "bad_descriptor")
    dim = len(cluster.local.router.queries(cluster.local.embed(["x"]))[0])
    r = cluster.admin.post("/v1/experts", json={"expert": {"name": "huge", "model": str(tiny_lms["a"]),
                                                           "num_cpus": 1000}, "cost": 0.1, "descriptor": [1.0] * dim})
    assert r.status_code == 400 and r.json()["error"]["code"] == "insufficient_resources", r.text
    assert "1000 CPU" in r.json()["error"]["message"] and time.perf_counter() - t0 < 30
    # a model that cannot load (an allowed folder that holds no model): the deploy fails, its
    # application is deleted, the pool is unchanged
    junk = tiny_lms["a"].parent / "not-a-model"
    junk.mkdir(exist_ok=True)
    r = cluster.admin.post("/v1/experts", json={"expert": {"name": "broken", "model": str(junk),
                                                           "num_cpus": 0.1}, "cost": 0.1, "descriptor": [1.0] * dim})
    assert r.status_code in (400, 504), r.text
    assert set(ray_serve.status().applications) == apps_before  # no orphan application
    assert cluster.admin.get("/healthz").json()["pool_version"] == version


def per_replica(cl, done, timeout: float = 30.0) -> dict[str, dict]:
    """The admin health report of each ingress replica (either answers a request), once
    ``done(reports)`` holds for the reports seen so far."""
    deadline, seen = time.time() + timeout, {}
    while time.time() < deadline:
        health = cl.admin.get("/healthz").json()
        seen[health["replica"]] = health
        if len(seen) == 2 and done(seen):
            return seen
        time.sleep(0.1)
    raise AssertionError(f"not within {timeout} s: {json.dumps(seen)[:3000]}")


def test_a_circuit_one_ingress_replica_opens_opens_on_both(cluster):
    """A black-box expert whose upstream refuses every connection, routed first (free, right on
    the prompt): one request fails over it and opens that replica's circuit (the fixture: one
    failure opens, 120 s cooldown); the other replica learns it from the shared board without a
    call of its own, so every request after it, whichever replica serves it, skips the expert."""
    prompt = PROMPTS[3]
    query = cluster.local.router.queries(cluster.local.embed([prompt]))[0].tolist()
    spec = {"name": "refuser", "backend": "openai", "model": "m", "base_url": f"http://127.0.0.1:{cluster.refusing}/v1",
            "retries": 0, "timeout_s": 10, "num_cpus": 0.05}
    added = cluster.admin.post("/v1/experts", json={"expert": spec, "cost": 0.0, "descriptor": query})
    assert added.status_code == 201 and added.json()["replicas"]["lagging"] == [], added.text
    ask = {"model": "cscr:1000", "max_tokens": 2, "candidates": ["refuser", RB_EXPERTS[0]],
           "messages": [{"role": "user", "content": prompt}]}
    try:
        first = cluster.http.post("/v1/chat/completions", json=ask)
        assert first.status_code == 200 and first.json()["cscr"]["failed"] == ["refuser"], first.text
        assert first.json()["model"] == RB_EXPERTS[0]
        reports = per_replica(cluster, lambda seen: all(
            h["circuits"].get("refuser", {}).get("state") == "open" for h in seen.values()))
        assert sum(h["metrics"]["failures"].get("refuser", 0) for h in reports.values()) == 1  # one call in all
        with ThreadPoolExecutor(4) as pool:  # spread over both replicas
            later = list(pool.map(lambda _: cluster.http.post("/v1/chat/completions", json=ask), range(12)))
        assert all(r.status_code == 200 and r.json()["cscr"]["failed"] == [] for r in later), [r.text for r in later]
        reports = per_replica(cluster, lambda seen: True)
        assert sum(h["metrics"]["failures"].get("refuser", 0) for h in reports.values()) == 1
        assert all(100 < h["circuits"]["refuser"]["retry_after_s"] <= 120 for h in reports.values())
    finally:
        gone = cluster.admin.delete("/v1/experts/refuser")
    assert gone.status_code == 200, gone.text
    per_replica(cluster, lambda seen: all("refuser" not in h["circuits"] for h in seen.values()))  # forgotten on both
