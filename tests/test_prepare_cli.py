"""``cscr prepare`` end to end: table, splits, embeddings, summary, errors."""

from __future__ import annotations

import numpy as np
import pytest
from cscr.cli import main

from cscr.data import RoutingTable
from cscr.encoder import load_run_embeddings
from cscr.runs.paths import RunPaths


def test_prepare_routerbench_table_and_summary(shared_data, tmp_path, capsys):
    out = tmp_path / "runs" / "routerbench"
    rc = main(["prepare", "--dataset", "routerbench", "--data-dir", str(shared_data), "--out", str(out), "--no-embed"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "prompts     3178 (train 1811, val 222, probe 192, test 953)" in text
    assert "experts     11; cost unit usd" in text
    assert "missing     154 quality cells in 28 rows (policy: mask" in text
    table = RoutingTable.load(RunPaths.of(out).table)
    assert table.n == 3178 and table.meta["missing_quality_cells"] == 154
    assert not (RunPaths.of(out).embeddings / "manifest.json").exists()


def test_prepare_data_dir_from_env_and_loader_options(shared_data, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CSCR_DATA_DIR", str(shared_data))
    out = tmp_path / "gsm"
    rc = main(["prepare", "--dataset", "routellm", "--option", "subset=gsm8k", "--out", str(out), "--no-embed",
               "--missing", "drop", "--seed", "3"])
    assert rc == 0
    table = RoutingTable.load(RunPaths.of(out).table)
    assert table.n == 1319 and set(table.categories) == {"gsm8k"}
    assert table.meta["seed"] == 3 and "cost registry" in capsys.readouterr().out


def test_prepare_embeds_and_reuses_the_cache(encoder, tmp_path, capsys):
    import json

    logs = tmp_path / "logs.jsonl"
    rows = [{"prompt_id": f"q{i}", "prompt": f"Question {i}: name a colour.", "model": m,
             "quality": float((i + k) % 2), "cost": 0.001 * (k + 1)}
            for i in range(12) for k, m in enumerate(["small", "large"])]
    logs.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "mine"
    args = ["prepare", "--dataset", "generic", "--option", f"file={logs}", "--out", str(out), "--probe-size", "2"]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "embeddings" in captured.out and "12 to encode" in captured.err
    emb = load_run_embeddings(out)
    assert emb.shape == (12, 384) and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    assert "lexical     none (--lexical-dims 0)" in captured.out  # the lexical view is opt-in
    assert main(args) == 0  # second run: everything from the cache
    assert "12 of 12 prompts cached, 0 to encode" in capsys.readouterr().err
    np.testing.assert_array_equal(load_run_embeddings(out), emb)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--dataset", "routerbnch"], "unknown data set 'routerbnch'; known:"),
        (["--dataset", "routellm", "--option", "subset"], "--option expects KEY=VALUE"),
        (["--dataset", "routellm", "--option", "sbset=mmlu"], "unknown option(s) ['sbset']"),
    ],
)
def test_prepare_bad_input_exits_2_with_one_line(argv, message, shared_data, tmp_path, capsys):
    rc = main(["prepare", *argv, "--data-dir", str(shared_data), "--out", str(tmp_path / "r"), "--no-embed"])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("cscr: error: ") and message in err[0]
