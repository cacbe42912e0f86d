"""Do newcomer levels pay? The unseen-experts experiment under nested K-fold CV on train + val.

For each fold k (foldcv's nested layout: fold k scored, fold k + 1 the validation split, the test
split never read) a CSCR head is trained on the seen experts and routes over the held-out ones
(``cscr.experiments.unseen.held_out_router``, with its category prior) three ways: the held-out
experts as the head sees them (levels off), each calibrated on its probe outcomes (levels always
on), and as chosen on the seen experts' validation answers (the default, cscr/newcomer.py); UMR
on the same held-out pool for reference.

``--diagnostics`` adds rows that ask where UMR's lead (LLMRouter) comes from; none is a router cscr
ships: UMR fitted on the held-out experts' *probe* answers (the data cscr's newcomers bring) instead
of their validation answers; and CSCR with the held-out experts' per-category prior means estimated
from their answers (weighted by the prior's p(c | x)) on the probe prompts (levels off, and on), and
on the probe and validation prompts (UMR's data; levels off). ``--more-probes N`` first moves N train
prompts into the probe split, so every expert answers more probes (a larger ``cscr prepare --probe-size``).

    python scripts/newcomer_cv.py --run runs/rb --unseen gpt-3.5-turbo-1106,claude-v2,... [--folds 5] [--seed 0] [--diagnostics] [--more-probes N] [--out f.json]

One line per fold, then the means.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def answered_means(router, pool, emb, rows):  # type: ignore[no-untyped-def]
    """{expert: (C,)} per-category mean quality of ``router``'s experts over ``pool``'s ``rows``,
    each answer weighted by the router's category prior's p(c | x) (a category nobody answered: the
    prior's own entry)."""
    import numpy as np

    p = router.prior.proba(emb[rows])  # (R, C)
    out = {}
    for name in router.expert_names:
        y = pool.quality[rows, pool.expert_index(name)]
        ok = ~np.isnan(y)
        mass = p[ok].sum(axis=0)
        est = p[ok].T @ y[ok] / np.maximum(mass, 1e-12)
        out[name] = np.where(mass > 0, est, router.prior.table[name])
    return out


def main(argv: list[str] | None = None) -> int:
    import numpy as np
    from foldcv import fold_table, make_folds, print_fold, print_results, scored_rows, without_test

    from cscr.config import TrainConfig
    from cscr.eval.utility import utility_audc
    from cscr.experiments.common import default_descriptors, train_cscr
    from cscr.experiments.unseen import fit_unseen_router, held_out_router, split_experts
    from cscr.routers import get_router
    from cscr.routers.base import RouterContext
    from cscr.runs.inputs import Run

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True)
    p.add_argument("--unseen", default=None, help="comma-separated held-out experts (default: a cost-stratified third)")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--seed", type=int, default=0, help="the heads' training seed")
    p.add_argument("--diagnostics", action="store_true", help="add the rows that ask where UMR's lead comes from")
    p.add_argument("--more-probes", type=int, default=0,
                   help="first move this many train prompts (drawn with seed 0) into the probe split: every "
                        "expert answers more probes")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)

    run = Run.of(a.run)
    table, emb = without_test(run.table, run.embeddings)
    unseen = a.unseen.split(",") if a.unseen else split_experts(table)[1]
    unknown = sorted(set(unseen) - set(table.expert_names))
    if unknown or len(unseen) >= len(table.expert_names):
        print(f"newcomer_cv: --unseen: unknown expert(s) {unknown} or nobody left to train on", file=sys.stderr)
        return 2
    train = table.split_index("train")
    if not 0 <= a.more_probes < len(train):
        print(f"newcomer_cv: --more-probes must be in [0, {len(train)}), got {a.more_probes}", file=sys.stderr)
        return 2
    if a.more_probes:
        table.splits[np.random.default_rng(0).choice(train, a.more_probes, replace=False)] = "probe"
        print(f"probe split: {len(table.split_index('probe'))} prompts ({a.more_probes} moved from train)")
    seen = [n for n in table.expert_names if n not in unseen]
    pool_rows, folds = make_folds(table, a.folds)
    res: dict[str, list[float]] = {}
    for k in range(a.folds):
        t0 = time.time()
        t = fold_table(table, pool_rows, folds, k, nested=True)
        seen_table, pool = t.subset(experts=seen), t.subset(experts=unseen)
        desc = default_descriptors(t)
        result = train_cscr(seen_table, emb, desc, "cscr", TrainConfig(seed=a.seed))
        rows = scored_rows(pool, nested=True)

        def audc(router, rows=rows, pool=pool) -> float:
            cols = [pool.expert_names.index(n) for n in router.expert_names]
            return utility_audc(list(router.expert_names), router.costs, router.utilities(emb[rows]), emb[rows],
                                pool.quality[rows][:, cols], pool.cost[rows][:, cols])

        chosen, record = held_out_router(result, seen_table, pool, emb, desc)
        fixed = {on: held_out_router(result, seen_table, pool, emb, desc, on)[0] for on in (False, True)}
        res.setdefault("levels off", []).append(audc(fixed[False]))
        res.setdefault("levels always on", []).append(audc(fixed[True]))
        res.setdefault("levels chosen (default)", []).append(audc(chosen))
        res.setdefault("chosen: on", []).append(float(bool(record and record["use"])))
        res.setdefault("umr", []).append(audc(fit_unseen_router("umr", pool, emb)))
        if a.diagnostics:
            probe = pool.split_index("probe")
            ctx = RouterContext(pool, emb, pool.split_index("train"), probe)  # seeded as the umr row
            res.setdefault("umr on probe answers", []).append(audc(get_router("umr").fit(ctx)))
            both = np.concatenate([probe, pool.split_index("val")])
            for on, label, answered in ((False, "probe", probe), (False, "probe + val", both), (True, "probe", probe)):
                router, prior = fixed[on], fixed[on].prior  # the rows above's routers, their prior put back after
                if prior is not None:  # None (no categories): the row repeats levels off / on
                    router.prior = prior.with_means(answered_means(router, pool, emb, answered))
                res.setdefault(f"{'on' if on else 'off'}, means from {label}", []).append(audc(router))
                router.prior = prior
        print_fold(k, res, t0)
    print_results(res, run.root, a.folds, a.out, 26)
    return 0


if __name__ == "__main__":
    sys.exit(main())
