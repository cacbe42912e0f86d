"""A live pool end to end through the CLI, as the README runs it: `cscr label` (Ray Data on an
embedded local cluster) -> `cscr fingerprint` (logit footprints) -> `cscr train` -> `cscr evaluate`,
with SmolLM2-135M-Instruct (from PyPI: it answers some built-in tasks right, so the head has
positives to learn from) beside a tiny random GPT-2 built from a config (which answers none)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from cscr.cli import main

from cscr.data.table import RoutingTable
from cscr.encoder import load_run_embeddings
from cscr.fingerprints.store import DescriptorStore
from cscr.models import tiny_random_lm
from cscr.newcomer import load_choice
from cscr.runs.paths import RunPaths

pytestmark = pytest.mark.slow


def test_label_fingerprint_train_evaluate_on_a_live_pool(tmp_path, capsys):
    a = tiny_random_lm(tmp_path / "a", seed=0)
    pool = tmp_path / "pool.yaml"
    pool.write_text(yaml.safe_dump({"name": "live", "experts": [
        {"name": "a", "kind": "open-weights", "source": {"model": str(a)}, "cost": {"n_params": 0.01}},
        {"name": "b", "kind": "open-weights", "source": {"model": "smollm2"}, "cost": {"n_params": 0.135}},
    ]}))
    run = tmp_path / "run"
    assert main(["label", "--pool", str(pool), "--tasks", "builtin", "--n", "48", "--probe-size", "8",
                 "--out", str(run), "--num-cpus", "2"]) == 0
    out = capsys.readouterr().out
    assert "labelled 48 prompts x 2 experts" in out
    table = RoutingTable.load(RunPaths.of(run).table)
    assert table.quality.shape == (48, 2) and (table.splits == "probe").sum() == 8
    assert (table.cost[:, 1] > table.cost[:, 0]).all()  # 13x the parameters
    assert np.nanmax(table.quality[:, 1]) == 1.0  # SmolLM2 gets some right
    emb = load_run_embeddings(run)  # label leaves the run ready to train, as prepare does
    assert emb.shape == (48, 384) and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-4)

    assert main(["fingerprint", "--pool", str(pool), "--run", str(run), "--n-probes", "8", "--steps", "3",
                 "--basis-size", "16", "--num-cpus", "2"]) == 0
    store = DescriptorStore(RunPaths.of(run).descriptors)
    assert store.kinds() == ["logit"] and sorted(store.experts("logit")) == ["a", "b"]
    vecs = store.read("logit")
    assert not np.allclose(vecs["a"], vecs["b"])

    assert main(["train", "--run", str(run), "--plain", "--descriptor-kind", "logit", "--epochs", "2"]) == 0
    capsys.readouterr()
    # the newcomer-level choice: the weak expert alone answers no train prompt well, so no head trains
    # without the strong one: that draw cannot be scored and the maps stay off (train still succeeds)
    choice = load_choice(RunPaths.of(run).model("cscr"))
    assert choice is not None and not choice.use and "no head trains without it" in choice.why
    assert main(["evaluate", "--run", str(run), "--routers", "cscr@logit,vanilla,oracle,random,single",
                 "--bootstrap", "100", "--lambdas", "30", "--compare", "cscr@logit"]) == 0
    printed = capsys.readouterr().out
    assert "cscr@logit vs " in printed
    metrics = json.loads((RunPaths.of(run).eval / "metrics.json").read_text())
    assert {"cscr@logit", "vanilla", "oracle", "single:a", "single:b"} <= set(metrics["routers"])
    for name, r in metrics["routers"].items():
        assert metrics["routers"]["oracle"]["audc"] >= r["audc"] - 1e-12, name
