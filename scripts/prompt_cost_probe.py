"""Does a per-prompt cost help the router more than the baselines? (validation split; the test split not read)

Every router prices an expert at one figure, its mean train cost c_m, while the deferral curve is
drawn in each prompt's actual cost C[i, m], which grows with the prompt's length. This probe routes
each trained router's own utilities on the validation split three ways and scores each (SPEC's AUDC):

* ``c_m``: as the router routes (``Router.scored``'s utilities and penalty);
* ``predicted``: the penalty an expert's per-prompt cost, predicted from the prompt alone by a
  least-squares line in its token count (``cscr.data.io.estimate_tokens``) fitted on the train split,
  on the routers' scale (divided by the largest mean train cost);
* ``true``: the validation prompts' actual costs (a ceiling: no router knows them in advance).

No choice is made here, so the validation split is enough; but each router made its own choices
there (cscr's best epoch and prior weight; UMR reads its per-cluster errors on it), so compare a
router's gain from pricing per prompt, not the routers' levels. A lever that lifts the baselines as
much as the router is a platform feature, not a reason the router wins.

    python scripts/prompt_cost_probe.py --run runs/llmr [--run runs/rb ...] [--out cost.json]
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROUTERS = ("cscr", "vanilla", "parametric", "per-category", "umr", "knn")


def token_cost_model(tokens: np.ndarray, cost: np.ndarray, train: np.ndarray) -> np.ndarray:
    """(2, M) per expert the least-squares line cost = a + b * tokens over the ``train`` rows."""
    a = np.stack([np.ones(len(train)), tokens[train]], axis=1)
    return np.stack([np.linalg.lstsq(a, cost[train, m], rcond=None)[0] for m in range(cost.shape[1])], axis=1)


def probe(run_dir: str, routers: list[str]) -> dict[str, object]:
    """The three scores of each router on the validation split (never the test split)."""
    from cscr.data.io import estimate_tokens
    from cscr.eval.utility import utility_audc
    from cscr.runs.inputs import Run
    from cscr.runs.loader import load_router

    run = Run.of(run_dir)
    t, emb = run.table, run.embeddings
    train, rows = t.split_index("train"), t.split_index("val")
    q, c = t.quality[rows], t.cost[rows]
    full = ~np.isnan(q).any(axis=1)
    rows, q, c = rows[full], q[full], c[full]
    tokens = estimate_tokens([str(s) for s in t.texts])
    line = token_cost_model(tokens, t.cost, train)
    predicted = np.maximum(line[0] + line[1] * tokens[rows, None], 0.0)
    scale = t.cost_scale(train)
    r2 = 1.0 - ((predicted - c) ** 2).sum(axis=0) / np.maximum(((c - c.mean(axis=0)) ** 2).sum(axis=0), 1e-30)
    out: dict[str, object] = {"run": run_dir, "split": "val", "n": int(len(rows)),
                              "cost_r2": dict(zip(t.expert_names, np.round(r2, 3).tolist(), strict=True)),
                              "routers": {}}
    e = emb[rows]
    for name in routers:
        r = load_router(run, name)
        u, pen = r.scored(e, rows)
        cols = [t.expert_names.index(n) for n in r.expert_names]
        scores = {how: utility_audc(list(r.expert_names), p, u, e, q[:, cols], c[:, cols]) for how, p in (
            ("c_m", np.broadcast_to(pen, u.shape)), ("predicted", predicted[:, cols] / scale),
            ("true", c[:, cols] / scale))}
        out["routers"][name] = scores  # type: ignore[index]
        print(f"  {name:13s} c_m {scores['c_m']:.4f}  predicted {scores['predicted']:.4f} "
              f"({scores['predicted'] - scores['c_m']:+.4f})  true {scores['true']:.4f} "
              f"({scores['true'] - scores['c_m']:+.4f})", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", action="append", required=True, help="a prepared and trained run (repeatable)")
    ap.add_argument("--routers", default=",".join(ROUTERS))
    ap.add_argument("--out", default=None, help="write the scores as JSON here")
    args = ap.parse_args(argv)
    from cscr.atomic import atomic_write_json

    results = []
    for run_dir in args.run:
        print(f"{run_dir} (validation split)", flush=True)
        results.append(probe(run_dir, [s for s in args.routers.split(",") if s]))
        print(f"  cost R^2 of the token line per expert: {results[-1]['cost_r2']}", flush=True)
    if args.out:
        atomic_write_json(args.out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
