"""build_app and `cscr serve` refuse what cannot be served, before Ray starts; pool -> specs."""

from __future__ import annotations

import pytest
import yaml
from cscr.cli import main
from cscr.serve.app import ServeArgs, build_app, expert_specs
from cscr.serve.pool import specs_from_pool
from cscr.serve.service import ServiceError

RUN_EXPERTS = ["mistralai/mistral-7b-chat", "mistralai/mixtral-8x7b-chat", "gpt-4-1106-preview"]


def write_pool(path, names, black_box=()):
    experts = []
    for n in names:
        if n in black_box:
            experts.append({"name": n, "kind": "black-box", "cost": {"input_price": 1.0},
                            "source": {"base_url": "http://127.0.0.1:9/v1", "model": "up-" + n,
                                       "api_key_env": "UPSTREAM_KEY"}, "timeout_s": 7, "max_retries": 4})
        else:
            experts.append({"name": n, "kind": "open-weights", "source": {"model": "smollm2"},
                            "backend": "transformers", "cost": {"n_params": 0.1}})
    path.write_text(yaml.safe_dump({"name": "t", "experts": experts}))
    return path


def test_pool_entries_become_serving_specs(tmp_path):
    pool = write_pool(tmp_path / "p.yaml", ["a", "b"], black_box=("b",))
    a, b = specs_from_pool(pool)
    assert (a.name, a.backend, a.model) == ("a", "transformers", "smollm2")
    assert (b.backend, b.model, b.source.base_url, b.source.api_key_env, b.timeout_s, b.max_retries) == (
        "openai", "up-b", "http://127.0.0.1:9/v1", "UPSTREAM_KEY", 7, 4)
    specs = expert_specs(ServeArgs(pool=str(pool), expert_num_cpus=0.05, expert_num_gpus=1))
    assert [(s.num_cpus, s.num_gpus) for s in specs] == [(0.05, 1), (0.05, 0)]  # no GPU for an API


def test_recorded_pools_are_refused(tmp_path):
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({"experts": [
        {"name": "claude-v2", "kind": "recorded", "source": {}, "cost": {"input_price": 8}}]}))
    with pytest.raises(ValueError, match=r"recorded expert\(s\) \['claude-v2'\] cannot answer live prompts"):
        specs_from_pool(tmp_path / "r.yaml")


def test_an_index_that_does_not_match_the_pool_is_refused(trained_run, tmp_path):
    pool = write_pool(tmp_path / "p.yaml", RUN_EXPERTS[:2] + ["smollm2-135m"])
    with pytest.raises(ServiceError, match=r"no descriptor in the run's index|no descriptor in the index") as err:
        build_app({"run": str(trained_run), "pool": str(pool)})
    assert "['smollm2-135m']" in str(err.value) and "['gpt-4-1106-preview']" in str(err.value)
    # the matching pool builds an application (nothing is started until serve.run)
    from ray.serve.deployment import Application

    ok = write_pool(tmp_path / "ok.yaml", RUN_EXPERTS)
    assert isinstance(build_app({"run": str(trained_run), "pool": str(ok)}), Application)
    with pytest.raises(ValueError, match="admin key must differ from the API key"):
        build_app({"run": str(trained_run), "pool": str(ok), "api_key": "k", "admin_key": "k"})


def test_cscr_serve_reports_bad_input_in_one_line(trained_run, tmp_path, capsys):
    pool = write_pool(tmp_path / "p.yaml", ["smollm2-135m"])
    assert main(["serve", "--run", str(trained_run), "--pool", str(pool)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # (after the run loader's info line)
    assert err.startswith("cscr: error: the expert index of") and "does not match the pool" in err
    assert main(["serve", "--run", str(tmp_path / "nope"), "--pool", str(pool)]) == 2
    assert "run folder not found" in capsys.readouterr().err
    assert main(["serve", "--run", str(trained_run), "--pool", str(tmp_path / "missing.yaml")]) == 2
    assert "pool file not found" in capsys.readouterr().err


def test_replica_and_autoscaling_options(trained_run, tmp_path, capsys):
    from cscr.serve.app import plan_app, replica_options

    ok = write_pool(tmp_path / "ok.yaml", RUN_EXPERTS)
    a = ServeArgs(run=str(trained_run), pool=str(ok))
    assert replica_options(a, 2) == {"num_replicas": 2}
    auto = ServeArgs(run=str(trained_run), pool=str(ok), min_replicas=2, max_replicas=5, target_ongoing_requests=4)
    assert replica_options(auto, 1) == {"num_replicas": "auto", "autoscaling_config": {
        "min_replicas": 2, "max_replicas": 5, "target_ongoing_requests": 4.0}}
    app, record, _ = plan_app(auto.model_copy(update={"state_dir": str(tmp_path / "state"), "expert_apps": True}))
    assert record.version == 1 and record.names() == RUN_EXPERTS
    assert all(e.app.startswith("cscr-expert-") and e.descriptor is None for e in record.experts)
    assert not (tmp_path / "state").exists()  # nothing is written before the controller starts
    with pytest.raises(ValueError, match=r"min_replicas \(6\) is above max_replicas \(5\)"):
        plan_app(auto.model_copy(update={"min_replicas": 6}))
    base = ["serve", "--run", str(trained_run), "--pool", str(ok)]
    for extra, words in ((["--router-replicas", "0"], "--router-replicas must be >= 1, got 0"),
                         (["--min-replicas", "2"], "--min-replicas needs --max-replicas (autoscaling)"),
                         (["--max-replicas", "0"], "--max-replicas must be >= 1, got 0"),
                         (["--breaker-failures", "0"], "--breaker-failures must be >= 1, got 0"),
                         (["--breaker-cooldown", "nan"], "--breaker-cooldown must be in 0..86400 seconds, got nan")):
        assert main(base + extra) == 2
        assert capsys.readouterr().err.strip() == f"cscr: error: {words}"


def test_a_saved_pool_wins_over_the_pool_file(trained_run, tmp_path):
    from cscr.serve.app import plan_app
    from cscr.serve.state import PoolEntry, PoolStore

    from cscr.pool import ExpertSpec as PoolSpec

    ok = write_pool(tmp_path / "ok.yaml", RUN_EXPERTS)
    args = ServeArgs(run=str(trained_run), pool=str(ok), state_dir=str(tmp_path / "state"))
    _, first, _ = plan_app(args)
    saved = first.with_expert(PoolEntry(spec=PoolSpec(name="added", model="smollm2"), cost=0.2,
                                        descriptor=[1.0, 0.0], app="cscr-expert-added-1"))
    PoolStore(tmp_path / "state").save(saved)
    _, restored, _ = plan_app(args)
    assert restored == saved and restored.version == 2 and "added" in restored.names()
