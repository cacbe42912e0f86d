"""Fault table of `cscr serve` (issue 13, item 3), loopback only, bounded in time.

One `cscr serve` process (2 Router and 2 Ingress replicas, every expert in its own application,
the pool saved in a state folder) on a trained run; C concurrent clients send chat completions
(model "cscr") while, in turn:

1. nothing happens (baseline);
2. a Router replica is killed (SIGKILL of its process; Serve starts another);
3. an Ingress replica is killed (requests in flight to it may fail: counted);
4. an expert's replica is killed (the request falls back to the next expert);
5. an expert is removed, then re-added (DELETE then POST /v1/experts, its descriptor from the run);
6. the whole `cscr serve` process is restarted (SIGTERM, then started again on the same state
   folder; clients retry only connections refused while no process listens; requests in flight
   when the old process closes its port fail: counted, like those of a killed ingress).

For each event: requests sent, answered (200), failed, and the pool (version and experts) before
and after. The pool after each event must be the pool before it (plus/minus the admin change).
After the baseline, the resident memory of each expert's replica processes is printed (RSS, split
into anonymous and file-backed pages: weights memory-mapped from a float32 folder are file-backed
and shared by the replicas of one model on a node; ``bench/expert_memory.py`` breaks it down).

    python bench/serve_faults.py --run RUN --pool POOL [--clients 8] [--requests 40]
    python bench/serve_faults.py --smoke-test     # a run trained here and tiny random LMs
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

KEY, ADMIN = "faults-key", "faults-admin"
HELPERS = str(Path(__file__).resolve().parents[1] / "tests" / "serve")  # serve_helpers: the tests' small real parts
if HELPERS not in sys.path:
    sys.path.insert(0, HELPERS)
PROMPTS = ["What is the capital of France?", "Solve for x: 3x + 5 = 20.", "Name three prime numbers.",
           "Write a function to compute the n-th Fibonacci number.", "Explain why the sky is blue."]


@dataclass
class Row:
    event: str
    sent: int = 0
    ok: int = 0
    failed: int = 0
    reconnects: int = 0  # connections refused while no server listened (restart only)
    seconds: float = 0.0
    pool_before: dict[str, Any] = field(default_factory=dict)
    pool_after: dict[str, Any] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)


class Server:
    """A `cscr serve` subprocess on loopback."""

    def __init__(self, run: Path, pool: Path, workdir: Path, port: int, extra: list[str] | None = None) -> None:
        self.run, self.pool, self.workdir, self.port = run, pool, workdir, port
        self.extra = extra or []
        self.state_dir = workdir / "state"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log(self) -> Path:
        return self.workdir / f"serve-{self.starts}.log"

    def start(self, timeout: float = 600) -> None:
        self.starts += 1
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0", "CSCR_API_KEY": KEY,
               "CSCR_ADMIN_KEY": ADMIN}
        env.pop("RAY_ADDRESS", None)
        cmd = [sys.executable, "-m", "cscr.cli", "serve", "--run", str(self.run), "--pool", str(self.pool),
               "--port", str(self.port), "--state-dir", str(self.state_dir), *self.extra]
        with self.log.open("w") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + timeout
        while "serving on" not in self.log.read_text():
            if self.proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"cscr serve did not start:\n{self.log.read_text()[-3000:]}")
            time.sleep(1)

    def stop(self, timeout: float = 180) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def replica_pids(self, fragment: str) -> list[int]:
        """Processes of this server's Ray cluster whose title holds ``fragment``
        (e.g. ``ServeReplica:cscr:Router``)."""
        import psutil

        assert self.proc is not None
        out = []
        for p in psutil.Process(self.proc.pid).children(recursive=True):
            try:
                if fragment in " ".join(p.cmdline()):
                    out.append(p.pid)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return sorted(out)

    def kill_one(self, fragment: str) -> int:
        pids = self.replica_pids(fragment)
        if not pids:
            raise RuntimeError(f"no process titled {fragment!r}")
        os.kill(pids[0], signal.SIGKILL)
        return pids[0]


def resident_mib(pid: int) -> dict[str, float]:
    """A process's resident memory in MiB (Linux ``/proc``): rss, anon, file."""
    keys = {"VmRSS": "rss", "RssAnon": "anon", "RssFile": "file"}
    out = dict.fromkeys(keys.values(), 0.0)
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in keys:
                out[keys[name]] = int(value.split()[0]) / 1024
    return out


