"""``cscr evaluate``: a prepared run in, the table printed and report files out; bad input -> exit 2.

The end-to-end test uses a small RouterBench table built by the real loader from
../shared/data, embedded with the real MiniLM encoder."""

from __future__ import annotations

import json

import numpy as np
import pytest
from cscr.cli import main

from cscr.runs.paths import RunPaths
from cscr.synthetic import synthetic_table, write_synthetic_run

ROUTERS = "oracle,random,pareto-random,knn,single"


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory):
    table, emb, _ = synthetic_table(n=400, n_experts=4, dim=32, seed=0, probe_size=20, missing=0.01)
    return write_synthetic_run(tmp_path_factory.mktemp("run") / "syn", table, emb), table


def test_evaluate_prints_the_table_and_writes_the_report(synthetic_run, capsys):
    run, table = synthetic_run
    rc = main(["evaluate", "--run", str(run), "--routers", ROUTERS, "--compare", "knn", "--bootstrap", "200",
               "--lambdas", "80"])
    out = capsys.readouterr().out
    assert rc == 0
    names = ["oracle", "random", "pareto-random", "knn"] + [f"single:{e}" for e in table.expert_names]
    lines = out.splitlines()
    for name in names:
        assert any(line.split()[:1] == [name] for line in lines), name
    assert "AUDC" in out and "QNC" in out and "peak" in out
    assert "knn vs " in out and "McNemar" in out
    ev = RunPaths.of(run).eval
    for f in ("report.md", "metrics.json", "metrics.csv", "deferral.png"):
        assert (ev / f).is_file(), f
    data = json.loads((ev / "metrics.json").read_text())
    assert set(data["routers"]) == set(names)
    test = table.split_index("test")
    assert data["n_dropped_missing_quality"] == int(np.isnan(table.quality[test]).any(axis=1).sum())
    assert data["significance"][0]["a"] == "knn"


