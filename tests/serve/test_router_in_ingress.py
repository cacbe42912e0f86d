"""Routing inside the Ingress replicas (``router_in_ingress``, ``cscr serve --router-in-ingress``):
no Router deployment; each of two Ingress replicas holds its own router, follows the pool record
(expert handles and index) and attaches the operating-point table as a Router replica does.

Real Ray, real Serve, real MiniLM, real HTTP: a trained CSCR run on a RouterBench slice; one tiny
random GPT-2 expert, the two others black-box experts behind this very server's tiny GPT-2 (no
model to load). Decisions are compared with the default graph (HTTP -> Ingress -> Router)
deployed beside it, on the same run and pool."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import yaml
from cscr.cli import main
from cscr.serve.app import ServeArgs, plan_app
from cscr.serve.service import RouterService
from serve_helpers import RB_EXPERTS, app_clients, free_port, serving

KEY, ADMIN = "k-in-ingress", "admin-in-ingress"
MISTRAL = RB_EXPERTS[0]
PROMPTS = ["What is the capital of France?", "Solve for x: 3x + 5 = 20.",
           "Write a function to compute the n-th Fibonacci number.", "Explain why the sky is blue."]


def write_pool(path, tiny_lms, port: int):
    """MISTRAL: a tiny GPT-2; the two others: black-box, answered by this server's MISTRAL."""
    up = {"base_url": f"http://127.0.0.1:{port}/v1", "model": MISTRAL, "api_key_env": "CSCR_TEST_UPSTREAM_KEY"}
    path.write_text(yaml.safe_dump({"name": "in-ingress", "experts": [
        {"name": MISTRAL, "kind": "open-weights", "source": {"model": str(tiny_lms["a"])}, "cost": {"n_params": 7.0}},
        {"name": RB_EXPERTS[1], "kind": "black-box", "source": up, "cost": {"input_price": 0.6}},
        {"name": RB_EXPERTS[2], "kind": "black-box", "source": up, "cost": {"input_price": 10.0}}]}))
    return path


def serve_args(run, pool, **extra) -> ServeArgs:
    return ServeArgs(run=str(run), pool=str(pool), api_key=KEY, admin_key=ADMIN, expert_num_cpus=0.1,
                     router_num_cpus=0.1, ingress_num_cpus=0.1, default_max_tokens=4, **extra)


@pytest.fixture(scope="module")
def served(trained_run, tiny_lms, tmp_path_factory, encoder):
    """The app routing in its two Ingress replicas, as application "cscr" on "/"."""
    port = free_port()
    pool = write_pool(tmp_path_factory.mktemp("in-ingress") / "pool.yaml", tiny_lms, port)
    app, _, _ = plan_app(serve_args(trained_run, pool, router_in_ingress=True, ingress_replicas=2))
    os.environ["CSCR_TEST_UPSTREAM_KEY"] = KEY  # inherited by the Ray workers started below
    with serving(app, port) as base:
        yield app_clients(base, KEY, ADMIN, pool=pool, local=RouterService.from_run(trained_run, encoder=encoder))


def routes(http: httpx.Client, prompt: str, lam: float, n: int = 12, path: str = "/v1/route") -> list[dict]:
    """``n`` concurrent decisions (spread over the ingress replicas), each with its header's version."""
    def one(_: int) -> dict:
        r = http.post(path, json={"prompt": prompt, "cost_weight": lam})
        assert r.status_code == 200, r.text
        return {**r.json(), "header_version": r.headers["x-cscr-pool-version"]}

    with ThreadPoolExecutor(6) as pool:
        return list(pool.map(one, range(n)))


def test_router_replicas_with_router_in_ingress_are_refused(trained_run, tiny_lms, tmp_path, capsys):
    pool = write_pool(tmp_path / "pool.yaml", tiny_lms, 9)
    with pytest.raises(ValueError, match="router_replicas has no effect with router_in_ingress"):
        plan_app(serve_args(trained_run, pool, router_in_ingress=True, router_replicas=2))
    assert main(["serve", "--run", str(trained_run), "--pool", str(pool), "--router-in-ingress",
                 "--router-replicas", "2"]) == 2
    assert capsys.readouterr().err.strip().endswith("routes): scale --ingress-replicas")


