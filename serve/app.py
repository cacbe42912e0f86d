"""The Serve application: ``build_app(args) -> Application`` and a local runner for ``cscr serve``.

    serve run cscr.serve.app:build_app run=runs/local pool=examples/pools/local-small.yaml
    cscr serve --run runs/local --pool examples/pools/local-small.yaml --port 8000

``build_app`` checks what it can before anything starts (the run's expert index against the
pool: a mismatch is refused with the names that differ), makes the first pool record (or
loads the latest one from the state folder: ``serve.state``), then binds the PoolController,
the Router (``router_replicas`` or autoscaling), the experts and the Ingress (``ingress_replicas``
or autoscaling). With ``router_in_ingress`` there is no Router deployment: every Ingress replica
holds its own router (``serve.router_core.RouterCore``) and its CPU share. This module is the
only place deployments are bound: experts with their own application (every expert under
``cscr serve``, and experts added at run time) are bound by ``ExpertLauncher``. Arguments
arrive as strings from ``serve run``; pydantic converts.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cscr.serve.protocol import ProtocolError
from cscr.serve.state import PoolEntry, PoolRecord, PoolStore
from pydantic import BaseModel, ConfigDict, Field

from cscr.pool import ExpertSpec

log = logging.getLogger("cscr.serve")


class ServeArgs(BaseModel):
    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid")

    run: str | None = None  # trained run folder (cscr train)
    variant: str = "cscr"  # router variant of the run (cscr, vanilla, or any registered router)
    pool: str | None = None  # expert pool YAML (cscr.pool)
    experts: list[ExpertSpec] | None = None  # expert specs given directly (instead of a pool)
    encoder: str | None = None  # sentence-transformers path; None: the packaged MiniLM
    api_key: str | None = None  # bearer key; None: $CSCR_API_KEY, else no key
    admin_key: str | None = None  # key of the admin API; None: $CSCR_ADMIN_KEY, else admin disabled
    enable_docs: bool = False  # serve /docs, /redoc and /openapi.json
    default_lambda: float = Field(0.0, ge=0)  # cost weight when a request names none
    default_budget: float | None = Field(None, ge=0)  # or: lambda of the best point within this mean cost
    default_quality_target: float | str | None = None  # or: of the cheapest point meeting it (0.7, "0.95x")
    keys: str | None = None  # YAML/JSON of API keys with spend budgets (serve.budgets); None: no per-key budgets
    expert_timeout_s: float = Field(120.0, gt=0)  # one expert call / first streamed token
    max_attempts: int = Field(3, ge=1)  # experts tried per request (first + fallbacks)
    default_max_tokens: int = Field(128, ge=1)
    max_prompt_chars: int = Field(32_000, ge=1)
    max_messages: int = Field(256, ge=1)  # chat messages per request
    max_stop: int = Field(4, ge=0)  # stop strings per request
    max_stop_chars: int = Field(64, ge=1)  # characters per stop string
    breaker_failures: int = Field(3, ge=1)  # failures in a row that open an expert's circuit
    breaker_cooldown_s: float = Field(10.0, ge=0)  # how long an open circuit skips the expert
    router_num_cpus: float = Field(0.25, ge=0)
    ingress_num_cpus: float = Field(0.1, ge=0)
    expert_num_cpus: float | None = Field(None, ge=0)  # overrides every expert's num_cpus
    expert_num_gpus: float | None = Field(None, ge=0)  # GPUs of every open-weights expert replica
    torch_threads: int = Field(1, ge=0)  # torch threads per replica (0: torch's default)
    max_batch_size: int = Field(32, ge=1)  # encoder calls batched per forward
    batch_wait_ms: float = Field(0.0, ge=0)  # extra wait to fill an encoder batch (0: continuous batching only)
    check_pool: bool = True  # refuse a run whose index does not match the pool
    state_dir: str | None = None  # durable pool record (None: in memory only; cscr serve: RUN/serve-state)
    router_replicas: int = Field(1, ge=1)
    router_in_ingress: bool = False  # every Ingress replica routes itself: no Router deployment, no hop
    ingress_replicas: int = Field(1, ge=1)
    min_replicas: int | None = Field(None, ge=0)  # autoscaling of Router and Ingress (with max_replicas)
    max_replicas: int | None = Field(None, ge=1)  # set: Router and Ingress autoscale in [min, max]
    target_ongoing_requests: float = Field(8.0, gt=0)  # per replica, what autoscaling aims at
    expert_apps: bool = False  # every expert in its own application (cscr serve: DELETE frees replicas)
    expert_deploy_timeout_s: float = Field(600.0, gt=0)  # an added expert must serve within this
    drain_timeout_s: float = Field(30.0, ge=0)  # on stop: requests in flight may finish within this (0: none)
    converge_timeout_s: float = Field(30.0, gt=0)  # admin calls wait this long for every replica
    # what admin-added experts may use (serve.policy), besides the pool file's own sources:
    allow_upstreams: list[str] = Field(default_factory=list)  # "BASE_URL=ENV": an upstream and its key variable
    model_roots: list[str] = Field(default_factory=list)  # folders local model paths must resolve into
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


def replica_options(a: ServeArgs, replicas: int) -> dict[str, Any]:
    """``num_replicas``, or Serve autoscaling when ``max_replicas`` is set."""
    if a.max_replicas is None:
        return {"num_replicas": replicas}
    low = a.min_replicas if a.min_replicas is not None else 1
    if low > a.max_replicas:
        raise ValueError(f"min_replicas ({low}) is above max_replicas ({a.max_replicas})")
    return {"num_replicas": "auto", "autoscaling_config": {
        "min_replicas": low, "max_replicas": a.max_replicas,
        "target_ongoing_requests": a.target_ongoing_requests}}


def initial_record(a: ServeArgs, specs: list[ExpertSpec]) -> PoolRecord:
    """The latest stored pool record of ``a.state_dir``, else version 1 from the pool and the run's costs."""
    if a.state_dir is not None:
        stored = PoolStore(a.state_dir).load()
        if stored is not None:
            log.warning("cscr: restored pool version %d from %s (%d experts); the pool file is not read "
                        "again (move the state folder away to start from it)", stored.version,
                        PoolStore(a.state_dir).path, len(stored.experts))
            return stored
    if a.router_factory is not None:
        router = a.router_factory()
    else:
        from cscr.runs.loader import load_router

        router = load_router(Path(str(a.run)), a.variant)
    costs = {n: float(c) for n, c in zip(router.expert_names, router.costs, strict=True)}
    launcher = ExpertLauncher(a.torch_threads, a.expert_deploy_timeout_s)
    return PoolRecord(version=1, experts=[
        PoolEntry(spec=s, cost=costs[s.name], app=launcher.new_app(s.name) if a.expert_apps else None)
        for s in specs if s.name in costs])


