"""Does the head's epoch choice pay? Nested K-fold cross-validation on train + val (the test split is never read).

For each fold k the default CSCR head (cscr.config.TrainConfig, with ``--config`` fields over it) is
trained on the other folds but k + 1, and scored on fold k after every epoch. Two figures per fold:
at the epoch the inner validation fold (k + 1) picks (what ``cscr train`` does with its validation
split), and after the fixed number of epochs with no choice made. One training per fold: each
epoch is validated on fold k + 1 (the choice) and scored on fold k, so both come from one trajectory.

``--patience 10,20,30`` adds early stopping: training stops once the inner fold's AUDC has not risen
for P epochs, and the best epoch so far is kept. Nothing in an epoch depends on the epochs after it,
so a stopped run is a prefix of the full trajectory and every P is read from the same training.

    python scripts/epoch_choice_cv.py --run runs/rb [--config '{"loss.bce_weight": 16.0}'] [--folds 5] [--patience 20]

Prints one line per fold and the means, with the fold-averaged curve.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv: list[str] | None = None) -> int:
    from foldcv import fold_table, fold_validators, json_object, nested_inputs, train_config

    from cscr.training.fit import fit_head

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True)
    p.add_argument("--config", default="{}", help="JSON {dotted TrainConfig field: value} over the defaults")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--patience", default="", help="comma-separated P: also score stopping after P epochs without a gain")
    a = p.parse_args(argv)
    try:
        patiences = [int(v) for v in a.patience.split(",") if v.strip()]
    except ValueError:
        patiences = [0]
    if any(v < 1 for v in patiences):
        print(f"epoch_choice_cv: --patience must be positive integers, got {a.patience!r}", file=sys.stderr)
        return 2
    over = json_object(a.config, "epoch_choice_cv: --config")
    if over is None:
        return 2
    cfg = train_config(over)

    d = nested_inputs(a.run, a.folds, "epoch_choice_cv")
    if d is None:
        return 2

    chosen, curves = [], []
    stopped: dict[int, list[tuple[float, int]]] = {v: [] for v in patiences}  # P -> (score, epochs trained) per fold
    for k in range(a.folds):
        t = fold_table(d.table, d.pool, d.folds, k, nested=True)  # fold k test, fold k + 1 val
        arrays, choose, score = fold_validators(t, d, cfg)
        scored: list[float] = []

        def validate(head, choose=choose, score=score, scored=scored):  # the choice on fold k + 1; fold k recorded
            scored.append(score(head))
            return choose(head)

        inner = [h["val_audc"] for h in fit_head(arrays, cfg, log=None, validate=validate).history]
        e = int(np.argmax(inner))
        chosen.append(scored[e])
        curves.append(scored)
        early = ""
        for v in patiences:
            best, trained = early_stop(inner, v)
            stopped[v].append((scored[best], trained))
            early += f"; P={v}: stopped after {trained}, epoch {best + 1} -> {scored[best]:.4f}"
        print(f"fold {k}: epoch {e + 1} chosen -> {scored[e]:.4f}; after {len(scored)} epochs {scored[-1]:.4f}{early}",
              flush=True)
    for v, rows in stopped.items():
        print(f"patience {v}: {np.mean([r[0] for r in rows]):.4f} after {np.mean([r[1] for r in rows]):.1f} epochs "
              f"on average (per fold {' '.join(f'{r[0] - c:+.4f}' for r, c in zip(rows, chosen, strict=True))} "
              "against the full run's choice)")
    mean = np.mean(curves, axis=0)
    print(f"chosen epoch {np.mean(chosen):.4f}   fixed {len(mean)} epochs {mean[-1]:.4f}   "
          f"curve {' '.join(f'{v:.4f}' for v in mean)}")
    return 0


def early_stop(inner: list[float], patience: int) -> tuple[int, int]:
    """(index of the epoch kept, epochs trained) when training stops after ``patience`` epochs without
    a rise in the validation AUDC ``inner`` (one value per epoch); ties keep the earlier epoch."""
    best = 0
    for i, v in enumerate(inner):
        if v > inner[best]:
            best = i
        if i - best >= patience:
            return best, i + 1
    return best, len(inner)


if __name__ == "__main__":
    sys.exit(main())
