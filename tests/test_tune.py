"""`cscr train --tune`: the search space and choice (pure), and the search on Ray Tune scored on the
validation split only, recorded next to the head it chose."""

from __future__ import annotations

import dataclasses
import json

import pytest
from cscr.cli import main as cli
from cscr.jobs.train_options import add_train_options, train_job_config

from cscr.config import ConfigError, TrainConfig
from cscr.synthetic import synthetic_table, write_synthetic_run
from cscr.training.search import SPACE, choose, sample_trials, trial_config


def test_trials_start_from_the_base_config_and_draw_valid_distinct_configs():
    base = TrainConfig()
    trials = sample_trials(base, 12, seed=3)
    assert len(trials) == 12 and trial_config(base, trials[0]) == base
    assert len({tuple(t.values()) for t in trials}) == 12
    for t in trials:
        assert set(t) == set(SPACE) and all(t[k] in SPACE[k] for k in SPACE)
        cfg = trial_config(base, t)  # valid: the quality head follows the BCE weight
        assert (cfg.head.utility == "quality") == (cfg.loss.bce_weight > 0)
    assert sample_trials(base, 12, seed=3) == trials and sample_trials(base, 12, seed=4) != trials
    with pytest.raises(ConfigError, match="at least 1 trial"):
        sample_trials(base, 0)
    with pytest.raises(ConfigError, match="unknown search parameter"):
        trial_config(base, {"optimizer.momentum": 0.9})
    # a base with the routing regret: a trial without the quality map drops it, one with it keeps it
    regret = dataclasses.replace(base, loss=dataclasses.replace(base.loss, regret_weight=100.0))
    assert trial_config(regret, {"loss.bce_weight": 0.0}).loss.regret_weight == 0.0
    assert trial_config(regret, {"loss.bce_weight": 16.0}).loss.regret_weight == 100.0


def test_the_choice_is_the_best_finished_validation_audc():
    rows = [{"status": "ok", "val_audc": 0.80}, {"status": "failed", "val_audc": None},
            {"status": "ok", "val_audc": 0.85}, {"status": "ok", "val_audc": 0.85}]
    assert choose(rows) == 2  # ties: the earlier
    with pytest.raises(ConfigError, match="nothing to choose"):
        choose([{"status": "failed", "val_audc": None}])


def test_tune_options_are_one_definition_for_cli_and_job():
    import argparse

    p = argparse.ArgumentParser()
    add_train_options(p)
    cfg = train_job_config(p.parse_args(["--smoke-test", "--tune", "--tune-trials", "3", "--tune-seed", "7"]))
    assert (cfg.tune, cfg.tune_trials, cfg.tune_seed, cfg.tune_cpus_per_trial) == (True, 3, 7, 0.5)
    with pytest.raises(ConfigError, match="--tune-trials"):
        train_job_config(p.parse_args(["--smoke-test", "--tune", "--tune-trials", "0"]))


@pytest.mark.slow
def test_train_tune_searches_on_validation_and_trains_the_chosen_config(tmp_path, ray_start_2_cpus, capsys):
    table, emb, _ = synthetic_table(n=400, n_experts=4, seed=5, probe_size=32)
    run = write_synthetic_run(tmp_path / "run", table, emb)
    assert cli(["train", "--run", str(run), "--plain", "--tune", "--tune-trials", "3", "--epochs", "2",
                "--batch-size", "64", "--variant", "cscr"]) == 0
    record = json.loads((run / "models" / "cscr" / "tune.json").read_text())
    rows = record["trials"]
    assert len(rows) == 3 and all(r["status"] == "ok" for r in rows)
    assert all(0.0 < r["val_audc"] <= 1.0 for r in rows)
    assert record["chosen_trial"] == max(range(3), key=lambda i: rows[i]["val_audc"])
    assert "test" not in json.dumps(rows)  # the search never saw the test split
    assert record["n_val_prompts"] == len(table.split_index("val"))
    # the saved head was trained with the chosen configuration, and the run records it as the default
    saved = json.loads((run / "models" / "cscr" / "config.json").read_text())["train"]
    assert saved["loss"] == record["chosen_config"]["loss"] and saved["epochs"] == record["chosen_config"]["epochs"]
    assert saved["head"]["utility"] == record["chosen_config"]["head"]["utility"]
    settings = json.loads((run / "settings.json").read_text())["train"]["train"]
    assert settings["loss"] == record["chosen_config"]["loss"]
    assert "chosen trial" in capsys.readouterr().err
