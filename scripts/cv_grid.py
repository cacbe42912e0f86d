"""K-fold cross-validation of training configurations on train + val (the test split is never read).

How the defaults of cscr.config.TrainConfig were chosen (docs/routing-quality.md): the 222 (RouterBench)
or 561 (LLMRouter) validation prompts alone are too few to tell configurations apart (seed sd 0.006),
so train + val are cut into K folds; each configuration is trained K times (on K - 1 folds, each epoch
scored by its AUDC on the held-out fold) and the per-epoch AUDC curves are averaged over folds and
seeds. Baseline routers are scored on the same folds for reference.

    python scripts/cv_grid.py --run runs/rb --configs '{"default": {}, "no-map": {"head.query_map": false}}' \
        [--seeds 0] [--folds 5] [--baselines parametric,per-category] [--out cv.jsonl]

A configuration is a dict of dotted TrainConfig fields over the defaults. One JSON line per row in --out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv: list[str] | None = None) -> int:
    from foldcv import fold_table as fold_split
    from foldcv import json_object, make_folds, train_config

    from cscr.eval import metrics as M
    from cscr.routers.base import RouterContext, get_router
    from cscr.runs.inputs import Run
    from cscr.training.arrays import prepare_arrays
    from cscr.training.fit import fit_head

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True)
    p.add_argument("--configs", required=True, help="JSON object: name -> {dotted field: value}")
    p.add_argument("--seeds", default="0")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--baselines", default="")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    configs = json_object(a.configs, "cv_grid: --configs")
    if configs is None:
        return 2
    run = Run.of(a.run)
    table, emb = run.table, run.embeddings
    try:  # the descriptor kind the run was trained with
        desc, kind, basis = run.trained_descriptors()
    except FileNotFoundError as exc:  # the message names the command that computes them
        print(f"cv_grid: {exc}", file=sys.stderr)
        return 2
    pool, folds = make_folds(table, a.folds)

    def fold_table(k: int):  # train + val, fold k as the validation split
        return fold_split(table, pool, folds, k)

    def audc_on(router, t, rows: np.ndarray) -> float:
        rows = rows[~np.isnan(t.quality[rows]).any(axis=1)]
        lam = router.knob_grid(emb[rows], 200, rows=rows)
        x, y = M.operating_points(router.route_sweep(emb[rows], lam, rows=rows), t.quality[rows], t.cost[rows])
        lo, hi = M.pool_range(t.cost[rows].mean(axis=0))
        return float(M.audc(M.deferral_curve(x, y), lo, hi))

    def emit(row: dict) -> None:
        if a.out:
            with open(a.out, "a") as f:
                f.write(json.dumps(row) + "\n")

    for name in [b for b in a.baselines.split(",") if b]:
        vals = []
        for k in range(a.folds):
            t = fold_table(k)
            vals.append(audc_on(get_router(name).fit(RouterContext.from_table(t, emb, 0)), t, t.split_index("val")))
        print(f"{name:34s} cv {np.mean(vals):.4f}  folds {' '.join(f'{v:.4f}' for v in vals)}", flush=True)
        emit({"run": str(run.root), "name": name, "cv": float(np.mean(vals)), "folds": vals})

    for name, over in configs.items():
        curves, t0 = [], time.time()
        for seed in [int(s) for s in a.seeds.split(",")]:
            for k in range(a.folds):
                cfg = train_config({**over, "seed": seed})
                arrays = prepare_arrays(fold_table(k), emb, desc, cfg.loss.tolerance, kind, basis)
                curves.append([h["val_audc"] for h in fit_head(arrays, cfg, log=None).history])
        c = np.mean(curves, axis=0)
        e = int(np.argmax(c)) + 1
        print(f"{name:34s} cv@E {c[e - 1]:.4f} (E={e})  last {c[-1]:.4f}  curve {' '.join(f'{v:.4f}' for v in c)} "
              f"({time.time() - t0:.0f} s)", flush=True)
        emit({"run": str(run.root), "name": name, "over": over, "curve": c.tolist(), "best_E": e,
              "cv_at_E": float(c[e - 1]), "cv_last": float(c[-1])})
    return 0


if __name__ == "__main__":
    sys.exit(main())
