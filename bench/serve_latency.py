"""Serving speed and reliability (issue 6, item 5), loopback only, bounded in time.

A real Serve app (Router + one Expert per pool entry + ingress) on a fresh local Ray cluster,
serving a trained CSCR run: ``--run`` or, by default, a run trained here in seconds on a slice of
RouterBench (three experts, the shortest prompts). The experts are tiny random GPT-2 models
saved from a config (deployment mechanics, not answer quality). Measured, each against a
reference taken in the same process, same machine, same moment:

1. route decision latency: p50 / p99 of POST /v1/route (HTTP + proxy + ingress + router with
   its batched MiniLM forward + FAISS + the cost knob) against a bare MiniLM forward of the same
   prompt in this process (one torch thread, as in the router replica), and where the time goes,
   per request (p50 of each stage): the router replica's own time (the decision's
   ``routing_ms``: batch wait, MiniLM, FAISS, the knob), the ingress-to-router hop (the
   ``x-cscr-routing-ms`` header, measured by the ingress around its router call, minus the
   former) and proxy + ingress (the client's time minus the header);
2. throughput under concurrency: /v1/route requests/s with C concurrent clients against bare
   batched MiniLM throughput (batches of the router's max batch size, one torch thread); the
   router's mean encoder batch size is printed; 1 and 2 are measured on eight short prompts and
   again on real RouterBench test prompts (``--long-requests``; long few-shot prompts, embedded
   in the run's long-prompt mode by both the router and the reference);
3. a load run: C clients send chat completions for D seconds; meanwhile one expert is removed
   (DELETE /v1/experts) and re-added (POST /v1/experts, its descriptor from the run): failed
   requests, and requests answered by the removed expert while it was out, are counted.

With ``--router-in-ingress`` the same measures run on the graph without a Router deployment
(``cscr serve --router-in-ingress``: each Ingress replica routes itself); the ingress-to-router hop
is then an in-process call.

    python bench/serve_latency.py [--run RUN] [--data-dir ../shared/data] [--requests 200]
                                  [--concurrency 16] [--load-seconds 40] [--router-in-ingress]
                                  [--smoke-test]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PROMPTS = [
    "Write a python function to find the first repeated character in a given string.",
    "What is the capital of France?",
    "The trophy doesn't fit into the brown suitcase because the _ is too large.",
    "Which gas do plants absorb from the air? A) oxygen B) carbon dioxide C) nitrogen",
    "Write a function to compute the n-th Fibonacci number.",
    "Solve for x: 3x + 5 = 20.",
    "Explain why the sky is blue in one sentence.",
    "Sarah gave Maria a gift because _ was celebrating her birthday.",
]


def log(msg: str) -> None:
    print(f"[serve-bench] {msg}", file=sys.stderr, flush=True)


def pct(ms: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(ms), q))


# ---- measurements ----
def routerbench_prompts(data_dir: str, n: int = 32, max_chars: int = 32_000) -> list[str]:
    """``n`` RouterBench test prompts drawn at random (seed 0): the lengths the router meets (most
    start with a few-shot preamble longer than one MiniLM window)."""
    from cscr.config import DataConfig
    from cscr.data import load_dataset

    table = load_dataset("routerbench", DataConfig(data_dir=data_dir))
    texts = [str(table.texts[i]) for i in table.split_index("test") if len(str(table.texts[i])) <= max_chars]
    pick = np.random.default_rng(0).choice(len(texts), size=min(n, len(texts)), replace=False)
    return [texts[i] for i in pick]


def route_latency(base: str, n: int, stages: dict[str, list[float]] | None = None,
                  prompts: list[str] = PROMPTS) -> list[float]:
    """Client-side ms per sequential /v1/route; ``stages`` gets each request's router-replica
    time and ingress-measured router call time (ms)."""
    import httpx

    out = []
    with httpx.Client(base_url=base, timeout=60) as c:
        for i in range(n):
            t0 = time.perf_counter()
            r = c.post("/v1/route", json={"prompt": prompts[i % len(prompts)], "cost_weight": 0.1})
            out.append((time.perf_counter() - t0) * 1e3)
            r.raise_for_status()
            if stages is not None:
                stages.setdefault("router", []).append(float(r.json()["routing_ms"]))
                stages.setdefault("ingress_call", []).append(float(r.headers["x-cscr-routing-ms"]))
    return out


def encoder_latency(encoder: Any, n: int, prompts: list[str] = PROMPTS) -> list[float]:
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        encoder.encode([prompts[i % len(prompts)]])
        out.append((time.perf_counter() - t0) * 1e3)
    return out


async def route_throughput(base: str, concurrency: int, total: int,
                           prompts: list[str] = PROMPTS) -> tuple[float, int]:
    import httpx

    done, failed = 0, 0

    async def worker(c: Any, k: int) -> None:
        nonlocal done, failed
        while done + failed < total:
            i = done + failed
            try:
                r = await c.post("/v1/route", json={"prompt": prompts[(i + k) % len(prompts)]})
                done += r.status_code == 200
                failed += r.status_code != 200
            except httpx.HTTPError:
                failed += 1

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, timeout=120, limits=limits) as c:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(c, k) for k in range(concurrency)))
        return done / (time.perf_counter() - t0), failed


def encoder_throughput(encoder: Any, batch: int, total: int, prompts: list[str] = PROMPTS) -> float:
    texts = [prompts[i % len(prompts)] for i in range(batch)]
    t0 = time.perf_counter()
    n = 0
    while n < total:
        encoder.encode(texts)
        n += batch
    return n / (time.perf_counter() - t0)


ADMIN_KEY = "bench-admin-key"  # the admin API is disabled without one
ADMIN_HEADERS = {"Authorization": f"Bearer {ADMIN_KEY}"}


async def load_run(base: str, concurrency: int, seconds: float, victim: str, readd: dict[str, Any]) -> dict[str, Any]:
    import httpx

    stats: dict[str, Any] = {"ok": 0, "failed": 0, "errors": {}, "by_expert": {}, "victim_while_out": 0,
                             "fallbacks": 0}
    out_window = [float("inf"), float("inf")]  # victim removed at, re-added at (perf_counter)
    stop = time.perf_counter() + seconds

    async def client(c: Any, k: int) -> None:
        i = k
        while time.perf_counter() < stop:
            i += concurrency
            body = {"model": "cscr", "max_tokens": 4, "cost_weight": [0.0, 0.05, 1.0][i % 3],
                    "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]}
            t_sent = time.perf_counter()
            try:
                r = await c.post("/v1/chat/completions", json=body)
            except httpx.HTTPError as exc:
                stats["failed"] += 1
                stats["errors"][type(exc).__name__] = stats["errors"].get(type(exc).__name__, 0) + 1
                continue
            if r.status_code != 200:
                stats["failed"] += 1
                key = f"HTTP {r.status_code}"
                stats["errors"][key] = stats["errors"].get(key, 0) + 1
                continue
            stats["ok"] += 1
            who = r.headers.get("x-cscr-expert", "?")
            stats["by_expert"][who] = stats["by_expert"].get(who, 0) + 1
            stats["fallbacks"] += r.headers.get("x-cscr-fallback") == "true"
            if who == victim and out_window[0] < t_sent and time.perf_counter() < out_window[1]:
                stats["victim_while_out"] += 1  # sent after the removal, answered before the re-add

    async def admin(c: Any) -> None:
        await asyncio.sleep(seconds * 0.25)
        r = await c.delete(f"/v1/experts/{victim}", headers=ADMIN_HEADERS)
        out_window[0] = time.perf_counter()
        stats["remove_status"] = r.status_code
        await asyncio.sleep(seconds * 0.15)
        t0 = time.perf_counter()
        r = await c.post("/v1/experts", json=readd, timeout=600, headers=ADMIN_HEADERS)
        out_window[1] = time.perf_counter()
        stats["readd_status"], stats["readd_s"] = r.status_code, out_window[1] - t0

    async with httpx.AsyncClient(base_url=base, timeout=300,
                                 limits=httpx.Limits(max_connections=concurrency + 2)) as c:
        await asyncio.gather(admin(c), *(client(c, k) for k in range(concurrency)))
    return stats


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default=None, help="a trained run (default: one trained here in seconds on a RouterBench slice of three experts)")
    p.add_argument("--data-dir", default=os.environ.get("CSCR_DATA_DIR", str(Path(__file__).resolve().parents[2] / "shared" / "data")))
    p.add_argument("--requests", type=int, default=200, help="sequential /v1/route requests (latency)")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--throughput-requests", type=int, default=400)
    p.add_argument("--batch-wait-ms", type=float, default=0.0,
                   help="the router's extra batch wait (cscr serve --batch-wait-ms; 0: continuous batching)")
    p.add_argument("--long-requests", type=int, default=64,
                   help="latency and throughput again on real RouterBench test prompts (0: skip)")
    p.add_argument("--load-seconds", type=float, default=40.0, help="0: skip the load run")
    p.add_argument("--router-in-ingress", action="store_true",
                   help="route inside the Ingress replica, no Router deployment (cscr serve --router-in-ingress)")
    p.add_argument("--smoke-test", action="store_true", help="tiny sizes")
    args = p.parse_args(argv)
    if args.smoke_test:
        args.requests, args.concurrency, args.throughput_requests, args.load_seconds = 20, 4, 40, 12.0
        args.long_requests = 8

    import torch
    import yaml
    from cscr.serve.app import build_app
    from ray import serve as ray_serve

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "serve"))
    from serve_helpers import RB_EXPERTS, free_port, make_tiny_lm, make_trained_run, serving

    from cscr.encoder import Encoder
    from cscr.fingerprints.store import DescriptorStore
    from cscr.markdown import markdown_table, num
    from cscr.runs.loader import load_router
    from cscr.runs.paths import RunPaths

    tmp = Path(tempfile.mkdtemp(prefix="cscr-serve-bench-"))
    run = Path(args.run) if args.run else None
    if run is None:
        log("training a run on a RouterBench slice ...")
        run = make_trained_run(tmp / "run", Path(args.data_dir), RB_EXPERTS, epochs=2)
    router = load_router(run)
    names = list(router.expert_names)
    assert router.descriptor_basis is not None
    descriptors = DescriptorStore(RunPaths.of(run).descriptors).read(router.descriptor_basis.kind, experts=names)
    costs = dict(zip(names, router.costs.tolist(), strict=True))
    lms = {n: make_tiny_lm(tmp / f"lm{i}", i + 1) for i, n in enumerate(names)}
    pool = tmp / "pool.yaml"
    pool.write_text(yaml.safe_dump({"name": "bench", "experts": [
        {"name": n, "kind": "open-weights", "source": {"model": str(lms[n])}, "cost": {"n_params": 1.0}}
        for n in names]}))
    app = build_app({"run": str(run), "pool": str(pool), "expert_num_cpus": 0.1, "expert_timeout_s": 60,
                     "default_max_tokens": 4, "admin_key": ADMIN_KEY, "batch_wait_ms": args.batch_wait_ms,
                     "router_in_ingress": args.router_in_ingress})
    router_deployment = "Ingress" if args.router_in_ingress else "Router"  # the replica that embeds

    def batch_stats() -> dict[str, int]:
        return dict(ray_serve.get_deployment_handle(router_deployment, "cscr").batch_stats.remote().result())

    t0 = time.perf_counter()
    with serving(app, free_port()) as base:  # a fresh local cluster, shut down on the way out
        log(f"cluster and app up in {time.perf_counter() - t0:.1f}s; load average {os.getloadavg()}")
        torch.set_num_threads(1)  # as in the router replica
        encoder = Encoder()
        encoder.encode(PROMPTS)  # warm
        route_latency(base, 10)  # warm

        enc_ms = encoder_latency(encoder, args.requests)
        stages: dict[str, list[float]] = {}
        route_ms = route_latency(base, args.requests, stages)
        enc_ms += encoder_latency(encoder, args.requests)  # interleaved: both see the same load
        rps, failed_tp = asyncio.run(route_throughput(base, args.concurrency, args.throughput_requests))
        enc_ps = encoder_throughput(encoder, 32, args.throughput_requests)
        long_rows: list[list[str]] = []
        if args.long_requests > 0:  # the same measures on real RouterBench prompts
            rb = routerbench_prompts(args.data_dir)
            chars = np.median([len(t) for t in rb])
            route_latency(base, 4, prompts=rb)  # warm
            long_enc = encoder_latency(encoder, args.long_requests, rb)
            long_route = route_latency(base, args.long_requests, prompts=rb)
            long_enc += encoder_latency(encoder, args.long_requests, rb)
            before = batch_stats()
            long_rps, _ = asyncio.run(route_throughput(base, args.concurrency, args.long_requests, rb))
            after = batch_stats()
            long_batch = (after["prompts"] - before["prompts"]) / max(after["batches"] - before["batches"], 1)
            long_ps = encoder_throughput(encoder, 32, args.long_requests, rb)
            tag = f"RouterBench prompts (median {chars:.0f} chars)"
            long_rows = [*[[f"{tag}: route p{q} (ms)", num(pct(long_route, q), ".1f"),
                            f"MiniLM forward {num(pct(long_enc, q), '.1f')}",
                            f"{num(pct(long_route, q) / pct(long_enc, q), '.2f')}x"] for q in (50, 99)],
                         [f"{tag}: throughput (req/s, {args.concurrency} clients)", num(long_rps, ".1f"),
                          f"batched MiniLM {num(long_ps, '.1f')} prompts/s (router's mean batch {long_batch:.1f})",
                          f"{num(long_rps / long_ps, '.2f')}x"]]
        batches = batch_stats()
        victim = names[0]
        readd = {"expert": {"name": victim, "model": str(lms[victim]), "num_cpus": 0.1}, "cost": costs[victim],
                 "descriptor": [float(x) for x in descriptors[victim]]}
        load: dict[str, Any] = {"ok": 0, "failed": 0, "errors": {}, "fallbacks": 0, "victim_while_out": 0,
                                "by_expert": {}}
        if args.load_seconds > 0:
            load = asyncio.run(load_run(base, args.concurrency, args.load_seconds, victim, readd))

    print(f"\nserve latency bench (loopback; load average now {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; "
          f"router batch wait {args.batch_wait_ms:g} ms; "
          f"{'routed in the ingress replica' if args.router_in_ingress else 'Router deployment'})")
    print(markdown_table(["measure", "cscr serve", "reference", "ratio"], [
        *[[f"short prompts: route p{q} (ms)", num(pct(route_ms, q), ".2f"), f"MiniLM forward {num(pct(enc_ms, q), '.2f')}",
           f"{num(pct(route_ms, q) / pct(enc_ms, q), '.2f')}x"] for q in (50, 99)],
        [f"short prompts: throughput (req/s, {args.concurrency} clients)", num(rps, ".1f"),
         f"batched MiniLM {num(enc_ps, '.1f')} prompts/s", f"{num(rps / enc_ps, '.2f')}x"], *long_rows], "llll"))
    client, ingress_call, router_ms = (np.asarray(route_ms), np.asarray(stages["ingress_call"]),
                                       np.asarray(stages["router"]))
    enc50 = pct(enc_ms, 50)
    print("\nwhere the time of one route decision goes (p50 per stage, ms):")
    print(markdown_table(["stage", "ms", "share of the client's p50"], [
        [name, num(value, ".2f"), f"{num(100 * value / pct(route_ms, 50), '.0f')}%"] for name, value in (
            ("MiniLM forward (bare, this process)", enc50),
            ("router replica beyond the forward (batch wait, thread hop, FAISS, knob)",
             float(np.median(router_ms)) - enc50),
            ("ingress -> router hop (in-process call)" if args.router_in_ingress else
             "ingress -> router hop (handle call)", float(np.median(ingress_call - router_ms))),
            ("HTTP proxy + ingress (FastAPI, checks, JSON)", float(np.median(client - ingress_call))),
            ("client total", pct(route_ms, 50)))], "lrr"))
    print(f"\nrouter encoder batches: {batches['batches']}, mean size "
          f"{batches['prompts'] / max(batches['batches'], 1):.2f}, largest {batches['largest']}; "
          f"failed route requests under concurrency: {failed_tp}")
    print(f"load run ({args.load_seconds:.0f}s, {args.concurrency} clients, '{victim}' removed then re-added): "
          f"{load['ok']} ok, {load['failed']} failed {load['errors'] or ''}, fallbacks {load['fallbacks']}, "
          f"answered by the removed expert while out: {load['victim_while_out']}, "
          f"remove HTTP {load.get('remove_status')}, re-add HTTP {load.get('readd_status')} "
          f"in {load.get('readd_s', float('nan')):.1f}s; answers per expert {load['by_expert']}"
          if args.load_seconds > 0 else "load run skipped (--load-seconds 0)")
    return 0 if load["failed"] == 0 and load["victim_while_out"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
