"""The descriptor-conditioned quality head (beyond the write-up): training with InfoNCE + BCE, the
router's P(good) utilities, save/load, a new expert by its descriptor alone; the smoothed choice of
the best epoch."""

from __future__ import annotations

import numpy as np
import pytest

from cscr.config import ConfigError, HeadConfig, LossConfig, TrainConfig
from cscr.fingerprints.probe_outcome import probe_outcome_descriptors
from cscr.routers.cscr import CSCRRouter
from cscr.runs.heads import load_trained, save_trained
from cscr.synthetic import synthetic_table
from cscr.training import fit_head, prepare_arrays, validation_audc

QUALITY = TrainConfig(epochs=4, batch_size=128, head=HeadConfig(utility="quality"), loss=LossConfig(bce_weight=1.0))


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
    plain = fit_head(arrays, TrainConfig(epochs=1, batch_size=128), "cscr", log=None)
    with pytest.raises(ValueError, match="no quality map"):
        plain.head.logits(*[np.zeros(1)] * 2)  # type: ignore[arg-type]


def test_quality_utility_and_bce_weight_go_together():
    with pytest.raises(ConfigError, match="go together"):
        TrainConfig(head=HeadConfig(utility="quality"))
    with pytest.raises(ConfigError, match="go together"):
        TrainConfig(loss=LossConfig(bce_weight=0.5))
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
