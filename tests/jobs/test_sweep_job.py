"""Ray Tune sweeps: trials train for real, the summary chooses on validation, a re-run resumes."""

from __future__ import annotations

import json

import pytest

from cscr.config import TrainConfig
from cscr.sweep import GRIDS, apply_value, get_grid, grid_names, summarize
from cscr.synthetic import synthetic_table, write_synthetic_run


def test_apply_value_sets_exactly_one_field():
    base = TrainConfig()
    cfg = apply_value(base, GRIDS["bands"], 11)
    assert cfg.loss.bands == 11 and cfg.loss.gamma == base.loss.gamma and cfg.head == base.head
    assert apply_value(base, GRIDS["width"], 1536).head.hidden == 1536
    assert apply_value(base, GRIDS["k"], 8).index.top_k == 8
    assert apply_value(base, GRIDS["descriptor"], "perplexity") == base


def test_unknown_grid_is_refused_with_its_name():
    with pytest.raises(ValueError, match="unknown grid 'depth'"):
        grid_names("bands,depth")
    assert grid_names("all") == sorted(GRIDS)


def test_summary_chooses_on_validation_not_test():
    g = get_grid("gamma")
    rows = summarize(g, [
        {"value": 0.0, "val_audc": 0.70, "test_audc": 0.90},
        {"value": 0.2, "val_audc": 0.75, "test_audc": 0.60},
        {"value": 0.5, "val_audc": None, "test_audc": None, "status": "failed"},
    ])
    assert [r["value"] for r in rows] == [0.0, 0.2, 0.5]
    assert [r["chosen"] for r in rows] == [False, True, False]
    assert rows[1]["default"]


@pytest.mark.slow
def test_sweep_runs_trials_on_ray_tune_and_resumes(tmp_path, ray_start_2_cpus):
    from cscr.jobs.sweep import sweep_grid

    table, emb, _ = synthetic_table(n=300, seed=1)
    run = write_synthetic_run(tmp_path / "run", table, emb)
    cfg = TrainConfig(epochs=2, batch_size=64)
    rows = sweep_grid(str(run), "width", cfg, concurrency=2, cpus_per_trial=0.5, gpus_per_trial=0, log=lambda s: None)
    assert [r["value"] for r in rows] == [384, 1536]
    assert all(r["status"] == "ok" for r in rows)
    assert all(0.0 < r["val_audc"] <= 1.0 and 0.0 < r["test_audc"] <= 1.0 for r in rows)
    assert sum(r["chosen"] for r in rows) == 1
    out = run / "sweeps" / "width"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rows"] == json.loads(json.dumps(rows))
    assert (out / "width.png").stat().st_size > 1000 and "Grid `width`" in (out / "summary.md").read_text()
    # a second call finds the finished experiment and restores it instead of training again
    logs: list[str] = []
    again = sweep_grid(str(run), "width", cfg, concurrency=2, cpus_per_trial=0.5, gpus_per_trial=0, log=logs.append)
    assert any("resuming" in s for s in logs)
    assert [r["test_audc"] for r in again] == [r["test_audc"] for r in rows]
