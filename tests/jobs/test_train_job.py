"""jobs/train.py on real local Ray: resume after a kill, a simulated two-node cluster, the smoke test."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cscr.config import TrainConfig
from cscr.runs.heads import load_trained
from cscr.runs.paths import RunPaths
from cscr.synthetic import synthetic_table, write_synthetic_run

REPO = Path(__file__).resolve().parents[2]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    env.pop("RAY_ADDRESS", None)  # always a fresh embedded cluster
    return env


def _checkpoints(folder: Path) -> list[Path]:
    return sorted(folder.glob("checkpoint_*")) if folder.is_dir() else []


@pytest.mark.slow
def test_killed_training_resumes_from_its_last_checkpoint(tmp_path):
    table, emb, _ = synthetic_table(n=1200, n_experts=5, seed=11, probe_size=48)
    run = write_synthetic_run(tmp_path / "run", table, emb)
    epochs = "10"
    ray_folder = RunPaths.of(run).root / "ray_train" / "cscr"
    log1 = open(tmp_path / "first.log", "w")  # noqa: SIM115 (closed in the finally below)
    first = subprocess.Popen(
        [sys.executable, "jobs/train.py", "--run", str(run), "--variant", "cscr", "--workers", "2",
         "--epochs", epochs, "--batch-size", "128"],
        cwd=REPO, env=_env(), stdout=log1, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 400
        while not _checkpoints(ray_folder) and time.time() < deadline and first.poll() is None:
            time.sleep(0.2)
        assert _checkpoints(ray_folder), f"no checkpoint before the deadline; log:\n{(tmp_path / 'first.log').read_text()[-3000:]}"
        time.sleep(1.0)  # let Ray record the checkpoint in its run snapshot
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # the driver and the local Ray it started
        first.wait(timeout=60)
        log1.close()
    assert not (RunPaths.of(run).model("cscr") / "head.pt").exists()  # it did not finish
    with open(tmp_path / "first.log") as fh:
        done_first = sum(1 for line in fh if "train[cscr] epoch " in line and "/10:" in line)

    # restart through `cscr train` with the same options: it must resume, not start over
    second = subprocess.run(
        [sys.executable, "-m", "cscr.cli", "train", "--run", str(run), "--variant", "cscr", "--workers", "2",
         "--epochs", epochs, "--batch-size", "128"],
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=500)
    out = second.stdout + second.stderr
    assert second.returncode == 0, out[-4000:]
    assert "found an interrupted run" in out
    resumed_at = [int(line.split("after epoch ")[1].split()[0]) for line in out.splitlines()
                  if "resuming from the checkpoint after epoch" in line]
    assert resumed_at and resumed_at[0] >= 1
    trained = load_trained(run, "cscr")
    epochs_seen = [h["epoch"] for h in trained.history]
    assert epochs_seen == list(range(1, 11))
    attempts = [h["attempt"] for h in trained.history]
    k = resumed_at[0]
    assert len(set(attempts[:k])) == 1 and len(set(attempts[k:])) == 1 and attempts[0] != attempts[-1]
    assert 1 <= k <= max(done_first, 1) + 1
    assert not (RunPaths.of(run).root / "ray_train" / "cscr").exists()  # finished: cleaned up


@pytest.mark.slow
def test_training_on_a_simulated_two_node_cluster(tmp_path):
    import cscr.jobs.train as job
    import ray
    from ray.cluster_utils import Cluster

    table, emb, _ = synthetic_table(n=500, n_experts=4, seed=12, probe_size=40)
    run = write_synthetic_run(tmp_path / "run", table, emb)
    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2
        results = job.run_training(str(run), ["cscr"], TrainConfig(epochs=2, batch_size=128), workers=2,
                                   cpus_per_worker=1.0, placement="SPREAD", log=lambda s: None)
    finally:
        ray.shutdown()
        cluster.shutdown()
    res = results["cscr"]
    assert [h["epoch"] for h in res.history] == [1, 2]
    assert res.history[-1]["workers"] == 2 and res.history[-1]["nodes"] == 2  # one worker per node
    assert res.best_val_audc is not None and res.meta["trainer"] == "ray-train"
    assert load_trained(run, "cscr").best_epoch == res.best_epoch


@pytest.mark.slow
def test_smoke_test_runs_end_to_end(tmp_path):
    env = dict(_env(), TMPDIR=str(tmp_path), RAY_TMPDIR="/tmp")  # the smoke run folder here; Ray as usual
    out = subprocess.run([sys.executable, "jobs/train.py", "--smoke-test", "--workers", "2"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=500)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    assert "cscr: best epoch" in out.stdout
    assert "train[cscr] epoch 2/2" in out.stderr  # the rank-0 worker's progress reaches the driver
    # and Ray Train's own chatter does not: a line per report and worker, and the placement-group
    # cleaner's failed state-API asks (no dashboard on a local cluster), one a second
    assert "Reporting training result" not in out.stderr
    assert "Failed to query Ray Train Controller actor state" not in out.stderr
    assert not list(tmp_path.glob("cscr-train-smoke-*"))  # removed afterwards


def test_changed_config_refuses_to_resume(tmp_path):
    """An interrupted run's folder with another config is refused; --fresh discards it."""
    import cscr.jobs.train as job

    table, emb, _ = synthetic_table(n=200, n_experts=3, seed=13, probe_size=20)
    run = write_synthetic_run(tmp_path / "run", table, emb)
    folder = RunPaths.of(run).root / "ray_train" / "cscr"
    folder.mkdir(parents=True)
    (folder / job.MARKER).write_text(json.dumps({"variant": "cscr", "train": {"epochs": 99}}))

    with pytest.raises(ValueError, match="another configuration: pass --fresh"):
        job.check_resumable(folder, job._marker(TrainConfig(), "cscr", 2, "probe-outcome"), fresh=False, log=lambda s: None)
    job.check_resumable(folder, job._marker(TrainConfig(), "cscr", 2, "probe-outcome"), fresh=True, log=lambda s: None)
    assert not folder.exists()


