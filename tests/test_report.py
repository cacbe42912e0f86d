"""`cscr report` over a runs folder whose pieces were produced by the real commands (small)."""

from __future__ import annotations

import json
import re
import shutil

import pytest
from cscr.cli import main

from cscr.config import TrainConfig
from cscr.report import build_report
from cscr.synthetic import synthetic_table, write_synthetic_run

FAST = ["--lambdas", "20", "--bootstrap", "100"]
ROUTERS = ["cscr", "knn", "oracle", "random"]


def _sweep(run, values=(0.0, 0.2)):
    """Two trials of the gamma grid with the sweep job's own trial pieces, then its summary writer."""
    from cscr.jobs.sweep import test_metrics, trial_inputs

    from cscr.runs.paths import RunPaths
    from cscr.sweep import apply_value, get_grid, summarize, write_sweep_report
    from cscr.training import fit_head

    grid, trials = get_grid("gamma"), []
    for v in values:
        cfg = apply_value(TrainConfig(epochs=1, batch_size=128), grid, v)
        arrays, table, emb = trial_inputs(str(run), "probe-outcome", cfg.loss.tolerance)
        res = fit_head(arrays, cfg, "cscr", log=None)
        trials.append({"value": v, "val_audc": res.best_val_audc, "best_epoch": res.best_epoch,
                       **test_metrics(res.head, arrays, table, emb, cfg.index.top_k)})
    write_sweep_report(grid, summarize(grid, trials), RunPaths.of(run).sweep("gamma"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("report") / "runs"
    table, emb, _ = synthetic_table(n=400, n_experts=5, dim=16, seed=5, probe_size=40)
    alpha = write_synthetic_run(base / "alpha", table, emb)
    assert main(["train", "--run", str(alpha), "--plain", "--variant", "cscr", "--epochs", "1"]) == 0
    assert main(["evaluate", "--run", str(alpha), "--routers", ",".join(ROUTERS) + ",single",
                 "--compare", "cscr", *FAST]) == 0
    assert main(["experiment", "unseen-experts", "--run", str(alpha), "--routers", "cscr,knn,oracle,soft-moe",
                 "--epochs", "1", *FAST]) == 0
    _sweep(alpha)
    write_synthetic_run(base / "beta", *synthetic_table(n=120, n_experts=3, dim=16, seed=6, probe_size=16)[:2])
    return base


def _links(md):
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)


def test_report_holds_every_piece_and_links_its_figures(runs, tmp_path):
    path = build_report(runs, tmp_path / "report")
    md = path.read_text()
    main_table = md.split("### alpha")[1].split("### beta")[0]
    for r in ROUTERS:  # every evaluated router in alpha's main table
        assert f"| {r} |" in main_table
    assert "| expert-0 |" in main_table and "Routers not run on this data set:" in main_table
    # single experts by their quality and cost (one point each: no AUDC, so never "AUDC 0.0000")
    experts = main_table.split("Single experts")[1].split("![")[0]
    assert "| expert | quality | cost (usd) |" in experts and "no AUDC of its own" in experts
    e0 = json.loads((runs / "alpha" / "eval" / "metrics.json").read_text())["experts"]["expert-0"]
    assert f"| {e0['quality']:.4f} | {e0['cost']:.4g} |" in experts
    assert "umr" in main_table.split("Routers not run on this data set:")[1]
    # significance row of CSCR against the strongest other router, as the evaluation recorded it
    metrics = json.loads((runs / "alpha" / "eval" / "metrics.json").read_text())
    sig = metrics["significance"][0]
    sig_part = md.split("## 2. Significance")[1].split("## 3.")[0]
    assert f"| alpha | {sig['b']} |" in sig_part and f"{sig['delta_audc']:+.4f}" in sig_part
    assert "beta: not run" in sig_part
    # generalisation: the unseen-experts table with its routers and the one that could not take part
    gen = md.split("## 3. Generalisation")[1].split("## 4. Ablations")[0]
    assert "#### alpha: unseen-experts" in gen and "| cscr |" in gen and "**soft-moe**" in gen
    assert "not run on: alpha (`cscr experiment ood" in gen and "beta (`cscr experiment unseen-experts" in gen
    # ablations: the gamma grid's table and the grids that have not run
    abl = md.split("## 4. Ablations")[1]
    assert "| alpha | gamma | 0.2 (" in abl and "Grid `gamma`" in abl and "bands" in abl.split("Grids not run")[1]
    # figures: every link resolves inside the report folder, and every copied figure is linked
    links = _links(md)
    assert len(links) == 3 and all((path.parent / link).stat().st_size > 1000 for link in links)
    copied = {p.relative_to(path.parent).as_posix() for p in (path.parent / "figures").rglob("*.png")}
    assert copied == set(links)
    assert "| beta | synthetic | not run | not run | not run | not run |" in md


def test_report_cli_regenerates_in_place_and_refuses_a_foreign_folder(runs, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["report", "--runs", str(runs), "--out", str(out)]) == 0
    assert "3 figures" in capsys.readouterr().out
    moved = runs.parent / "gamma-away"
    shutil.move(runs / "alpha" / "sweeps" / "gamma", moved)
    try:
        assert main(["report", "--runs", str(runs), "--out", str(out)]) == 0
    finally:
        shutil.move(moved, runs / "alpha" / "sweeps" / "gamma")
    md = (out / "report.md").read_text()
    assert "No ablation sweep has run yet (not run)" in md
    assert not (out / "figures" / "alpha" / "sweep-gamma.png").exists()  # the stale figure went with the old report
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "mine.txt").write_text("keep")
    assert main(["report", "--runs", str(runs), "--out", str(foreign)]) == 2
    assert "is not an earlier cscr report" in capsys.readouterr().err and (foreign / "mine.txt").exists()
    assert main(["report", "--runs", str(tmp_path / "nowhere"), "--out", str(out)]) == 2
    assert "no such folder" in capsys.readouterr().err
