"""The descriptor-conditioned quality head (beyond the write-up): training with InfoNCE + BCE, the
router's P(good) utilities, save/load, a new expert by its descriptor alone; the smoothed choice of
the best epoch."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from cscr.config import ConfigError, HeadConfig, LossConfig, TrainConfig
from cscr.fingerprints.probe_outcome import probe_outcome_descriptors
from cscr.routers.cscr import CSCRRouter
from cscr.runs.heads import load_trained, save_trained
from cscr.synthetic import synthetic_table
from cscr.training import fit_head, prepare_arrays, validation_audc

QUALITY = TrainConfig(epochs=4, batch_size=128, lr=5e-4, head=HeadConfig(utility="quality"), loss=LossConfig(bce_weight=1.0))


@pytest.fixture(scope="module")
def synth():
    table, emb, _ = synthetic_table(n=800, n_experts=5, seed=2, probe_size=64)
    arrays = prepare_arrays(table, emb, probe_outcome_descriptors(table))
    return table, emb, arrays


@pytest.fixture(scope="module")
def quality(synth):
    return fit_head(synth[2], QUALITY, "cscr", log=None)


def _router(res, arrays, k=0):
    return CSCRRouter.from_trained(res, dict(zip(arrays.expert_names, arrays.descriptors, strict=True)),
                                   dict(zip(arrays.expert_names, arrays.costs, strict=True)), top_k=k, use_gpu=False)


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def test_quality_utilities_are_the_sigmoid_of_the_descriptor_conditioned_map(synth, quality):
    _, _, arrays = synth
    head = quality.head
    assert quality.config.head.utility == "quality" and quality.config.loss.bce_weight == 1.0
    u = _router(quality, arrays).utilities(arrays.val_x)
    q = head.encode(arrays.val_x)
    a, b = head.quality_map(arrays.descriptors)
    np.testing.assert_allclose(u, _sigmoid(a * (q @ arrays.descriptors.T) + b[None, :]), rtol=1e-5, atol=1e-6)
    assert ((u > 0) & (u < 1)).all()
    # top-k keeps the k most similar experts: the others are -inf
    u2 = _router(quality, arrays, k=2).utilities(arrays.val_x)
    assert (np.isfinite(u2).sum(axis=1) == 2).all()
    # the trained map is in quality units: the mean P(good) on validation is near the observed rate
    assert abs(u.mean() - arrays.val_quality.mean()) < 0.1, (u.mean(), arrays.val_quality.mean())
    # and it routes better than chance on validation (the validator uses the same router)
    assert quality.best_val_audc == pytest.approx(validation_audc(head, arrays, 0))
    assert quality.history[-1]["train_loss"] < quality.history[0]["train_loss"]


def test_a_new_expert_joins_by_its_descriptor_alone(synth, quality):
    _, _, arrays = synth
    names = arrays.expert_names
    seen = dict(zip(names[:-1], arrays.descriptors[:-1], strict=True))
    router = CSCRRouter.from_trained(quality, seen, dict(zip(names, arrays.costs, strict=True)), use_gpu=False)
    router.add_expert(names[-1], arrays.descriptors[-1], float(arrays.costs[-1]))
    full = _router(quality, arrays).utilities(arrays.val_x)
    np.testing.assert_allclose(router.utilities(arrays.val_x), full, rtol=1e-5, atol=1e-6)


def test_save_load_keeps_the_quality_map_and_old_heads_score_similarities(tmp_path, synth, quality):
    _, _, arrays = synth
    save_trained(tmp_path / "run", quality)
    back = load_trained(tmp_path / "run", "cscr")
    assert back.config.head.utility == "quality" and back.head.cfg.utility == "quality"
    np.testing.assert_allclose(_router(back, arrays).utilities(arrays.val_x),
                               _router(quality, arrays).utilities(arrays.val_x), rtol=1e-6, atol=1e-7)
    # a head config written before the option existed has no "utility": it scores similarities
    old = {k: v for k, v in TrainConfig.from_nested({}).head.__dict__.items() if k != "utility"}
    assert HeadConfig(**old).utility == "similarity"
    plain = fit_head(arrays, TrainConfig(epochs=1, batch_size=128, head=HeadConfig(), loss=LossConfig(bce_weight=0.0)), "cscr", log=None)
    with pytest.raises(ValueError, match="no single quality map"):
        plain.head.logits(*[np.zeros(1)] * 2)  # type: ignore[arg-type]


def test_quality_utility_follows_the_bce_weight_and_old_records_mean_similarity():
    # the head's utility follows the BCE weight (the quality map is trained by it)
    assert TrainConfig(head=HeadConfig(utility="quality"), loss=LossConfig(bce_weight=0.0)).head.utility == "similarity"
    assert TrainConfig(head=HeadConfig(), loss=LossConfig(bce_weight=0.5)).head.utility == "quality"
    with pytest.raises(ConfigError, match="bce_weight must be >= 0"):
        LossConfig(bce_weight=-1.0)
    # the defaults: the quality head (chosen on validation); a record without the fields: similarity
    d = TrainConfig()
    assert (d.head.utility, d.loss.bce_weight, d.lr, d.batch_size, d.epochs) == ("quality", 1000.0, 3e-3, 128, 80)
    assert (d.head.query_map, d.head.dropout, d.loss.category_smoothing) == (True, 0.1, 0.75)
    old = TrainConfig.from_nested({"head": {"hidden": 384}, "loss": {"gamma": 0.2}})
    assert (old.head.utility, old.loss.bce_weight) == ("similarity", 0.0)
    assert (old.head.query_map, old.head.dropout, old.loss.category_smoothing) == (False, 0.0, 0.0)
    assert TrainConfig.from_nested(dataclasses.asdict(d)) == d
    with pytest.raises(ConfigError, match="utility must be"):
        HeadConfig(utility="odds")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="select_window"):
        TrainConfig(select_window=0)


def test_the_vanilla_variant_keeps_the_quality_head(synth):
    res = fit_head(synth[2], QUALITY.__class__(**{**QUALITY.__dict__, "epochs": 1}), "vanilla", log=None)
    assert res.config.loss.bands == 1 and res.config.loss.bce_weight == 1.0 and res.head.cfg.utility == "quality"


def test_the_best_epoch_is_chosen_on_the_trailing_mean_of_validation(synth):
    _, _, arrays = synth
    scores = iter([0.5, 0.9, 0.1, 0.7, 0.72])  # single best: epoch 2; trailing mean of 2: epoch 5 (0.71)
    res = fit_head(arrays, TrainConfig(epochs=5, batch_size=128, select_window=2), "cscr", log=None,
                   validate=lambda head: next(scores))
    assert [h["val_select"] for h in res.history] == pytest.approx([0.5, 0.7, 0.5, 0.4, 0.71])
    assert res.best_epoch == 5 and res.best_val_audc == 0.72
    scores = iter([0.5, 0.9, 0.1, 0.7, 0.72])
    single = fit_head(arrays, TrainConfig(epochs=5, batch_size=128), "cscr", log=None, validate=lambda h: next(scores))
    assert single.best_epoch == 2


def test_the_unseen_experts_experiment_runs_on_the_quality_head():
    from cscr.config import EvalConfig
    from cscr.experiments.unseen import run_unseen

    table, emb, _ = synthetic_table(n=600, n_experts=6, seed=1, probe_size=48)
    names = table.expert_names
    cfg = TrainConfig(epochs=2, batch_size=128, head=HeadConfig(utility="quality"), loss=LossConfig(bce_weight=4.0))
    res = run_unseen(table, emb, ["cscr", "umr"], names[:4], names[4:], cfg, EvalConfig(n_lambdas=50, bootstrap=20))
    audc = res.evaluation.routers["cscr"].audc
    assert 0.0 < audc <= 1.0 and res.unseen == names[4:]


@pytest.mark.parametrize("utility", ["similarity", "quality"])
def test_an_ensemble_averages_its_members_logits_in_one_search(synth, tmp_path, utility):
    _, _, arrays = synth
    w = 2.0 if utility == "quality" else 0.0
    cfg = TrainConfig(epochs=2, batch_size=128, head=HeadConfig(utility=utility, members=3),  # type: ignore[arg-type]
                      loss=LossConfig(bce_weight=w))
    res = fit_head(arrays, cfg, "cscr", log=None)
    parts = res.head.parts()
    assert len(parts) == 3 and res.head.cfg.members == 3
    qs = [p.encode(arrays.val_x) for p in parts]
    assert not np.allclose(qs[0], qs[1])  # members start from their own initialisations
    d = arrays.descriptors
    if utility == "quality":
        want = _sigmoid(np.mean([p.quality_map(d)[0] * (q @ d.T) + p.quality_map(d)[1][None, :]
                                 for p, q in zip(parts, qs, strict=True)], axis=0))
    else:
        want = np.mean([q @ d.T for q in qs], axis=0)
    u = _router(res, arrays).utilities(arrays.val_x)
    np.testing.assert_allclose(u, want, rtol=1e-4, atol=1e-5)
    save_trained(tmp_path / "run", res)
    back = load_trained(tmp_path / "run", "cscr")
    np.testing.assert_allclose(_router(back, arrays).utilities(arrays.val_x), u, rtol=1e-6, atol=1e-7)


def test_category_smoothing_shrinks_the_bce_targets_towards_the_category_means(synth):
    from cscr.training.loop import bce_targets

    table, _, arrays = synth
    train = table.split_index("train")
    # the category means are over the whole train split (prompts without a positive included)
    cats = table.categories[train]
    keep = ~np.isnan(table.quality[train]).all(axis=1) & (np.nan_to_num(table.quality[train]) > 0).any(axis=1)
    assert arrays.category_quality is not None and arrays.category_quality.shape == arrays.quality.shape
    first = cats[keep][0]
    expect = np.nanmean(table.quality[train][cats == first], axis=0)
    np.testing.assert_allclose(arrays.category_quality[0], expect, rtol=1e-5)
    assert len({tuple(r) for r in np.round(arrays.category_quality, 6)}) == len(set(cats[keep]))
    np.testing.assert_array_equal(bce_targets(arrays, 0.0), arrays.quality)
    np.testing.assert_allclose(bce_targets(arrays, 1.0), arrays.category_quality)
    half = bce_targets(arrays, 0.5)
    np.testing.assert_allclose(half, 0.5 * arrays.quality + 0.5 * arrays.category_quality, rtol=1e-6)
    with pytest.raises(ConfigError, match="category_smoothing"):
        LossConfig(category_smoothing=1.5)
    # a smoothed head trains and still routes by its quality map
    cfg = dataclasses.replace(QUALITY, loss=LossConfig(bce_weight=1.0, category_smoothing=0.5))
    res = fit_head(arrays, cfg, "cscr", log=None)
    assert res.config.loss.category_smoothing == 0.5 and res.best_val_audc is not None
    u = _router(res, arrays).utilities(arrays.val_x)
    assert ((u > 0) & (u < 1)).all()


def test_the_auxiliary_category_task_teaches_the_query_the_category_and_routing_ignores_it(synth, tmp_path):
    import torch

    table, _, arrays = synth
    names = arrays.meta["categories"]
    assert arrays.category_ids is not None and len(names) > 1
    train = table.split_index("train")
    np.testing.assert_array_equal(np.asarray(names)[arrays.category_ids][:5], table.categories[train][:5])
    with pytest.raises(ConfigError, match="category_weight"):
        LossConfig(category_weight=-0.1)
    # off by default, and a record written before the option has none
    assert TrainConfig().loss.category_weight == 0.0 and TrainConfig.from_nested({}).head.categories == 0
    assert fit_head(arrays, dataclasses.replace(QUALITY, epochs=1), "cscr", log=None).head.cfg.categories == 0
    cfg = dataclasses.replace(QUALITY, epochs=8, loss=dataclasses.replace(QUALITY.loss, category_weight=1.0))
    res = fit_head(arrays, cfg, "cscr", log=None)
    assert res.head.cfg.categories == len(names)
    res.head.eval()
    with torch.no_grad():  # the classifier reads the unit query q (the routing query is P q)
        pred = res.head.category_logits(res.head(torch.from_numpy(arrays.x[:400]))).argmax(1).numpy()
    # the classifier learned the categories (chance: 1 / len(names))
    assert (pred == arrays.category_ids[:400]).mean() > 0.9  # (near chance, 0.28, at weight 1e-4)
    # the vanilla ablation keeps the task; save / load keeps the classifier (the state dict loads)
    assert fit_head(arrays, dataclasses.replace(cfg, epochs=1), "vanilla", log=None).config.loss.category_weight == 1.0
    save_trained(tmp_path / "run", res)
    back = load_trained(tmp_path / "run", "cscr")
    assert back.head.cfg.categories == len(names)
    np.testing.assert_allclose(_router(back, arrays).utilities(arrays.val_x), _router(res, arrays).utilities(arrays.val_x),
                               rtol=1e-6, atol=1e-7)


def test_the_routing_regret_trains_the_quality_map_and_is_off_by_default(synth, quality, tmp_path):
    _, _, arrays = synth
    assert TrainConfig().loss.regret_weight == 0.0 and TrainConfig.from_nested({}).loss.regret_weight == 0.0
    with pytest.raises(ConfigError, match="regret_weight must be"):
        LossConfig(regret_weight=-1.0)
    with pytest.raises(ConfigError, match="regret_temperature"):
        LossConfig(regret_temperature=0.0)
    with pytest.raises(ConfigError, match="needs the quality map"):
        LossConfig(bce_weight=0.0, regret_weight=1.0)
    cfg = dataclasses.replace(QUALITY, loss=dataclasses.replace(QUALITY.loss, regret_weight=5.0))
    res = fit_head(arrays, cfg, "cscr", log=None)
    assert res.config.loss.regret_weight == 5.0 and res.best_val_audc is not None
    # the same seed and schedule without it give another head: the term is in the loss
    assert res.history[0]["train_loss"] != pytest.approx(quality.history[0]["train_loss"])
    u = _router(res, arrays).utilities(arrays.val_x)
    assert ((u > 0) & (u < 1)).all()
    save_trained(tmp_path / "run", res)  # the record keeps the setting
    assert load_trained(tmp_path / "run", "cscr").config.loss.regret_weight == 5.0
    # it scores a choice by the recorded quality, or by the BCE's smoothed targets
    from cscr.training.loop import Tensors, bce_targets

    with pytest.raises(ConfigError, match="regret_on"):
        LossConfig(regret_on="oracle")  # type: ignore[arg-type]
    assert cfg.loss.category_smoothing > 0 and not np.array_equal(bce_targets(arrays, cfg.loss.category_smoothing),
                                                                  bce_targets(arrays, 0.0))
    for on, smoothing in (("recorded", 0.0), ("targets", cfg.loss.category_smoothing)):
        loss = dataclasses.replace(cfg.loss, regret_on=on)
        outcome = Tensors.of(arrays, dataclasses.replace(cfg, loss=loss)).outcome
        assert outcome is not None
        np.testing.assert_array_equal(outcome.numpy(), bce_targets(arrays, smoothing))
    assert Tensors.of(arrays, QUALITY).outcome is None  # off: not built
