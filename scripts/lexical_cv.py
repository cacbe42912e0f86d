"""Which lexical view, if any? K-fold cross-validation on train + val (the test split is never read).

For each fold and each configuration (a dict of cscr.lexical.LexicalConfig fields; ``null``: no
view) the view is fitted on the fold's training texts only, the default CSCR head is trained on
``[MiniLM, lex]`` and scored on the held-out fold:

- in distribution: the head's AUDC over the whole pool (folds as scripts/category_probe.py); its
  best epoch is chosen on the fold it is scored on, unless ``--nested`` (then on the next fold);
- with ``--unseen E1,E2,...``: the unseen-experts experiment (cscr.experiments.unseen) on the same
  folds instead: the head trained on the other experts, routing over ``E1, E2, ...`` by their
  descriptors (the held-out fold is its test split, the next fold its validation split).

    python scripts/lexical_cv.py --run runs/rb --configs '{"none": null, "d128": {}, "d32": {"dims": 32}}'
    python scripts/lexical_cv.py --run runs/rb --unseen gpt-3.5-turbo-1106,claude-v2,... --configs ...
    python scripts/lexical_cv.py --run runs/rb --unseen ... --configs '{"none": null}' --train '{"epochs": 80}'

``--train`` replaces dotted cscr.config.TrainConfig fields of the head's defaults (as epoch_choice_cv.py's
``--config``), so the unseen-experts experiment can be cross-validated for another head schedule.

One line per configuration: the mean AUDC over the folds, then each fold's.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv: list[str] | None = None) -> int:
    from foldcv import (
        fold_table,
        head_router,
        json_object,
        make_folds,
        print_fold,
        scored_rows,
        train_config,
        without_test,
    )

    from cscr.config import EvalConfig
    from cscr.encoder import load_run_embeddings
    from cscr.eval.utility import utility_audc
    from cscr.experiments.unseen import run_unseen
    from cscr.lexical import LexicalConfig, LexicalView, features
    from cscr.routers.base import RouterContext, get_router
    from cscr.runs.inputs import Run

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True)
    p.add_argument("--configs", default='{"none": null, "d128": {}}', help="JSON {name: LexicalConfig fields or null}")
    p.add_argument("--unseen", default=None, help="comma-separated experts: the unseen-experts experiment instead")
    p.add_argument("--train", default="{}", help="JSON {dotted TrainConfig field: value} over the head's defaults")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--nested", action="store_true",
                   help="score each fold with the head's epoch chosen on the next fold (foldcv.fold_table)")
    a = p.parse_args(argv)

    given, over = json_object(a.configs, "lexical_cv: --configs"), json_object(a.train, "lexical_cv: --train")
    if given is None or over is None:
        return 2
    train_cfg = train_config(over)
    try:
        configs = {k: None if v is None else LexicalConfig(**v) for k, v in given.items()}
    except TypeError as exc:
        print(f"lexical_cv: --configs: not a lexical configuration: {exc}", file=sys.stderr)
        return 2
    run = Run.of(a.run)
    desc, kind, basis = run.trained_descriptors()
    table, base = run.table, load_run_embeddings(run.root, lexical=False)
    unseen = a.unseen.split(",") if a.unseen else None
    nested = a.nested or unseen is not None
    if nested:  # the fold becomes the test split: the real test rows go (never read either way)
        table, base = without_test(table, base)
    seen = None if unseen is None else [n for n in table.expert_names if n not in unseen]
    pool, folds = make_folds(table, a.folds)
    res: dict[str, list[float]] = {}
    for k in range(a.folds):
        t0 = time.time()
        t = fold_table(table, pool, folds, k, nested=nested)
        train = t.split_index("train")
        for name, cfg in configs.items():
            view = None if cfg is None else LexicalView.fit(list(t.texts[train]), cfg)
            e = features(base, t.texts, view)
            if unseen is not None:
                r = run_unseen(t, e, ["cscr", "umr"], seen or [], unseen, train_cfg, EvalConfig(bootstrap=1))
                res.setdefault(name, []).append(r.evaluation.routers["cscr"].audc)
                res.setdefault(f"{name}: umr", []).append(r.evaluation.routers["umr"].audc)
                if "cscr" in r.levels:  # the newcomer-level choice (cscr/newcomer.py): 1 = on
                    res.setdefault(f"{name}: newcomer levels on", []).append(float(r.levels["cscr"]["use"]))
                continue
            rows = scored_rows(t, nested)
            router = head_router(t, e, desc, kind, basis, train_cfg)
            ref = get_router("per-category").fit(RouterContext.from_table(t, e, 0))  # the probes' c_m
            res.setdefault(name, []).append(utility_audc(ref.expert_names, ref.costs, router.utilities(e[rows]),
                                                         e[rows], t.quality[rows], t.cost[rows]))
        print_fold(k, res, t0)
    for name, vals in res.items():
        print(f"{name:24s} {np.mean(vals):.4f}   {' '.join(f'{v:.4f}' for v in vals)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