def build_app(args: dict[str, Any] | ServeArgs) -> Any:
    """One Serve application: PoolController + Router + experts + the OpenAI-compatible ingress
    (which routes itself, without a Router deployment, with ``router_in_ingress``)."""
    return plan_app(args)[0]


def plan_app(args: dict[str, Any] | ServeArgs) -> tuple[Any, PoolRecord, ServeArgs]:
    """(the application, the pool record it starts from, the checked arguments)."""
    a = args if isinstance(args, ServeArgs) else ServeArgs(**args)
    if a.run is None and a.router_factory is None:
        raise ValueError("give a trained run (run=PATH)")
    if a.run is not None and not Path(a.run).is_dir():
        raise FileNotFoundError(f"run folder not found: {a.run}")
    specs = expert_specs(a)
    if a.run is not None and a.router_factory is None and a.check_pool:
        from cscr.serve.pool import check_run_matches_pool

        check_run_matches_pool(a.run, a.variant, [s.name for s in specs])
    api_key = a.api_key or os.environ.get("CSCR_API_KEY") or None
    admin_key = a.admin_key or os.environ.get("CSCR_ADMIN_KEY") or None
    if admin_key is not None and admin_key == api_key:
        raise ValueError("the admin key must differ from the API key (every API user would be an admin)")
    if a.router_in_ingress and a.router_replicas != 1:
        raise ValueError("router_replicas has no effect with router_in_ingress (each Ingress replica routes): "
                         "scale ingress_replicas")
    router_opts, ingress_opts = replica_options(a, a.router_replicas), replica_options(a, a.ingress_replicas)
    record = initial_record(a, specs)
    from cscr.serve.completion import CompletionSettings
    from cscr.serve.deployments import Ingress, PoolController, RouterDeployment
    from cscr.serve.routes import EdgeSettings

    completion = CompletionSettings(
        expert_timeout_s=a.expert_timeout_s, max_attempts=a.max_attempts,
        default_max_tokens=a.default_max_tokens, default_lambda=a.default_lambda,
        max_prompt_chars=a.max_prompt_chars, max_messages=a.max_messages, max_stop=a.max_stop,
        max_stop_chars=a.max_stop_chars, breaker_failures=a.breaker_failures,
        breaker_cooldown_s=a.breaker_cooldown_s)
    key_budgets = None
    if a.keys is not None:
        from cscr.serve.budgets import KeyBudgets

        key_budgets = KeyBudgets.load_entries(a.keys)
        if admin_key is not None and any(e["key"] == admin_key for e in key_budgets):
            raise ValueError("a key of the keys file is the admin key (every holder would be an admin)")
    edge = EdgeSettings(api_key=api_key, admin_key=admin_key, enable_docs=a.enable_docs, key_budgets=key_budgets)
    source: dict[str, Any] = {"run": a.run, "variant": a.variant, "encoder": a.encoder,
                              "default_lambda": a.default_lambda, "max_prompt_chars": a.max_prompt_chars,
                              "default_budget": a.default_budget, "default_quality_target": a.default_quality_target,
                              "encoder_factory": a.encoder_factory, "router_factory": a.router_factory}
    # the controller holds the state folder: it runs on the head node (where cscr serve writes it)
    controller = PoolController.options(  # type: ignore[attr-defined]  # a @serve.deployment class
        ray_actor_options={"num_cpus": 0, "resources": {"node:__internal_head__": 0.001}},
    ).bind(record.model_dump(), a.state_dir)
    router_kwargs = {"source": source, "max_batch_size": a.max_batch_size,
                     "batch_wait_timeout_s": a.batch_wait_ms / 1e3, "torch_threads": a.torch_threads}
    router, local_router, ingress_cpus = None, None, a.ingress_num_cpus
    if a.router_in_ingress:  # each Ingress replica does the Router's work too: it gets its CPU share
        local_router, ingress_cpus = router_kwargs, a.ingress_num_cpus + a.router_num_cpus
    else:
        router = RouterDeployment.options(ray_actor_options={"num_cpus": a.router_num_cpus},  # type: ignore[attr-defined]
                                          **router_opts).bind(controller=controller, **router_kwargs)
    bound = {e.name: expert_application(e.spec, a.torch_threads) for e in record.experts if e.app is None}
    ingress = Ingress.options(ray_actor_options={"num_cpus": ingress_cpus}, **ingress_opts)  # type: ignore[attr-defined]
    from cscr.serve.policy import SourcePolicy

    policy = SourcePolicy.build(specs, a.allow_upstreams, a.model_roots)
    admin = {"expert_num_cpus": a.expert_num_cpus if a.expert_num_cpus is not None else 0.25,
             "converge_timeout_s": a.converge_timeout_s, "policy": policy.model_dump()}
    app = ingress.bind(router, controller, bound, completion.model_dump(), edge.model_dump(),
                       ExpertLauncher(a.torch_threads, a.expert_deploy_timeout_s), admin, local_router=local_router)
    return app, record, a


