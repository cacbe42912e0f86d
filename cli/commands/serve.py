"""``cscr serve``: the router and the pool's experts behind an OpenAI-compatible HTTP API.

    cscr serve --run runs/local --pool examples/pools/local-small.yaml --port 8000
    # then, from any OpenAI client:
    #   OpenAI(base_url="http://127.0.0.1:8000/v1", api_key=...).chat.completions.create(
    #       model="cscr", messages=[...], extra_body={"cost_weight": 0.3})

Starts an embedded local Ray cluster with Ray's token auth (or joins one with --address, e.g. on
a cluster started from cluster.yaml) and deploys the Serve application of serve/app.py: the pool
controller, the Router (--router-replicas, or autoscaling with --max-replicas), one application
per expert, the ingress (--ingress-replicas); with --router-in-ingress every ingress replica routes
itself (no Router deployment, one hop less). The run's expert index must match the pool (refused
otherwise, before anything starts). The live pool is saved in --state-dir (default RUN/serve-state)
on every admin change, and restored from there on the next start. Ctrl-C or SIGTERM stops it;
exit code 3 when its Ray cluster dies.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Any

from cscr.jobs.data_options import add_cluster_options


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
                   help="bearer key of the admin API (/v1/experts, /healthz details); default: "
                        "$CSCR_ADMIN_KEY; none: the admin API is disabled. Must differ from the API key")
    p.add_argument("--allow-upstream", action="append", default=[], metavar="URL=ENV",
                   help="an OpenAI-compatible upstream admin-added experts may use, with the environment "
                        "variable holding its key (repeatable; the pool file's upstreams are always allowed)")
    p.add_argument("--model-root", action="append", default=[], metavar="DIR",
                   help="a folder admin-added local models may come from (repeatable; packaged models and "
                        "the pool file's models are always allowed)")
    p.add_argument("--enable-docs", action="store_true",
                   help="serve /docs, /redoc and /openapi.json (off by default)")
    p.add_argument("--cost-weight", type=float, default=0.0,
                   help="lambda when a request names none (default: 0)")
    p.add_argument("--default-budget", type=float, default=None,
                   help="instead of --cost-weight: route requests that name nothing at the best operating point "
                        "within this expected mean cost per request (run's unit; see cscr calibrate)")
    p.add_argument("--default-quality-target", default=None,
                   help="instead of --cost-weight: the cheapest operating point meeting this quality "
                        "(absolute, e.g. 0.7, or relative to the best expert, e.g. 0.95x)")
    p.add_argument("--keys", default=None,
                   help="YAML/JSON file of API keys with spend budgets ([{key, name, budget, rpm?}], budget in "
                        "the run's unit): spend is tallied per key and a key over its budget gets a 429; "
                        "rpm limits a key to that many requests in any 60 s (429 with Retry-After past it)")
    p.add_argument("--expert-timeout", type=float, default=120.0,
                   help="seconds before an expert call falls back to the next candidate")
    p.add_argument("--breaker-failures", type=int, default=3,
                   help="failures in a row (errors or timeouts) that take an expert out of rotation; one "
                        "dead-replica error always does (default: 3)")
    p.add_argument("--breaker-cooldown", type=float, default=10.0,
                   help="seconds an expert out of rotation is skipped without a call before one trial "
                        "request decides whether it is back (default: 10)")
    p.add_argument("--expert-cpus", type=float, default=None, help="Ray CPUs per expert replica")
    p.add_argument("--expert-gpus", type=float, default=None,
                   help="GPUs per open-weights expert replica (1 for vLLM on GPU clusters)")
    p.add_argument("--state-dir", default=None,
                   help="folder of the durable pool record (default: RUN/serve-state); the latest "
                        "version there is served on start")
    p.add_argument("--router-replicas", type=int, default=1, help="Router replicas (default: 1)")
    p.add_argument("--router-in-ingress", action="store_true",
                   help="route inside every Ingress replica (its own encoder and index) instead of a Router "
                        "deployment: saves the ingress-to-router hop; routers then scale with --ingress-replicas")
    p.add_argument("--max-batch-size", type=int, default=32,
                   help="prompts the router embeds in one encoder forward (default: 32)")
    p.add_argument("--batch-wait-ms", type=float, default=0.0,
                   help="extra wait to fill an encoder batch (default: 0: continuous batching, a lone request "
                        "is embedded at once and requests arriving during a forward share the next one)")
    p.add_argument("--ingress-replicas", type=int, default=1, help="Ingress (HTTP) replicas (default: 1)")
    p.add_argument("--min-replicas", type=int, default=None,
                   help="autoscaling: fewest Router/Ingress replicas (default: 1; needs --max-replicas)")
    p.add_argument("--max-replicas", type=int, default=None,
                   help="autoscaling: most Router/Ingress replicas (set: Serve autoscales both)")
    p.add_argument("--target-ongoing-requests", type=float, default=8.0,
                   help="autoscaling: ongoing requests per replica Serve aims at (default: 8)")
    p.add_argument("--drain-timeout", type=float, default=30.0,
                   help="on Ctrl-C / SIGTERM: new requests get a 503 to retry while those in flight finish, "
                        "for at most this many seconds, then the port closes (0: close at once)")
    p.add_argument("--expert-deploy-timeout", type=float, default=600.0,
                   help="seconds an expert added at run time may take to start (default: 600)")
    add_cluster_options(p)
    p.set_defaults(func=run)


def quality_target(text: str | None) -> float | str | None:
    """--default-quality-target: a number (absolute) or a string such as 0.95x (relative)."""
    if text is None or text.strip().lower().endswith("x"):
        return text
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"--default-quality-target must be a number or a multiple such as 0.95x, got {text!r}") from None


def run(args: argparse.Namespace) -> int:
    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be in 1..65535, got {args.port}")
    for flag, value, low in (("--router-replicas", args.router_replicas, 1),
                             ("--ingress-replicas", args.ingress_replicas, 1),
                             ("--min-replicas", args.min_replicas, 0), ("--max-replicas", args.max_replicas, 1)):
        if value is not None and value < low:
            raise ValueError(f"{flag} must be >= {low}, got {value}")
    if args.router_in_ingress and args.router_replicas != 1:
        raise ValueError("--router-replicas has no effect with --router-in-ingress (every ingress replica "
                         "routes): scale --ingress-replicas")
    if args.min_replicas is not None and args.max_replicas is None:
        raise ValueError("--min-replicas needs --max-replicas (autoscaling)")
    if args.max_batch_size < 1:
        raise ValueError(f"--max-batch-size must be >= 1, got {args.max_batch_size}")
    if not 0 <= args.batch_wait_ms <= 1000:
        raise ValueError(f"--batch-wait-ms must be in 0..1000, got {args.batch_wait_ms}")
    if args.breaker_failures < 1:
        raise ValueError(f"--breaker-failures must be >= 1, got {args.breaker_failures}")
    if not 0 <= args.breaker_cooldown <= 86_400:
        raise ValueError(f"--breaker-cooldown must be in 0..86400 seconds, got {args.breaker_cooldown}")
    if not args.target_ongoing_requests > 0:
        raise ValueError(f"--target-ongoing-requests must be > 0, got {args.target_ongoing_requests}")
    from cscr.serve.app import ServeArgs, run_local

    from cscr.runs.settings import head_line

    print(f"cscr: serving {head_line(args.run, args.variant) or args.variant}", file=sys.stderr, flush=True)

    sargs = ServeArgs(
        run=args.run, pool=args.pool, variant=args.variant, api_key=args.api_key, admin_key=args.admin_key,
        allow_upstreams=args.allow_upstream, model_roots=args.model_root,
        enable_docs=args.enable_docs,
        default_lambda=args.cost_weight, default_budget=args.default_budget,
        default_quality_target=quality_target(args.default_quality_target), keys=args.keys, expert_timeout_s=args.expert_timeout,
        breaker_failures=args.breaker_failures, breaker_cooldown_s=args.breaker_cooldown,
        expert_num_cpus=args.expert_cpus, expert_num_gpus=args.expert_gpus,
        state_dir=args.state_dir or os.path.join(args.run, "serve-state"),
        router_replicas=args.router_replicas, ingress_replicas=args.ingress_replicas,
        router_in_ingress=args.router_in_ingress,
        min_replicas=args.min_replicas, max_replicas=args.max_replicas,
        target_ongoing_requests=args.target_ongoing_requests, expert_apps=True,
        expert_deploy_timeout_s=args.expert_deploy_timeout, drain_timeout_s=args.drain_timeout,
        max_batch_size=args.max_batch_size, batch_wait_ms=args.batch_wait_ms,
    )
    run_local(sargs, host=args.host, port=args.port, num_cpus=math.ceil(args.num_cpus) if args.num_cpus else None,
              address=args.address)
    return 0
