"""`cscr experiment unseen-experts|ood` on small generated runs: files written, routers listed, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
from cscr.cli import main
from cscr.cli.commands.experiment import ood_splits, resolve_split

from cscr.errors import InputError
from cscr.synthetic import synthetic_table, write_synthetic_run

FAST = ["--epochs", "1", "--lambdas", "20", "--bootstrap", "100"]
TASKS = np.array(["math", "mbpp", "mmlu", "commongen"])  # LLMRouter task names, one per topic
SUBJECTS = np.array(["abstract_algebra", "college_physics", "philosophy", "anatomy"])  # MMLU: 2 STEM, 2 not


def _run(root, categories=None):
    table, emb, topic = synthetic_table(n=400, n_experts=5, dim=16, n_clusters=4, seed=3, probe_size=40)
    if categories is not None:
        table.categories = categories[topic] if len(categories) == 4 else categories
    return write_synthetic_run(root, table, emb), table, topic


@pytest.fixture(scope="module")
def tasks_run(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("exp") / "tasks", TASKS)


def _png(path):
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_unseen_experts_writes_tables_and_lists_who_could_not_take_part(tasks_run, capsys):
    run, table, _ = tasks_run
    routers = "cscr,umr,knn,oracle,parametric"
    assert main(["experiment", "unseen-experts", "--run", str(run), "--routers", routers, *FAST]) == 0
    out = run / "experiments" / "unseen-experts"
    rec = json.loads((out / "metrics.json").read_text())
    assert rec["experiment"] == "unseen-experts"
    assert len(rec["unseen"]) == 2 and sorted(rec["seen"] + rec["unseen"]) == sorted(table.expert_names)
    assert set(rec["excluded"]) == {"parametric"} and "new network" in rec["excluded"]["parametric"]
    assert [r[0] for r in rec["tables"][0]["rows"]] and {r[0] for r in rec["tables"][0]["rows"]} == {
        "cscr", "umr", "knn", "oracle"}
    ev = rec["evaluations"]["unseen"]
    assert sorted(ev["experts"]) == sorted(rec["unseen"])  # routed over the held-out pool only
    assert rec["significance"][0]["a"] == "cscr" and rec["significance"][0]["b"] in {"umr", "knn"}
    md = (out / "report.md").read_text()
    assert "| cscr |" in md and "Could not take part" in md and "**parametric**" in md and "deferral.png" in md
    assert _png(out / "deferral.png") and (out / "metrics.csv").read_text().startswith("group,set,router,audc")
    assert "| umr |" in capsys.readouterr().out
    levels = rec["newcomer_levels"]["cscr"]  # the newcomer-level choice, recorded and said in the table's note
    assert len(levels["gains"]) == len(levels["draws"]) >= 1 and levels["use"] == (np.mean(levels["gains"]) > 0)
    assert "cscr: held-out experts" in rec["tables"][0]["note"]
    assert main(["experiment", "unseen-experts", "--run", str(run), "--routers", "cscr", "--newcomer-levels", "off",
                 "--out", str(run / "no-levels"), *FAST]) == 0
    assert json.loads((run / "no-levels" / "metrics.json").read_text())["newcomer_levels"] == {}


def test_ood_holds_out_a_task_group(tasks_run):
    run, table, topic = tasks_run
    assert main(["experiment", "ood", "--run", str(run), "--split", "tasks", "--group", "math",
                 "--routers", "cscr,knn,oracle", *FAST]) == 0
    out = run / "experiments" / "ood-tasks-math"
    rec = json.loads((out / "metrics.json").read_text())
    assert rec["split"] == "tasks" and [g["test_group"] for g in rec["groups"]] == ["math"]
    assert rec["evaluations"]["math/ood"]["n_evaluated"] == int((topic == 0).sum())  # every math prompt
    for t in rec["tables"]:
        assert {r[0] for r in t["rows"]} == {"cscr", "knn", "oracle"}
    assert _png(out / "deferral-math.png") and _png(out / "deferral-math-id.png")
    assert "deferral-math.png" in (out / "report.md").read_text()


def test_ood_with_the_guard_searches_inside_the_training_groups(tasks_run):
    run, _, _ = tasks_run
    assert main(["experiment", "ood", "--run", str(run), "--split", "tasks", "--group", "code", "--guard",
                 "--far-share", "0.25", "--routers", "cscr,knn", *FAST, "--out", str(run / "ood-guard")]) == 0
    rec = json.loads((run / "ood-guard" / "metrics.json").read_text())
    assert rec["settings"]["guard"] is True and rec["settings"]["far_share"] == 0.25
    for t in rec["tables"]:
        assert {r[0] for r in t["rows"]} == {"cscr", "cscr+guard", "knn"}
    assert {(s["a"], s["b"]) for s in rec["significance"]} == {("cscr", "knn"), ("cscr+guard", "knn")}


def test_split_resolution_and_stem_grouping(tmp_path):
    assert resolve_split("auto", {"abstract_algebra", "philosophy"}) == "stem"
    assert resolve_split("auto", {"math", "mbpp"}) == "tasks"
    assert resolve_split("auto", {"arc-challenge", "mbpp"}) == "categories"
    _, table, topic = _run(tmp_path / "mmlu", SUBJECTS)
    (split,) = ood_splits(table, "stem")
    assert split.test_group == "non-stem"
    assert set(split.table.categories[split.ood_rows]) == {"philosophy", "anatomy"}
    assert len(ood_splits(table, "categories")) == 4
    with pytest.raises(InputError, match="--split tasks does not fit"):
        ood_splits(table, "tasks")


@pytest.mark.parametrize("argv,message", [
    (["experiment", "ood", "--split", "stem"], "--split stem does not fit"),
    (["experiment", "ood", "--routers", "cscr,nope"], "unknown router 'nope'"),
    (["experiment", "ood", "--routers", "single"], "single experts are always evaluated"),
    (["experiment", "ood", "--split", "tasks", "--group", "poetry"], "--group 'poetry'"),
    (["experiment", "ood", "--routers", "knn", "--guard"], "put cscr in --routers"),
    (["experiment", "ood", "--far-share", "0.5"], "--far-share weighs the guard's search: add --guard"),
    (["experiment", "ood", "--guard", "--far-share", "2"], "--far-share must be in [0, 1]"),
    (["experiment", "unseen-experts", "--unseen", "expert-0,gpt-9"], "unknown expert(s) ['gpt-9']"),
])
def test_bad_input_exits_2_with_one_clear_line(tasks_run, capsys, argv, message):
    run, _, _ = tasks_run
    assert main([*argv[:2], "--run", str(run), *argv[2:]]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cscr: error: ") and message in err


def test_ood_on_a_table_without_categories_is_refused(tmp_path, capsys):
    run, table, _ = _run(tmp_path / "nocat", np.array([""] * 400))
    assert main(["experiment", "ood", "--run", str(run)]) == 2
    assert "has no prompt categories" in capsys.readouterr().err


def test_run_without_a_table_and_unknown_experiment(tmp_path, capsys):
    assert main(["experiment", "unseen-experts", "--run", str(tmp_path / "empty")]) == 2
    assert "has no routing table" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["experiment", "leave-one-out", "--run", str(tmp_path)])
    assert exc.value.code == 2
    assert "invalid choice: 'leave-one-out'" in capsys.readouterr().err