def expert_application(spec: ExpertSpec, torch_threads: int = 1) -> Any:
    """One expert's deployment, bound (its replica's resources and concurrency from the spec)."""
    from cscr.serve.deployments import ExpertDeployment, deployment_name

    return ExpertDeployment.options(  # type: ignore[attr-defined]  # a @serve.deployment class
        name=deployment_name(spec.name), max_ongoing_requests=spec.max_concurrency,
        ray_actor_options={"num_cpus": spec.num_cpus, "num_gpus": spec.num_gpus},
    ).bind(spec.model_dump(), torch_threads)


def check_resources(spec: ExpertSpec) -> None:
    """Refuse at once an expert whose replica no node could ever hold (400) or that the cluster
    cannot hold now (503), instead of a deploy that waits for resources forever."""
    import ray

    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    free = ray.available_resources()
    for key, need in (("CPU", spec.num_cpus), ("GPU", spec.num_gpus)):
        if not need:
            continue
        largest = max((float(r.get(key, 0.0)) for r in nodes), default=0.0)
        if need > largest:
            raise ProtocolError(f"expert {spec.name!r} asks for {need:g} {key} per replica; the largest "
                                f"node of the cluster has {largest:g}", status=400,
                                code="insufficient_resources", param=f"expert.num_{key.lower()}s")
        if need > float(free.get(key, 0.0)) + 1e-9:
            raise ProtocolError(f"expert {spec.name!r} asks for {need:g} {key}; the cluster has "
                                f"{float(free.get(key, 0.0)):g} free now", status=503,
                                code="insufficient_resources", type_="server_error",
                                param=f"expert.num_{key.lower()}s")


