"""The ``cscr`` command as the application layer: lazy subcommands (``cscr --help`` imports
neither ray nor torch), one definition of each job option shared by ``cscr X`` and
``python jobs/X.py``, configs whose defaults are the parsers' defaults, global -v/--log-level,
and bad values refused with one line before anything starts."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import os
import subprocess
import sys

import pytest
from cscr.cli import COMMANDS, build_parser, command_in, main
from cscr.jobs import cluster, data_options

from cscr.config import ConfigError, EncoderConfig, FingerprintConfig

HEAVY = ("ray", "torch", "pandas", "transformers", "cscr.jobs.embed", "cscr.jobs.fingerprint",
         "cscr.jobs.label", "cscr.jobs.train", "cscr.serve.app")
MINE = ("prepare", "fingerprint", "label", "serve", "quickstart", "report")


def _loaded_after(argv: list[str]) -> list[str]:
    """Heavy modules loaded by ``cscr ARGV`` (``--help``: exits 0) in a fresh interpreter."""
    code = ("import sys\nfrom cscr.cli import main\n"
            f"try:\n    main({argv!r})\nexcept SystemExit as e:\n    assert e.code == 0, e.code\n"
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"})
    return ast.literal_eval(out.stdout.strip().splitlines()[-1])  # a printed list of names


def test_top_level_help_imports_no_command_module_nor_ray_or_torch():
    assert _loaded_after(["--help"]) == []


@pytest.mark.parametrize("command", MINE)
def test_subcommand_help_imports_neither_ray_nor_torch(command):
    assert _loaded_after([command, "--help"]) == []


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_subcommand_has_a_description_lists_its_choices_and_matches_the_listing():
    full = build_parser()  # imports every command module
    subs = _subparsers(full)
    assert set(subs) == set(COMMANDS)
    action = next(a for a in full._actions if isinstance(a, argparse._SubParsersAction))
    listed = {a.dest: a.help for a in action._choices_actions}
    for name, p in subs.items():
        assert (p.description or "").strip(), f"cscr {name} --help has no description"
        assert listed[name] == COMMANDS[name], f"cscr.cli.COMMANDS[{name!r}] differs from the module's help"
        text = p.format_help()
        for a in p._actions:
            if a.choices and not isinstance(a, argparse._SubParsersAction):
                assert "{" + ",".join(map(str, a.choices)) + "}" in text, f"cscr {name}: {a.dest} choices not shown"


def _options(p: argparse.ArgumentParser) -> dict[str, object]:
    """option string -> default, without help and the logging options."""
    skip = {"-h", "--help", "-v", "--verbose", "--log-level"}
    return {s: a.default for a in p._actions for s in a.option_strings if s not in skip}


def test_jobs_and_cli_share_their_options():
    from cscr.jobs import embed, fingerprint, label

    subs = _subparsers(build_parser(["fingerprint", "label", "prepare"]))
    assert _options(fingerprint.build_parser()) == _options(subs["fingerprint"])
    assert _options(label.build_parser()) == _options(subs["label"])
    job, prepare = _options(embed.build_parser()), _options(subs["prepare"])
    shared = {k: v for k, v in job.items() if k not in ("--run", "--smoke-test")}
    assert {k: prepare[k] for k in shared} == shared  # cscr prepare --ray takes the embed job's options


def _parse(add, argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add(p)
    return p.parse_args(argv)


def test_parser_defaults_are_the_config_defaults():
    fp = data_options.fingerprint_config(_parse(data_options.add_fingerprint_options, ["--pool", "p", "--run", "r"]))
    assert fp == data_options.FingerprintJob(pool="p", run="r")
    assert fp.fingerprint == FingerprintConfig()
    lab = data_options.label_config(_parse(data_options.add_label_options,
                                           ["--pool", "p", "--out", "o", "--tasks", "builtin"]))
    assert lab == data_options.LabelJob(pool="p", out="o", tasks="builtin")
    emb = data_options.embed_config(_parse(data_options.add_embed_options, ["--run", "r"]))
    assert emb == data_options.EmbedJob(run="r") and emb.encoder == EncoderConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        fp.workers = 3  # type: ignore[misc]


def test_copied_choice_lists_match_the_library():
    from cscr.encoder import LONG_PROMPT_MODES
    from cscr.label import DEFAULT_MAX_NEW_TOKENS

    assert data_options.LONG_PROMPT_MODES == LONG_PROMPT_MODES
    assert f"cscr.label's, {DEFAULT_MAX_NEW_TOKENS}:" in _subparsers(build_parser(["label"]))["label"].format_help()


@pytest.mark.parametrize(("argv", "message"), [
    (["fingerprint", "--pool", "p.yaml", "--run", "r", "--workers", "0"], "--workers must be >= 1"),
    (["fingerprint", "--run", "r"], "--pool and --run are required"),
    (["label", "--pool", "p.yaml", "--out", "o"], "give --prompts FILE"),
    (["label", "--pool", "p.yaml", "--out", "o", "--tasks", "builtin", "--prompts", "x.jsonl"], "not both"),
    (["label", "--pool", "p.yaml", "--out", "o", "--tasks", "builtin", "--num-cpus", "0"], "--num-cpus must be > 0"),
])
def test_bad_job_options_get_one_line_and_exit_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("cscr: error: ") and message in err[0]


def test_bad_values_in_a_config_raise_config_error():
    with pytest.raises(ConfigError, match="cpus-per-worker"):
        data_options.FingerprintJob(cpus_per_worker=0)
    with pytest.raises(ConfigError, match="unknown fingerprint kind"):
        FingerprintConfig(kind="probe-outcome")  # type: ignore[arg-type]


def test_command_is_found_after_global_options():
    assert command_in(["-v", "--log-level", "info", "train", "--run", "x"]) == "train"
    assert command_in(["--log-level", "DEBUG", "--help"]) is None
    assert command_in(["-vv", "report"]) == "report"


def test_log_level_from_flags_and_environment(monkeypatch):
    monkeypatch.delenv(cluster.LOG_LEVEL_ENV, raising=False)
    assert cluster.log_level() == "WARNING" and not cluster.verbose() and cluster.train_verbose() == 0
    assert cluster.set_log_level(None, 1) == "INFO" and cluster.verbose()
    assert cluster.set_log_level(None, 2) == "DEBUG"
    assert cluster.set_log_level("error", 2) == "ERROR" and not cluster.verbose()  # --log-level wins
    assert cluster.set_log_level(None, 0) == "ERROR"  # neither: the environment's setting stays
    monkeypatch.setenv(cluster.LOG_LEVEL_ENV, "nonsense")
    assert cluster.log_level() == "WARNING"
    with pytest.raises(ValueError, match="unknown log level"):
        cluster.set_log_level("loud")


def test_global_verbose_flag_reaches_the_environment(monkeypatch, tmp_path, capsys):
    monkeypatch.delenv(cluster.LOG_LEVEL_ENV, raising=False)
    runs = tmp_path / "runs"
    runs.mkdir()
    main(["-v", "report", "--runs", str(runs), "--out", str(tmp_path / "report")])
    assert os.environ[cluster.LOG_LEVEL_ENV] == "INFO"
    monkeypatch.delenv(cluster.LOG_LEVEL_ENV)
    with pytest.raises(SystemExit):
        main(["--log-level", "loud", "report"])
    assert "invalid choice" in capsys.readouterr().err