@pytest.mark.parametrize("argv,message", [
    (["--routers", "oracle,nope"], "unknown router 'nope'"),
    (["--routers", "single:nope"], "unknown expert 'nope'"),
    (["--routers", "knn,knn"], "listed twice"),
    (["--routers", "knn", "--compare", "oracle"], "--compare 'oracle' is not among --routers"),
    (["--routers", "knn:3"], "takes no ':' argument"),
    (["--routers", "knn", "--lambdas", "1"], "n_lambdas must be >= 2"),
])
def test_bad_router_lists_exit_2_with_one_clear_line(synthetic_run, capsys, argv, message):
    run, _ = synthetic_run
    assert main(["evaluate", "--run", str(run), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cscr: error: ") and message in err


def test_missing_run_or_embeddings_exit_2(tmp_path, capsys):
    assert main(["evaluate", "--run", str(tmp_path / "none"), "--routers", "knn"]) == 2
    assert "has no routing table" in capsys.readouterr().err
    table, _, _ = synthetic_table(n=60, n_experts=3, dim=8, probe_size=5)
    table.save(RunPaths.of(tmp_path / "noemb").table)
    assert main(["evaluate", "--run", str(tmp_path / "noemb"), "--routers", "knn"]) == 2
    assert "has no prompt embeddings" in capsys.readouterr().err


def test_list_routers(capsys):
    assert main(["evaluate", "--list"]) == 0
    out = capsys.readouterr().out.split()
    assert {"oracle", "random", "pareto-random", "knn", "single"} <= set(out)


@pytest.mark.slow
def test_end_to_end_on_a_small_real_routerbench_table(shared_data, tmp_path, capsys):
    from cscr.config import DataConfig, EncoderConfig
    from cscr.data import load_dataset
    from cscr.encoder import Encoder, embed_table

    full = load_dataset("routerbench", DataConfig(data_dir=str(shared_data)))
    rng = np.random.default_rng(0)
    # a small stratified sample: 40 train and 30 test prompts per task, plus every test row with a gap
    keep = []
    for cat in np.unique(full.categories):
        for split, k in (("train", 40), ("test", 30)):
            idx = np.flatnonzero((full.categories == cat) & (full.splits == split))
            keep += list(rng.choice(idx, size=min(k, len(idx)), replace=False))
    gaps = np.flatnonzero((full.splits == "test") & np.isnan(full.quality).any(axis=1))
    keep = np.unique(np.concatenate([keep, gaps]))
    table = full.subset(keep)
    paths = RunPaths.of(tmp_path / "rb")
    table.save(paths.table)
    embed_table(table, Encoder(EncoderConfig(max_seq_length=64, batch_size=32)), paths.embeddings, progress=None)

    rc = main(["evaluate", "--run", str(paths.root), "--routers", ROUTERS, "--bootstrap", "300", "--compare", "knn"])
    out = capsys.readouterr().out
    assert rc == 0, out
    data = json.loads((paths.eval / "metrics.json").read_text())
    assert data["n_dropped_missing_quality"] == len(gaps) > 0
    test = table.split_index("test")
    ok = test[~np.isnan(table.quality[test]).any(axis=1)]
    assert data["n_evaluated"] == len(ok)
    mean_q = table.quality[ok].mean(axis=0)
    assert data["best_expert"]["name"] == table.expert_names[int(np.argmax(mean_q))]
    assert data["best_expert"]["quality"] == pytest.approx(mean_q.max())
    r = data["routers"]
    assert len(r) == 4 + 11
    for name, v in r.items():  # the oracle is the ceiling on real data too
        assert r["oracle"]["audc"] >= v["audc"] - 1e-12, name
        assert r["oracle"]["peak"] >= v["peak"] - 1e-12, name
    assert r["oracle"]["qnc"] is not None and r["oracle"]["qnc_ratio"] < 1
    assert r["knn"]["n_distinct_points"] > 5  # a real knob sweep
    assert "gpt-4-1106-preview" in out and "knn vs " in out


def test_heads_of_two_descriptor_kinds_are_evaluated_side_by_side(tmp_path, capsys):
    """`cscr train --descriptor-kind K` keeps models/cscr@K; `cscr evaluate` compares the kinds."""
    from cscr.fingerprints.store import DescriptorStore
    from cscr.runs.heads import load_trained

    table, emb, _ = synthetic_table(n=400, n_experts=4, dim=32, seed=1, probe_size=20)
    run = write_synthetic_run(tmp_path / "syn", table, emb)
    rng = np.random.default_rng(3)  # a second kind: 16-d random unit vectors, one per expert
    DescriptorStore(RunPaths.of(run).descriptors).write_many(
        {e: (v := rng.normal(size=16)) / np.linalg.norm(v) for e in table.expert_names}, kind="random16")
    for kind in ("probe-outcome", "random16"):
        assert main(["train", "--run", str(run), "--plain", "--variant", "cscr", "--epochs", "2",
                     "--descriptor-kind", kind]) == 0
    assert load_trained(run, "cscr").descriptor_kind == "random16"  # models/cscr: the latest
    assert load_trained(run, "cscr@probe-outcome").head.cfg.out_dim != load_trained(run, "cscr@random16").head.cfg.out_dim
    capsys.readouterr()
    assert main(["evaluate", "--run", str(run), "--routers", "cscr@probe-outcome,cscr@random16,oracle",
                 "--bootstrap", "100", "--lambdas", "40"]) == 0
    data = json.loads((RunPaths.of(run).eval / "metrics.json").read_text())
    assert {"cscr@probe-outcome", "cscr@random16", "oracle"} <= set(data["routers"])
    assert data["routers"]["cscr@probe-outcome"]["audc"] != data["routers"]["cscr@random16"]["audc"]
    assert main(["evaluate", "--run", str(run), "--routers", "cscr@logit"]) == 2
    assert "--variant cscr --descriptor-kind logit" in capsys.readouterr().err
    assert main(["evaluate", "--run", str(run), "--routers", "knn@logit"]) == 2
    assert "'@KIND' goes with cscr or vanilla" in capsys.readouterr().err