@dataclass(frozen=True)
class ExpertLauncher:
    """Runs an expert as its own Serve application (an expert added at run time, or every expert
    under ``cscr serve``): resources checked up front, the deploy bounded by ``deploy_timeout_s``,
    the application deleted on any failure."""

    torch_threads: int = 1
    deploy_timeout_s: float = 600.0

    @staticmethod
    def new_app(expert: str) -> str:
        """A fresh application name (a racing add of the same expert never shares it)."""
        from cscr.serve.deployments import deployment_name

        return f"cscr-expert-{deployment_name(expert).removeprefix('Expert_')}-{secrets.token_hex(3)}"

    def start(self, spec: ExpertSpec, app: str | None = None) -> str:
        from ray import serve as ray_serve

        check_resources(spec)
        name = app or self.new_app(spec.name)
        deadline = time.monotonic() + self.deploy_timeout_s
        try:
            ray_serve._run(expert_application(spec, self.torch_threads), name=name, route_prefix=None,
                           _blocking=False)
            state, message = wait_for_app(name, deadline)
            if state == "RUNNING":
                return name
            if state == "TIMEOUT":
                raise ProtocolError(f"expert {spec.name!r} did not start within {self.deploy_timeout_s:g} s",
                                    status=504, code="expert_start_timeout", type_="server_error")
            raise ProtocolError(f"expert {spec.name!r} failed to start: {message[-400:]}", status=400,
                                code="expert_start_failed", param="expert")
        except BaseException:
            self.stop(name)
            raise

    def stop(self, app: str) -> None:
        from ray import serve as ray_serve

        try:
            ray_serve.delete(app)
        except Exception as exc:  # already gone
            log.warning("could not delete application %s: %r", app, exc)

    @staticmethod
    def handle(spec: ExpertSpec, app: str) -> Any:
        from cscr.serve.deployments import deployment_name
        from ray import serve as ray_serve

        # looked up lazily: the application may still be starting (calls wait for its replicas)
        return ray_serve.get_deployment_handle(deployment_name(spec.name), app, _check_exists=False)


def wait_for_app(name: str, deadline: float) -> tuple[str, str]:
    """Poll a Serve application until it runs, fails or ``deadline`` (monotonic) passes:
    ("RUNNING" | "DEPLOY_FAILED" | "UNHEALTHY" | "TIMEOUT", its status message)."""
    from ray import serve as ray_serve

    while True:
        status = ray_serve.status().applications.get(name)
        state = str(getattr(getattr(status, "status", ""), "value", getattr(status, "status", "")))
        if state in ("RUNNING", "DEPLOY_FAILED", "UNHEALTHY"):
            return state, str(getattr(status, "message", ""))
        if time.monotonic() > deadline:
            return "TIMEOUT", ""
        time.sleep(0.5)


