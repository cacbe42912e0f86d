"""Does averaging the head's weights over epochs pay? Nested K-fold cross-validation on train + val (the test split is never read).

The head trains 80 epochs at a constant learning rate and keeps the epoch its validation split
scores best; the validation curve is flat and noisy for dozens of epochs, so that choice is partly
luck. Averaging the weights over epochs (stochastic weight averaging, or an exponential moving
average) is the usual cure. Each scheme's averaged head is formed after every epoch, scored on the
inner validation fold (k + 1) and on fold k from the same training, and its epoch chosen on fold
k + 1 as the default's is, so every row compares like with like:

* ``default``: the head after each epoch, the best on fold k + 1 kept (what ``cscr train`` does);
* ``swa from epoch E on``: the uniform average of the heads of epochs E..e, the best e on fold k + 1;
* ``ema decay=β``: the exponential moving average ``avg = β·avg + (1 − β)·head`` after each epoch from the
  first, the best epoch on fold k + 1.

    python scripts/average_cv.py --run runs/rb [--folds 5] [--swa-from 21,41] [--ema 0.9,0.97] [--out avg.json]

One line per fold, then every row's mean and per-fold values.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from typing import Any

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")


class Average:
    """A running average of a head's floating-point weights: uniform from epoch ``start`` (1-based),
    or exponential with decay ``beta`` from the first epoch."""

    def __init__(self, name: str, start: int = 1, beta: float | None = None) -> None:
        self.name, self.start, self.beta = name, start, beta
        self.state: dict[str, Any] | None = None
        self.count = 0

    def update(self, head: Any, epoch: int) -> Any | None:
        """Fold in the head after ``epoch``; the averaged head (a copy), or None before ``start``."""
        if epoch < self.start:
            return None
        now = {k: v.detach().clone() for k, v in head.state_dict().items()}
        if self.state is None:
            self.state = now
        else:
            for k, v in now.items():
                if not v.is_floating_point():
                    self.state[k] = v
                elif self.beta is None:
                    self.state[k] += (v - self.state[k]) / (self.count + 1)
                else:
                    self.state[k] = self.beta * self.state[k] + (1.0 - self.beta) * v
        self.count += 1
        averaged = copy.deepcopy(head)
        averaged.load_state_dict(self.state)
        return averaged.eval()


def floats(text: str, what: str, low: float, high: float) -> list[float] | None:
    """Comma-separated numbers in [low, high], or None after one clear error on stderr."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = [low - 1]
    if any(not low <= v <= high for v in values):
        print(f"average_cv: {what} must be comma-separated numbers in [{low:g}, {high:g}], got {text!r}",
              file=sys.stderr)
        return None
    return values


def main(argv: list[str] | None = None) -> int:
    from foldcv import fold_table, fold_validators, nested_inputs, print_fold, print_results

    from cscr.config import TrainConfig
    from cscr.training.fit import fit_head

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True)
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--swa-from", default="21,41", help="comma-separated first epochs of uniform averages")
    p.add_argument("--ema", default="0.9,0.97", help="comma-separated decays of exponential averages")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    cfg = TrainConfig()
    starts = floats(a.swa_from, "--swa-from", 1, cfg.epochs)
    betas = floats(a.ema, "--ema", 0.0, 0.999)
    if starts is None or betas is None:
        return 2

    d = nested_inputs(a.run, a.folds, "average_cv")
    if d is None:
        return 2
    res: dict[str, list[float]] = {}
    started = time.time()
    for k in range(a.folds):
        t = fold_table(d.table, d.pool, d.folds, k, nested=True)  # fold k test, fold k + 1 val
        arrays, choose, score = fold_validators(t, d, cfg)
        schemes = [Average(f"swa from epoch {int(s)} on", start=int(s)) for s in starts]
        schemes += [Average(f"ema decay={b:g}", beta=b) for b in betas]
        curves: dict[str, tuple[list[float], list[float]]] = {n: ([], []) for n in
                                                              ["default", *(s.name for s in schemes)]}

        def validate(head: Any, choose=choose, score=score, schemes=schemes, curves=curves) -> float | None:
            epoch = len(curves["default"][0]) + 1  # 1-based: the default's curve has one value per epoch so far
            for s in schemes:
                averaged = s.update(head, epoch)
                if averaged is not None:
                    curves[s.name][0].append(choose(averaged) or 0.0)
                    curves[s.name][1].append(score(averaged) or 0.0)
            mine = choose(head)
            curves["default"][0].append(mine or 0.0)
            curves["default"][1].append(score(head) or 0.0)
            return mine

        fit_head(arrays, cfg, log=None, validate=validate)
        first = {"default": 1, **{s.name: s.start for s in schemes}}  # the epoch each curve starts at
        for name, (inner, outer) in curves.items():
            best = int(np.argmax(inner))
            res.setdefault(name, []).append(outer[best])
            res.setdefault(f"{name}: epoch chosen", []).append(float(first[name] + best))
        for name in curves:
            if name != "default":
                res.setdefault(f"{name} - default", []).append(res[name][-1] - res["default"][-1])
        print_fold(k, {n: res[n] for n in curves}, started)
    print_results(res, d.run.root, a.folds, a.out, 44)
    return 0


if __name__ == "__main__":
    sys.exit(main())
