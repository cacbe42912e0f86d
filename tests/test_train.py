"""The one training loop (cscr.training): batches, learning, best epoch, resume, the validator passed
in, save/load, run folders, the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from cscr.cli import main as cli

from cscr.config import LossConfig, TrainConfig
from cscr.fingerprints.probe_outcome import probe_outcome_descriptors
from cscr.fingerprints.store import DescriptorStore
from cscr.newcomer import load_choice
from cscr.runs.heads import load_trained, save_trained
from cscr.runs.paths import RunPaths
from cscr.synthetic import synthetic_table, write_synthetic_run
from cscr.training import (
    TrainState,
    epoch_batches,
    fit_head,
    head_for,
    init_training,
    prepare_arrays,
    run_epochs,
    validation_audc,
    variant_config,
)
from cscr.training.plain import train_run

FAST = TrainConfig(epochs=3, batch_size=128)


@pytest.fixture(scope="module")
def synth():
    table, emb, topic = synthetic_table(n=800, n_experts=5, seed=2, probe_size=64)
    arrays = prepare_arrays(table, emb, probe_outcome_descriptors(table))
    return table, emb, arrays


@pytest.fixture(scope="module")
def trained(synth):
    _, _, arrays = synth
    return fit_head(arrays, FAST, "cscr", log=None)


def test_epoch_batches_shard_one_permutation_per_epoch():
    full = epoch_batches(103, 16, seed=0, epoch=0)
    assert sorted(np.concatenate(full).tolist()) == list(range(103))
    assert [len(b) for b in full[:-1]] == [16] * 6
    a = [epoch_batches(103, 16, 0, 0, rank=r, world=2) for r in range(2)]
    assert len(a[0]) == len(a[1])  # equal steps per worker (DDP)
    assert all(len(b) == 8 for b in a[0][:-1])  # global batch 16 = 2 x 8
    flat = [np.concatenate(x) for x in a]
    assert not set(flat[0]) & set(flat[1]) and len(flat[0]) == len(flat[1]) == 51
    assert np.array_equal(np.concatenate(epoch_batches(103, 16, 0, 0)), np.concatenate(full))
    assert not np.array_equal(np.concatenate(epoch_batches(103, 16, 0, 1)), np.concatenate(full))
    with pytest.raises(ValueError, match="cannot be shared"):
        epoch_batches(1, 4, 0, 0, rank=0, world=2)


def test_prepare_arrays_keeps_prompts_without_positive_and_drops_incomplete_val_rows():
    table, emb, _ = synthetic_table(n=300, n_experts=4, seed=1, probe_size=32, missing=0.05)
    arrays = prepare_arrays(table, emb, probe_outcome_descriptors(table))
    # a train prompt nobody answered well stays (the quality map learns it fails everywhere; the
    # InfoNCE skips it: no positive); one with no observed cell at all is dropped
    train_q = table.quality[table.split_index("train")]
    assert arrays.n == int((~np.isnan(train_q)).any(axis=1).sum())
    assert arrays.observed.any(axis=1).all()
    assert arrays.meta["n_train_with_positive"] == int(arrays.positives.any(axis=1).sum()) < arrays.n
    assert (arrays.quality[~arrays.positives.any(axis=1)] == 0).all()
    assert not (arrays.positives & ~arrays.observed).any()
    assert not np.isnan(arrays.val_quality).any()
    assert arrays.descriptors.shape == (4, 32)
    with pytest.raises(ValueError, match=r"no descriptor for expert\(s\) \['expert-3'\]"):
        prepare_arrays(table, emb, {f"expert-{j}": np.ones(32) for j in range(3)})


def test_training_learns_and_keeps_the_best_epoch(synth, trained):
    table, emb, arrays = synth
    hist = trained.history
    assert [h["epoch"] for h in hist] == [1, 2, 3]
    assert hist[-1]["train_loss"] < hist[0]["train_loss"]
    best = max(hist, key=lambda h: h["val_audc"])
    assert trained.best_epoch == best["epoch"] and trained.best_val_audc == best["val_audc"]
    # the saved head is the best epoch's: recomputing its validation AUDC gives the recorded value
    assert validation_audc(trained.head, arrays, FAST.index.top_k) == pytest.approx(trained.best_val_audc)
    # and it routes better than an untrained head
    with torch.random.fork_rng():
        torch.manual_seed(123)
        untrained = head_for(arrays, variant_config(FAST, "cscr"))
    assert trained.best_val_audc > validation_audc(untrained, arrays, FAST.index.top_k)
    assert trained.config.head.out_dim == arrays.descriptors.shape[1]


def test_resuming_from_a_state_continues_exactly(synth):
    _, _, arrays = synth
    cfg = TrainConfig(epochs=3, batch_size=128)
    straight = fit_head(arrays, cfg, "cscr", log=None)
    saved: list[dict] = []
    fit_head(arrays, TrainConfig(epochs=1, batch_size=128), "cscr", log=None,
             on_epoch=lambda s: saved.append(s.to_dict()))
    state = TrainState.from_dict(saved[-1])
    assert state.epoch == 1
    resumed = fit_head(arrays, cfg, "cscr", log=None, state=state)
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3]
    for h_a, h_b in zip(straight.history, resumed.history, strict=True):
        assert h_a["train_loss"] == pytest.approx(h_b["train_loss"], rel=1e-6)
    for (k, a), b in zip(straight.head.state_dict().items(), resumed.head.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=k)


def test_the_loop_takes_its_validation_as_a_callable(synth, trained):
    _, _, arrays = synth
    seen: list[int] = []

    def by_hand(head):  # the default validator's score, recorded per call
        seen.append(len(seen))
        return validation_audc(head, arrays, FAST.index.top_k)

    same = fit_head(arrays, FAST, "cscr", log=None, validate=by_hand)
    assert seen == [0, 1, 2]  # once per epoch
    assert [h["val_audc"] for h in same.history] == [h["val_audc"] for h in trained.history]
    # without validation the best epoch is the lowest train loss, and no AUDC is recorded
    blind = fit_head(arrays, FAST, "cscr", log=None, validate=lambda head: None)
    assert all(h["val_audc"] is None for h in blind.history) and blind.best_val_audc is None
    losses = [h["train_loss"] for h in blind.history]
    assert blind.best_epoch == 1 + losses.index(min(losses))
    assert losses == pytest.approx([h["train_loss"] for h in trained.history], rel=1e-6)


def test_one_loop_for_every_worker_shards_the_epoch(synth):
    """run_epochs as worker ``rank`` of ``world`` trains its shard; the record counts the global prompts."""
    _, _, arrays = synth
    cfg = TrainConfig(epochs=1, batch_size=128)
    records = []
    for rank in range(2):
        head, opt, state = init_training(arrays, cfg)
        state = run_epochs(arrays, cfg, head, opt, state, None, rank=rank, world=2, extra={"workers": 2})
        records.append(state.history[-1])
    assert [r["prompts"] for r in records] == [2.0 * (arrays.n // 2)] * 2
    assert records[0]["workers"] == 2 and records[0]["val_audc"] is None
    assert records[0]["train_loss"] != records[1]["train_loss"]  # different shards


def test_the_loop_module_does_not_import_the_routers():
    """Validation is passed in: loading the loop loads no router (no circle through cscr.routers.cscr)."""
    import subprocess
    import sys

    code = ("import sys, cscr.training.loop, cscr.training.arrays; "
            "print(sorted(m for m in sys.modules if m.startswith(('cscr.routers', 'cscr.trained', 'cscr.run'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_variants():
    cfg = TrainConfig(loss=LossConfig(bands=5, gamma=0.3, alpha=0.4, tau_min=0.07, tolerance=0.1))
    v = variant_config(cfg, "vanilla").loss
    assert (v.bands, v.gamma, v.alpha, v.tau_min, v.tolerance) == (1, 0.0, 0.0, 0.07, 0.1)
    assert variant_config(cfg, "cscr") is cfg
    with pytest.raises(ValueError, match="unknown training variant"):
        variant_config(cfg, "fancy")


def test_save_and_load_trained_roundtrip(tmp_path, synth, trained):
    _, emb, arrays = synth
    folder = save_trained(tmp_path / "run", trained)
    assert folder == RunPaths.of(tmp_path / "run").model("cscr")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "head.pt", "history.json"]
    config = json.loads((folder / "config.json").read_text())
    assert config["variant"] == "cscr" and config["descriptor_kind"] == ""
    assert config["train"]["head"]["out_dim"] == arrays.descriptors.shape[1]
    back = load_trained(tmp_path / "run", "cscr")
    np.testing.assert_allclose(back.head.encode(emb[:20]), trained.head.encode(emb[:20]), rtol=1e-6, atol=1e-6)
    assert back.best_epoch == trained.best_epoch and back.history == json.loads(json.dumps(trained.history))
    save_trained(tmp_path / "run", trained)  # overwrite: atomic folder swap, nothing left behind
    assert [p.name for p in folder.parent.iterdir()] == ["cscr"]
    with pytest.raises(FileNotFoundError, match="cscr train --run .* --variant vanilla"):
        load_trained(tmp_path / "run", "vanilla")


def test_train_run_writes_probe_outcome_descriptors_and_the_head(tmp_path):
    table, emb, _ = synthetic_table(n=400, n_experts=4, seed=3, probe_size=40)
    run = write_synthetic_run(tmp_path / "run", table, emb)
    lines: list[str] = []
    res = train_run(str(run), "vanilla", TrainConfig(epochs=2, batch_size=128), log=lines.append)
    store = DescriptorStore(RunPaths.of(run).descriptors)
    assert store.kinds() == ["probe-outcome"] and len(store.experts("probe-outcome")) == 4
    assert store.info("probe-outcome")["dimension"] == 40
    assert any("epoch 2/2" in s for s in lines)
    back = load_trained(run, "vanilla")
    assert back.descriptor_kind == "probe-outcome" and back.experts == table.expert_names
    assert back.config.loss.bands == 1 and back.config.loss.gamma == 0.0
    assert res.meta["n_val"] == len(table.split_index("val")) and len(res.history) == 2
    # the newcomer-level choice over the run's own experts (pseudo-newcomers), recorded for serving
    choice = load_choice(RunPaths.of(run).model("vanilla"))
    assert choice is not None and choice.use == (np.mean(choice.gains) > 0)
    assert len(choice.gains) == len(choice.draws) == 4
    assert all(d and set(d) <= set(table.expert_names) for d in choice.draws)
    # scored over the pool they join: one pseudo-newcomer of four still moves the AUDC (alone it could not)
    assert choice.over == "the pool they join" and any(g != 0 for g in choice.gains)
    assert any("vanilla: newcomer levels" in s for s in lines) and any("newcomer_levels.json" in s for s in lines)
    # the vanilla@probe-outcome copy carries what train wrote beside the head, so it routes alike
    main_dir, copy_dir = RunPaths.of(run).model("vanilla"), RunPaths.of(run).model("vanilla@probe-outcome")
    assert sorted(p.name for p in copy_dir.iterdir()) == sorted(p.name for p in main_dir.iterdir())
    assert {"newcomer_levels.json", "operating_points.json"} <= {p.name for p in copy_dir.iterdir()}
    assert load_choice(copy_dir) == choice
    train_run(str(run), "cscr", TrainConfig(epochs=1, batch_size=128, newcomer_levels=False), log=None)
    assert load_choice(RunPaths.of(run).model("cscr")) is None  # asked for none: none recorded
    (RunPaths.of(run).model("cscr") / "newcomer_levels.json").write_text('{"use": "yes"}')
    with pytest.raises(ValueError, match="not a newcomer-level record"):
        load_choice(RunPaths.of(run).model("cscr"))
    with pytest.raises(FileNotFoundError, match="no 'logit' descriptors"):
        train_run(str(run), "cscr", TrainConfig(epochs=1), descriptor_kind="logit", log=None)


def test_cli_train_plain_and_bad_input(tmp_path, capsys):
    table, emb, _ = synthetic_table(n=300, n_experts=4, seed=4, probe_size=32)
    run = write_synthetic_run(tmp_path / "run", table, emb)
    assert cli(["train", "--run", str(run), "--plain", "--epochs", "1", "--batch-size", "64", "--top-k", "2"]) == 0
    out = capsys.readouterr().out
    assert "cscr" in out and "vanilla" in out
    back = load_trained(run, "cscr")
    assert back.config.index.top_k == 2 and back.config.batch_size == 64
    assert cli(["train", "--run", str(run), "--plain", "--variant", "cscr,fancy"]) == 2
    assert "unknown variant(s) ['fancy']" in capsys.readouterr().err
    assert cli(["train", "--run", str(tmp_path / "nope"), "--plain"]) == 2
    assert "has no routing table" in capsys.readouterr().err
    assert cli(["train", "--run", str(run), "--plain", "--gamma", "-1"]) == 2
    assert "gamma must be >= 0" in capsys.readouterr().err
