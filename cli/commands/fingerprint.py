"""``cscr fingerprint``: expert descriptors for a pool, on an embedded local Ray cluster.

    cscr fingerprint --pool examples/pools/local-small.yaml --run runs/local
    cscr fingerprint --pool examples/pools/routerbench.yaml --run runs/routerbench

The same job as ``ray job submit --working-dir . -- python jobs/fingerprint.py ...``
(jobs/fingerprint.py, the same options): logit footprints for open-weights experts, perplexity fingerprints for
black-box and recorded ones, written to RUN/descriptors.parquet; finished experts are skipped
unless --force. ``--address`` joins a running cluster instead.
"""

from __future__ import annotations

import argparse
from typing import Any

from cscr.jobs.data_options import add_fingerprint_options, fingerprint_config


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("fingerprint", help="compute expert descriptors (logit / perplexity) for a pool",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_fingerprint_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cscr.jobs.fingerprint import describe
    from cscr.jobs.fingerprint import run as fingerprint_job

    job = fingerprint_config(args)
    out = fingerprint_job(job)
    if job.run is not None and not job.smoke_test:  # the run's settings record (cscr.runs.settings)
        from cscr.runs.settings import record_settings

        record_settings(job.run, "fingerprint", {"pool": job.pool, "kinds": out.basis, "experts": out.done + out.skipped})
    print(describe(out))
    return 0
