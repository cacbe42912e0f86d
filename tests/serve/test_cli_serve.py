"""`cscr serve` as a user runs it: a subprocess on a trained run and a pool YAML, answering over
HTTP on loopback, stopped by SIGTERM (what a process manager sends) with a clean exit."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import pytest
import yaml
from serve_helpers import free_port

pytestmark = pytest.mark.slow

MISTRAL, MIXTRAL, GPT4 = "mistralai/mistral-7b-chat", "mistralai/mixtral-8x7b-chat", "gpt-4-1106-preview"


def test_cscr_serve_answers_then_stops_cleanly_on_sigterm(trained_run, tiny_lms, tmp_path):
    pool = tmp_path / "pool.yaml"
    pool.write_text(yaml.safe_dump({"name": "cli", "experts": [
        {"name": name, "kind": "open-weights", "source": {"model": str(tiny_lms[lm])}, "cost": {"n_params": n}}
        for name, lm, n in ((MISTRAL, "a", 7.0), (MIXTRAL, "b", 46.7), (GPT4, "a", 1000.0))]}))
    port = free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1"}
    log = tmp_path / "serve.log"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "cscr.cli", "serve", "--run", str(trained_run),
                                 "--pool", str(pool), "--port", str(port), "--num-cpus", "2",
                                 "--expert-cpus", "0.1", "--api-key", "k", "--state-dir", str(tmp_path / "state")],
                                stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.time() + 240
        while "serving on" not in log.read_text():
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.time() < deadline, log.read_text()[-3000:]
            time.sleep(1)
        h = {"Authorization": "Bearer k"}
        models = httpx.get(f"http://127.0.0.1:{port}/v1/models", headers=h, timeout=30).json()
        assert {m["id"] for m in models["data"]} == {"cscr", MISTRAL, MIXTRAL, GPT4}
        r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", headers=h, timeout=120, json={
            "model": "cscr:1000", "messages": [{"role": "user", "content": "What is 2 + 2?"}], "max_tokens": 4})
        assert r.status_code == 200 and r.json()["model"] == MISTRAL  # the cheapest, at a high cost weight
        assert r.headers["x-cscr-pool-version"] == "1" and (tmp_path / "state" / "pool.json").is_file()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0, log.read_text()[-3000:]
        assert "cscr: stopping" in log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
