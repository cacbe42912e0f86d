"""Does refitting on train + validation pay, for the router and for its rivals? Nested K-fold CV (the test split is never read).

Every trained router learns from the train split and makes its choices on the validation split
(the head's best epoch and its prior's w; parametric's early stop). A common last step is to make
the choices there and then fit again on train + validation with them fixed: a quarter more data
for the final model, no choice left to make. Does that lift cscr more than the baselines it must
beat?

For each fold k (the layout of the other nested scripts: fold k scored, fold k + 1 the validation
split, the rest train), each router is fitted twice and scored on fold k:

* ``default``: as ``cscr train`` / ``cscr evaluate`` fit it (train split, choices on validation);
* ``refit``: the same choices (the head's best epoch count and its prior's w; parametric's best
  epoch count), then fitted again from scratch on train + validation for that many epochs, nothing
  chosen on held-out prompts (of those epochs, the one of lowest training loss is kept: the
  training loops' rule without validation prompts, in practice one of the last).

Routers: cscr and vanilla (each head with its category prior, as served), parametric and
per-category (which has no choice to make: its refit is its table of train + validation).

    python scripts/refit_cv.py --run runs/rb [--folds 5] [--out refit.json]

One line per fold, then every row's mean and per-fold values (refit − default gains included).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import sys
import time
from typing import Any

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def merged(t: Any) -> Any:
    """``t`` with its validation rows relabelled train (no validation split left)."""
    m = copy.copy(t)
    sp = t.splits.copy()
    sp[t.split_index("val")] = "train"
    m.splits = sp
    return m


def head_pair(t: Any, emb: np.ndarray, desc: Any, kind: str, basis: Any,
              variant: str) -> tuple[list[tuple[Any, Any]], int]:
    """([(default router, its prior), (refit router, its prior)], the epoch count chosen) of one head
    variant; a prior is None where the train rows have fewer than two categories."""
    from foldcv import arrays_router

    from cscr.config import TrainConfig
    from cscr.prior import CategoryPrior, fit_prior
    from cscr.training.arrays import prepare_arrays
    from cscr.training.fit import fit_head

    cfg = TrainConfig()
    arrays = prepare_arrays(t, emb, desc, cfg.loss.tolerance, kind, basis)
    chosen = fit_head(arrays, cfg, variant=variant, log=None)
    default = arrays_router(arrays, chosen)
    prior = fit_prior(default, t, emb)  # w chosen on the validation split

    t2 = merged(t)
    arrays2 = prepare_arrays(t2, emb, desc, cfg.loss.tolerance, kind, basis)
    again = fit_head(arrays2, dataclasses.replace(cfg, epochs=chosen.best_epoch), variant=variant, log=None,
                     validate=lambda head: None)  # the chosen epoch count; nothing chosen on train + val
    refit = arrays_router(arrays2, again)
    # train + val hold every category train does: a prior fitted there can be fitted here
    prior2 = None if prior is None else dataclasses.replace(CategoryPrior.fit(t2, emb), w=prior.w)
    return [(default, prior), (refit, prior2)], chosen.best_epoch


def parametric_pair(t: Any, emb: np.ndarray) -> tuple[Any, Any, int]:
    """(default, refit, epochs) of the parametric baseline: refit trains the default's best epoch count
    on train + validation (its loss there only tracks training: nothing is chosen on it)."""
    from cscr.routers.base import RouterContext, get_router

    default: Any = get_router("parametric").fit(RouterContext.from_table(t, emb, 0))
    best = int(np.argmin([h["val_loss"] for h in default.history])) + 1
    pool = np.sort(np.concatenate([t.split_index("train"), t.split_index("val")]))
    ctx = RouterContext(t, emb, pool, pool, 0)
    refit = get_router("parametric", max_epochs=best, patience=best + 1).fit(ctx)
    return default, refit, best


def main(argv: list[str] | None = None) -> int:
    from foldcv import fold_table, nested_inputs, print_results, scored_rows

    from cscr.eval.utility import utility_audc
    from cscr.routers.base import RouterContext, get_router

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True)
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)

    d = nested_inputs(a.run, a.folds, "refit_cv")
    if d is None:
        return 2
    emb = d.emb
    res: dict[str, list[float]] = {}
    started = time.time()
    for k in range(a.folds):
        t = fold_table(d.table, d.pool, d.folds, k, nested=True)
        rows = scored_rows(t, nested=True)
        e = emb[rows]

        def audc(names: list[str], costs: np.ndarray, u: np.ndarray, t=t, rows=rows, e=e) -> float:
            cols = [t.expert_names.index(n) for n in names]
            return utility_audc(list(names), costs, u, e, t.quality[rows][:, cols], t.cost[rows][:, cols])

        for variant in ("cscr", "vanilla"):
            pair, epochs = head_pair(t, emb, d.desc, d.kind, d.basis, variant)
            for how, (r, prior) in zip(("default", "refit"), pair, strict=True):
                u = r.utilities(e)
                if prior is not None:
                    u = prior.apply(u, r.expert_names, e)
                res.setdefault(f"{variant} {how}", []).append(audc(r.expert_names, np.asarray(r.costs), u))
            res.setdefault(f"{variant}: epochs", []).append(float(epochs))
        p_default, p_refit, best = parametric_pair(t, emb)
        for how, r in (("default", p_default), ("refit", p_refit)):
            res.setdefault(f"parametric {how}", []).append(audc(r.expert_names, np.asarray(r.costs), r.utilities(e)))
        res.setdefault("parametric: epochs", []).append(float(best))
        for how, tt in (("default", t), ("refit", merged(t))):
            r = get_router("per-category").fit(RouterContext.from_table(tt, emb, 0))
            res.setdefault(f"per-category {how}", []).append(
                audc(r.expert_names, np.asarray(r.costs), r.utilities(e, rows)))
        for name in ("cscr", "vanilla", "parametric", "per-category"):
            res.setdefault(f"{name}: refit gain", []).append(res[f"{name} refit"][-1] - res[f"{name} default"][-1])
        print(f"fold {k}: " + "  ".join(f"{n} {res[f'{n} default'][-1]:.4f} -> {res[f'{n} refit'][-1]:.4f}"
                                        for n in ("cscr", "vanilla", "parametric", "per-category"))
              + f"  {time.time() - started:.0f} s", flush=True)
    for name in ("vanilla", "parametric", "per-category"):  # cscr's margin over each rival, both ways
        for how in ("default", "refit"):
            res[f"cscr {how} - {name} {how}"] = list(np.subtract(res[f"cscr {how}"], res[f"{name} {how}"]))
    print_results(res, d.run.root, a.folds, a.out, 40)
    return 0


if __name__ == "__main__":
    sys.exit(main())
