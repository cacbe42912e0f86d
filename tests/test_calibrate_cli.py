"""``cscr calibrate`` and ``cscr route``: a run whose prompts are embedded with the real MiniLM
encoder; the table printed, stored and plotted; the offline decision at the point a budget or a
quality target chooses; bad requests end with one clear line and exit 2."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from cscr.cli import main

from cscr.encoder import embed_table
from cscr.operating import OperatingTable, for_budget, for_quality
from cscr.operating_run import table_path
from cscr.runs.loader import load_router
from cscr.runs.paths import RunPaths
from cscr.synthetic import synthetic_table

PROMPT = "synthetic prompt 7 on topic 2"


@pytest.fixture(scope="module")
def run(tmp_path_factory, encoder):
    """A synthetic table whose prompt texts are embedded with the real encoder (the run's manifest
    records it, so `cscr route` rebuilds the same encoder)."""
    table, _, _ = synthetic_table(n=320, n_experts=4, dim=8, seed=4, val_fraction=0.3, probe_size=16, missing=0.01)
    paths = RunPaths.of(tmp_path_factory.mktemp("run") / "syn")
    table.save(paths.table)
    embed_table(table, encoder, paths.embeddings, progress=None, shared=False)
    return paths.root, table


def _lambda(out: str) -> float:
    m = re.search(r"^lambda (\S+) ", out, re.M)
    assert m, out
    return float(m.group(1))


def test_calibrate_prints_stores_and_plots_the_table(run, capsys):
    root, table = run
    assert main(["calibrate", "--run", str(root), "--variant", "knn", "--budget", "0.05",
                 "--quality-target", "0.9x", "--log-cost", "--verify"]) == 0
    out = capsys.readouterr().out
    path = table_path(root, "knn")
    assert path.is_file() and path.with_suffix(".png").stat().st_size > 5000
    assert (path.parent / "operating_check.md").is_file()
    stored = OperatingTable.load(path)
    data = json.loads(path.read_text())
    assert data["split"] == "val" and data["variant"] == "knn" and data["cost_unit"] == table.cost_unit
    assert [p["name"] for p in data["pool"]] == table.expert_names
    val = table.split_index("val")
    assert stored.n_dropped == int(np.isnan(table.quality[val]).any(axis=1).sum())
    assert f"operating points of knn on {stored.n_prompts} val prompts" in out
    rows = [line for line in out.splitlines() if re.match(r"^\s+\S+\s+\S+\s+0\.\d{4}\s+expert-", line)]
    assert 2 <= len(rows) <= 15
    b = for_budget(stored, 0.05)
    assert f"budget 0.05: lambda {b.lam:.4g}, expected cost {b.cost:.5g}" in out
    q = for_quality(stored, "0.9x")
    assert f"quality 0.9x: lambda {q.lam:.4g}, expected cost {q.cost:.5g}" in out
    assert "promised (val" in out and "within tolerance" in out


def test_calibrate_refuses_an_unreachable_budget_before_writing(run, capsys, tmp_path):
    root, _ = run
    out = tmp_path / "op.json"
    assert main(["calibrate", "--run", str(root), "--variant", "knn", "--budget", "0", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cscr: error: budget 0 ") and "reachable: budget >= " in err
    assert not out.exists()


def test_route_decides_at_the_point_the_request_chooses(run, capsys, encoder):
    root, table = run
    assert main(["route", "--run", str(root), "--variant", "knn", "--budget", "0.04", PROMPT]) == 0
    out = capsys.readouterr().out
    stored = OperatingTable.load(table_path(root, "knn"))
    p = for_budget(stored, 0.04)
    assert _lambda(out) == pytest.approx(p.lam, rel=1e-5)
    assert f"expected quality {p.quality:.4f}" in out
    router = load_router(root, "knn")
    ranked = router.rank(encoder.encode([PROMPT]), p.lam)[0]
    assert f"choice: {ranked[0].expert}" in out
    listed = re.findall(r"^\s+\d+\s+(expert-\d)\s", out, re.M)
    assert listed == [r.expert for r in ranked]


def test_route_max_cost_routes_among_the_cheap_experts_only(run, capsys):
    root, table = run
    mean = table.cost[table.split_index("train")].mean(axis=0)
    cap = float(np.sort(mean)[1]) * 1.01  # the two cheapest experts
    assert main(["route", "--run", str(root), "--variant", "knn", "--quality-target", "0.3", "--max-cost",
                 str(cap), PROMPT]) == 0
    out = capsys.readouterr().out
    listed = re.findall(r"^\s+\d+\s+(expert-\d)\s", out, re.M)
    cheap = {table.expert_names[j] for j in np.argsort(mean)[:2]}
    assert set(listed) == cheap
    assert "max-cost" in out


@pytest.mark.parametrize("argv,message", [
    (["--budget", "0.05", "--cost-weight", "0.1"], "not both"),
    (["--quality-target", "1.5"], "quality_target must be a number in (0, 1]"),
    (["--quality-target", "0.999"], "reachable: quality <="),
    (["--max-cost", "0"], "no expert costs at most --max-cost 0.0"),
    (["--category", "topic-0"], "router 'knn' takes no category hint"),
])
def test_route_bad_requests_exit_2_with_one_clear_line(run, capsys, argv, message):
    root, _ = run
    assert main(["route", "--run", str(root), "--variant", "knn", *argv, PROMPT]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cscr: error: ") and message in err and err.count("\n") == 1


def test_route_takes_the_prompts_category_when_the_head_has_a_prior(run, capsys):
    from cscr.encoder import Encoder, load_run_embeddings
    from cscr.prior_run import fit_run_prior
    from cscr.synthetic import train_synthetic_head

    root, table = run
    train_synthetic_head(root, table, load_run_embeddings(root), "cscr")
    prior = fit_run_prior(root, "cscr")
    assert prior is not None and prior.w_given is not None
    router = load_router(root, "cscr")
    emb = Encoder.from_run(root).encode([PROMPT])
    for cat in prior.categories:
        assert main(["route", "--run", str(root), "--cost-weight", "0", "--category", cat, PROMPT]) == 0
        out = capsys.readouterr().out
        assert f"category {cat!r}, as given" in out
        want = router.rank(np.asarray(emb, dtype=np.float32), 0.0, categories=[cat])[0][0].expert
        assert out.strip().splitlines()[-1] == f"choice: {want}"
    assert main(["route", "--run", str(root), "--category", "no-such-task", PROMPT]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cscr: error: unknown category 'no-such-task'; the router knows: ") and err.count("\n") == 1
