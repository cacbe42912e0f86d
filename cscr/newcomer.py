"""Newcomer levels: an expert that joins after training, calibrated on its probe outcomes
(beyond the write-up, labelled so).

A probe-outcome descriptor (cscr/fingerprints/probe_outcome.py) is the expert's quality on the N
probe prompts *standardised* per expert, so it says which probes the expert does better or worse
on, not how good it is overall; the head's expected quality for an expert it was not trained on
therefore has the right shape but a borrowed level and slope. The probe outcomes the descriptor is
made from fix that without retraining anything: a two-parameter Platt map on the logit of the
head's expected quality, fitted on the newcomer's own probe prompts,

    u'(x, m) = sigmoid(a_m * logit(u(x, m)) + b_m)     (a_m >= 0: the map never reverses the order)

Experts the head was trained on keep their utilities (their level was learned from their answers).

Whether a router uses the maps is chosen over the experts the head was trained on, the test split
unread (``choose_levels``): ``TrainConfig.newcomer_draws`` times, a third of them (drawn as the
unseen-experts experiment draws its held-out experts: stratified by cost, seeded) play newcomers, a
head is trained on the rest, and the AUDC over the pseudo-newcomers on the train and validation
prompts (their answers there are ones that head never read) is compared with and without their maps;
the maps are used when the draws gain on average. The draws and gains are recorded.

By nested 5-fold CV on train + val (``scripts/newcomer_cv.py``, docs/routing-quality.md) the maps
always on lift CSCR over experts that join later on RouterBench (0.7733 -> 0.7999; UMR, which reads
each newcomer's validation answers, 0.7915) and lower it on LLMRouter (0.6014 -> 0.5983): hence the
choice (0.7999 and 0.5994 as chosen from six draws; 0.7929 and 0.5996 from three).

``cscr train`` makes the same choice for the run's own pool and records it (``save_choice``:
``models/<variant>/newcomer_levels.json``); serving calibrates an expert added with probe outcomes only
where the record says so (``cscr.runs.loader.attach_probes``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cscr.atomic import atomic_write_json
from cscr.calibration import logistic_fit

FILE = "newcomer_levels.json"  # models/<variant>/: the choice ``cscr train`` made over the run's experts
EPS = 1e-4  # utilities are clipped to [EPS, 1 - EPS] before the logit


def _logit(u: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(u, dtype=np.float64), EPS, 1.0 - EPS)
    return np.log(p / (1.0 - p))  # type: ignore[no-any-return]


def as_outcomes(values: Any) -> np.ndarray:
    """Probe outcomes as (R,) floats, NaN where not answered (None or NaN); ValueError unless every
    answered one is a number in [0, 1]. The one check of outcome values (the router's, the fit's)."""
    try:
        y = np.array([np.nan if v is None else float(v) for v in np.asarray(values, dtype=object).ravel()])
    except (TypeError, ValueError) as exc:
        raise ValueError(f"probe outcomes must be numbers in [0, 1] or null: {exc}") from exc
    known = y[~np.isnan(y)]
    if not np.isfinite(known).all() or (known < 0).any() or (known > 1).any():
        raise ValueError("probe outcomes must be numbers in [0, 1] or null")
    return y


def fit_level(u_probe: np.ndarray, outcomes: np.ndarray) -> tuple[float, float] | None:
    """(a, b) of the Platt map from the head's expected qualities ``u_probe`` (R,) of one expert on
    the probe prompts to its outcomes there (R,), NaN = missing; None when fewer than two probes have
    both, or the outcomes do not vary (no slope to fit)."""
    u = np.asarray(u_probe, dtype=np.float64)
    if u.ndim != 1 or np.shape(outcomes) != u.shape:
        raise ValueError(f"probe utilities and outcomes must be (R,) alike, got {u.shape} and {np.shape(outcomes)}")
    y = as_outcomes(outcomes)
    ok = np.isfinite(u) & ~np.isnan(y)
    if ok.sum() < 2 or np.ptp(y[ok]) == 0:
        return None
    a, b = logistic_fit(_logit(u[ok]), y[ok])
    return float(a), float(b)


def apply_level(u: np.ndarray, level: tuple[float, float]) -> np.ndarray:
    """One expert's utilities (n,) through its map; -inf (outside the top-k) stays -inf."""
    u = np.asarray(u, dtype=np.float64)
    out = u.copy()
    ok = np.isfinite(u)
    a, b = level
    out[ok] = 1.0 / (1.0 + np.exp(-(a * _logit(u[ok]) + b)))
    return out


@dataclass
class LevelChoice:
    """Whether routers of a head calibrate newcomers on their probe outcomes, and why."""

    use: bool
    gains: list[float] = field(default_factory=list)  # AUDC gain per pseudo-newcomer draw (train + val prompts)
    draws: list[list[str]] = field(default_factory=list)  # the pseudo-newcomers of each draw
    why: str = ""
    over: str = ""  # what the gains were scored over: the pseudo-newcomers alone, or the pool they join

    def record(self) -> dict[str, Any]:
        return {"use": self.use, "gains": self.gains, "draws": self.draws, "why": self.why, "over": self.over,
                "how": "u' = sigmoid(a logit(u) + b) per newcomer, fitted on its probe outcomes; used when the "
                       "pseudo-newcomer draws gain on average (AUDC on the train and validation prompts)"}


def choose_levels(gain_of: Callable[[list[str]], float | None], picks: Sequence[Sequence[str]]) -> LevelChoice:
    """The choice from pseudo-newcomer draws ``picks`` among the experts a head was trained on:
    ``gain_of(held_out)`` trains a head without ``held_out`` and returns the AUDC gain of their maps
    (None: the draw cannot be scored: no prompts to score, no probe answers, or no head trains without it)."""
    if not picks:
        return LevelChoice(False, why="fewer than 2 trained experts: nobody to play a newcomer")
    held = [list(d) for d in picks]
    gains = [gain_of(d) for d in held]
    if any(g is None for g in gains):
        return LevelChoice(False, [], held, "a draw could not be scored (no prompts to score, no probe answers, or "
                                            "no head trains without it)")
    got = [float(g) for g in gains if g is not None]
    use = float(np.mean(got)) > 0
    return LevelChoice(use, got, held, "the draws gain on average" if use else "the draws do not gain on average")


def save_choice(model_dir: str | os.PathLike[str], choice: LevelChoice) -> Path:
    """Write ``model_dir/newcomer_levels.json`` (the choice and its evidence) atomically."""
    return atomic_write_json(Path(model_dir) / FILE, choice.record())


def load_choice(model_dir: str | os.PathLike[str]) -> LevelChoice | None:
    """The choice ``cscr train`` recorded for a head (None: it recorded none: a run trained before,
    ``newcomer_levels`` false, or a similarity head); ValueError for a record that is not one."""
    path = Path(model_dir) / FILE
    if not path.exists():
        return None
    try:
        rec = json.loads(path.read_text())
        if not isinstance(rec, dict) or not isinstance(rec.get("use"), bool):
            raise ValueError("no boolean 'use'")
        return LevelChoice(rec["use"], [float(g) for g in rec.get("gains", [])],
                           [list(map(str, d)) for d in rec.get("draws", [])], str(rec.get("why", "")),
                           str(rec.get("over", "")))
    except (OSError, ValueError, TypeError) as exc:
        raise ValueError(f"{path}: not a newcomer-level record ({exc}; retrain the head, or remove the file)") from exc
