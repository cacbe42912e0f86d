"""``cscr report``: one markdown report with PNG figures over every run folder.

    cscr report                       # runs/ -> report/report.md (+ report/figures/)
    cscr report --runs runs --out report

Main table per data set (every router, from ``<run>/eval/metrics.json``), significance of CSCR
against the strongest baseline (paired bootstrap, McNemar), the generalisation experiments
(``<run>/experiments/*``) and the ablation sweeps (``<run>/sweeps/*``). Anything not run yet is
listed as "not run" with the command that produces it. Regenerate by running it again: the
output folder is replaced as a whole.
"""

from __future__ import annotations

import argparse
from typing import Any


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("report", help="build the markdown report over all runs",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", default="runs", help="folder holding the run folders (default: runs)")
    p.add_argument("--out", default="report", help="report folder, replaced as a whole (default: report)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cscr.report import build_report

    path = build_report(args.runs, args.out)
    figures = sorted((path.parent / "figures").rglob("*.png"))
    print(f"wrote {path} ({len(figures)} figures under {path.parent / 'figures'})")
    return 0
