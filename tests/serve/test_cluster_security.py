"""The embedded cluster of `cscr serve` is not a back door (issue 13, item 8).

Ray binds its GCS, raylet and worker ports on every interface (a node cannot be bound to
loopback: ray.init turns 127.0.0.1 into the host's address), so `cscr serve` starts its embedded
cluster with Ray's token auth and a fresh random token: a driver that connects with no token,
or with a wrong one, is refused. Its HTTP port listens on loopback only. When the cluster dies,
`cscr serve` logs one line and exits with code 3 (not a live process with a dead port).

Before the attack it is checked as a user runs it (defaults but for the flags below): it lists the
pool's models, answers a chat completion through the router with the pool's version in a header,
and keeps the pool's durable record in its state folder. Its graceful stop (SIGTERM, exit 0) is
checked in test_faults.py, whose restart event stops `cscr serve` that way."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest
import yaml
from serve_helpers import RB_EXPERTS, free_port

pytestmark = pytest.mark.slow


def descendants(pid: int, name: str) -> list[psutil.Process]:
    out = []
    for p in psutil.Process(pid).children(recursive=True):
        try:
            if name in p.name() or name in " ".join(p.cmdline()[:1]):
                out.append(p)
        except psutil.Error:
            continue
    return out


def listening(procs: list[psutil.Process]) -> list[tuple[str, int]]:
    pids = {p.pid for p in procs}
    return sorted({(c.laddr.ip, c.laddr.port) for c in psutil.net_connections(kind="inet")
                   if c.status == psutil.CONN_LISTEN and c.pid in pids})


def connect_attempts(addresses: list[str], envs: list[dict[str, str]], tmp: Path) -> list[tuple[str, int]]:
    """Every (address, credentials) pair tried at once, each by its own driver process; returns each
    one's output (stdout and stderr) and exit code. They only wait on Ray's import and the answer, so
    they need not wait on each other."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH") and k != "RAY_ADDRESS"}
    started = []
    for address in addresses:
        code = (f"import os, ray; ray.init(address={address!r}, log_to_driver=False); "
                "print('CONNECTED', ray.get(ray.remote(lambda: sorted(os.environ)).remote())[:3])")
        for extra in envs:
            log = tmp / f"attempt-{len(started)}.log"
            with log.open("w") as out:
                started.append((log, subprocess.Popen([sys.executable, "-c", code], env={**base, **extra},
                                                      stdout=out, stderr=subprocess.STDOUT)))
    results = []
    try:
        for log, proc in started:
            code = proc.wait(timeout=120)
            results.append((log.read_text(), code))
    finally:
        for _, proc in started:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return results


def test_embedded_cluster_needs_a_token_and_its_death_stops_the_server(trained_run, tiny_lms, tmp_path):
    pool = tmp_path / "pool.yaml"
    pool.write_text(yaml.safe_dump({"name": "sec", "experts": [
        {"name": n, "kind": "open-weights", "source": {"model": str(tiny_lms["ab"[i % 2]])}, "cost": {"n_params": c}}
        for i, (n, c) in enumerate(zip(RB_EXPERTS, (7.0, 46.7, 1000.0), strict=True))]}))
    port = free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_AUTH_TOKEN", None)
    log = tmp_path / "serve.log"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "cscr.cli", "serve", "--run", str(trained_run),
                                 "--pool", str(pool), "--port", str(port), "--num-cpus", "2",
                                 "--expert-cpus", "0.1", "--state-dir", str(tmp_path / "state"), "--api-key", "k"],
                                stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.time() + 400
        while "serving on" not in log.read_text():
            assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(1)
        assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=30).json() == {"status": "ok"}
        # as a user runs it: the pool's models, one routed answer, the pool's durable record
        h = {"Authorization": "Bearer k"}
        models = httpx.get(f"http://127.0.0.1:{port}/v1/models", headers=h, timeout=30).json()
        assert {m["id"] for m in models["data"]} == {"cscr", *RB_EXPERTS}
        r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", headers=h, timeout=120, json={
            "model": "cscr:1000", "messages": [{"role": "user", "content": "What is 2 + 2?"}], "max_tokens": 4})
        assert r.status_code == 200 and r.json()["model"] == RB_EXPERTS[0], r.text  # the cheapest, at a high cost weight
        assert r.headers["x-cscr-pool-version"] == "1" and (tmp_path / "state" / "pool.json").is_file()
        assert httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=30).status_code == 401  # no key, no answer
        # the HTTP port: loopback only
        http_socks = {(c.laddr.ip, c.laddr.port) for c in psutil.net_connections(kind="inet")
                      if c.status == psutil.CONN_LISTEN and c.laddr.port == port}
        assert http_socks and {ip for ip, _ in http_socks} <= {"127.0.0.1"}, http_socks
        gcs = descendants(proc.pid, "gcs_server")
        raylet = descendants(proc.pid, "raylet")
        assert len(gcs) == 1 and raylet, "no embedded GCS/raylet under cscr serve"
        assert gcs[0].environ().get("RAY_AUTH_MODE") == "token" and len(gcs[0].environ().get("RAY_AUTH_TOKEN", "")) >= 32
        ports = [p for _, p in listening(gcs)]
        assert ports, "the GCS listens on no port"
        # no token, a wrong token: refused (the same credentials an attacker on the network has)
        said_token = False
        attempts = connect_attempts([f"127.0.0.1:{p}" for p in ports[:2]],
                                    [{"RAY_AUTH_MODE": "disabled"}, {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "x" * 43}],
                                    tmp_path)
        assert len(attempts) == 2 * len(ports[:2])
        for text, code in attempts:
            assert code != 0 and "CONNECTED" not in text, text[-2000:]
            said_token |= "token" in text.lower()
        assert said_token  # refused for want of the token (not merely a wrong port)
        # the cluster dies: the server says so and exits non-zero
        os.kill(gcs[0].pid, signal.SIGKILL)
        code = proc.wait(timeout=60)
        text = log.read_text()
        assert code == 3, text[-3000:]
        assert "cscr: the Ray cluster died" in text
        assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in raylet)  # nothing left behind
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