def test_job_needs_a_run_or_smoke_test(capsys):
    import cscr.jobs.train as job

    assert job.main([]) == 2
    assert "--run is required" in capsys.readouterr().err


def test_job_and_cli_share_every_option(tmp_path, capsys):
    """jobs/train.py has the CLI's options (one definition): here --plain with the loss and head options."""
    import cscr.jobs.train as job

    table, emb, _ = synthetic_table(n=240, n_experts=3, seed=14, probe_size=24)
    run = write_synthetic_run(tmp_path / "run", table, emb)
    argv = ["--run", str(run), "--plain", "--epochs", "1", "--batch-size", "64", "--gamma", "0.3", "--bands", "2",
            "--hidden", "32", "--top-k", "2", "--seed", "7", "--threads", "1"]
    assert job.main(argv) == 0
    assert "cscr: best epoch 1" in capsys.readouterr().out
    back = load_trained(run, "cscr")
    cfg = back.config
    assert (cfg.loss.gamma, cfg.loss.bands, cfg.head.hidden, cfg.index.top_k, cfg.seed) == (0.3, 2, 32, 2, 7)
    assert _options(job.build_parser()) == _options(_cli_subparser("train"))
    assert job.main(["--run", str(run), "--plain", "--gamma", "-1"]) == 2
    assert "gamma must be >= 0" in capsys.readouterr().err


def _options(parser) -> set[str]:
    """The options of a parser, less -v/--log-level (global options of `cscr`, before the command)."""
    return {opt for a in parser._actions for opt in a.option_strings} - {"-v", "--verbose", "--log-level"}


def _cli_subparser(name: str):
    import argparse

    from cscr.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def test_sweep_job_and_cli_share_every_option():
    import cscr.jobs.sweep as job

    opts = _options(job.build_parser())
    assert opts == _options(_cli_subparser("sweep"))
    assert {"--allow-failed-trials", "--smoke-test", "--address", "--config", "--gamma"} <= opts
