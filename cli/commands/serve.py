"""``cscr serve``: the router and the pool's experts behind an OpenAI-compatible HTTP API.

    cscr serve --run runs/local --pool examples/pools/local-small.yaml --port 8000
    # then, from any OpenAI client:
    #   OpenAI(base_url="http://127.0.0.1:8000/v1", api_key=...).chat.completions.create(
    #       model="cscr", messages=[...], extra_body={"cost_weight": 0.3})

Starts an embedded local Ray cluster (or joins one with --address, e.g. on a cluster started from
cluster.yaml) and deploys the Serve application of serve/app.py: one Router, one Expert per pool
entry, the ingress. The run's expert index must match the pool (refused otherwise, before
anything starts). Ctrl-C stops it.
"""

from __future__ import annotations

import argparse
import os
from typing import Any


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("serve", help="serve the router and the pool over an OpenAI-compatible API",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="trained run folder (cscr train)")
    p.add_argument("--pool", required=True, help="expert pool YAML (open-weights and black-box experts)")
    p.add_argument("--variant", default="cscr", help="router variant of the run (default: cscr)")
    p.add_argument("--host", default="127.0.0.1", help="HTTP host (default: loopback only)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default: 8000)")
    p.add_argument("--api-key", default=None,
                   help="bearer key clients must send (default: $CSCR_API_KEY; none: open)")
    p.add_argument("--admin-key", default=None,
                   help="bearer key for /v1/experts (default: $CSCR_ADMIN_KEY, else the API key)")
    p.add_argument("--cost-weight", type=float, default=0.0,
                   help="lambda when a request names none (default: 0)")
    p.add_argument("--expert-timeout", type=float, default=120.0,
                   help="seconds before an expert call falls back to the next candidate")
    p.add_argument("--expert-cpus", type=float, default=None, help="Ray CPUs per expert replica")
    p.add_argument("--expert-gpus", type=float, default=None,
                   help="GPUs per open-weights expert replica (1 for vLLM on GPU clusters)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the embedded Ray cluster")
    p.add_argument("--address", default=None,
                   help="join this Ray cluster instead of starting one (e.g. 'auto' on a cluster head)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be in 1..65535, got {args.port}")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from cscr.serve.app import ServeArgs, run_local

    sargs = ServeArgs(
        run=args.run, pool=args.pool, variant=args.variant, api_key=args.api_key, admin_key=args.admin_key,
        default_lambda=args.cost_weight, expert_timeout_s=args.expert_timeout,
        expert_num_cpus=args.expert_cpus, expert_num_gpus=args.expert_gpus,
    )
    run_local(sargs, host=args.host, port=args.port, num_cpus=args.num_cpus, address=args.address)
    return 0