@pytest.mark.slow
def test_decisions_equal_the_default_graphs(served, trained_run):
    from ray import serve as ray_serve

    status = ray_serve.status().applications["cscr"].deployments
    assert "Router" not in status and status["Ingress"].replica_states.get("RUNNING") == 2
    health = served.admin.get("/healthz").json()
    assert sorted(r["role"] for r in health["replicas"].values() if r["version"] == 1) == ["Ingress", "Ingress"]
    # the record carries the run's operating-point table, attached by an ingress replica's router
    assert health["operating_points"]["experts"] == list(served.local.table.expert_names)

    default, _, _ = plan_app(serve_args(trained_run, served.pool))  # HTTP -> Ingress -> Router
    ray_serve.run(default, name="default", route_prefix="/default")
    try:
        assert "Router" in ray_serve.status().applications["default"].deployments
        for prompt in PROMPTS:
            for lam in (0.0, 0.05, 1000.0):
                want = routes(served.http, prompt, lam, n=1, path="/default/v1/route")[0]
                got = routes(served.http, prompt, lam)
                for d in got:
                    assert (d["chosen"], d["pool_version"], d["header_version"]) == (
                        want["chosen"], want["pool_version"], want["header_version"]) == (
                        served.local.route([prompt], lam)[0].chosen, 1, "1")
                    assert [x["name"] for x in d["ranked"]] == [x["name"] for x in want["ranked"]]
                    assert [x["similarity"] for x in d["ranked"]] == pytest.approx(
                        [x["similarity"] for x in want["ranked"]], abs=1e-5)
    finally:
        ray_serve.delete("default")


@pytest.mark.slow
def test_live_add_and_remove_reach_every_ingress_router(served):
    from ray import serve as ray_serve

    prompt = "Name three prime numbers larger than one hundred."
    query = served.local.router.queries(served.local.embed([prompt]))[0].tolist()
    before = routes(served.http, prompt, 0.0)
    assert {d["chosen"] for d in before} == {served.local.route([prompt], 0.0)[0].chosen} != {"newcomer"}
    version = before[0]["pool_version"]
    apps = set(ray_serve.status().applications)
    spec = {"name": "newcomer", "backend": "openai", "model": MISTRAL, "base_url": f"{served.base}/v1",
            "api_key_env": "CSCR_TEST_UPSTREAM_KEY", "num_cpus": 0.05}
    added = served.admin.post("/v1/experts", json={"expert": spec, "cost": 0.0, "descriptor": query})
    assert added.status_code == 201, added.text
    body = added.json()
    assert body["pool_version"] == version + 1
    assert body["replicas"]["lagging"] == [] and len(body["replicas"]["serving"]) == 2
    for lam in (0.0, 5.0):  # right on the prompt and free: chosen whatever the knob, by both replicas
        got = routes(served.http, prompt, lam)
        assert {(d["chosen"], d["pool_version"], d["header_version"]) for d in got} == {
            ("newcomer", version + 1, str(version + 1))}
    # the new pool's table, computed by an ingress replica's router and attached to the record
    assert "newcomer" in served.admin.get("/healthz").json()["operating_points"]["experts"]
    r = served.http.post("/v1/chat/completions", json={"model": "cscr", "max_tokens": 3,
                                                       "messages": [{"role": "user", "content": prompt}]})
    assert r.status_code == 200 and r.json()["model"] == "newcomer" and r.json()["choices"][0]["message"]["content"]

    gone = served.admin.delete("/v1/experts/newcomer")
    assert gone.status_code == 200 and gone.json()["pool_version"] == version + 2
    assert gone.json()["replicas"]["lagging"] == []
    for d in routes(served.http, prompt, 0.0):
        assert "newcomer" not in [x["name"] for x in d["ranked"]]
        assert (d["chosen"], d["pool_version"]) == (before[0]["chosen"], version + 2)
    assert set(ray_serve.status().applications) == apps  # its application is gone
