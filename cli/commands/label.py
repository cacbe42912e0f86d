"""``cscr label``: routing data from a live pool (batch inference on an embedded local Ray).

    cscr label --pool examples/pools/local-small.yaml --tasks builtin --n 300 --out runs/local
    cscr label --pool my-pool.yaml --prompts prompts.jsonl --out runs/mine

Every live expert answers every prompt (Ray Data; transformers or vLLM), answers are graded
(exact, mc, numeric: cscr.grading), cost (parameters x tokens, or prices x tokens) and latency
recorded, and a routing table written to OUT/table, with splits (train/val/probe/test). Then
``cscr fingerprint``, ``cscr train`` and ``cscr evaluate`` run on OUT as on any other run.
The same job: ``ray job submit --working-dir . -- python jobs/label.py ...``.
"""

from __future__ import annotations

import argparse
from typing import Any

from cscr.errors import InputError


def register(subparsers: Any) -> None:
    from cscr.jobs.label import add_arguments

    p = subparsers.add_parser("label", help="run a live pool on prompts with answers and write a routing table",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the embedded Ray cluster")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cscr.pool import load_pool

    if not args.pool or not args.out:
        raise InputError("--pool and --out are required")
    pool = load_pool(args.pool)
    from cscr.jobs.label import label_local, load_tasks, summary

    res = label_local(pool, load_tasks(args), args.out, args)
    print(summary(res["table"], res["seconds"]))
    print(f"table -> {args.out}/table; per-call records -> {res['calls']}")
    return 0
