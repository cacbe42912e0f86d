"""``cscr sweep --run R --grid NAME``: CSCR ablation sweeps on Ray Tune (jobs/sweep.py).

Each grid trains one head per value of one hyperparameter (the others at the values given
below, else at those the run was last trained with, said in one line, else at the defaults;
the descriptor kind likewise), chooses the value on validation AUDC and reports test AUDC:
RUN/sweeps/<grid>/summary.{md,csv,json} and <grid>.png. Trials run on an embedded local Ray (or
--address); an interrupted sweep resumes. When any trial fails, the table says which and why,
no value is chosen and the exit status is 1 (unless --allow-failed-trials).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from cscr.jobs.train_options import add_sweep_options, grids_epilog, sweep_job_config


def register(sub: Any) -> None:
    p = sub.add_parser("sweep", help="Ray Tune ablation sweep (bands, k, gamma, alpha, tau_min, width, descriptor)",
                       description=__doc__, epilog=grids_epilog(),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_sweep_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    cfg = sweep_job_config(args)  # bad grid names and values fail before Ray starts
    import cscr.jobs.sweep as job  # Ray lives in jobs/: imported only here

    result = job.run(cfg)
    return job.exit_status(result, cfg, lambda msg: print(f"cscr {msg}", file=sys.stderr))
