"""``cscr train --run RUN``: train the CSCR head (and the vanilla ablation) for a prepared run.

By default on Ray Train (jobs/train.py) on an embedded local Ray cluster; ``--plain`` runs the
single-process loop of cscr/training instead. Heads are saved to ``RUN/models/<variant>`` (and
``RUN/models/<variant>@<kind>``), where ``cscr evaluate --routers cscr,vanilla`` finds them. The
options are jobs/train.py's (one definition, jobs/train_options.py); this command builds the
job's config and calls its ``run``.

Defaults come from the run: the descriptor kind and hyperparameters it was last trained with
(RUN/settings.json) unless given here, said in one line; replacing a head trained with another
descriptor kind is said in one line too.
"""

from __future__ import annotations

import argparse
from typing import Any

from cscr.jobs.train_options import add_train_options, train_job_config


def register(sub: Any) -> None:
    p = sub.add_parser("train", help="train the CSCR head (Ray Train, or --plain)",
                       description=__doc__.split("\n\n")[0])
    add_train_options(p, default_variants="cscr,vanilla")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    cfg = train_job_config(args)
    import cscr.jobs.train as job  # torch and (lazily) Ray: imported only when training

    results = job.run(cfg)
    from cscr.runs.paths import RunPaths

    print(f"{'variant':<10} {'descriptors':<14} {'best epoch':>10} {'val AUDC':>9}  model")
    for v, r in results.items():
        audc = "n/a" if r.best_val_audc is None else f"{r.best_val_audc:.4f}"
        where = RunPaths.of(cfg.run).model(v) if cfg.run else "(smoke test: removed with its run folder)"
        print(f"{v:<10} {r.meta.get('descriptor_kind', '?'):<14} {r.best_epoch:>10} {audc:>9}  {where}")
    return 0
