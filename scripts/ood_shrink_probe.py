"""Does shrinking CSCR's expected quality towards the pool's mean help on unseen task groups?

The out-of-distribution experiment (``cscr experiment ood``) trains on some task groups and tests on
a held-out one. There the default head falls below the query-blind routers (pareto-random, the
per-category table's fallback). The hypothesis: on a prompt unlike any training group the head's
per-expert estimates are overconfident, and a mix with the pool's mean quality would transfer better:

    u_w(x) = (1 - w(x)) * P_head(good | x, m) + w(x) * Qbar_m        (Qbar_m: mean train quality of expert m)

``w(x) = w`` for every prompt (gate q = 1), or only for prompts far from the training prompts:
``w(x) = w`` when x's mean cosine similarity to its 10 nearest training prompts is below the q-quantile
of the same figure over the training prompts themselves (each without itself), else 0. So at q = 0.05
about 5 % of in-distribution prompts are shrunk.

``(w, q)`` is chosen without the held-out group (nested leave-one-group-out): for each outer held-out
group g, a head is trained on each inner split of the remaining groups (one of them held out in
turn), and ``(w, q)`` is the grid pair with the best mean inner AUDC. Then the outer head (trained on
every group but g, as the experiment trains it) is scored on g with that pair, and, for reference,
with every ``w`` at q = 1. The outer held-out group never informs the choice.

    python scripts/ood_shrink_probe.py --run runs/llmr [--split tasks] [--seed 0] [--out shrink.json]

A diagnostic, kept as the evidence behind the out-of-distribution guard that grew out of it
(cscr/guard.py: ``cscr guard``, ``cscr experiment ood --guard``); it shares the guard's grid and
scorer. ``--pool-mean head`` shrinks towards the head's own mean expected quality instead of the
labels' mean (it does not help: docs/routing-quality.md).
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
    from cscr.cli.commands.experiment import ood_splits, resolve_split

    from cscr.config import TrainConfig
    from cscr.experiments.common import costs_of, cscr_router, default_descriptors, train_cscr
    from cscr.experiments.ood import LLMROUTER_TASK_GROUPS, leave_one_group_out
    from cscr.guard import GATES, GRID, grid_audc
    from cscr.runs.inputs import Run

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True)
    p.add_argument("--split", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    p.add_argument("--pool-mean", choices=("labels", "head"), default="labels",
                   help="Qbar_m: the mean train quality (labels) or the head's own mean P(good) over the train prompts")
    a = p.parse_args(argv)

    run = Run.of(a.run)
    table, emb = run.table, run.embeddings
    split = resolve_split(a.split, {str(c) for c in table.categories if str(c).strip()})
    cfg = TrainConfig(seed=a.seed)

    def fit_split(t, e):
        """The cscr router trained on t's train split and the means it shrinks to (--pool-mean)."""
        desc = default_descriptors(t)
        train = t.split_index("train")
        router = cscr_router("cscr", train_cscr(t, e, desc, "cscr", cfg), {n: desc[n] for n in t.expert_names},
                             costs_of(t, train))
        qbar = None if a.pool_mean == "labels" else router.utilities(e[train]).mean(axis=0)
        return router, train, qbar

    def audcs(fitted, t, e, rows) -> np.ndarray:  # (gates, w) AUDC on rows
        router, train, qbar = fitted
        return grid_audc(router, t, e, train, rows[~np.isnan(t.quality[rows]).any(axis=1)], qbar)

    def show(v: np.ndarray) -> str:
        return " ".join(f"{x:.4f}" for x in v)

    results = []
    for s in ood_splits(table, split):
        t0 = time.time()
        e_out = emb[s.emb_rows]
        # inner: the training groups only, one of them held out in turn
        keep = np.setdiff1d(np.arange(s.table.n), s.ood_rows)
        inner_table, inner_emb = s.table.subset(keep), e_out[keep]
        if split == "tasks":
            groups = {k: v for k, v in LLMROUTER_TASK_GROUPS.items() if k != s.test_group}
        else:
            cats = sorted({str(c) for c in inner_table.categories if str(c).strip()})
            groups = {c: [c] for c in cats}
        inner = []
        for si in leave_one_group_out(inner_table, groups):
            ei = inner_emb[si.emb_rows]
            inner.append(audcs(fit_split(si.table, ei), si.table, ei, si.ood_rows))
        inner_mean = np.mean(inner, axis=0)
        gi, wi = np.unravel_index(int(np.argmax(inner_mean)), inner_mean.shape)
        ci = GATES.index(1.0)
        w_const = int(np.argmax(inner_mean[ci]))  # the best constant shrink (q = 1)
        fitted = fit_split(s.table, e_out)
        outer = audcs(fitted, s.table, e_out, s.ood_rows)
        in_dist = audcs(fitted, s.table, e_out, s.id_rows)
        row = {"held_out": s.test_group, "grid": list(GRID), "gates": list(GATES), "inner_mean": inner_mean.tolist(),
               "w": GRID[w_const], "gate": GATES[gi], "w_gated": GRID[wi], "ood": outer.tolist(), "id": in_dist.tolist(),
               "ood_head": outer[ci, 0], "ood_at_w": outer[ci, w_const], "ood_gated": outer[gi, wi],
               "id_head": in_dist[ci, 0], "id_at_w": in_dist[ci, w_const], "id_gated": in_dist[gi, wi]}
        results.append(row)
        print(f"{s.test_group:18s} constant: inner {show(inner_mean[ci])} -> w={GRID[w_const]}; held-out head "
              f"{outer[ci, 0]:.4f}, at w {row['ood_at_w']:.4f} (grid {show(outer[ci])}); in-dist {row['id_at_w']:.4f} "
              f"vs {row['id_head']:.4f}\n{'':18s} gated: chose q={GATES[gi]}, w={GRID[wi]} -> held-out "
              f"{row['ood_gated']:.4f}, in-dist {row['id_gated']:.4f}  ({time.time() - t0:.0f} s)", flush=True)
    for key, label in (("ood_at_w", "constant shrink"), ("ood_gated", "gated shrink")):
        head, chosen = np.mean([r["ood_head"] for r in results]), np.mean([r[key] for r in results])
        idh, idc = np.mean([r["id_head"] for r in results]), np.mean([r[key.replace("ood", "id")] for r in results])
        print(f"mean over held-out groups, {label}: held-out head {head:.4f} -> {chosen:.4f} ({chosen - head:+.4f}); "
              f"in-distribution {idh:.4f} -> {idc:.4f} ({idc - idh:+.4f})")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"run": str(run.root), "split": split, "seed": a.seed, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
