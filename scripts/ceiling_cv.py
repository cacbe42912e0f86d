"""How far can reading the category take the router? Nested K-fold CV on train + val (the test split never read).

The per-category table is handed each prompt's category; the router has to read it from the prompt.
For each fold (foldcv's nested layout: fold k scored, fold k + 1 picks every weight) this scores
the default head and its category prior (the category read from the MiniLM vector), then three
upper references:

* the prior's classifier also reading a lexical view of the prompt (cscr/lexical.py, fitted on the
  fold's training texts): what a better category reader buys;
* the prior handed the true category (one-hot p(c | x)) and blended with the head, w chosen on the
  inner fold: the head's worth beyond the category (the router ``cscr evaluate --routers
  cscr+category`` evaluates, through the same ``CategoryPrior`` calls);
* a within-category neighbour table handed the true category: the mean quality of the K nearest
  training prompts of the same category, shrunk towards the category mean (K and the shrinkage
  chosen on the inner fold): what the prompt says beyond its category, without the head.

    python scripts/ceiling_cv.py --run runs/llmr [--folds 5] [--out ceiling.json]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

NEIGHBOURS = (10, 30, 100)  # K
SHRINK = (10.0, 30.0)  # pseudo-count of the category mean


def neighbour_table(feats: np.ndarray, quality: np.ndarray, codes: np.ndarray, train: np.ndarray, rows: np.ndarray,
                    qbar: np.ndarray, k: int, shrink: float) -> np.ndarray:
    """(len(rows), M) per prompt: the mean quality of its ``k`` most similar train prompts of its own
    category (missing answers: that expert's train mean), shrunk towards the category's row of ``qbar``."""
    fill = np.nanmean(quality[train], axis=0)
    q = np.where(np.isnan(quality), fill[None, :], quality)
    out = qbar[np.maximum(codes[rows], 0)].astype(np.float64)  # a prompt of no train category: row 0, unused
    for c in np.unique(codes[rows]):
        mine, pool = rows[codes[rows] == c], train[codes[train] == c]
        if c < 0 or len(pool) == 0:
            continue
        kk = min(k, len(pool))
        sim = feats[mine] @ feats[pool].T
        near = np.argpartition(-sim, kk - 1, axis=1)[:, :kk]
        out[codes[rows] == c] = (kk * q[pool][near].mean(axis=1) + shrink * qbar[c]) / (kk + shrink)
    return out


def main(argv: list[str] | None = None) -> int:
    from foldcv import (
        fold_table,
        head_router,
        make_folds,
        print_fold,
        print_results,
        scored_rows,
        without_test,
    )

    from cscr.eval.utility import utility_audc
    from cscr.lexical import LexicalConfig, LexicalView
    from cscr.prior import GRID, CategoryPrior, PriorError, choose_w
    from cscr.routers.base import RouterContext, get_router
    from cscr.runs.inputs import Run

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True)
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--lexical-dims", type=int, default=128)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)

    run = Run.of(a.run)
    table, emb = without_test(run.table, run.embeddings)
    desc, kind, basis = run.trained_descriptors()
    pool, folds = make_folds(table, a.folds)
    res: dict[str, list[float]] = {}
    for k in range(a.folds):
        t0 = time.time()
        t = fold_table(table, pool, folds, k, nested=True)
        test, train = scored_rows(t, nested=True), t.split_index("train")
        val = t.split_index("val")
        val = val[~np.isnan(t.quality[val]).any(axis=1)]
        router = head_router(t, emb, desc, kind, basis)
        names, costs = list(router.expert_names), np.asarray(router.costs)
        own = [t.expert_names.index(n) for n in names]
        try:
            base = CategoryPrior.fit(t, emb)
        except PriorError as exc:
            print(f"ceiling_cv: {exc}", file=sys.stderr)
            return 2
        codes = base.codes(t.categories)  # -1: a category without a train prompt in this fold
        qbar = np.stack([base.table[n] for n in names], axis=1)  # (C, M)

        def audc(u: np.ndarray, rows: np.ndarray, t=t, own=own, names=names, costs=costs) -> float:
            return utility_audc(names, costs, u, emb[rows], t.quality[rows][:, own], t.cost[rows][:, own])

        def chosen_blend(p_val: np.ndarray, p_test: np.ndarray, router=router, qbar=qbar,
                         val=val, test=test) -> tuple[float, float]:
            """(test AUDC, w) of the head blended with p(c | x) @ qbar, w chosen on the inner fold."""
            u_val, u_test = router.utilities(emb[val]), router.utilities(emb[test])
            scores = [audc((1 - w) * u_val + w * (p_val @ qbar), val) for w in GRID]
            w = GRID[int(np.argmax(np.round(scores, 10)))]
            return audc((1 - w) * u_test + w * (p_test @ qbar), test), w

        res.setdefault("head", []).append(audc(router.utilities(emb[test]), test))
        prior = choose_w(base, router.utilities, names, costs, t, emb, val)
        res.setdefault("head + prior (the default)", []).append(audc(prior.apply(router.utilities(emb[test]), names,
                                                                                 emb[test]), test))
        view = LexicalView.fit(list(t.texts[train]), LexicalConfig(dims=a.lexical_dims))
        feats = emb if view is None else np.hstack([emb, view.transform(list(t.texts))]).astype(np.float32)
        lex = CategoryPrior.fit(t, feats)
        res.setdefault("accuracy: MiniLM", []).append(float((base.proba(emb[test]).argmax(1) == codes[test]).mean()))
        res.setdefault("accuracy: + lexical", []).append(float((lex.proba(feats[test]).argmax(1) == codes[test]).mean()))
        got, _ = chosen_blend(lex.proba(feats[val]), lex.proba(feats[test]))
        res.setdefault("head + prior reading lexical too", []).append(got)
        given = choose_w(base, router.utilities, names, costs, t, emb, val, given=True)  # as cscr+category
        res.setdefault("head + true category", []).append(
            audc(given.apply(router.utilities(emb[test]), names, emb[test], given=codes[test]), test))
        res.setdefault("  its w", []).append(given.w)
        grid = [(n, s) for n in NEIGHBOURS for s in SHRINK]
        q_own = t.quality[:, own]
        scores = [audc(neighbour_table(emb, q_own, codes, train, val, qbar, n, s), val) for n, s in grid]
        n, s = grid[int(np.argmax(np.round(scores, 10)))]
        res.setdefault("neighbours within the true category", []).append(
            audc(neighbour_table(emb, q_own, codes, train, test, qbar, n, s), test))
        per_cat = get_router("per-category").fit(RouterContext.from_table(t, emb, 0))
        cols = [per_cat.expert_names.index(n) for n in names]
        res.setdefault("per-category (given the label)", []).append(audc(per_cat.utilities(emb[test], test)[:, cols],
                                                                         test))
        print_fold(k, res, t0)
    print_results(res, run.root, a.folds, a.out, 36)
    return 0


if __name__ == "__main__":
    sys.exit(main())
