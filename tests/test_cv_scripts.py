"""The cross-validation scripts (scripts/cv_grid.py, category_probe.py, lexical_cv.py, prior_cv.py, newcomer_cv.py, ceiling_cv.py,
refit_cv.py, average_cv.py, finetune_probe.py with finetune_export.py) share their folds (scripts/foldcv.py): run end to end on a
small synthetic run, they score the same rows, and the test split is never read. The validation-split
probe scripts/prompt_cost_probe.py runs on the same run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from cscr.synthetic import synthetic_table, train_synthetic_head, write_synthetic_run

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
sys.path.insert(0, str(SCRIPTS))

import average_cv  # noqa: E402
import category_probe  # noqa: E402
import ceiling_cv  # noqa: E402
import cv_grid  # noqa: E402
import epoch_choice_cv  # noqa: E402
import finetune_device  # noqa: E402
import finetune_export  # noqa: E402
import finetune_import  # noqa: E402
import finetune_probe  # noqa: E402
import foldcv  # noqa: E402
import lexical_cv  # noqa: E402
import newcomer_cv  # noqa: E402
import prior_cv  # noqa: E402
import prompt_cost_probe  # noqa: E402
import refit_cv  # noqa: E402


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    table, emb, _ = synthetic_table(n=400, n_experts=4, seed=3)
    out = write_synthetic_run(tmp_path_factory.mktemp("cv") / "run", table, emb)
    train_synthetic_head(out, table, emb)
    return out, table


def test_folds_cover_train_and_val_once_and_never_the_test_split(run_dir):
    _, table = run_dir
    pool, folds = foldcv.make_folds(table, 3)
    assert sorted(np.concatenate(folds).tolist()) == sorted(pool.tolist())
    assert not set(pool.tolist()) & set(table.split_index("test").tolist())
    again = foldcv.make_folds(table, 3)[1]
    assert all(np.array_equal(a, b) for a, b in zip(folds, again, strict=True))  # one permutation for all
    t = foldcv.fold_table(table, pool, folds, 1)
    assert set(t.split_index("val").tolist()) == set(folds[1].tolist())
    assert np.array_equal(t.split_index("test"), table.split_index("test")) and table.splits is not t.splits
    u = foldcv.fold_table(table, pool, folds, 2, nested=True)
    assert set(u.split_index("test").tolist()) >= set(folds[2].tolist())
    assert set(u.split_index("val").tolist()) == set(folds[0].tolist())


def _table(out: str) -> dict[str, list[float]]:
    """name -> [mean, fold 1, fold 2, ...] from a script's final table (a name, then numbers)."""
    rows = {}
    for line in out.splitlines():
        tokens = line.split()
        n = 0
        while n < len(tokens):
            try:
                float(tokens[-1 - n])
            except ValueError:
                break
            n += 1
        if n >= 2 and n < len(tokens):
            rows[" ".join(tokens[: len(tokens) - n])] = [float(v) for v in tokens[len(tokens) - n:]]
    return rows