def expert_memory(server: Server, specs: list[Any]) -> str:
    """The resident memory of every expert replica process of ``server``, as a table."""
    from cscr.serve.deployments import deployment_name

    lines = [f"| {'expert':<28} | {'model':<28} |    pid |  RSS MiB |     anon |     file |",
             f"|{'-' * 30}|{'-' * 30}|--------|----------|----------|----------|"]
    for spec in specs:
        for pid in server.replica_pids(":" + deployment_name(spec.name)):
            try:
                m = resident_mib(pid)
            except OSError:  # the replica exited meanwhile
                continue
            lines.append(f"| {spec.name:<28} | {str(spec.source.model)[-28:]:<28} | {pid:>6} | {m['rss']:>8.0f} "
                         f"| {m['anon']:>8.0f} | {m['file']:>8.0f} |")
    return "\n".join(lines)


def pool_of(base: str) -> dict[str, Any]:
    body = httpx.get(f"{base}/healthz", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=60).json()
    return {"version": body["pool_version"], "experts": sorted(body["experts"])}


def wait_replicas(base: str, want: int = 4, timeout: float = 180) -> None:
    """Until ``want`` Router/Ingress replicas serve the current version (after a kill: the new one)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        body = httpx.get(f"{base}/healthz", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=60).json()
        if sum(r["version"] == body["pool_version"] for r in body["replicas"].values()) >= want:
            return
        time.sleep(1)


PHASE = {"now": ""}  # what the event is doing (a restart: stopping / starting), logged with failures


def load(base: str, event: Callable[[], None] | None, clients: int, requests: int, name: str,
         max_tokens: int = 3, deadline_s: float = 600, model: str = "cscr:1000") -> Row:
    """``clients`` threads send ``requests`` chat completions in all; ``event`` runs once a quarter
    of them were sent. ``cscr:1000``: the cheapest expert answers (the one whose replica is killed,
    then removed and re-added), the others are the fallbacks."""
    row = Row(name)
    lock = threading.Lock()
    fire = threading.Event()
    counter = iter(range(requests))
    stop_at = time.time() + deadline_s

    def client(i: int) -> None:
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {KEY}"}, timeout=180) as http:
            while True:
                with lock:
                    n = next(counter, None)
                    if n is None:
                        return
                    row.sent += 1
                    if row.sent >= max(1, requests // 4):
                        fire.set()
                body = {"model": model, "max_tokens": max_tokens,
                        "messages": [{"role": "user", "content": PROMPTS[n % len(PROMPTS)]}]}
                while True:
                    try:
                        r = http.post("/v1/chat/completions", json=body)
                        if r.status_code == 404 and "/-/routes" in r.text and time.time() < stop_at:
                            # Serve's proxy listens but the app is not deployed yet (a restart):
                            # the request never reached cscr (its own 404s are OpenAI-shaped), so
                            # like a refused connection it is retried, as a readiness probe would
                            with lock:
                                row.reconnects += 1
                            time.sleep(0.5)
                            continue
                        if r.status_code == 503 and "retry-after" in r.headers and time.time() < stop_at:
                            # the server drains (a graceful stop): retry after the time it asks,
                            # as the openai client does
                            with lock:
                                row.reconnects += 1
                            time.sleep(float(r.headers["retry-after"]))
                            continue
                        good, why = r.status_code == 200, f"{r.status_code} {r.text[:160]}"
                        break
                    except httpx.ConnectError:  # nothing listens (a restart): the request never left
                        with lock:
                            row.reconnects += 1
                        if time.time() > stop_at:
                            good, why = False, "server never came back"
                            break
                        time.sleep(0.5)
                    except httpx.HTTPError as exc:
                        good, why = False, repr(exc)[:160]
                        break
                with lock:
                    if good:
                        row.ok += 1
                    else:
                        row.failed += 1
                        row.errors.append(f"{why} [{PHASE['now'] or 'during the event'}]")

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    ev_error: list[BaseException] = []
    if event is not None:
        fire.wait(timeout=120)
        try:
            event()
        except BaseException as exc:  # reported in the table
            ev_error.append(exc)
    for t in threads:
        t.join()
    row.seconds = time.perf_counter() - t0
    if ev_error:
        row.errors.append(f"event failed: {ev_error[0]!r}")
    return row


def run_descriptor(run: Path, expert: str) -> tuple[list[float], float]:
    """The expert's descriptor and cost in the run's index (to re-add it as it was)."""
    from cscr.routers.cscr import CSCRRouter
    from cscr.runs.loader import load_router

    router = load_router(run, "cscr")
    assert isinstance(router, CSCRRouter) and router.index is not None, type(router)
    j = router.expert_names.index(expert)
    return router.index.vectors()[router.index.position(expert)].tolist(), float(router.costs[j])


def run_faults(run: Path, pool: Path, workdir: Path, clients: int = 8, requests: int = 40,
               extra: list[str] | None = None, log: Callable[[str], None] = print) -> list[Row]:
    from cscr.serve.pool import specs_from_pool
    from serve_helpers import free_port

    specs = specs_from_pool(pool)
    costs = {s.name: run_descriptor(run, s.name)[1] for s in specs}
    victim = min(specs, key=lambda s: costs[s.name])  # the cheapest: it answers "cscr:1000"
    descriptor, cost = run_descriptor(run, victim.name)
    server = Server(run, pool, workdir, free_port(), ["--router-replicas", "2", "--ingress-replicas", "2",
                                                      "--num-cpus", "4", "--expert-timeout", "20",
                                                      *(extra or [])])
    rows: list[Row] = []
    admin = httpx.Client(base_url=server.base, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=600)

    def remove_and_readd() -> None:
        r = admin.delete(f"/v1/experts/{victim.name}")
        assert r.status_code == 200, r.text
        spec = victim.model_dump(mode="json", exclude_unset=True)
        r = admin.post("/v1/experts", json={"expert": {**spec, "name": victim.name, "kind": victim.kind},
                                            "cost": cost, "descriptor": descriptor})
        assert r.status_code == 201, r.text

    def restart() -> None:
        PHASE["now"] = "stopping"
        code = server.stop()
        assert code == 0, f"cscr serve exited {code}"
        PHASE["now"] = "starting"
        server.start()
        PHASE["now"] = "started"

    from cscr.serve.deployments import deployment_name

    events: list[tuple[str, Callable[[], None] | None]] = [
        ("baseline", None),
        ("kill a Router replica", lambda: log(f"  killed pid {server.kill_one('ServeReplica:cscr:Router')}")),
        ("kill an Ingress replica", lambda: log(f"  killed pid {server.kill_one('ServeReplica:cscr:Ingress')}")),
        ("kill an expert replica",
         lambda: log(f"  killed pid {server.kill_one(':' + deployment_name(victim.name))}")),
        ("remove and re-add an expert", remove_and_readd),
        ("restart cscr serve", restart),
    ]
    server.start()
    try:
        wait_replicas(server.base)
        for name, event in events:
            PHASE["now"] = ""
            before = pool_of(server.base)
            row = load(server.base, event, clients, requests, name)
            wait_replicas(server.base)
            row.pool_before, row.pool_after = before, pool_of(server.base)
            rows.append(row)
            log(format_row(row))
            if name == "baseline":
                log("resident memory of the expert replicas after the baseline load:\n"
                    + expert_memory(server, specs))
    finally:
        if server.proc is not None and server.proc.poll() is None:
            server.stop()
    return rows


def format_row(r: Row) -> str:
    pool = lambda p: f"v{p.get('version')} {len(p.get('experts', []))} experts"  # noqa: E731
    return (f"| {r.event:<28} | {r.sent:>4} | {r.ok:>4} | {r.failed:>6} | {r.reconnects:>10} | {r.seconds:>6.1f} "
            f"| {pool(r.pool_before):<16} | {pool(r.pool_after):<16} |")


def format_table(rows: list[Row]) -> str:
    head = (f"| {'event':<28} | sent |   ok | failed | reconnects |      s | {'pool before':<16} | "
            f"{'pool after':<16} |")
    return "\n".join([head, "|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|",
                      *(format_row(r) for r in rows)])


def smoke_inputs(workdir: Path, data_dir: Path) -> tuple[Path, Path]:
    """A run trained here on a RouterBench slice and a pool of tiny random LMs under its experts."""
    import yaml
    from serve_helpers import RB_EXPERTS, make_tiny_lm, make_trained_run

    run = make_trained_run(workdir / "run", data_dir)
    lms = [make_tiny_lm(workdir / f"lm-{i}", i + 1) for i in range(2)]
    pool = workdir / "pool.yaml"
    pool.write_text(yaml.safe_dump({"name": "faults", "experts": [
        {"name": n, "kind": "open-weights", "source": {"model": str(lms[i % 2])}, "cost": {"n_params": c},
         "num_cpus": 0.1} for i, (n, c) in enumerate(zip(RB_EXPERTS, (7.0, 46.7, 1000.0), strict=True))]}))
    return run, pool


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run")
    p.add_argument("--pool")
    p.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=40)
    p.add_argument("--smoke-test", action="store_true")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="cscr-faults-") as tmp:
        work = Path(tmp)
        if a.smoke_test or not (a.run and a.pool):
            run, pool = smoke_inputs(work, Path(a.data_dir))
        else:
            run, pool = Path(a.run), Path(a.pool)
        t0 = time.perf_counter()
        rows = run_faults(run, pool, work, a.clients, a.requests)
        print(format_table(rows))
        print(f"total {time.perf_counter() - t0:.0f} s; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
        for r in rows:
            for e in r.errors[:3]:
                print(f"  {r.event}: {e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