def secure_embedded_cluster() -> None:
    """Token auth for an embedded cluster: Ray listens on every interface (it cannot bind a node
    to loopback), so every driver, worker and CLI call must present this process's token. Call it
    before ray is imported in this process (Ray reads the mode once, at import)."""
    import sys

    if "ray" in sys.modules and os.environ.get("RAY_AUTH_MODE") != "token":
        log.warning("cscr: ray was imported before token auth could be turned on; the embedded cluster "
                    "runs with RAY_AUTH_MODE=%s (start cscr serve through its CLI)",
                    os.environ.get("RAY_AUTH_MODE", "disabled"))
        return
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ.pop("RAY_AUTH_TOKEN_PATH", None)
    os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_urlsafe(32))


def cluster_problem(embedded: bool) -> str | None:
    """Why the Ray cluster this process uses is gone (None: it is alive)."""
    import ray

    if not ray.is_initialized():
        return "Ray is no longer initialised in this process"
    if embedded:
        from ray._private import worker

        node = getattr(worker, "_global_node", None)
        dead = node.dead_processes() if node is not None else []
        if dead:
            return "Ray processes exited: " + ", ".join(sorted({str(kind) for kind, _ in dead}))
    return None


def launch_expert_apps(record: PoolRecord, launcher: ExpertLauncher) -> None:
    """Start every expert of ``record`` that has its own application (in parallel)."""
    from concurrent.futures import ThreadPoolExecutor

    own = [e for e in record.experts if e.app is not None]
    if own:
        with ThreadPoolExecutor(max_workers=len(own)) as pool:
            list(pool.map(lambda e: launcher.start(e.spec, e.app), own))


def deploy(app: Any, record: PoolRecord, launcher: ExpertLauncher, timeout_s: float = 1800.0) -> Any:
    """Deploy the main application first (its route exists at once: a request that arrives while
    replicas start waits for them instead of meeting a 404), then the experts' applications;
    returns once everything runs."""
    from ray import serve as ray_serve

    handle = ray_serve._run(app, name="cscr", route_prefix="/", _blocking=False)
    launch_expert_apps(record, launcher)
    state, message = wait_for_app("cscr", time.monotonic() + timeout_s)
    if state != "RUNNING":
        raise RuntimeError(f"the cscr application did not start ({state}): {message[-1000:]}")
    return handle


def run_local(args: ServeArgs, host: str = "127.0.0.1", port: int = 8000, num_cpus: int | None = None,
              address: str | None = None, blocking: bool = True, watch_s: float = 2.0) -> Any:
    """Start (or join) Ray, start Serve's HTTP proxy on host:port, start the experts' applications
    and deploy the app. An embedded cluster runs with Ray's token auth; a watchdog exits the
    process (code 3, one log line) when the cluster dies."""
    embedded = not (address or os.environ.get("RAY_ADDRESS"))
    if embedded:
        secure_embedded_cluster()  # before ray is imported: it reads its auth mode once
    from cscr.jobs.cluster import connect, disconnect
    from ray import serve as ray_serve

    app, record, a = plan_app(args)  # validate before starting anything
    started = connect(address, num_cpus=num_cpus)  # a fresh cluster unless address is given
    launcher = ExpertLauncher(a.torch_threads, a.expert_deploy_timeout_s)
    if not blocking:
        ray_serve.start(http_options={"host": host, "port": port}, proxy_location="HeadOnly")
        return deploy(app, record, launcher)
    import signal

    def _stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    handle: Any = None
    # SIGTERM (a process manager, `kill`) stops the server like Ctrl-C does, also during start-up
    # (this replaces the handler ray.init installed, which exits without shutting Serve down)
    signal.signal(signal.SIGTERM, _stop)
    try:
        ray_serve.start(http_options={"host": host, "port": port}, proxy_location="HeadOnly")
        handle = deploy(app, record, launcher)
        print(f"cscr: serving on http://{host}:{port}/v1 (pool version {record.version}; Ctrl-C to stop)",
              flush=True)
        while True:
            time.sleep(watch_s)
            problem = cluster_problem(embedded and started)
            if problem is not None:
                print(f"cscr: the Ray cluster died ({problem}); exiting", flush=True)
                _abandon_cluster(embedded and started)
                os._exit(3)  # Serve and Ray cannot shut down without their cluster
    except (KeyboardInterrupt, SystemExit):
        print("cscr: stopping", flush=True)
    finally:
        if handle is not None:  # requests in flight finish; new ones get a 503 to retry
            with contextlib.suppress(KeyboardInterrupt):  # a second Ctrl-C / SIGTERM: stop now
                drain(a.drain_timeout_s)
        if embedded and started:
            # the cluster goes down whole: close the HTTP port first, so that a client meets a
            # refused connection (and retries), not one accepted then dropped during the teardown;
            # the pool is in the state folder already
            _close_http(host, port)
        else:  # a shared cluster: remove what this process deployed
            ray_serve.shutdown()
        disconnect(started)
    return handle


