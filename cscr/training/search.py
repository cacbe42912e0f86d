"""The hyperparameter search of ``cscr train --tune``: pure functions, no Ray (jobs/sweep.py runs it).

    trials = sample_trials(base, n, seed)        # trial 0 is ``base`` itself, the rest random draws
    cfg = trial_config(base, trials[i])           # the TrainConfig of one trial
    chosen = choose(rows)                         # the best validation AUDC among finished trials
    record = search_record(...)                   # what RUN/models/<variant>/tune.json holds

Every trial is scored on the VALIDATION split only (its best epoch's validation AUDC): the test
split plays no part in the search; ``cscr evaluate`` uses it once, afterwards. The space covers
the method's hyperparameters (SPEC.md section 4: bands, gamma, alpha, tau_min; the head width, the
epochs and the learning rate) and the quality head (beyond the write-up: ``bce_weight`` 0 keeps similarity
utilities, > 0 trains the quality map and routes on P(good)). The long-prompt mode is a property
of the run's embeddings (``cscr prepare --long-prompt``), chosen there, not here.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from cscr.config import ConfigError, TrainConfig

#: the search space: TrainConfig field (dotted) -> the values a trial draws from
SPACE: dict[str, tuple[Any, ...]] = {
    "loss.bands": (1, 2, 3, 5, 8),
    "loss.gamma": (0.0, 0.1, 0.2, 0.3, 0.5),
    "loss.alpha": (0.0, 0.1, 0.25, 0.5),
    "loss.tau_min": (0.02, 0.05, 0.08),
    "head.hidden": (384, 768, 1536),
    "epochs": (5, 10, 20, 40, 80),
    "lr": (2e-4, 5e-4, 1e-3, 3e-3),
    "loss.bce_weight": (0.0, 1.0, 4.0, 16.0, 64.0, 1000.0),
    "loss.category_smoothing": (0.0, 0.25, 0.5, 0.75),
}


def _get(cfg: TrainConfig, dotted: str) -> Any:
    obj: Any = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def trial_config(base: TrainConfig, values: Mapping[str, Any]) -> TrainConfig:
    """``base`` with the trial's values (dotted TrainConfig fields) set. ``loss.bce_weight`` > 0
    turns the quality head on (utility "quality"), 0 turns it off: the two go together, and 0
    turns a base's routing regret (``loss.regret_weight``) off with it."""
    top: dict[str, Any] = {}
    sub: dict[str, dict[str, Any]] = {"head": {}, "loss": {}, "index": {}}
    for key, value in values.items():
        section, _, name = key.rpartition(".")
        if section and section not in sub:
            raise ConfigError(f"unknown search parameter {key!r}; known: {sorted(SPACE)}")
        (sub[section] if section else top)[name] = value
    if "bce_weight" in sub["loss"]:
        quality_map = float(sub["loss"]["bce_weight"]) > 0
        sub["head"]["utility"] = "quality" if quality_map else "similarity"
        if not quality_map:
            sub["loss"]["regret_weight"] = 0.0  # the routing regret trains the quality map: none without it
    try:
        return dataclasses.replace(
            base, **top, head=dataclasses.replace(base.head, **sub["head"]),
            loss=dataclasses.replace(base.loss, **sub["loss"]), index=dataclasses.replace(base.index, **sub["index"]))
    except TypeError as exc:
        raise ConfigError(f"unknown search parameter in {sorted(values)}: {exc}") from exc


def sample_trials(base: TrainConfig, n: int, seed: int = 0,
                  space: Mapping[str, Sequence[Any]] | None = None) -> list[dict[str, Any]]:
    """``n`` trials (dicts of dotted field -> value): trial 0 is ``base`` (so the search never
    loses the starting point), the others independent uniform draws from ``space``, seeded;
    duplicates and configs the TrainConfig refuses are redrawn."""
    if n < 1:
        raise ConfigError(f"the search needs at least 1 trial, got {n}")
    space = dict(SPACE if space is None else space)
    rng = np.random.default_rng([seed, 10])
    first = {k: _get(base, k) for k in space}
    trials, seen = [first], {tuple(first.values())}
    for _ in range(200 * n):
        if len(trials) == n:
            break
        draw = {k: vals[int(rng.integers(len(vals)))] for k, vals in space.items()}
        key = tuple(draw.values())
        if key in seen:
            continue
        try:
            trial_config(base, draw)
        except ConfigError:
            continue
        trials.append(draw)
        seen.add(key)
    return trials


def choose(rows: Sequence[Mapping[str, Any]]) -> int:
    """Index of the row with the best validation AUDC among finished trials (ties: the earlier)."""
    ok = [(i, float(r["val_audc"])) for i, r in enumerate(rows)
          if r.get("status") == "ok" and r.get("val_audc") is not None and math.isfinite(float(r["val_audc"]))]
    if not ok:
        raise ConfigError("no search trial finished with a validation AUDC: nothing to choose")
    return max(ok, key=lambda t: (t[1], -t[0]))[0]


def search_record(rows: Sequence[Mapping[str, Any]], chosen: int, base: TrainConfig, seed: int,
                  n_val: int) -> dict[str, Any]:
    """The JSON record of a search: the space, every trial (values, val AUDC, status), the choice."""
    return {
        "criterion": "best validation AUDC of the trial's best epoch (the test split is not used)",
        "n_val_prompts": int(n_val), "seed": int(seed), "space": {k: list(v) for k, v in SPACE.items()},
        "base": dataclasses.asdict(base), "trials": [dict(r) for r in rows], "chosen_trial": int(chosen),
        "chosen": dict(rows[chosen]["values"]),
        "chosen_config": dataclasses.asdict(trial_config(base, rows[chosen]["values"])),
    }


def trials_table(rows: Sequence[Mapping[str, Any]], chosen: int) -> str:
    """A plain-text table of the trials, one line each, the chosen one marked."""
    keys = list(SPACE)
    head = "  ".join(f"{k.split('.')[-1]:>10}" for k in keys)
    lines = [f"{'':2}{'#':>3}  {head}  {'val AUDC':>9}  status"]
    for i, r in enumerate(rows):
        vals = "  ".join(f"{r['values'].get(k, ''):>10}" for k in keys)
        audc = "n/a" if r.get("val_audc") is None else f"{float(r['val_audc']):.4f}"
        lines.append(f"{'*' if i == chosen else '':2}{i:>3}  {vals}  {audc:>9}  {r.get('status', '?')}")
    return "\n".join(lines)
