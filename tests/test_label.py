"""Graders, the built-in task set, prompts files, and routing tables from a live pool."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest

from cscr.data.table import RoutingTable
from cscr.errors import InputError
from cscr.grading import GRADERS, extract_letter, extract_number, grade, register_grader
from cscr.label import LabelUDF, build_table, label_serial, task_rows
from cscr.models import tiny_random_lm
from cscr.pool import pool_from_dict
from cscr.tasks import FAMILIES, builtin_tasks, read_jsonl, write_jsonl


@pytest.mark.parametrize("answer, ref, want", [
    ("19", "19", 1), ("12 + 7 = 19", "19", 1), ("The answer is 1,200.", "1200", 1), ("-3", "-3", 1),
    ("20", "19", 0), ("nineteen", "19", 0), ("19.0000000001", "19", 1),
])
def test_numeric(answer, ref, want):
    assert grade("numeric", answer, ref) == want


@pytest.mark.parametrize("answer, ref, want", [
    ("B", "B", 1), ("(C) 54", "C", 1), ("The answer is D.", "D", 1), ("answer: a", "A", 1),
    ("A) 51", "B", 0), ("I think so", "A", 0),
])
def test_multiple_choice(answer, ref, want):
    assert grade("mc", answer, ref) == want


@pytest.mark.parametrize("answer, ref, want", [
    ("Yes", "yes", 1), ("yes, because it is even", "yes", 1), ("Wednesday.", "Wednesday", 1),
    ("yesterday", "yes", 0), ("no", "yes", 0), ("", "yes", 0),
])
def test_exact(answer, ref, want):
    assert grade("exact", answer, ref) == want


def test_registry_is_pluggable_and_missing_answers_score_zero():
    @register_grader("contains")
    def contains(answer: str, reference: str) -> float:
        return float(reference in answer)

    assert grade("contains", "xx 42 yy", "42") == 1.0 and grade("numeric", None, "1") == 0.0
    with pytest.raises(ValueError, match="unknown grader 'nope'"):
        grade("nope", "a", "b")
    GRADERS.pop("contains")
    assert extract_number("no digits") is None and extract_letter("none here") is None


def _check_answer(t) -> bool:
    """Recompute a task's answer from its prompt, independently of the generator."""
    p = t.prompt
    if t.category == "arithmetic":
        a, op, b = re.search(r"What is (\d+) ([+*-]) (\d+)\?", p).groups()
        return int(t.answer) == {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
    if t.category == "comparison":
        which, a, b = re.search(r"is (larger|smaller), (\d+) or (\d+)", p).groups()
        return int(t.answer) == (max if which == "larger" else min)(int(a), int(b))
    if t.category == "parity":
        return t.answer == ("yes" if int(re.search(r"Is (\d+)", p).group(1)) % 2 == 0 else "no")
    if t.category == "multiple-choice":
        opts = dict(re.findall(r"([A-D])\) (\w+)", p))
        if "letters" in p:
            return max(opts.values(), key=len) == opts[t.answer]
        a, op, b = re.search(r"What is (\d+) (times|plus) (\d+)", p).groups()
        return int(opts[t.answer]) == (int(a) * int(b) if op == "times" else int(a) + int(b))
    return True


def test_builtin_tasks_are_seeded_varied_and_right():
    tasks = builtin_tasks(220, seed=3)
    assert builtin_tasks(220, seed=3) == tasks and builtin_tasks(220, seed=4) != tasks
    assert len({t.id for t in tasks}) == len({t.prompt for t in tasks}) == 220
    assert {t.category for t in tasks} == set(FAMILIES)
    assert all(t.grader in GRADERS for t in tasks)
    assert all(_check_answer(t) for t in tasks)
    # every reference answer passes its own grader
    assert all(grade(t.grader, t.answer, t.answer) == 1.0 for t in tasks)


def test_prompts_jsonl_round_trip_and_errors(tmp_path):
    tasks = builtin_tasks(5)
    path = write_jsonl(tasks, tmp_path / "p.jsonl")
    assert read_jsonl(path) == tasks
    bad = {
        '{"prompt": "x"}': "missing field(s) ['answer']",
        '{"prompt": "x", "answer": "1", "grader": "fuzzy"}': "unknown grader 'fuzzy'",
        '{"prompt": "x", "answer": "1", "colour": 2}': "unknown field(s) ['colour']",
        "{not json": "malformed JSON",
        '{"prompt": "x", "answer": "1", "split": "dev"}': "unknown split 'dev'",
    }
    for line, msg in bad.items():
        (tmp_path / "b.jsonl").write_text(line + "\n")
        with pytest.raises(InputError, match=re.escape(msg)):
            read_jsonl(tmp_path / "b.jsonl")
    (tmp_path / "d.jsonl").write_text('{"id": "a", "prompt": "x", "answer": "1"}\n' * 2)
    with pytest.raises(InputError, match="duplicate id 'a'"):
        read_jsonl(tmp_path / "d.jsonl")


@pytest.fixture(scope="module")
def tiny_pool(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("tiny-pool")
    a = tiny_random_lm(tmp_path / "a", seed=0)
    b = tiny_random_lm(tmp_path / "b", seed=1, chat_template=True)
    return pool_from_dict({"name": "tiny", "experts": [
        {"name": "a", "kind": "open-weights", "source": {"model": str(a)}, "cost": {"n_params": 1.0}},
        {"name": "b", "kind": "open-weights", "source": {"model": str(b)}, "cost": {"n_params": 3.0}},
    ]})


def test_label_udf_grades_a_hand_built_batch(tiny_pool):
    pool = tiny_pool
    tasks = builtin_tasks(4)
    udf = LabelUDF("a", pool.get("a").source.model, max_new_tokens=3)
    rows = task_rows(tasks)
    out = udf({k: np.array([r[k] for r in rows], dtype=object) for k in rows[0]})
    assert out["quality"].shape == (4,)
    for a, t, q in zip(out["answer"], tasks, out["quality"], strict=True):
        assert q == grade(t.grader, a, t.answer)


def test_label_serial_builds_a_routing_table(tiny_pool, tmp_path):
    pool = tiny_pool
    tasks = builtin_tasks(24, seed=1)
    records = label_serial(pool, tasks, max_new_tokens=3, batch_size=8)
    table = build_table(pool, tasks, records, seed=0, probe_size=4)
    assert table.quality.shape == (24, 2) and table.cost_unit == "params"
    assert set(table.splits) == {"train", "val", "probe", "test"} and (table.splits == "probe").sum() == 4
    # cost = n_params x (prompt + output tokens) / 1000, per call
    rec_b = records[records["expert"] == "b"].sort_values("prompt_idx")
    np.testing.assert_allclose(table.cost[:, 1], 3.0 * (rec_b["prompt_tokens"] + rec_b["output_tokens"]) / 1000)
    assert table.responses[0, 0] == records[(records["expert"] == "a") & (records["prompt_idx"] == 0)]["answer"].item()
    table.save(tmp_path / "run" / "table")
    back = RoutingTable.load(tmp_path / "run" / "table")
    assert back.meta["label"]["a"]["mean_latency_s"] > 0
    assert json.dumps(back.meta)  # serialisable


def test_failed_calls_are_missing_cells_and_units_must_agree(tiny_pool):
    pool = tiny_pool
    tasks = builtin_tasks(3)
    rec = pd.DataFrame([{"expert": e, "prompt_idx": i, "answer": "1", "quality": 1.0, "prompt_tokens": 5,
                         "output_tokens": 1, "latency_s": 0.1, "error": "Timeout" if (e, i) == ("b", 2) else ""}
                        for e in ("a", "b") for i in range(3)])
    table = build_table(pool, tasks, rec, probe_size=0)
    assert np.isnan(table.quality[2, 1]) and table.quality[2, 0] == 1.0
    mixed = pool_from_dict({"experts": [
        {"name": "a", "kind": "open-weights", "source": {"model": "x"}, "cost": {"n_params": 1}},
        {"name": "b", "kind": "black-box", "source": {"base_url": "http://127.0.0.1:1/v1", "model": "m"},
         "cost": {"input_price": 1}}]})
    with pytest.raises(InputError, match="share a unit"):
        build_table(mixed, tasks, rec, probe_size=0)
    with pytest.raises(InputError, match="2 labelled prompts, expected 3"):
        build_table(pool, tasks, rec[rec["prompt_idx"] < 2], probe_size=0)


def test_cli_label_refuses_bad_prompts_before_starting_anything(tmp_path, capsys, repo_root):
    from cscr.cli import main

    (tmp_path / "p.jsonl").write_text('{"prompt": "2+2?", "answer": "4", "grader": "vibes"}\n')
    pool = str(repo_root / "examples/pools/local-small.yaml")
    assert main(["label", "--pool", pool, "--prompts", str(tmp_path / "p.jsonl"), "--out", str(tmp_path / "r")]) == 2
    assert "unknown grader 'vibes'" in capsys.readouterr().err
    assert main(["label", "--pool", pool, "--out", str(tmp_path / "r")]) == 2
    assert "--tasks builtin" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
