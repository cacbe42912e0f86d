"""Fallback latency past a dead expert on the real Serve path (issue 13, item 4), loopback only.

A real Serve app on a fresh 2-CPU local Ray cluster serves a CSCR run trained here in seconds on a
RouterBench slice (three experts); the experts are tiny random GPT-2 models behind the
transformers backend. The cheapest candidate's replica is killed, its weights moved away first so
that the replica Serve starts in its place cannot load: the expert stays dead. Measured in the same
process, against the same routed request sent with the dead expert left out of the candidates
(routing + the next expert's own latency):

- the first request after the kill: it meets the dead replica, or no replica takes it within the
  connect timeout (0.5 s) and Serve reports none running; either way the expert's circuit opens;
- the requests after it, inside the circuit's cooldown: the expert is skipped without a call.

The goal (issue 13): under 1 s plus the next expert's own latency. The generation timeout is 60 s,
so a fallback that waited for it would show. The admin ``/healthz`` report gives the dead
expert's circuit and failure count, which say whether the later requests called it.

    python bench/fallback_latency.py [--data-dir ../shared/data] [--requests 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

KEY, ADMIN = "fallback-key", "fallback-admin"
PROMPT = "Write a function to compute the n-th Fibonacci number."


def routed(http: httpx.Client, candidates: list[str]) -> tuple[httpx.Response, float]:
    t0 = time.perf_counter()
    r = http.post("/v1/chat/completions", json={
        "model": "cscr:1000", "candidates": candidates, "max_tokens": 4,
        "messages": [{"role": "user", "content": PROMPT}]})
    seconds = time.perf_counter() - t0
    if r.status_code != 200:
        raise RuntimeError(f"{r.status_code}: {r.text}")
    return r, seconds


def measure(work: Path, data_dir: Path, requests: int, log=print) -> dict[str, float | int | str]:
    import ray
    import yaml

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "serve"))
    from cscr.serve.app import build_app
    from cscr.serve.deployments import deployment_name
    from serve_helpers import (
        RB_EXPERTS,
        app_clients,
        free_port,
        make_tiny_lm,
        make_trained_run,
        serving,
    )

    dead, nxt = RB_EXPERTS[0], RB_EXPERTS[1]  # the cheapest, then the next one up
    log("training a run on a RouterBench slice and saving two tiny LMs ...")
    run = make_trained_run(work / "run", data_dir)
    lms = [make_tiny_lm(work / f"lm-{i}", i + 1) for i in range(2)]
    pool = work / "pool.yaml"
    pool.write_text(yaml.safe_dump({"name": "fallback", "experts": [
        {"name": name, "kind": "open-weights", "source": {"model": str(lm)}, "backend": "transformers",
         "cost": {"n_params": n}}
        for name, lm, n in ((dead, lms[0], 7.0), (nxt, lms[1], 46.7), (RB_EXPERTS[2], lms[1], 1000.0))]}))
    port = free_port()
    application = build_app({"run": str(run), "pool": str(pool), "api_key": KEY, "admin_key": ADMIN,
                             "expert_num_cpus": 0.1, "expert_timeout_s": 60, "default_max_tokens": 4})
    log("starting the Serve app ...")
    with serving(application, port) as base:
        cl = app_clients(base, KEY, ADMIN)
        http, admin = cl.http, cl.admin
        for _ in range(2):  # warm both experts
            routed(http, [dead])
            routed(http, [nxt])
        alone = [routed(http, [nxt])[1] for _ in range(requests)]
        victim = next(a for a in ray.util.list_named_actors(all_namespaces=True)
                      if f"#{deployment_name(dead)}#" in a["name"])
        moved = lms[0].with_name(lms[0].name + ".moved")
        lms[0].rename(moved)  # the replacement replica cannot load: the expert stays dead
        ray.kill(ray.get_actor(victim["name"], namespace=victim["namespace"]))
        first, first_s = routed(http, [dead, nxt])
        if first.headers.get("x-cscr-expert") != nxt or first.headers.get("x-cscr-failed") != dead:
            raise RuntimeError(f"the first request did not fall back as expected: {dict(first.headers)}")
        failures_after_first = admin.get("/healthz").json()["metrics"]["failures"].get(dead, 0)
        later = []
        for _ in range(requests):
            r, seconds = routed(http, [dead, nxt])
            if r.headers.get("x-cscr-expert") != nxt:
                raise RuntimeError(f"a later request was not answered by {nxt}: {dict(r.headers)}")
            later.append(seconds)
        health = admin.get("/healthz").json()
    return {"alone": statistics.median(alone), "first": first_s, "later": statistics.median(later),
            "later_max": max(later), "calls_after_first": health["metrics"]["failures"].get(dead, 0)
            - failures_after_first, "circuit": str(health["circuits"].get(dead))}


def report(m: dict[str, float | int | str], requests: int) -> str:
    alone, first, later = float(m["alone"]), float(m["first"]), float(m["later"])
    rows = [("routed to the next expert alone (median)", alone),
            ("first request after the kill", first), (f"later requests (median of {requests})", later),
            ("later requests (max)", float(m["later_max"]))]
    lines = ["| request | s | over the next expert alone, s | ratio |", "|---|---|---|---|"]
    lines += [f"| {name} | {s:.3f} | {s - alone:+.3f} | {s / alone:.2f}x |" for name, s in rows]
    met = lambda s: "met" if s < alone + 1.0 else "NOT met"  # noqa: E731
    lines.append(f"goal (under 1 s plus the next expert's own latency): first {met(first)}, later {met(later)}")
    lines.append(f"calls to the dead expert after the first request: {m['calls_after_first']} "
                 f"(its circuit: {m['circuit']})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    p.add_argument("--requests", type=int, default=5, help="timed requests per kind (inside the 10 s cooldown)")
    a = p.parse_args(argv)
    if not 1 <= a.requests <= 10:
        p.error("--requests must be in 1..10 (the later ones must fit in the circuit's 10 s cooldown)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores at the start", flush=True)
    with tempfile.TemporaryDirectory(prefix="cscr-fallback-") as tmp:
        m = measure(Path(tmp), Path(a.data_dir), a.requests)
    print(report(m, a.requests))
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