def drain(timeout_s: float) -> bool:
    """A graceful stop's first step: every ingress replica answers new requests with a 503 to
    retry (``serve.deployments.EdgeGate``) while the requests in flight finish; returns once none
    is left (True) or after ``timeout_s`` (False: those still in flight fail when the port closes)."""
    from ray import serve as ray_serve

    if timeout_s <= 0:
        return False
    t0 = time.monotonic()
    try:
        controller = ray_serve.get_deployment_handle("PoolController", app_name="cscr")
        controller.drain.remote().result(timeout_s=10)
        status: dict[str, Any] = {"inflight": {}}
        while time.monotonic() - t0 < timeout_s:
            status = controller.drained.remote(1.0).result(timeout_s=10)
            if status["drained"]:
                print(f"cscr: drained: every request in flight finished ({time.monotonic() - t0:.1f} s)", flush=True)
                return True
        print(f"cscr: drain timed out after {timeout_s:.0f} s; still in flight: {status['inflight']}", flush=True)
    except Exception as exc:  # Serve is already going away: nothing to wait for
        log.warning("drain skipped: %r", exc)
    return False


def _actor_pid(actor: Any) -> int:
    import ray

    return int(ray.get(actor.__ray_call__.remote(lambda self: os.getpid()), timeout=10))


def _close_http(host: str, port: int, timeout_s: float = 20.0) -> None:
    """Close the HTTP port at once, before anything else stops: SIGKILL Serve's controller (so
    that nothing starts a proxy again) and its HTTP proxies (this machine's processes: the
    embedded cluster), then wait until nothing listens on ``port``. Requests in flight through the
    proxy fail; later ones meet a refused connection instead of one accepted and then dropped by
    a proxy whose cluster is going away."""
    import contextlib
    import signal
    import socket

    import ray

    pids: list[int] = []
    try:
        names = [("SERVE_CONTROLLER_ACTOR", "serve")] + [
            (a["name"], a["namespace"]) for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith("SERVE_PROXY_ACTOR")]
        pids = [_actor_pid(ray.get_actor(name, namespace=ns)) for name, ns in names]
    except Exception as exc:  # Serve never started, or is gone already
        log.warning("closing the HTTP port: %r", exc)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    target = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            sock.settimeout(0.5)
            if sock.connect_ex((target, port)) != 0:
                return
        time.sleep(0.1)
    log.warning("the HTTP port %d still accepts connections after %.0f s", port, timeout_s)


def _abandon_cluster(embedded: bool) -> None:
    """Kill what is left of an embedded cluster whose core process died (no orphans)."""
    if not embedded:
        return
    from ray._private import worker

    node = getattr(worker, "_global_node", None)
    if node is not None:
        try:
            node.kill_all_processes(check_alive=False, allow_graceful=False)
        except Exception as exc:
            log.warning("could not stop the rest of the cluster: %r", exc)
