"""One default per setting across commands (issue 14 item 2): a run records how it was trained
(runs/<name>/settings.json, models/<variant>/config.json), later commands default to it and
say so in one line, a training that replaces a head of another descriptor kind says so, and
`cscr evaluate` names the heads it evaluates.

Real parts throughout: a generated run folder (cscr.synthetic), the real descriptor store, the
plain trainer (`cscr train --plain`), the real FAISS-backed router in `cscr evaluate`. The second
descriptor kind, ``val-outcome``, is a real outcome descriptor over the validation prompts
(instead of the probe prompts), so that two kinds of one dimension exist without a scorer LM.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
from cscr.cli import main

from cscr.config import ConfigError, IndexConfig, TrainConfig
from cscr.fingerprints.probe_outcome import probe_outcome_descriptors
from cscr.fingerprints.store import DescriptorStore
from cscr.runs.paths import RunPaths
from cscr.runs.settings import (
    head_line,
    overwrite_line,
    read_settings,
    record_settings,
    record_training,
    recorded_training,
    training_defaults,
)
from cscr.synthetic import synthetic_table, write_synthetic_run

OTHER = "val-outcome"  # the second descriptor kind of the run


@pytest.fixture()
def run(tmp_path: Path) -> Path:
    table, emb, _ = synthetic_table(n=500, n_experts=4, seed=3, probe_size=40)
    root = write_synthetic_run(tmp_path / "run", table, emb)
    val = table.split_index("val")
    DescriptorStore(RunPaths.of(root).descriptors).write_many(
        probe_outcome_descriptors(table, rows=val[:40]), OTHER, basis_id="val-rows-40", source="val split")
    return root


def _lines(text: str, needle: str) -> list[str]:
    return [s for s in text.splitlines() if needle in s]


# ---------------------------------------------------------------- the record

def test_settings_record_sections_and_encoder_from_manifest(run: Path) -> None:
    assert read_settings(run) == {"embeddings": {"encoder_id": "synthetic", "model": "synthetic", "dim": 384,
                                                 "n_prompts": 500}}
    record_settings(run, "prepare", {"dataset": "synthetic", "seed": 3})
    record_settings(run, "fingerprint", {"pool": "p.yaml"})
    record_settings(run, "prepare", {"dataset": "other"})  # a section is replaced, the others kept
    raw = json.loads((run / "settings.json").read_text())
    assert set(raw) == {"prepare", "fingerprint"} and "embeddings" not in raw  # the manifest is not copied
    assert raw["prepare"]["dataset"] == "other" and "seed" not in raw["prepare"] and raw["prepare"]["recorded"]
    assert read_settings(run)["embeddings"]["encoder_id"] == "synthetic"
    with pytest.raises(ValueError, match="embedding manifest"):
        record_settings(run, "embeddings", {})
    (run / "settings.json").write_text("{not json")
    with pytest.raises(ConfigError, match="settings.json is not valid JSON"):
        read_settings(run)


def test_training_defaults_use_the_record_and_say_so_in_one_line(run: Path) -> None:
    said: list[str] = []
    nothing = training_defaults(run, kind=None, log=said.append)
    assert (nothing.descriptor_kind, nothing.train, nothing.line, said) == (None, None, None, [])

    cfg = TrainConfig(epochs=3, index=IndexConfig(top_k=2, use_gpu=True))
    record_training(run, OTHER, cfg, ["cscr"], "plain")
    rec = recorded_training(run)
    assert rec is not None and rec.descriptor_kind == OTHER and rec.source.name == "settings.json"
    assert rec.train is not None and rec.train.index.use_gpu is None  # the machine's setting is not carried

    d = training_defaults(run, kind=None, log=said.append)
    assert d.descriptor_kind == OTHER and d.train is not None and (d.train.epochs, d.train.index.top_k) == (3, 2)
    assert said == [d.line] and d.line is not None
    assert d.line.startswith(f"cscr: using descriptor kind {OTHER!r}, epochs 3, top_k 2 recorded in ")
    assert d.line.endswith("(pass --descriptor-kind, --epochs, --top-k to change)")

    # what the command line names is the command line's, and is not announced
    said.clear()
    d = training_defaults(run, kind="probe-outcome", given={"epochs"}, log=said.append)
    assert d.descriptor_kind == "probe-outcome" and said == [d.line]
    assert d.line is not None and "descriptor kind" not in d.line and "epochs" not in d.line and "top_k 2" in d.line
    said.clear()
    d = training_defaults(run, kind="probe-outcome", given={"epochs", "index.top_k"}, log=said.append)
    assert d.line is None and said == []

    # a folder that does not exist (yet) has no record: the defaults, silently
    assert training_defaults(run / "nope", kind=None, log=said.append).line is None and said == []


def test_train_and_sweep_job_configs_default_to_the_run(run: Path) -> None:
    from cscr.jobs.train_options import (
        add_sweep_options,
        add_train_options,
        sweep_job_config,
        train_job_config,
    )

    record_training(run, OTHER, TrainConfig(epochs=4, lr=1e-3), ["cscr"], "plain")
    said: list[str] = []
    p = argparse.ArgumentParser()
    add_train_options(p)
    cfg = train_job_config(p.parse_args(["--run", str(run), "--plain"]), log=said.append)
    assert cfg.descriptor_kind == OTHER and (cfg.train.epochs, cfg.train.lr) == (4, 1e-3) and len(said) == 1
    said.clear()
    cfg = train_job_config(p.parse_args(["--run", str(run), "--descriptor-kind", "probe-outcome", "--epochs", "2",
                                         "--lr", "0.0005"]), log=said.append)
    assert cfg.descriptor_kind == "probe-outcome" and (cfg.train.epochs, cfg.train.lr) == (2, 5e-4) and said == []
    # --config names every hyperparameter: the recorded ones are not used (the kind still is)
    cfg = train_job_config(p.parse_args(["--run", str(run), "--config", '{"epochs": 6}']), log=said.append)
    assert cfg.train == TrainConfig(epochs=6) and cfg.descriptor_kind == OTHER
    assert len(said) == 1 and said[0].startswith(f"cscr: using descriptor kind {OTHER!r} recorded in ")
    assert said[0].endswith(f"{run.name} (pass --descriptor-kind to change)")
    # a long inline object (a tune's chosen config) and a file both work; a missing file is one clear error

    long = {"epochs": 5, "lr": 5e-4, "head": {"hidden": 768, "dropout": 0.0}, "loss": {"bands": 5, "tau_min": 0.08,
            "alpha": 0.0, "gamma": 0.1, "bce_weight": 1.0}, "index": {"top_k": 0}, "batch_size": 512}
    text = json.dumps(long) + " " * 300  # longer than a file name may be
    cfg = train_job_config(p.parse_args(["--run", str(run), "--config", text]), log=said.append)
    assert (cfg.train.epochs, cfg.train.head.hidden, cfg.train.loss.tau_min) == (5, 768, 0.08)
    (run / "chosen.json").write_text(json.dumps(long))
    assert train_job_config(p.parse_args(["--run", str(run), "--config", str(run / "chosen.json")]),
                            log=said.append).train == cfg.train
    with pytest.raises(ConfigError, match="cannot read"):
        train_job_config(p.parse_args(["--run", str(run), "--config", str(run / "nope.json")]), log=said.append)

    s = argparse.ArgumentParser()
    add_sweep_options(s)
    said.clear()
    sweep = sweep_job_config(s.parse_args(["--run", str(run), "--grid", "k"]), log=said.append)
    assert sweep.descriptor_kind == OTHER and sweep.train.epochs == 4 and len(said) == 1
    assert sweep_job_config(s.parse_args(["--run", str(run), "--grid", "k", "--descriptor-kind", "x"]),
                            log=said.append).descriptor_kind == "x"


def test_experiment_configs_default_to_the_run(run: Path) -> None:
    from cscr.cli.commands.experiment import _configs

    record_training(run, OTHER, TrainConfig(epochs=4, seed=9), ["cscr"], "plain")
    args = argparse.Namespace(run=str(run), descriptor=None, seed=1, epochs=None, lambdas=5, bootstrap=10)
    train, _, kind = _configs(args)
    assert kind == OTHER and train.epochs == 4 and train.seed == 1  # --seed is always the experiment's
    args.descriptor, args.epochs = "probe-outcome", 2
    train, _, kind = _configs(args)
    assert kind == "probe-outcome" and train.epochs == 2


# ---------------------------------------------------------------- the commands, end to end

def test_train_keeps_the_runs_kind_warns_on_replacing_and_evaluate_names_heads(
        run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["train", "--run", str(run), "--plain", "--threads", "1", "--variant", "cscr"]

    # 1. trained with the other kind (as the quickstart trains with perplexity)
    assert main([*base, "--descriptor-kind", OTHER, "--epochs", "2"]) == 0
    err = capsys.readouterr().err
    assert _lines(err, "cscr: using") == [] and _lines(err, "is replaced") == []
    settings = json.loads((run / "settings.json").read_text())["train"]
    assert settings["descriptor_kind"] == OTHER and settings["train"]["epochs"] == 2
    assert settings["variants"] == ["cscr"] and settings["trainer"] == "plain"

    # 2. a plain `cscr train` keeps the run's kind (and epochs), and says so in one line
    assert main(base) == 0
    out, err = capsys.readouterr()
    used = _lines(err, "cscr: using")
    assert len(used) == 1 and f"descriptor kind {OTHER!r}, epochs 2 recorded in" in used[0]
    assert "(pass --descriptor-kind, --epochs to change)" in used[0]
    assert _lines(err, "is replaced") == []
    assert json.loads((run / "models" / "cscr" / "config.json").read_text())["descriptor_kind"] == OTHER
    assert OTHER in _lines(out, "models")[0]  # the result table names the kind

    # 3. another kind named on the command line replaces models/cscr: said in one line; the old head is kept
    assert main([*base, "--descriptor-kind", "probe-outcome"]) == 0
    err = capsys.readouterr().err
    replaced = _lines(err, "is replaced")
    assert len(replaced) == 1
    assert f"models/cscr was trained with {OTHER!r} descriptors" in replaced[0]
    assert "'probe-outcome' training (that head stays in " in replaced[0] and f"models/cscr@{OTHER}" in replaced[0]
    assert json.loads((run / "models" / "cscr" / "config.json").read_text())["descriptor_kind"] == "probe-outcome"
    kept = json.loads((run / "models" / f"cscr@{OTHER}" / "config.json").read_text())
    assert kept["descriptor_kind"] == OTHER
    assert json.loads((run / "settings.json").read_text())["train"]["descriptor_kind"] == "probe-outcome"

    # 4. evaluate names each head it evaluates
    assert main(["evaluate", "--run", str(run), "--routers", f"cscr,cscr@{OTHER},random", "--lambdas", "5",
                 "--bootstrap", "10", "--out", str(run / "eval-test")]) == 0
    out = capsys.readouterr().out
    heads = _lines(out, "head cscr")
    assert len(heads) == 2
    now = json.loads((run / "models" / "cscr" / "config.json").read_text())
    assert heads[0].startswith("head cscr: ") and "descriptor kind 'probe-outcome'" in heads[0]
    assert f"basis {now['basis_id']}" in heads[0] and f"trained {now['created']}" in heads[0]
    assert f"best epoch {now['best_epoch']} (val AUDC {now['best_val_audc']:.4f})" in heads[0]
    assert "k = every expert" in heads[0]
    assert heads[1].startswith(f"head cscr@{OTHER}: ") and f"descriptor kind {OTHER!r}" in heads[1]
    assert f"basis {kept['basis_id']}" in heads[1] and kept["basis_id"] == "val-rows-40"


def test_runs_trained_before_the_record_use_their_heads(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--run", str(run), "--plain", "--threads", "1", "--variant", "cscr",
                 "--descriptor-kind", OTHER, "--epochs", "1", "--top-k", "2"]) == 0
    (run / "settings.json").unlink()  # as a run trained before settings.json existed
    capsys.readouterr()
    rec = recorded_training(run)
    assert rec is not None and rec.source == RunPaths.of(run).model("cscr") / "config.json"
    assert rec.descriptor_kind == OTHER and rec.train is not None
    assert (rec.train.epochs, rec.train.index.top_k) == (1, 2)
    assert rec.train.head.in_dim == TrainConfig().head.in_dim  # widths come from the data, not the record
    line = training_defaults(run, kind=None, log=None).line
    assert line is not None and "descriptor kind" in line and "top_k 2" in line
    assert overwrite_line(run, "cscr", OTHER) is None
    assert overwrite_line(run, "vanilla", "probe-outcome") is None  # never trained: nothing replaced
    assert "models/cscr was trained with" in (overwrite_line(run, "cscr", "probe-outcome") or "")
    assert head_line(run, "vanilla") is None
    assert "k = 2" in (head_line(run, "cscr") or "")


# ---------------------------------------------------------------- the k grid

def test_k_grid_default_is_every_expert_as_in_the_config_and_help() -> None:
    from cscr.jobs.train_options import add_train_options, grids_epilog

    from cscr.sweep import GRIDS

    k = GRIDS["k"]
    assert k.default == IndexConfig().top_k == 0 and 0 in k.values and "0 = every expert" in k.label
    assert "0 = every expert" in next(s for s in grids_epilog().splitlines() if s.strip().startswith("k "))
    p = argparse.ArgumentParser()
    add_train_options(p)
    assert "0 = every expert (default 0)" in " ".join(p.format_help().split())


# ---------------------------------------------------------------- on Ray (Train, Tune)

@pytest.mark.slow
def test_ray_training_records_the_run_and_a_sweep_uses_its_kind(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The Ray Train path records settings.json like the plain one; `cscr sweep` trains its trials
    with the recorded descriptor kind (summary.json says which)."""
    assert main(["train", "--run", str(run), "--workers", "1", "--variant", "cscr", "--descriptor-kind", OTHER,
                 "--epochs", "1", "--batch-size", "64"]) == 0
    settings = json.loads((run / "settings.json").read_text())["train"]
    assert (settings["descriptor_kind"], settings["trainer"], settings["train"]["epochs"]) == (OTHER, "ray-train", 1)
    capsys.readouterr()
    assert main(["sweep", "--run", str(run), "--grid", "width", "--concurrency", "2"]) == 0
    err = capsys.readouterr().err
    used = _lines(err, "cscr: using")
    assert len(used) == 1 and f"descriptor kind {OTHER!r}, epochs 1, batch_size 64 recorded in" in used[0]
    summary = json.loads((run / "sweeps" / "width" / "summary.json").read_text())
    assert summary["meta"]["descriptor_kind"] == OTHER and summary["meta"]["train"]["epochs"] == 1
    assert all(r["status"] == "ok" for r in summary["rows"])
