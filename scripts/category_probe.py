"""How much of the per-category router's lead is the category label? K-fold cross-validation on train + val.

The per-category router (SPEC.md section 7) is handed each prompt's category; CSCR sees only the prompt.
For each fold this trains the default CSCR head (cscr.config.TrainConfig, best epoch on the fold, so its
figure runs a little high) and the baselines on the other folds, then scores on the held-out fold:

- ``head``: the CSCR router; ``per-category``, ``parametric``: the baselines;
- ``head+cat w``: ``(1 - w) * P_head(good) + w * Qbar[category]``: CSCR *given* the category label;
- ``softcat``: prompt only: a softmax regression from the prompt embedding to the category,
  ``u = sum_c p(c | x) * Qbar[c]``; ``head+softcat w``: its blend with the head;
- ``head+pool w``: ``(1 - w) * P_head(good) + w * Qbar``: the head shrunk towards the pool's mean
  train quality per expert (prompt only; scripts/ood_shrink_probe.py asks the same on unseen groups);
- ``head+param w``: ``(1 - w) * P_head(good) + w * P_parametric(good)``: the head blended with the
  per-expert MLP (prompt only; seen experts only: the MLP has one output per train expert). What any
  per-expert part added to CSCR's shared descriptor map could gain at most, roughly;
- ``head+lex``, ``parametric+lex``, ``softcat+lex`` (``--lexical``): the same with the lexical view
  (cscr/lexical.py) appended, refitted on each fold's training rows; the other rows then read the
  encoder's vectors only (how the lexical view was chosen);
- ``head+len``, ``parametric+len``, ``per-category+len`` (``--length``): is there signal in the prompt's
  length? Two features, log(1 + characters) and log(1 + digits), standardised on the fold's training
  rows: appended (weight 0.5) to the features of the head and the parametric MLP, and, given the
  category, a logistic regression on them per category and expert (L2; the category's table where an
  expert has fewer than 10 answers). MiniLM's mean-pooled, unit vectors carry little of a prompt's length;
- ``head+guard`` (``--guard``): the head with the out-of-distribution guard (cscr/guard.py) as
  ``cscr guard`` would choose it from the other folds (the held-out fold is hidden from the search
  as if it were the test split; the next fold is the inner validation split): what the guard costs
  or gains in distribution, without the test split. The head here is the head alone, so the search
  scores it without the category prior too; ``scripts/prior_cv.py --guard`` measures the guard on
  the head with its prior, as ``cscr guard`` searches and serves it.

With ``--nested`` each fold is scored with every router's choices made on the next fold instead
(the head's best epoch, the MLPs' early stopping), so no figure runs high; the routers then train
on K - 2 folds.

    python scripts/category_probe.py --run runs/llmr [--folds 5] [--guard] [--lexical] [--length] [--nested] [--out probe.json]

The test split is never read. One line per variant: the mean AUDC over the folds, then each fold's.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

BLEND = (0.25, 0.5, 0.75)


def category_classifier(x: np.ndarray, y: np.ndarray, n_classes: int, l2: float = 1e-4, steps: int = 300):
    """A softmax regression (cscr.prior.softmax_regression: L2, full-batch L-BFGS) from embeddings
    (n, d) to classes (n,); returns ``proba(x) -> (m, n_classes)``."""
    from cscr.prior import softmax_regression, softmax_rows

    weight, bias = softmax_regression(x, y, n_classes, l2, steps)
    return lambda z: softmax_rows((np.asarray(z, dtype=np.float32) @ weight + bias).astype(np.float64))


def length_features(texts) -> np.ndarray:
    """(n, 2) log(1 + characters) and log(1 + digits) of each text."""
    return np.log1p(np.array([(len(t), sum(ch.isdigit() for ch in t)) for t in texts], dtype=float))


def per_category_length(z_train: np.ndarray, y_train: np.ndarray, q_train: np.ndarray, z: np.ndarray, y: np.ndarray,
                        qbar: np.ndarray, l2: float = 10.0) -> np.ndarray:
    """(n, M) P(good) of each expert on rows (features ``z`` (n, f), categories ``y`` (n,)) from an L2 logistic
    regression per category and expert fitted on the training rows (``z_train``, ``y_train``, quality
    ``q_train`` (N, M), NaN = missing); ``qbar`` (C, M) where a cell has fewer than 10 answers."""
    import torch

    from cscr.prior import lbfgs_minimise

    u = qbar[y].copy()  # (n, M)
    for c in np.unique(y):
        tr, sc = np.flatnonzero(y_train == c), np.flatnonzero(y == c)
        for m in range(q_train.shape[1]):
            ok = tr[~np.isnan(q_train[tr, m])]
            if len(ok) < 10:
                continue
            x, t = torch.tensor(z_train[ok]), torch.tensor(q_train[ok, m])
            p0 = float(t.mean().clamp(1e-3, 1 - 1e-3))
            w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
            b = torch.tensor(np.log(p0 / (1 - p0)), dtype=torch.float64, requires_grad=True)
            lbfgs_minimise([w, b], lambda x=x, t=t, w=w, b=b: torch.nn.functional.binary_cross_entropy_with_logits(
                x @ w + b, t, reduction="sum") + l2 * w.pow(2).sum(), 100)
            with torch.no_grad():
                u[sc, m] = torch.sigmoid(torch.tensor(z[sc]) @ w + b).numpy()
    return u


def fold_utilities(t, e: np.ndarray, rows: np.ndarray, cats: np.ndarray, desc, kind: str, basis):
    """One fold's utilities on ``rows`` from features ``e`` (n, d), every router trained on ``t``'s train
    split with its choices on ``t``'s val split: ``head`` (the default CSCR head), ``per-category``,
    ``parametric`` and ``softcat``. Also returns what the variants reuse, as attributes: ``router`` (the
    head), ``train``, ``names`` and ``y_train`` (the categories), ``qbar`` (C, M) and ``overall`` (M,) (the
    train table per category and overall), ``accuracy`` (the softmax regression's category accuracy on
    ``rows``) and ``audc(u)`` (the AUDC of routing ``rows`` by utilities ``u``). scripts/finetune_probe.py
    scores its fold-specific features with it."""
    from types import SimpleNamespace

    from foldcv import head_router

    from cscr.data.table import category_means
    from cscr.eval.utility import utility_audc
    from cscr.routers.base import RouterContext, get_router

    router = head_router(t, e, desc, kind, basis)
    ctx = RouterContext.from_table(t, e, 0)
    per_cat = get_router("per-category").fit(ctx)
    u = {"head": router.utilities(e[rows]), "per-category": per_cat.utilities(e[rows], rows),
         "parametric": get_router("parametric").fit(ctx).utilities(e[rows], rows)}
    train = t.split_index("train")
    names = sorted(set(cats[train].tolist()))
    code = {c: i for i, c in enumerate(names)}
    y_train = np.array([code[c] for c in cats[train]])
    means, overall = category_means(t.quality[train], y_train, len(names))
    qbar = np.where(np.isnan(means), overall[None, :], means)  # (C, M) as the per-category router's table
    p_c = category_classifier(e[train], y_train, len(names))(e[rows])  # (n, C)
    u["softcat"] = p_c @ qbar

    def audc(util: np.ndarray) -> float:
        return utility_audc(per_cat.expert_names, per_cat.costs, util, e[rows], t.quality[rows], t.cost[rows])

    return u, SimpleNamespace(router=router, train=train, names=names, y_train=y_train, qbar=qbar, overall=overall,
                              accuracy=float(np.mean(np.array(names)[p_c.argmax(1)] == cats[rows])), audc=audc)


def main(argv: list[str] | None = None) -> int:
    from foldcv import fold_table, head_router, make_folds, print_results, scored_rows, without_test

    from cscr.config import TrainConfig
    from cscr.encoder import load_run_embeddings
    from cscr.experiments.ood import search_guard
    from cscr.guard import Guard
    from cscr.lexical import LexicalConfig, LexicalView, features
    from cscr.routers.base import RouterContext, get_router
    from cscr.runs.descriptors import DEFAULT_KIND
    from cscr.runs.inputs import Run

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True)
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--out", default=None)
    p.add_argument("--guard", action="store_true", help="add the head+guard row (a guard search per fold)")
    p.add_argument("--lexical", action="store_true",
                   help="add +lex rows: the lexical view refitted per fold (other rows: encoder vectors only)")
    p.add_argument("--length", action="store_true",
                   help="add +len rows: two prompt-length features with the head, parametric and per-category")
    p.add_argument("--nested", action="store_true",
                   help="every router's choices (the head's epoch, early stopping) on the next fold, not the scored one")
    a = p.parse_args(argv)

    run = Run.of(a.run)
    table = run.table
    emb = load_run_embeddings(run.root, lexical=False) if a.lexical else run.embeddings
    if a.nested:  # the fold becomes the test split: the real test rows go (never read either way)
        table, emb = without_test(table, emb)

    try:  # the descriptor kind the run was trained with
        desc, kind, basis = run.trained_descriptors()
    except FileNotFoundError as exc:  # the message names the command that computes them
        print(f"category_probe: {exc}", file=sys.stderr)
        return 2
    cats = np.asarray(table.categories, dtype=str)

    def guarded(t, sp, inner_val, router, rows):
        """The head's utilities on rows with the guard searched on the other folds (fold -> test)."""
        hidden = copy.copy(t)
        spl = sp.copy()
        spl[rows], spl[inner_val] = "test", "val"
        hidden.splits = spl
        search = search_guard(hidden, emb, TrainConfig(category_prior=False), "cscr",  # as the rows: no prior
                              None if kind == DEFAULT_KIND else desc)
        guard = Guard.fit(t, emb, search.w, search.gate)  # reference and means: the training folds
        return guard.apply(router.utilities(emb[rows]), router.expert_names, emb[rows]), (search.w, search.gate)

    pool, folds = make_folds(table, a.folds)  # as scripts/cv_grid.py
    res: dict[str, list[float]] = {}
    raw = length_features(table.texts) if a.length else None  # (n, 2), the same for every fold
    for k in range(a.folds):
        t0 = time.time()
        t = fold_table(table, pool, folds, k, nested=a.nested)
        sp = t.splits
        rows = scored_rows(t, a.nested)

        u, f = fold_utilities(t, emb, rows, cats, desc, kind, basis)
        router, train, names, y_train, qbar, overall = f.router, f.train, f.names, f.y_train, f.qbar, f.overall
        held = cats[rows]
        acc = f.accuracy

        def with_features(feat: np.ndarray, tag: str, t=t, rows=rows, u=u) -> None:
            """The head and the parametric MLP trained and scored on other features: ``u["head+<tag>"]``, ..."""
            u[f"head+{tag}"] = head_router(t, feat, desc, kind, basis).utilities(feat[rows])
            u[f"parametric+{tag}"] = get_router("parametric").fit(RouterContext.from_table(t, feat, 0)).utilities(
                feat[rows], rows)

        if a.lexical:  # the view fitted on this fold's training texts only, as cscr prepare fits the train split
            lex = features(emb, table.texts, LexicalView.fit(list(table.texts[train]), LexicalConfig()))
            with_features(lex, "lex")
            p_lex = category_classifier(lex[train], y_train, len(names))(lex[rows])
            u["softcat+lex"] = p_lex @ qbar
            res.setdefault("category accuracy (softcat+lex)", []).append(
                float(np.mean(np.array(names)[p_lex.argmax(1)] == held)))
        if a.length:  # standardised on the fold's training rows
            z = (raw - raw[train].mean(0)) / raw[train].std(0).clip(min=1e-9)
            with_features(np.concatenate([emb, 0.5 * z / np.sqrt(z.shape[1])], 1).astype(np.float32), "len")
            code = {c: i for i, c in enumerate(names)}
            known = np.array([c in code for c in held])  # a category the training folds never saw: its table row
            y_rows = np.array([code.get(c, 0) for c in held])
            u["per-category+len"] = np.where(known[:, None], per_category_length(
                z[train], y_train, t.quality[train], z[rows], y_rows, qbar), u["per-category"])
        for w in BLEND:
            u[f"head+cat w={w}"] = (1 - w) * u["head"] + w * u["per-category"]
            u[f"head+softcat w={w}"] = (1 - w) * u["head"] + w * u["softcat"]
            u[f"head+pool w={w}"] = (1 - w) * u["head"] + w * overall[None, :]
            u[f"head+param w={w}"] = (1 - w) * u["head"] + w * u["parametric"]

        if a.guard:
            u["head+guard"], chosen = guarded(t, sp, folds[(k + 1) % a.folds], router, rows)
            res.setdefault("guard w", []).append(chosen[0])
            res.setdefault("guard gate", []).append(chosen[1])
        for name, util in u.items():
            res.setdefault(name, []).append(f.audc(util))
        res.setdefault("category accuracy (softcat)", []).append(acc)
        print(f"fold {k}: head {res['head'][-1]:.4f}  per-category {res['per-category'][-1]:.4f}  "
              f"softcat {res['softcat'][-1]:.4f} (category accuracy {acc:.3f})  {time.time() - t0:.0f} s", flush=True)
    print_results(res, run.root, a.folds, a.out, 30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
