"""``cscr fingerprint``: expert descriptors for a pool, on an embedded local Ray cluster.

    cscr fingerprint --pool examples/pools/local-small.yaml --run runs/local
    cscr fingerprint --pool examples/pools/routerbench.yaml --run runs/routerbench

The same job as ``ray job submit --working-dir . -- python jobs/fingerprint.py ...``
(jobs/fingerprint.py): logit footprints for open-weights experts, perplexity fingerprints for
black-box and recorded ones, written to RUN/descriptors.parquet; finished experts are skipped
unless --force.
"""

from __future__ import annotations

import argparse
from typing import Any

from cscr.errors import InputError


def register(subparsers: Any) -> None:
    from cscr.jobs.fingerprint import add_arguments

    p = subparsers.add_parser("fingerprint", help="compute expert descriptors (logit / perplexity) for a pool",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the embedded Ray cluster")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cscr.pool import load_pool
    from cscr.run import RunPaths

    if not args.pool or not args.run:
        raise InputError("--pool and --run are required")
    pool = load_pool(args.pool)
    from cscr.jobs.fingerprint import fingerprint_local

    out = fingerprint_local(pool, args.run, args)
    print(f"fingerprinted {len(out['done'])} expert(s) ({', '.join(out['done']) or 'none'}), skipped "
          f"{len(out['skipped'])}, {out['probes']} probes, {out['seconds']:.1f}s -> {RunPaths.of(args.run).descriptors}")
    return 0
