"""``cscr sweep --run R --grid NAME``: CSCR ablation sweeps on an embedded local Ray (jobs/sweep.py)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sweep", help="Ray Tune ablation sweep (bands, k, gamma, alpha, tau_min, width, descriptor)")
    p.add_argument("--run", required=True, help="prepared run folder")
    p.add_argument("--grid", default="all", help="grid name(s), comma-separated, or 'all'")
    p.add_argument("--epochs", type=int, default=None, help="epochs per trial (default 10)")
    p.add_argument("--concurrency", type=int, default=None, help="trials at a time")
    p.add_argument("--cpus-per-trial", type=float, default=0.5)
    p.add_argument("--no-resume", action="store_true", help="start over instead of resuming an earlier sweep")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cscr.run import RunPaths
    from cscr.sweep import grid_names

    grid_names(args.grid)  # bad grid names fail before Ray starts
    RunPaths.of(args.run).require_table()
    import cscr.jobs.sweep  # lazily: Ray lives in jobs/

    argv = ["--run", args.run, "--grid", args.grid, "--cpus-per-trial", str(args.cpus_per_trial)]
    if args.epochs:
        argv += ["--epochs", str(args.epochs)]
    if args.concurrency:
        argv += ["--concurrency", str(args.concurrency)]
    if args.no_resume:
        argv.append("--no-resume")
    return cscr.jobs.sweep.main(argv)
