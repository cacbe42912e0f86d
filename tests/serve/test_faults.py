"""Faults lose nothing (issue 13, item 3): `cscr serve` with 2 Router and 2 Ingress replicas
under a bounded concurrent load (8 clients, 40 chat completions per event, loopback) while a
Router replica, an Ingress replica and an expert replica are killed, an expert is removed and
re-added, and the whole process is restarted on its state folder (a graceful stop: it drains the
requests in flight first). No request fails except those in flight to a killed Ingress replica; the pool
after each event is the pool before it (plus the admin change). The fault table is printed
(bench/serve_faults.py prints the same table on its own)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import yaml
from serve_helpers import RB_EXPERTS

pytestmark = pytest.mark.slow

BENCH = Path(__file__).resolve().parents[2] / "bench" / "serve_faults.py"


def bench():
    spec = importlib.util.spec_from_file_location("serve_faults", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["serve_faults"] = module  # dataclasses look their module up while it loads
    spec.loader.exec_module(module)
    return module


def test_faults_lose_no_request_and_no_pool_change(trained_run, tiny_lms, tmp_path, capsys):
    faults = bench()
    pool = tmp_path / "pool.yaml"
    pool.write_text(yaml.safe_dump({"name": "faults", "experts": [
        {"name": n, "kind": "open-weights", "source": {"model": str(tiny_lms["ab"[i % 2]])},
         "cost": {"n_params": c}, "num_cpus": 0.1}
        for i, (n, c) in enumerate(zip(RB_EXPERTS, (7.0, 46.7, 1000.0), strict=True))]}))
    rows = faults.run_faults(trained_run, pool, tmp_path, clients=8, requests=40)
    with capsys.disabled():
        print("\n" + faults.format_table(rows))
        for r in rows:
            for e in r.errors[:10]:
                print(f"  {r.event}: {e}")
    by = {r.event: r for r in rows}
    assert list(by) == ["baseline", "kill a Router replica", "kill an Ingress replica", "kill an expert replica",
                        "remove and re-add an expert", "restart cscr serve"]
    for r in rows:
        assert r.sent == 40 and r.ok + r.failed == 40, r
        assert not [e for e in r.errors if e.startswith("event failed")], r.errors
        if r.event not in ("kill an Ingress replica", "restart cscr serve"):
            assert r.failed == 0, (r.event, r.errors)  # only requests in flight to a killed ingress may fail
        assert r.pool_after["experts"] == r.pool_before["experts"], r
    assert by["kill an Ingress replica"].failed <= 8, by["kill an Ingress replica"].errors  # in flight: 1 per client
    restart_failures = by["restart cscr serve"].errors
    # a restart drains first: the requests in flight finish, new ones get a 503 with Retry-After
    # (retried, as the openai client does), then the port closes and refused connections are
    # retried until the new process serves. Measured: 0 failed. A request caught between the
    # proxy and an ingress at the very moment the port closes could still fail: at most 2 allowed
    assert len(restart_failures) <= 2 and all(e.endswith("[stopping]") for e in restart_failures), restart_failures
    assert by["remove and re-add an expert"].pool_after["version"] == by["remove and re-add an expert"].pool_before["version"] + 2
    restart = by["restart cscr serve"]
    assert restart.pool_after == restart.pool_before  # the durable record, restored (version included)
    assert "cscr: stopping" in (tmp_path / "serve-1.log").read_text()  # the first process stopped gracefully (exit 0)
    for r in rows[:4]:
        assert r.pool_after["version"] == r.pool_before["version"]  # faults change no pool
