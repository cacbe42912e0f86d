"""Does the category prior pay? Nested K-fold cross-validation on train + val (the test split is never read).

For each fold k the default CSCR head is trained on the folds but k and k + 1 (best epoch on fold
k + 1), the category prior (cscr/prior.py) is fitted on the same training folds with its weight w
chosen on fold k + 1, as ``cscr train`` chooses it on the validation split, and the router is
scored on fold k with and without it (and at every w of the grid, for the record).

    python scripts/prior_cv.py --run runs/llmr [--folds 5] [--guard] [--out prior.json]

``--guard`` adds the out-of-distribution guard (cscr/guard.py) on top of the head and its prior, as
``cscr guard`` would choose it on the training folds (fold k hidden as the test split, fold k + 1 the
validation split): its in-distribution cost, for the choice that weighs the held-out groups alone
(far share 1, the rule before stop 38) and for the default (far share 0.5: held-out groups and
in-distribution validation rows weighed alike), from one search per fold.

One line per fold, then the means.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv: list[str] | None = None) -> int:
    from foldcv import fold_table, head_router, nested_inputs, print_results, scored_rows

    from cscr.config import TrainConfig
    from cscr.eval.utility import utility_audc
    from cscr.experiments.ood import search_guard
    from cscr.guard import FAR_SHARE, Guard, GuardSearch
    from cscr.prior import GRID, fit_prior
    from cscr.routers.base import RouterContext, get_router
    from cscr.runs.descriptors import DEFAULT_KIND

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True)
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--out", default=None)
    p.add_argument("--guard", action="store_true", help="add head + prior + guard rows (a guard search per fold)")
    a = p.parse_args(argv)

    d = nested_inputs(a.run, a.folds, "prior_cv")
    if d is None:
        return 2
    table, emb, desc, kind, basis, pool, folds = d.table, d.emb, d.desc, d.kind, d.basis, d.pool, d.folds
    res: dict[str, list[float]] = {}
    for k in range(a.folds):
        t0 = time.time()
        t = fold_table(table, pool, folds, k, nested=True)
        rows = scored_rows(t, nested=True)
        router = head_router(t, emb, desc, kind, basis)
        prior = fit_prior(router, t, emb)
        if prior is None:
            print("prior_cv: fewer than 2 train categories: no prior to score", file=sys.stderr)
            return 2
        per_cat = get_router("per-category").fit(RouterContext.from_table(t, emb, 0))

        own = [t.expert_names.index(n) for n in router.expert_names]  # the table's columns in the router's order

        def audc(u: np.ndarray, t=t, rows=rows, own=own, names=router.expert_names, costs=router.costs) -> float:
            return utility_audc(list(names), costs, u, emb[rows], t.quality[rows][:, own], t.cost[rows][:, own])

        u = router.utilities(emb[rows])
        res.setdefault("head", []).append(audc(u))
        u_prior = prior.apply(u, router.expert_names, emb[rows])  # the default router's utilities
        res.setdefault("head + prior (w chosen)", []).append(audc(u_prior))
        res.setdefault("chosen w", []).append(prior.w)
        for w in GRID:
            res.setdefault(f"w={w}", []).append(audc(prior.apply(u, router.expert_names, emb[rows], w)))
        if a.guard:  # searched on the training folds (fold k is t's test split: never read by the search)
            search = search_guard(t, emb, TrainConfig(), "cscr", None if kind == DEFAULT_KIND else desc)
            for share in (1.0, FAR_SHARE):
                w, gate = GuardSearch.choose(search.mean, search.mean_in, share)
                g = Guard.fit(t, emb, w, gate)  # reference and means: the training folds, as cscr guard fits it
                tag = f"+ guard (far share {share:g})"
                res.setdefault(tag, []).append(audc(g.apply(u_prior, router.expert_names, emb[rows])))
                res.setdefault(f"{tag}: w", []).append(w)
                res.setdefault(f"{tag}: gate", []).append(gate)
        cols = [per_cat.expert_names.index(n) for n in router.expert_names]
        res.setdefault("per-category (given the label)", []).append(audc(per_cat.utilities(emb[rows], rows)[:, cols]))
        print(f"fold {k}: head {res['head'][-1]:.4f}  with the prior {res['head + prior (w chosen)'][-1]:.4f} "
              f"(w = {prior.w:g})  per-category {res['per-category (given the label)'][-1]:.4f}  {time.time() - t0:.0f} s",
              flush=True)
    print_results(res, d.run.root, a.folds, a.out, 32)
    return 0


if __name__ == "__main__":
    sys.exit(main())
