"""The Serve application: ``build_app(args) -> Application`` and a local runner for ``cscr serve``.

    serve run cscr.serve.app:build_app run=runs/local pool=examples/pools/local-small.yaml
    cscr serve --run runs/local --pool examples/pools/local-small.yaml --port 8000

``build_app`` checks what it can before anything starts (the run's expert index against the
pool: a mismatch is refused with the names that differ), then binds one Router, one Expert per
pool entry and the Ingress. Arguments arrive as strings from ``serve run``; pydantic converts.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cscr.serve.protocol import ExpertSpec
from pydantic import BaseModel, ConfigDict, Field


class ServeArgs(BaseModel):
    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid")

    run: str | None = None  # trained run folder (cscr train)
    variant: str = "cscr"  # router variant of the run (cscr, vanilla, or any registered router)
    pool: str | None = None  # expert pool YAML (cscr.pool)
    experts: list[ExpertSpec] | None = None  # expert specs given directly (instead of a pool)
    encoder: str | None = None  # sentence-transformers path; None: the packaged MiniLM
    api_key: str | None = None  # bearer key; None: $CSCR_API_KEY, else no key
    admin_key: str | None = None  # key for /v1/experts; None: $CSCR_ADMIN_KEY, else the api key
    default_lambda: float = Field(0.0, ge=0)  # cost weight when a request names none
    expert_timeout_s: float = Field(120.0, gt=0)  # one expert call / first streamed token
    max_attempts: int = Field(3, ge=1)  # experts tried per request (first + fallbacks)
    default_max_tokens: int = Field(128, ge=1)
    max_prompt_chars: int = Field(32_000, ge=1)
    router_num_cpus: float = Field(0.25, ge=0)
    ingress_num_cpus: float = Field(0.1, ge=0)
    expert_num_cpus: float | None = Field(None, ge=0)  # overrides every expert's num_cpus
    expert_num_gpus: float | None = Field(None, ge=0)  # GPUs of every open-weights expert replica
    torch_threads: int = Field(1, ge=0)  # torch threads per replica (0: torch's default)
    max_batch_size: int = Field(32, ge=1)  # encoder calls batched per forward
    batch_wait_ms: float = Field(2.0, ge=0)  # how long the router waits to fill a batch
    check_pool: bool = True  # refuse a run whose index does not match the pool
    # programmatic use and tests: build the router / encoder inside the replica
    router_factory: Callable[[], Any] | None = None
    encoder_factory: Callable[[], Any] | None = None


def expert_specs(args: ServeArgs) -> list[ExpertSpec]:
    """The served experts: from ``args.experts`` or the pool YAML."""
    if args.experts is not None:
        specs = list(args.experts)
    elif args.pool is not None:
        from cscr.serve.pool import specs_from_pool

        specs = specs_from_pool(args.pool)
    else:
        raise ValueError("give a pool (pool=PATH) or expert specs")
    if not specs:
        raise ValueError("the pool has no servable expert")
    names = [s.name for s in specs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"duplicate expert names in the pool: {dup}")
    if args.expert_num_cpus is not None:
        specs = [s.model_copy(update={"num_cpus": args.expert_num_cpus}) for s in specs]
    if args.expert_num_gpus is not None:
        specs = [s.model_copy(update={"num_gpus": args.expert_num_gpus}) if s.backend != "openai" else s
                 for s in specs]
    return specs


def build_app(args: dict[str, Any] | ServeArgs) -> Any:
    """One Serve application: Router + one Expert per pool entry + the OpenAI-compatible ingress."""
    a = args if isinstance(args, ServeArgs) else ServeArgs(**args)
    if a.run is None and a.router_factory is None:
        raise ValueError("give a trained run (run=PATH)")
    if a.run is not None and not Path(a.run).is_dir():
        raise FileNotFoundError(f"run folder not found: {a.run}")
    specs = expert_specs(a)
    if a.run is not None and a.router_factory is None and a.check_pool:
        from cscr.serve.pool import check_run_matches_pool

        check_run_matches_pool(a.run, a.variant, [s.name for s in specs])
    from cscr.serve.deployments import build_graph
    from cscr.serve.ingress import IngressSettings

    settings = IngressSettings(
        api_key=a.api_key or os.environ.get("CSCR_API_KEY") or None,
        admin_key=a.admin_key or os.environ.get("CSCR_ADMIN_KEY") or None,
        expert_timeout_s=a.expert_timeout_s, max_attempts=a.max_attempts,
        default_max_tokens=a.default_max_tokens, default_lambda=a.default_lambda,
        max_prompt_chars=a.max_prompt_chars,
        expert_num_cpus=a.expert_num_cpus if a.expert_num_cpus is not None else 0.25,
    )
    source: dict[str, Any] = {"run": a.run, "variant": a.variant, "encoder": a.encoder,
                              "default_lambda": a.default_lambda, "max_prompt_chars": a.max_prompt_chars,
                              "encoder_factory": a.encoder_factory}
    router_options = {"ray_actor_options": {"num_cpus": a.router_num_cpus}}
    return build_graph(source, specs, settings, router_options=router_options,
                       torch_threads=a.torch_threads, router_factory=a.router_factory,
                       ingress_num_cpus=a.ingress_num_cpus, max_batch_size=a.max_batch_size,
                       batch_wait_s=a.batch_wait_ms / 1e3)


def run_local(args: ServeArgs, host: str = "127.0.0.1", port: int = 8000, num_cpus: int | None = None,
              address: str | None = None, blocking: bool = True) -> Any:
    """Start (or join) Ray, start Serve's HTTP proxy on host:port and deploy the app."""
    import ray
    from ray import serve as ray_serve

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    app = build_app(args)  # validate before starting anything
    if not ray.is_initialized():
        if address:
            ray.init(address=address)
        else:
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False)  # a fresh cluster
    if not blocking:
        ray_serve.start(http_options={"host": host, "port": port}, proxy_location="HeadOnly")
        return ray_serve.run(app, name="cscr", route_prefix="/", blocking=False)
    import signal
    import time

    def _stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    handle: Any = None
    # SIGTERM (a process manager, `kill`) stops the server like Ctrl-C does, also during start-up
    # (this replaces the handler ray.init installed, which exits without shutting Serve down)
    signal.signal(signal.SIGTERM, _stop)
    try:
        ray_serve.start(http_options={"host": host, "port": port}, proxy_location="HeadOnly")
        handle = ray_serve.run(app, name="cscr", route_prefix="/", blocking=False)
        print(f"cscr: serving on http://{host}:{port}/v1 (Ctrl-C to stop)", flush=True)
        while True:
            time.sleep(3600)
    except (KeyboardInterrupt, SystemExit):
        print("cscr: stopping", flush=True)
    finally:
        ray_serve.shutdown()
        ray.shutdown()
    return handle
