"""``cscr label``: routing data from a live pool (batch inference on an embedded local Ray).

    cscr label --pool examples/pools/local-small.yaml --tasks builtin --n 300 --out runs/local
    cscr label --pool my-pool.yaml --prompts prompts.jsonl --out runs/mine

Every live expert answers every prompt (Ray Data; transformers or vLLM), answers are graded
(exact, mc, numeric: cscr.grading), cost (parameters x tokens, or prices x tokens) and latency
recorded, and a routing table written to OUT/table, with splits (train/val/probe/test). Then
``cscr fingerprint``, ``cscr train`` and ``cscr evaluate`` run on OUT as on any other run.
The same job, with the same options: ``ray job submit --working-dir . -- python jobs/label.py ...``.
"""

from __future__ import annotations

import argparse
from typing import Any

from cscr.jobs.data_options import add_label_options, label_config


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("label", help="run a live pool on prompts with answers and write a routing table",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_label_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cscr.jobs.label import describe
    from cscr.jobs.label import run as label_job

    print(describe(label_job(label_config(args))))
    return 0
