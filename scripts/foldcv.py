"""The K folds the cross-validation scripts share (cv_grid.py, category_probe.py, lexical_cv.py).

Train + val are cut into K folds by one fixed permutation, so every script scores its rows on the
same folds and their figures compare; the test split is never read.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import numpy as np

SEED = 12345  # the permutation every script's folds come from


def make_folds(table: Any, k: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """(train + val rows, their K folds)."""
    pool = table.split_index("train", "val")
    return pool, np.array_split(np.random.default_rng(SEED).permutation(pool), k)


def fold_table(table: Any, pool: np.ndarray, folds: list[np.ndarray], k: int, nested: bool = False) -> Any:
    """``table`` with train + val relabelled: fold ``k`` the validation split, the rest train (the
    fold that is scored also picks the head's best epoch: optimistic for the head). With ``nested``
    fold ``k`` is the test split and the next fold the validation split, so every choice a router
    makes is made on another fold than the one it is scored on (the unseen-experts experiment's
    layout). A nested table should hold no real test rows (``without_test``)."""
    t = copy.copy(table)
    sp = table.splits.copy()
    sp[pool] = "train"
    if nested:
        sp[folds[k]], sp[folds[(k + 1) % len(folds)]] = "test", "val"
    else:
        sp[folds[k]] = "val"
    t.splits = sp
    return t


def without_test(table: Any, emb: np.ndarray) -> tuple[Any, np.ndarray]:
    """``table`` and its features without the real test rows (never read by cross-validation)."""
    keep = np.flatnonzero(table.splits != "test")
    return table.subset(keep), np.asarray(emb)[keep]


@dataclass
class NestedInputs:
    """What a nested-CV script reads from a run: train + val (no real test rows), the trained
    descriptors (``desc``, their ``kind`` and ``basis``) and the K folds of train + val."""

    run: Any
    table: Any
    emb: np.ndarray
    desc: Any
    kind: str
    basis: Any
    pool: np.ndarray
    folds: list[np.ndarray]


def nested_inputs(run_dir: str, k: int, script: str) -> NestedInputs | None:
    """The run at ``run_dir`` cut into ``k`` folds, or None after one clear error on stderr (fewer
    than 3 folds: one scored, one validating, the rest training; a run without trained descriptors;
    ``script`` names the caller)."""
    import sys

    from cscr.runs.inputs import Run

    if k < 3:
        print(f"{script}: nested cross-validation needs at least 3 folds (one scored, one for the "
              f"choices, the rest to train on), got {k}", file=sys.stderr)
        return None
    run = Run.of(run_dir)
    try:
        desc, kind, basis = run.trained_descriptors()
    except FileNotFoundError as exc:
        print(f"{script}: {exc}", file=sys.stderr)
        return None
    table, emb = without_test(run.table, run.embeddings)
    pool, folds = make_folds(table, k)
    return NestedInputs(run, table, emb, desc, kind, basis, pool, folds)


def fold_validators(t: Any, d: NestedInputs, cfg: Any) -> tuple[Any, Any, Any]:
    """(the head's training arrays of nested fold table ``t``, ``choose``, ``score``): ``choose(head)``
    is the validation AUDC on ``t``'s validation fold (what ``cscr train`` picks an epoch by),
    ``score(head)`` the AUDC on its scored fold, the same training rows behind both."""
    from cscr.training.arrays import prepare_arrays
    from cscr.training.validation import audc_validator

    arrays = prepare_arrays(t, d.emb, d.desc, cfg.loss.tolerance, d.kind, d.basis)
    held = copy.copy(t)  # the same training rows, the scored fold as the validation split
    sp = t.splits.copy()
    sp[t.split_index("val")], sp[t.split_index("test")] = "test", "val"
    held.splits = sp
    scored = prepare_arrays(held, d.emb, d.desc, cfg.loss.tolerance, d.kind, d.basis)
    return arrays, audc_validator(arrays, cfg.index.top_k), audc_validator(scored, cfg.index.top_k)


def scored_rows(t: Any, nested: bool = False) -> np.ndarray:
    """The rows a fold is scored on: its validation split (nested: its test split), those with
    every expert's outcome known."""
    rows = t.split_index("test" if nested else "val")
    return rows[~np.isnan(t.quality[rows]).any(axis=1)]


def json_object(text: str, what: str) -> dict[str, Any] | None:
    """``text`` read as a JSON object, or None after one clear error on stderr (``what``: the script
    and flag, e.g. ``cv_grid: --configs``)."""
    import json
    import sys

    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        print(f"{what} is not JSON: {exc}", file=sys.stderr)
        return None
    if not isinstance(value, dict):
        print(f"{what} must be a JSON object, not {type(value).__name__}", file=sys.stderr)
        return None
    return value


def print_fold(k: int, res: dict[str, list[float]], started: float) -> None:
    """Fold ``k``'s line: every row's latest value, then the seconds since ``started``."""
    import time

    print(f"fold {k}: " + "  ".join(f"{n} {v[-1]:.4f}" for n, v in res.items()) + f"  {time.time() - started:.0f} s",
          flush=True)


def print_results(res: dict[str, list[float]], run: Any, folds: int, out: str | None, width: int = 30) -> None:
    """One line per row of ``res`` (its mean over the folds, then each fold's); with ``out``, the
    results as JSON there too."""
    import json

    for name, vals in res.items():
        print(f"{name:{width}s} {np.mean(vals):.4f}   {' '.join(f'{v:.4f}' for v in vals)}")
    if out:
        with open(out, "w") as f:
            json.dump({"run": str(run), "folds": folds, "results": res}, f, indent=1)


def train_config(over: dict[str, Any]) -> Any:
    """The default TrainConfig with ``over``'s dotted fields (``{"loss.bce_weight": 16.0}``) replaced."""
    import dataclasses

    from cscr.config import TrainConfig

    d = dataclasses.asdict(TrainConfig())
    for key, value in over.items():
        section, _, name = key.rpartition(".")
        (d[section] if section else d)[name] = value
    return TrainConfig.from_nested(d)


def head_router(t: Any, emb: np.ndarray, desc: Any, kind: str, basis: Any, cfg: Any = None) -> Any:
    """The CSCR head (``cfg``, default TrainConfig()) trained on ``t``'s train split (best epoch on its
    val split), as a router."""
    from cscr.config import TrainConfig
    from cscr.training.arrays import prepare_arrays
    from cscr.training.fit import fit_head

    cfg = cfg or TrainConfig()
    arrays = prepare_arrays(t, emb, desc, cfg.loss.tolerance, kind, basis)
    return arrays_router(arrays, fit_head(arrays, cfg, log=None))


def arrays_router(arrays: Any, result: Any) -> Any:
    """The CSCR router of a trained head (``fit_head``'s result) over the experts of its training
    ``arrays``, with their descriptors and normalised costs."""
    from cscr.routers.cscr import CSCRRouter

    return CSCRRouter.from_trained(result, dict(zip(arrays.expert_names, arrays.descriptors, strict=True)),
                                   dict(zip(arrays.expert_names, arrays.costs, strict=True)), use_gpu=False)