def test_the_scripts_score_the_same_folds(run_dir, capsys):
    out, _ = run_dir
    assert lexical_cv.main(["--run", str(out), "--folds", "2", "--configs", '{"none": null, "d8": {"dims": 8}}']) == 0
    lex = _table(capsys.readouterr().out)
    assert category_probe.main(["--run", str(out), "--folds", "2"]) == 0
    probe = _table(capsys.readouterr().out)
    # the same default head on the same folds: the same AUDC per fold
    np.testing.assert_allclose(lex["none"], probe["head"], atol=1e-9)
    assert all(0.0 < v <= 1.0 for v in lex["d8"] + probe["per-category"])

    assert cv_grid.main(["--run", str(out), "--folds", "2", "--configs", "{}", "--baselines", "per-category"]) == 0
    grid = capsys.readouterr().out
    # cv_grid scores the baseline on the same folds as category_probe (same rows, same router)
    assert f"{probe['per-category'][1]:.4f} {probe['per-category'][2]:.4f}" in grid
    assert cv_grid.main(["--run", str(out), "--configs", "not json"]) == 2
    assert cv_grid.main(["--run", str(out), "--configs", "[1]"]) == 2
    assert lexical_cv.main(["--run", str(out), "--configs", "{"]) == 2
    assert lexical_cv.main(["--run", str(out), "--configs", '{"x": {"no_such_field": 1}}']) == 2
    assert "not a lexical configuration" in capsys.readouterr().err

    # nested: the head's epoch is chosen on another fold than the scored one; both scripts agree
    assert lexical_cv.main(["--run", str(out), "--folds", "3", "--nested", "--configs", '{"none": null}']) == 0
    nested = _table(capsys.readouterr().out)
    assert category_probe.main(["--run", str(out), "--folds", "3", "--nested", "--length"]) == 0
    probe = _table(capsys.readouterr().out)
    np.testing.assert_allclose(nested["none"][1:], probe["head"][1:], atol=1e-9)
    # --train: the head is trained with the schedule given, not the default's
    assert lexical_cv.main(["--run", str(out), "--folds", "3", "--nested", "--configs", '{"none": null}',
                            "--train", '{"epochs": 1, "lr": 1e-6}']) == 0
    assert _table(capsys.readouterr().out)["none"] != nested["none"]
    assert lexical_cv.main(["--run", str(out), "--configs", '{"none": null}', "--train", "[1]"]) == 2
    for name in ("head+len", "parametric+len", "per-category+len", "head+param w=0.5"):
        assert len(probe[name]) == 4 and all(0.0 < v <= 1.0 for v in probe[name]), name  # the mean, 3 folds

    # the epoch the inner fold picks, scored on the held-out fold, against a fixed epoch count
    # and with early stopping: patience 4 >= the epochs never stops, so it keeps the full run's choice
    assert epoch_choice_cv.main(["--run", str(out), "--folds", "3", "--config", '{"epochs": 4}',
                                 "--patience", "1,4"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 6 and lines[-1].startswith("chosen epoch") and "fixed 4 epochs" in lines[-1]
    assert all("; P=1: stopped after " in line for line in lines[:3])
    assert lines[4].startswith("patience 4: ") and "after 4.0 epochs" in lines[4]
    assert "per fold +0.0000 +0.0000 +0.0000 against" in lines[4]
    assert epoch_choice_cv.main(["--run", str(out), "--config", "{"]) == 2
    assert epoch_choice_cv.main(["--run", str(out), "--patience", "0"]) == 2
    assert epoch_choice_cv.early_stop([0.5, 0.6, 0.55, 0.7], 1) == (1, 3)
    assert epoch_choice_cv.early_stop([0.5, 0.6, 0.55, 0.7], 2) == (3, 4)
    assert epoch_choice_cv.early_stop([0.5, 0.5, 0.5], 2) == (0, 3)  # a tie is no gain


def test_the_finetune_probe_scores_fold_features_on_category_probes_nested_folds(run_dir, tmp_path, capsys):
    from cscr.runs.inputs import Run

    out, _ = run_dir
    run = Run.of(out)
    table, emb = run.table, run.embeddings
    # the export's folds: every train + val row in the fold category_probe --nested scores it in
    fold = finetune_export.fold_ids(table, emb, 3)
    keep = np.flatnonzero(table.splits != "test")
    _, folds = foldcv.make_folds(foldcv.without_test(table, emb)[0], 3)
    for k, f in enumerate(folds):
        assert sorted(np.flatnonzero(fold == k).tolist()) == sorted(keep[f].tolist())
    assert (fold[table.split_index("test")] == -1).all() and (fold[keep] >= 0).sum() == sum(map(len, folds))

    # the CSCR head's training arrays per variant: their rows are the ones cscr train would read
    from cscr.config import TrainConfig
    from cscr.training.arrays import prepare_arrays

    arrays = finetune_export.cscr_arrays(run, table, emb, 3)
    desc, kind, basis = run.trained_descriptors()
    t2, e2 = foldcv.without_test(table, emb)
    t_nested = foldcv.fold_table(t2, *foldcv.make_folds(t2, 3), 1, nested=True)
    for name, t, e in (("fold1", t_nested, e2), ("full", table, emb)):
        ref = prepare_arrays(t, e, desc, TrainConfig().loss.tolerance, kind, basis)
        np.testing.assert_array_equal(np.asarray(emb, dtype=np.float32)[arrays[f"{name}__rows"]], ref.x)
        np.testing.assert_array_equal(arrays[f"{name}__positives"], ref.positives)
    assert not set(arrays["fold1__rows"].tolist()) & set(np.flatnonzero((fold == 1) | (fold == 2) | (fold == -1)).tolist())

    # "fine-tuned" features equal to the run's own in every fold: the same figures as the frozen rows,
    # and the frozen head's the same as category_probe's on the same nested folds
    same = tmp_path / "same.npz"
    np.savez(same, **{f"fold{k}": np.asarray(emb, dtype=np.float32) for k in range(3)})
    assert finetune_probe.main(["--run", str(out), "--folds", "3", "--features", str(same)]) == 0
    rows = _table(capsys.readouterr().out)
    for name in ("head", "parametric", "per-category", "softcat", "category accuracy"):
        np.testing.assert_allclose(rows[f"fine-tuned {name}"], rows[f"frozen {name}"], atol=1e-9)
    assert category_probe.main(["--run", str(out), "--folds", "3", "--nested"]) == 0
    np.testing.assert_allclose(rows["frozen head"], _table(capsys.readouterr().out)["head"], atol=1e-9)

    # features that lack a fold, or have another row count: one clear error, exit 2
    np.savez(tmp_path / "short.npz", fold0=np.asarray(emb[:10], dtype=np.float32))
    assert finetune_probe.main(["--run", str(out), "--folds", "3", "--features", str(tmp_path / "short.npz")]) == 2
    assert "hold no fold1, fold2" in capsys.readouterr().err
    np.savez(tmp_path / "short3.npz", **{f"fold{k}": np.asarray(emb[:10], dtype=np.float32) for k in range(3)})
    assert finetune_probe.main(["--run", str(out), "--folds", "3", "--features", str(tmp_path / "short3.npz")]) == 2
    assert "wrong row count" in capsys.readouterr().err
    assert finetune_probe.main(["--run", str(out), "--features", str(tmp_path / "no_such.npz")]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_a_fine_tuned_encoder_comes_back_in_parts_and_embeds_a_run_as_the_device_did(tmp_path, shared_data, capsys):
    """finetune_export -> finetune_device --save-encoder (CPU smoke: 16 prompts, one epoch) ->
    finetune_import: the imported sentence-transformers folder reproduces the device's own vectors of the
    run's prompts, and ``cscr prepare --encoder`` embeds with it; altered parts are refused."""
    from cscr.cli import main as cscr

    rows = []
    with open(shared_data / "llmrouter" / "default_query_train.jsonl") as f:
        for i, line in zip(range(40), f, strict=False):
            item = json.loads(line)
            rows += [{"prompt_id": f"q{i}", "prompt": item["query"], "model": m, "category": item["task_name"],
                      "quality": float((i + k) % 3 == 0), "cost": 0.001 * (k + 1)} for k, m in enumerate(["a", "b"])]
    logs = tmp_path / "logs.jsonl"
    logs.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    run = tmp_path / "run"
    assert cscr(["prepare", "--dataset", "generic", "--option", f"file={logs}", "--probe-size", "4",
                 "--out", str(run)]) == 0
    assert cscr(["train", "--run", str(run), "--plain", "--epochs", "1", "--threads", "1"]) == 0  # descriptors
    data, dev = tmp_path / "ft", tmp_path / "dev"
    assert finetune_export.main(["--run", str(run), "--out", str(data / "r.npz"), "--weights", str(data / "m"),
                                 "--folds", "3"]) == 0
    assert finetune_device.main(["--model", str(data / "m"), "--data", str(data), "--out", str(dev), "--sets", "r",
                                 "--folds", "0", "--epochs", "1", "--smoke", "16", "--save-encoder"]) == 0
    log = json.loads((dev / "ft_log.json").read_text())
    assert log["r"]["encoder"]["parts"] and all((dev / p).stat().st_size <= 15 << 20 for p in log["r"]["encoder"]["parts"])
    capsys.readouterr()

    out = tmp_path / "minilm-ft"
    assert finetune_import.main(["--from", str(dev), "--set", "r", "--out", str(out), "--check-run", str(run)]) == 0
    low = float(capsys.readouterr().out.split("lowest cosine")[-1])
    assert low > 0.999
    # the fine-tuned weights differ from the base's: a run embedded with them gets other vectors
    ft = tmp_path / "run-ft"
    assert cscr(["prepare", "--dataset", "generic", "--option", f"file={logs}", "--probe-size", "4",
                 "--out", str(ft), "--encoder", str(out)]) == 0
    from cscr.encoder import load_run_embeddings

    base_v, ft_v = load_run_embeddings(run), load_run_embeddings(ft)
    assert base_v.shape == ft_v.shape and (base_v * ft_v).sum(1).min() < 0.9999

    # --top-layers 1: only the last layer trains (the states below it computed once); the rest comes back as it was
    dev1, out1 = tmp_path / "dev1", tmp_path / "minilm-top1"
    assert finetune_device.main(["--model", str(data / "m"), "--data", str(data), "--out", str(dev1), "--sets", "r",
                                 "--folds", "0", "--epochs", "1", "--smoke", "16", "--save-encoder",
                                 "--top-layers", "1"]) == 0
    assert "the last 1 layers over the kept states: min cosine" in capsys.readouterr().out
    assert finetune_import.main(["--from", str(dev1), "--set", "r", "--out", str(out1), "--check-run", str(run)]) == 0
    assert float(capsys.readouterr().out.split("lowest cosine")[-1]) > 0.999
    from safetensors.torch import load_file

    base_w, top_w = load_file(str(data / "m" / "model.safetensors")), load_file(str(out1 / "model.safetensors"))
    moved = {k for k in top_w if not base_w[k].half().float().equal(top_w[k])}  # the parts travel as float16
    assert moved and all(".layer.5." in f".{k}" for k in moved), sorted(moved)[:5]
    assert finetune_device.main(["--model", str(data / "m"), "--data", str(data), "--out", str(dev1), "--sets", "r",
                                 "--top-layers", "7"]) == 2

    # the encoder id (the embedding caches' key) names the weights: other weights at the same path, another id
    import shutil

    from safetensors.torch import load, save

    from cscr.config import EncoderConfig
    from cscr.encoder import default_model_path, encoder_id_for

    first = encoder_id_for(EncoderConfig(model=str(out)))
    state = load(finetune_import.join_parts(str(dev), "r"))
    state = {k: v * 2 if k.endswith("LayerNorm.bias") else v for k, v in state.items()}  # same names, sizes
    shutil.rmtree(out)
    finetune_import.write_folder(save(state), default_model_path(), str(out))
    assert encoder_id_for(EncoderConfig(model=str(out))) != first

    # refused with one line: an existing folder, an altered part, a set without an encoder
    assert finetune_import.main(["--from", str(dev), "--set", "r", "--out", str(out)]) == 2
    assert "exists" in capsys.readouterr().err
    part = dev / log["r"]["encoder"]["parts"][0]
    part.write_bytes(part.read_bytes()[:-1] + b"\0")
    assert finetune_import.main(["--from", str(dev), "--set", "r", "--out", str(tmp_path / "x")]) == 2
    assert "sha256" in capsys.readouterr().err and not (tmp_path / "x").exists()
    assert finetune_import.main(["--from", str(dev), "--set", "nope", "--out", str(tmp_path / "y")]) == 2
    assert "no encoder of 'nope'" in capsys.readouterr().err


def test_the_length_probe_reads_length_within_a_category_and_falls_back_to_the_table():
    """per_category_length: within each category, P(good) follows the feature that decides the answers;
    an expert with fewer than 10 answers in a category keeps the category's table value."""
    rng = np.random.default_rng(0)
    z_train = rng.normal(size=(200, 2))
    y_train = np.repeat([0, 1], 100)
    q = np.stack([(z_train[:, 0] > 0).astype(float), np.full(200, np.nan)], 1)  # expert 1: no answers
    q[:5, 1] = 1.0  # 5 answers: under 10
    qbar = np.array([[0.5, 0.9], [0.5, 0.8]])
    z = np.array([[2.0, 0.0], [-2.0, 0.0], [2.0, 0.0]])
    u = category_probe.per_category_length(z_train, y_train, q, z, np.array([0, 0, 1]), qbar)
    assert u[0, 0] > 0.8 and u[1, 0] < 0.2 and u[2, 0] > 0.8
    np.testing.assert_allclose(u[:, 1], [0.9, 0.9, 0.8])
    np.testing.assert_allclose(category_probe.length_features(["ab 12", ""]), np.log1p([[5, 2], [0, 0]]))


def test_prior_cv_scores_the_nested_folds_with_w_chosen_on_the_next_fold(run_dir, capsys, tmp_path):
    from cscr.guard import GATES
    from cscr.guard import GRID as GUARD_GRID
    from cscr.prior import GRID

    out, _ = run_dir
    assert category_probe.main(["--run", str(out), "--folds", "3", "--nested"]) == 0
    probe = _table(capsys.readouterr().out)
    assert prior_cv.main(["--run", str(out), "--folds", "3", "--guard", "--out", str(tmp_path / "p.json")]) == 0
    rows = _table(capsys.readouterr().out)
    # the same nested head and baseline on the same folds as the probe
    np.testing.assert_allclose(rows["head"], probe["head"], atol=1e-9)
    np.testing.assert_allclose(rows["per-category (given the label)"], probe["per-category"], atol=1e-9)
    # each fold scores the w its inner fold chose, one of the grid's
    for k, w in enumerate(rows["chosen w"][1:]):
        assert w in GRID
        assert rows["head + prior (w chosen)"][1 + k] == pytest.approx(rows[f"w={w}"][1 + k], abs=1e-9)
    np.testing.assert_allclose(rows["w=0.0"], rows["head"], atol=1e-12)
    # --guard: the guard each fold's search chose, on top of the head and its prior; no shrink leaves it as it was
    for share in ("1", "0.5"):
        tag = f"+ guard (far share {share})"
        for k, (w, gate) in enumerate(zip(rows[f"{tag}: w"][1:], rows[f"{tag}: gate"][1:], strict=True)):
            assert w in GUARD_GRID and gate in GATES
            if w == 0:
                assert rows[tag][1 + k] == pytest.approx(rows["head + prior (w chosen)"][1 + k], abs=1e-12)
        assert all(0.0 < v <= 1.0 for v in rows[tag])
    saved = json.loads((tmp_path / "p.json").read_text())
    assert saved["folds"] == 3 and len(saved["results"]["head"]) == 3


def test_newcomer_cv_scores_held_out_experts_off_on_and_as_chosen(run_dir, capsys, tmp_path):
    out, table = run_dir
    held = table.expert_names[-1]
    assert newcomer_cv.main(["--run", str(out), "--folds", "3", "--unseen", held, "--diagnostics",
                             "--more-probes", "16", "--out", str(tmp_path / "n.json")]) == 0
    printed = capsys.readouterr().out
    assert f"probe split: {len(table.split_index('probe')) + 16} prompts (16 moved from train)" in printed
    rows = _table(printed)
    for row in ("umr on probe answers", "off, means from probe", "off, means from probe + val",
                "on, means from probe"):  # --diagnostics
        assert len(rows[row]) == 4 and all(0.0 < v <= 1.0 for v in rows[row])
    for k, on in enumerate(rows["chosen: on"][1:]):  # the default is one of the two it chose between, per fold
        picked = rows["levels always on" if on else "levels off"][1 + k]
        assert rows["levels chosen (default)"][1 + k] == pytest.approx(picked, abs=1e-12)
    assert all(0.0 < v <= 1.0 for v in rows["umr"] + rows["levels off"])
    assert json.loads((tmp_path / "n.json").read_text())["folds"] == 3
    assert newcomer_cv.main(["--run", str(out), "--unseen", "gpt-9"]) == 2
    assert "unknown expert(s) ['gpt-9']" in capsys.readouterr().err
    assert newcomer_cv.main(["--run", str(out), "--unseen", held, "--more-probes", "-1"]) == 2
    assert "--more-probes must be in" in capsys.readouterr().err


def test_ceiling_cv_scores_the_prior_and_its_references_on_the_prior_cv_folds(run_dir, capsys):
    out, _ = run_dir
    assert prior_cv.main(["--run", str(out), "--folds", "3"]) == 0
    prior = _table(capsys.readouterr().out)
    assert ceiling_cv.main(["--run", str(out), "--folds", "3", "--lexical-dims", "8"]) == 0
    rows = _table(capsys.readouterr().out)
    # the same nested head, prior and per-category table on the same folds as prior_cv
    np.testing.assert_allclose(rows["head"], prior["head"], atol=1e-9)
    np.testing.assert_allclose(rows["head + prior (the default)"], prior["head + prior (w chosen)"], atol=1e-9)
    np.testing.assert_allclose(rows["per-category (given the label)"], prior["per-category (given the label)"], atol=1e-9)
    for name in ("head + prior reading lexical too", "head + true category", "neighbours within the true category"):
        assert all(0.0 < v <= 1.0 for v in rows[name]), name
    assert all(0.0 <= v <= 1.0 for v in rows["accuracy: MiniLM"] + rows["accuracy: + lexical"])


def test_the_neighbour_table_stays_within_a_category_and_shrinks_to_its_mean():
    feats = np.eye(4, dtype=np.float32)[[0, 0, 1, 1, 2, 2]]
    quality = np.array([[1.0], [1.0], [0.0], [0.0], [1.0], [0.0]])
    codes = np.array([0, 0, 1, 1, 0, 1])
    train, rows = np.arange(4), np.array([4, 5])
    qbar = np.array([[0.6], [0.2]])
    got = ceiling_cv.neighbour_table(feats, quality, codes, train, rows, qbar, 2, 0.0)
    assert got[:, 0] == pytest.approx([1.0, 0.0])  # each prompt's own category's neighbours only
    got = ceiling_cv.neighbour_table(feats, quality, codes, train, rows, qbar, 2, 2.0)
    assert got[:, 0] == pytest.approx([(2 * 1.0 + 2 * 0.6) / 4, (2 * 0.0 + 2 * 0.2) / 4])


def test_the_prompt_cost_probe_scores_each_router_as_it_routes_then_priced_per_prompt(run_dir, tmp_path):
    from cscr.eval.utility import utility_audc
    from cscr.runs.inputs import Run
    from cscr.runs.loader import load_router

    tokens = np.array([10.0, 20.0, 30.0, 40.0])  # the cost line: least squares per expert, train rows only
    cost = np.stack([2 + 3 * tokens, 5 * tokens, np.r_[1.0, 1.0, 1.0, 99.0]], axis=1)
    np.testing.assert_allclose(prompt_cost_probe.token_cost_model(tokens, cost, np.arange(3)), [[2, 0, 1], [3, 5, 0]],
                               atol=1e-9)
    out, table = run_dir
    # the per-prompt costs go on the routers' scale: a train row's cost over cost_scale averages to c_m
    train = table.split_index("train")
    np.testing.assert_allclose(table.cost[train].mean(axis=0) / table.cost_scale(), table.expert_costs(), rtol=1e-12)
    assert table.expert_costs().max() == 1.0
    assert prompt_cost_probe.main(["--run", str(out), "--routers", "cscr,per-category",
                                   "--out", str(tmp_path / "c.json")]) == 0
    (saved,) = json.loads((tmp_path / "c.json").read_text())
    val = table.split_index("val")
    rows = val[~np.isnan(table.quality[val]).any(axis=1)]
    assert saved["split"] == "val" and saved["n"] == len(rows)
    emb = Run.of(out).embeddings[rows]
    for name in ("cscr", "per-category"):
        r = load_router(out, name)
        cols = [table.expert_names.index(n) for n in r.expert_names]
        u, pen = r.scored(emb, rows)
        as_routed = utility_audc(list(r.expert_names), np.broadcast_to(pen, u.shape), u, emb,
                                 table.quality[rows][:, cols], table.cost[rows][:, cols])
        assert saved["routers"][name]["c_m"] == pytest.approx(as_routed, abs=1e-12)
        assert all(0.0 < v <= 1.0 for v in saved["routers"][name].values())


def test_refit_cv_scores_each_router_as_fitted_and_refitted_on_the_prior_cv_folds(run_dir, capsys, tmp_path):
    out, _ = run_dir
    assert prior_cv.main(["--run", str(out), "--folds", "3"]) == 0
    prior = _table(capsys.readouterr().out)
    assert refit_cv.main(["--run", str(out), "--folds", "3", "--out", str(tmp_path / "r.json")]) == 0
    rows = _table(capsys.readouterr().out)
    # the default rows are the routers as cscr train fits them: prior_cv's head with its prior, its table
    np.testing.assert_allclose(rows["cscr default"], prior["head + prior (w chosen)"], atol=1e-9)
    np.testing.assert_allclose(rows["per-category default"], prior["per-category (given the label)"], atol=1e-9)
    for name in ("cscr", "vanilla", "parametric", "per-category"):
        np.testing.assert_allclose(rows[f"{name}: refit gain"],
                                   np.subtract(rows[f"{name} refit"], rows[f"{name} default"]), atol=1e-4)
        assert all(0.0 < v <= 1.0 for v in rows[f"{name} refit"])
    for how in ("default", "refit"):
        np.testing.assert_allclose(rows[f"cscr {how} - parametric {how}"],
                                   np.subtract(rows[f"cscr {how}"], rows[f"parametric {how}"]), atol=1e-4)
    assert all(1 <= e <= 80 for e in rows["cscr: epochs"] + rows["parametric: epochs"])
    # the per-category table refitted is the table of train + validation: it reads more rows
    refit_table = refit_cv.merged(foldcv.fold_table(*_nested(out), 0, nested=True))
    assert len(refit_table.split_index("val")) == 0 and len(refit_table.split_index("test")) > 0
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["folds"] == 3 and len(saved["results"]["cscr refit"]) == 3
    assert refit_cv.main(["--run", str(tmp_path / "missing")]) == 2
    for script in (refit_cv, average_cv, prior_cv, epoch_choice_cv):  # nested: one fold scored, one chooses
        assert script.main(["--run", str(out), "--folds", "2"]) == 2


def test_average_cv_scores_averaged_heads_chosen_as_the_default_is(run_dir, capsys):
    out, _ = run_dir
    assert epoch_choice_cv.main(["--run", str(out), "--folds", "3"]) == 0
    chosen = float(capsys.readouterr().out.splitlines()[-1].split()[2])
    # an exponential average of decay 0 and a uniform one from the last epoch are the head itself
    assert average_cv.main(["--run", str(out), "--folds", "3", "--swa-from", "80,1", "--ema", "0"]) == 0
    rows = _table(capsys.readouterr().out)
    assert rows["default"][0] == pytest.approx(chosen, abs=5e-5)  # epoch_choice_cv's choice, the same training
    np.testing.assert_allclose(rows["ema decay=0"], rows["default"], atol=1e-9)
    np.testing.assert_allclose(rows["ema decay=0: epoch chosen"], rows["default: epoch chosen"], atol=1e-9)
    np.testing.assert_allclose(rows["ema decay=0 - default"], 0.0, atol=1e-9)
    assert rows["swa from epoch 80 on: epoch chosen"][1:] == [80.0, 80.0, 80.0]
    assert all(0.0 < v <= 1.0 for v in rows["swa from epoch 1 on"])
    for bad in (["--ema", "1.5"], ["--swa-from", "0"], ["--ema", "x"]):
        assert average_cv.main(["--run", str(out), *bad]) == 2
    assert average_cv.main(["--run", str(out.parent / "missing")]) == 2


def _nested(out):
    """(train + val of the run at ``out``, its rows, its 3 folds), as the nested scripts cut them."""
    d = foldcv.nested_inputs(str(out), 3, "test")
    assert d is not None
    return d.table, d.pool, d.folds
