"""``cscr prepare`` and long prompts: the recorded mode, the distinct-embedding count and its
warning, and the shared prompt-embedding cache across runs (real MiniLM)."""

from __future__ import annotations

import json

import numpy as np
from cscr.cli import main

from cscr.encoder import Encoder, load_run_embeddings
from cscr.runs.paths import RunPaths

PREAMBLE = " ".join(f"Example {i}: which planet is closest to the sun? Answer: Mercury." for i in range(40))
QUESTIONS = ["what is 2 + 2?", "name a primary colour.", "who wrote Hamlet?", "what is the capital of Peru?",
             "translate 'cat' into French.", "how many legs has a spider?"]


def _logs(tmp_path):
    logs = tmp_path / "logs.jsonl"
    rows = [{"prompt_id": f"q{i}", "prompt": f"{PREAMBLE} Question: {q}", "model": m,
             "quality": float((i + k) % 2), "cost": 0.001 * (k + 1)}
            for i, q in enumerate(QUESTIONS) for k, m in enumerate(["small", "large"])]
    logs.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return logs


def test_head_mode_warns_the_default_sees_the_question_and_a_second_run_reuses_the_cache(tmp_path, capsys):
    logs = _logs(tmp_path)
    base = ["prepare", "--dataset", "generic", "--option", f"file={logs}", "--probe-size", "1", "--val-fraction", "0"]

    assert main([*base, "--out", str(tmp_path / "head"), "--long-prompt", "head"]) == 0
    cap = capsys.readouterr()
    assert "distinct    1 distinct embeddings for 6 distinct prompt texts" in cap.out
    assert "warning: 6 of 6 distinct prompts (100%) share an embedding" in cap.err and "--long-prompt" in cap.err

    assert main([*base, "--out", str(tmp_path / "default")]) == 0  # default mode: windows
    cap = capsys.readouterr()
    assert "distinct    6 distinct embeddings for 6 distinct prompt texts" in cap.out and "warning" not in cap.err
    assert "long prompts: windows" in cap.out and "6 to encode" in cap.err
    manifest = json.loads((RunPaths.of(tmp_path / "default").embeddings / "manifest.json").read_text())
    assert manifest["long_prompt"] == "windows" and manifest["config"]["long_prompt"] == "windows"
    assert Encoder.from_run(tmp_path / "default").cfg.long_prompt == "windows"

    # another run on the same prompts: every vector from the shared user cache, nothing encoded
    assert main([*base, "--out", str(tmp_path / "again")]) == 0
    assert "6 of 6 prompts cached, 6 from the shared cache" in capsys.readouterr().err
    np.testing.assert_array_equal(load_run_embeddings(tmp_path / "again"), load_run_embeddings(tmp_path / "default"))

    # the shared cache switched off: encoded again
    assert main([*base, "--out", str(tmp_path / "off"), "--embedding-cache", "off"]) == 0
    assert "6 to encode" in capsys.readouterr().err
