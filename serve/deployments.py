"""Thin Ray Serve deployments over the plain layers (STYLE.md rule 7).

- ``PoolController``: the live pool record (``serve.state.PoolState``): compare-and-set
  commits, persisted atomically in the state folder, and a long poll that every Router and
  Ingress replica follows (``PoolFollower``); beside it the ``CircuitBoard`` the ingress
  replicas' breakers share (``serve.health``), long-polled the same way. One replica, pinned
  to the head node (where the state folder is); Serve restarts it on failure and it reloads the
  durable record (the board starts empty: the ingress replicas post their open circuits again).
- ``RouterDeployment``: one ``serve.router_core.RouterCore`` (a ``RouterService``; encoder calls
  of concurrent requests batched by ``serve.batching.EncoderBatcher``, one MiniLM forward per batch). Its index
  follows the pool record, so it runs as many replicas as asked (or autoscales).
- ``ExpertDeployment``: one per expert, wrapping a backend of ``serve.experts``.
- ``Ingress``: the HTTP app of ``serve.routes`` over a ``CompletionService`` and an
  ``AdminService``, with Ray handles behind their client interfaces (``HandleRouter``,
  ``ServeExperts``). Its expert handles are a function of the pool record (the main
  application's bound handles, or ``serve.get_deployment_handle`` by application name), so it
  also runs as many replicas as asked.
  With ``local_router`` (``ServeArgs.router_in_ingress``) it holds its own ``RouterCore``
  instead of a Router handle: no Router deployment, no ingress-to-router hop; its follower then
  applies each record to the expert handles and to that router.

Everything here is glue; requests are served by ``serve.completion``, the HTTP edge is
``serve.routes`` / ``serve.admin``, decisions live in ``serve.service``. The deployments are
bound in one place, ``serve.app``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol

from cscr.serve.admin import AdminService
from cscr.serve.budgets import KeyBudgets, RequestWindows
from cscr.serve.completion import CompletionService, CompletionSettings
from cscr.serve.experts import build_backend
from cscr.serve.health import CircuitBoard, ExpertUnavailable
from cscr.serve.protocol import (
    ExpertSpec,
    GenerationRequest,
    GenerationResult,
    ProtocolError,
    RouteDecision,
)
from cscr.serve.router_core import RouterCore
from cscr.serve.routes import EdgeSettings, build_api, error_response
from cscr.serve.service import CostReference
from cscr.serve.state import (
    PoolRecord,
    PoolState,
    PoolStateError,
    PoolStore,
    SpendBook,
    VersionConflict,
)
from ray import serve

log = logging.getLogger("cscr.serve")
POLL_S = 5.0  # long-poll timeout of a follower (also its heartbeat period)
DRAIN_POLL_S = 0.2  # while the server drains, an ingress reports its in-flight requests this often


@serve.deployment(name="PoolController", num_replicas=1, max_ongoing_requests=10_000,
                  ray_actor_options={"num_cpus": 0})
class PoolController:
    """The versioned live pool (``PoolState``) behind a handle."""

    def __init__(self, initial: dict[str, Any], state_dir: str | None) -> None:
        store = PoolStore(state_dir) if state_dir else None
        self.state = PoolState(PoolRecord.model_validate(initial), store)
        self.spend = SpendBook(state_dir)  # per-key spend of every ingress replica (serve.budgets)
        self.circuits = CircuitBoard()  # the open circuits every ingress replica shares (in memory)
        self.windows = RequestWindows()  # per-key request rates (rpm) of every ingress replica (in memory)

    async def get(self) -> PoolRecord:
        return await self.state.get()

    async def wait_for_version(self, seen: int, timeout_s: float = POLL_S) -> PoolRecord:
        return await self.state.wait_for_version(seen, timeout_s)

    async def commit(self, expected: int, record: PoolRecord) -> PoolRecord:
        try:
            out = await self.state.commit(expected, record)
        except VersionConflict as exc:
            raise ProtocolError(str(exc), status=409, code="pool_changed") from None
        except PoolStateError as exc:
            raise ProtocolError(str(exc), status=409, code="pool_state") from None
        await self.circuits.keep(out.names())  # an expert that left: its circuit is forgotten
        return out

    # the shared circuits (serve.health.CircuitBoard): posted by an ingress replica's breaker
    async def circuit(self, name: str, is_open: bool, cooldown_s: float) -> None:
        if not is_open:
            await self.circuits.closed(name)
        elif name in self.state.record.names():  # a post that raced the expert's removal is dropped
            await self.circuits.opened(name, cooldown_s)

    async def circuits_since(self, seen: int, timeout_s: float = POLL_S) -> dict[str, Any]:
        return await self.circuits.wait(seen, timeout_s)

    async def ack(self, replica: str, role: str, version: int, inflight: int | None = None) -> None:
        await self.state.ack(replica, role, version, inflight)

    async def poll(self, seen: int, draining: bool, timeout_s: float = POLL_S) -> tuple[PoolRecord, bool]:
        return await self.state.poll(seen, draining, timeout_s)

    async def drain(self) -> None:
        await self.state.drain()
        self.spend.flush()  # a graceful stop: the tally on disk is complete before the port closes

    async def drained(self, timeout_s: float = 1.0) -> dict[str, object]:
        return await self.state.drained(timeout_s)

    async def attach_table(self, version: int, table: dict[str, Any]) -> bool:
        return await self.state.attach_table(version, table)

    # the shared spend tally (ControllerLedger); single-threaded: no lock needed
    async def spent(self, name: str) -> float:
        return self.spend.get(name)

    async def charge(self, name: str, amount: float) -> float:
        return self.spend.charge(name, amount)

    async def take(self, name: str, rpm: int) -> float:
        return self.windows.take(name, rpm)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.spend.flush()

    async def replicas(self) -> dict[str, dict[str, object]]:
        return await self.state.replicas()

    async def converged(self, version: int, timeout_s: float = 30.0) -> dict[str, list[str]]:
        return await self.state.converged(version, timeout_s)


def _replica_id() -> str:
    try:
        ctx = serve.get_replica_context()
        return f"{ctx.deployment}#{ctx.replica_id.unique_id}"
    except Exception:  # outside a replica (tests)
        import os

        return f"local#{os.getpid()}"


class ControllerLedger:
    """The per-key spend tally of ``serve.budgets`` kept by the PoolController (one for every
    ingress replica, persisted in the state folder), and its per-key request windows (``rpm``)."""

    def __init__(self, controller: Any) -> None:
        self.controller = controller

    async def spent(self, name: str) -> float:
        return float(await self.controller.spent.remote(name))

    async def charge(self, name: str, amount: float) -> float:
        return float(await self.controller.charge.remote(name, amount))

    async def take(self, name: str, rpm: int) -> float:
        return float(await self.controller.take.remote(name, rpm))


class PoolFollower:
    """Keeps one replica on the latest pool record: ``apply(record)`` at start, then after every
    change the controller's long poll reports; each poll acknowledges the version served. It also
    learns when the server drains (``draining``); an ingress then reports its in-flight requests
    (``inflight``) every ``DRAIN_POLL_S``."""

    def __init__(self, controller: Any, role: str, apply: Callable[[PoolRecord], Awaitable[None] | None],
                 inflight: Callable[[], int] | None = None) -> None:
        from ray.serve import metrics

        self.controller = controller
        self.role = role
        self.apply = apply
        self.inflight = inflight
        self.replica = _replica_id()
        self.version = 0
        self.draining = False
        self._task: asyncio.Task[None] | None = None
        # Serve tags it with the deployment and the replica: a lagging replica shows as a lower value
        self._version_gauge = metrics.Gauge("cscr_pool_version", "the pool record version this replica serves")

    async def _apply(self, record: PoolRecord) -> None:
        out = self.apply(record)
        if out is not None:
            await out
        self.version = record.version
        self._version_gauge.set(record.version)

    async def start(self) -> None:
        """Serve the current record before taking requests, then follow it in the background."""
        await self._apply(await self.controller.get.remote())
        await self.controller.ack.remote(self.replica, self.role, self.version)
        self._task = asyncio.get_running_loop().create_task(self._follow())

    async def _follow(self) -> None:
        async def step() -> None:
            wait = DRAIN_POLL_S if self.draining and self.inflight is not None else POLL_S
            record, self.draining = await self.controller.poll.remote(self.version, self.draining, wait)
            if record.version != self.version:
                await self._apply(record)
            busy = self.inflight() if self.draining and self.inflight is not None else None
            await self.controller.ack.remote(self.replica, self.role, self.version, busy)

        await keep_polling(self.replica, "pool", step)


async def keep_polling(replica: str, what: str, step: Callable[[], Awaitable[None]]) -> None:
    """Run one long-poll ``step`` after another, for ever; a step that fails (the controller
    restarting) is logged and tried again a second later."""
    while True:
        try:
            await step()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("%s: %s poll failed (%r); retrying", replica, what, exc)
            await asyncio.sleep(1.0)


@serve.deployment(name="Router", num_replicas=1, max_ongoing_requests=512,
                  ray_actor_options={"num_cpus": 0.25})
class RouterDeployment:
    """The Router as its own deployment: a ``RouterCore`` that follows the pool record."""

    async def __init__(self, source: dict[str, Any], controller: Any,  # type: ignore[misc]  # Serve awaits it
                       max_batch_size: int = 32,
                       batch_wait_timeout_s: float = 0.0, torch_threads: int = 1) -> None:
        self.core = RouterCore(source, controller, max_batch_size, batch_wait_timeout_s, torch_threads)
        self.follower = PoolFollower(controller, "Router", self.core.apply)
        await self.follower.start()

    async def route(self, text: str, lam: float | None, max_cost: float | None = None,
                    candidates: list[str] | None = None, budget: float | None = None,
                    quality_target: float | str | None = None, category: str | None = None) -> RouteDecision:
        return await self.core.route(text, lam, max_cost, candidates, budget, quality_target, category)

    async def experts(self) -> dict[str, float]:
        return await self.core.experts()

    async def pool_version(self) -> int:
        return await self.core.pool_version()

    async def reference(self) -> CostReference:
        return await self.core.reference()

    async def fingerprint_plan(self) -> Any:
        return await self.core.fingerprint_plan()

    async def check_descriptor(self, descriptor: list[float] | None) -> None:
        await self.core.check_descriptor(descriptor)

    async def check_outcomes(self, outcomes: list[float | None] | None) -> None:
        await self.core.check_outcomes(outcomes)

    async def batch_stats(self) -> dict[str, int]:
        return await self.core.batch_stats()


@serve.deployment(max_ongoing_requests=16, ray_actor_options={"num_cpus": 0.25})
class ExpertDeployment:
    def __init__(self, spec: dict[str, Any], torch_threads: int = 1) -> None:
        self.spec = ExpertSpec(**spec)
        self.backend = build_backend(self.spec, torch_threads=torch_threads)

    async def generate(self, req: GenerationRequest) -> GenerationResult:
        return await self.backend.generate(req)

    async def stream(self, req: GenerationRequest) -> AsyncIterator[str]:
        async for piece in self.backend.stream(req):
            yield piece

    async def fingerprint(self, plan: Any) -> list[float]:
        """This expert's logit footprint under the router's plan (transformers, same weights)."""
        from cscr.serve.fingerprint import logit_footprint_of

        if self.spec.backend == "openai":
            raise ProtocolError(f"expert {self.spec.name!r} is black-box (no logits): send its descriptor",
                                param="fingerprint", code="unsupported")
        model = getattr(self.backend, "path", None) or self.spec.source.model
        return await asyncio.to_thread(logit_footprint_of, model, plan)


def deployment_name(expert: str) -> str:
    return "Expert_" + re.sub(r"[^A-Za-z0-9_-]", "_", expert)


def _expert_error(name: str, exc: BaseException) -> BaseException:
    """What an expert call's exception means to the fallback: dead replicas (the actor died, the
    deployment or replica is unavailable) are ``ExpertUnavailable`` (its circuit opens at once);
    an error raised in the replica is itself (a ProtocolError keeps its status)."""
    from ray.exceptions import RayActorError
    from ray.serve.exceptions import DeploymentUnavailableError, ReplicaUnavailableError

    if isinstance(exc, RayActorError | DeploymentUnavailableError | ReplicaUnavailableError):
        return ExpertUnavailable(f"expert {name!r} is unavailable: {type(exc).__name__}")
    return _unwrap(exc)


def _unwrap(exc: BaseException) -> BaseException:
    """The user-facing exception inside a Ray task error (a ProtocolError raised in a replica)."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, BaseException) else exc


def _replica_died(exc: BaseException) -> bool:
    """The call failed because the replica serving it died (not because of the request)."""
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
    from ray.serve.exceptions import ReplicaUnavailableError

    return isinstance(exc, RayActorError | ActorDiedError | ActorUnavailableError | ReplicaUnavailableError)


class HandleRouter:
    """The Router deployment's handle as the router client of the completion and admin services.
    Router calls are idempotent: one that met a dying replica is sent again (another replica, or
    the one Serve starts in its place), so killing a Router replica fails no request."""

    def __init__(self, handle: Any, retries: int = 3) -> None:
        self.handle = handle
        self.retries = retries

    async def _call(self, method: str, *args: Any) -> Any:
        for attempt in range(self.retries + 1):
            try:
                return await getattr(self.handle, method).remote(*args)
            except Exception as exc:
                if attempt < self.retries and _replica_died(exc):
                    log.warning("router replica died during %s (%s): sending it again", method,
                                type(exc).__name__)
                    await asyncio.sleep(0.2 * (attempt + 1))
                    continue
                raise _unwrap(exc) from None
        raise AssertionError("unreachable")

    async def route(self, text: str, lam: float | None, max_cost: float | None = None,
                    candidates: list[str] | None = None, budget: float | None = None,
                    quality_target: float | str | None = None, category: str | None = None) -> RouteDecision:
        return await self._call("route", text, lam, max_cost, candidates, budget,  # type: ignore[no-any-return]
                                quality_target, category)

    async def experts(self) -> dict[str, float]:
        return await self._call("experts")  # type: ignore[no-any-return]

    async def reference(self) -> CostReference:
        return await self._call("reference")  # type: ignore[no-any-return]

    async def check_descriptor(self, descriptor: list[float] | None) -> None:
        await self._call("check_descriptor", descriptor)

    async def check_outcomes(self, outcomes: list[float | None] | None) -> None:
        await self._call("check_outcomes", outcomes)

    async def fingerprint_plan(self) -> Any:
        return await self._call("fingerprint_plan")



class Launcher(Protocol):
    """Starts and stops an expert's own Serve application (serve.app.ExpertLauncher)."""

    def start(self, spec: ExpertSpec) -> str: ...  # -> the application's name, once it serves

    def stop(self, app: str) -> None: ...

    def handle(self, spec: ExpertSpec, app: str) -> Any: ...


class HandleState:
    """The PoolController's handle as the versioned pool state of the admin service."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle

    async def _call(self, method: str, *args: Any) -> Any:
        try:
            return await getattr(self.handle, method).remote(*args)
        except Exception as exc:
            raise _unwrap(exc) from None

    async def get(self) -> PoolRecord:
        return await self._call("get")  # type: ignore[no-any-return]

    async def commit(self, expected: int, record: PoolRecord) -> PoolRecord:
        return await self._call("commit", expected, record)  # type: ignore[no-any-return]

    async def converged(self, version: int, timeout_s: float) -> dict[str, list[str]]:
        return await self._call("converged", version, timeout_s)  # type: ignore[no-any-return]

    async def replicas(self) -> dict[str, dict[str, object]]:
        return await self._call("replicas")  # type: ignore[no-any-return]


class ServeExperts:
    """Expert deployments' handles as the expert client (and live pool) of the services.

    What it serves is a function of the pool record (``apply``): experts of the main application
    use the handles bound there, the others are looked up by application name, so every ingress
    replica holds the same map."""

    def __init__(self, bound: dict[str, Any], launcher: Launcher, connect_timeout_s: float = 0.5) -> None:
        self.bound = dict(bound)  # the main application's expert handles (constructor args)
        self.launcher = launcher
        self.connect_timeout_s = connect_timeout_s  # a replica must take a call within this
        self.handles: dict[str, Any] = {}
        self.specs: dict[str, ExpertSpec] = {}
        self.apps: dict[str, str] = {}  # expert -> its own application (record or pending start)
        self._resolved: dict[tuple[str, str], Any] = {}

    def apply(self, record: PoolRecord) -> None:
        handles, specs, apps = {}, {}, {}
        for e in record.experts:
            if e.app is None:
                if e.name not in self.bound:
                    log.error("pool v%d: expert %r has no deployment in this application", record.version, e.name)
                    continue
                handles[e.name] = self.bound[e.name]
            else:
                key = (e.name, e.app)
                if key not in self._resolved:
                    self._resolved[key] = self.launcher.handle(e.spec, e.app)
                handles[e.name] = self._resolved[key]
                apps[e.name] = e.app
            specs[e.name] = e.spec
        self.handles, self.specs, self.apps = handles, specs, apps

    def names(self) -> set[str]:
        return set(self.handles)

    def limit(self, name: str) -> int:
        return self.specs[name].max_new_tokens

    def backend(self, name: str) -> str | None:
        spec = self.specs.get(name)
        return spec.backend if spec is not None else None

    async def _live_replicas(self, name: str) -> int | None:
        """Replicas of the expert's deployment that can take a call: RUNNING as Serve's controller
        sees them and alive as Ray sees them (a killed replica leaves Ray at once, the controller
        notices at its next health check). None: unknown."""
        handle: Any = self.handles.get(name)

        def count() -> int:
            import ray

            status = serve.status()
            states: dict[Any, int] = dict(status.applications[handle.app_name]
                                          .deployments[handle.deployment_name].replica_states)
            running = int(states.get("RUNNING", 0))  # ReplicaState is a str enum
            prefix = f"SERVE_REPLICA::{handle.app_name}#{handle.deployment_name}#"
            alive = sum(a["name"].startswith(prefix) for a in ray.util.list_named_actors(all_namespaces=True))
            return min(running, alive)

        try:
            return await asyncio.to_thread(count)
        except Exception:  # no status to go by: treat the expert as busy, not dead
            return None

    async def _assigned(self, name: str, resp: Any) -> None:
        """Wait until a replica took the call. Every ``connect_timeout_s`` without one, look: no
        live replica (they died, or the replacement cannot start) is ExpertUnavailable at once (its
        circuit opens); live but busy replicas are waited for (the generation timeout bounds it)."""
        assigned = asyncio.ensure_future(resp._fetch_future_result_async())
        try:
            while True:
                done, _ = await asyncio.wait({assigned}, timeout=self.connect_timeout_s)
                if done:
                    assigned.result()
                    return
                if await self._live_replicas(name) == 0:
                    raise ExpertUnavailable(f"expert {name!r} has no live replica (none took the call "
                                            f"within {self.connect_timeout_s:g} s)")
        finally:
            if not assigned.done():
                assigned.cancel()

    async def generate(self, name: str, req: GenerationRequest) -> GenerationResult:
        resp = self.handles[name].generate.remote(req)
        try:
            await self._assigned(name, resp)
            return await resp  # type: ignore[no-any-return]
        except asyncio.CancelledError:  # timed out or the client left: stop the replica's work
            resp.cancel()
            raise
        except Exception as exc:
            resp.cancel()
            raise _expert_error(name, exc) from None

    async def stream(self, name: str, req: GenerationRequest) -> AsyncIterator[str]:
        gen = self.handles[name].options(stream=True).stream.remote(req)
        finished = False
        try:
            await self._assigned(name, gen)
            async for piece in gen:
                yield piece
            finished = True
        except Exception as exc:
            raise _expert_error(name, exc) from None
        finally:
            if not finished:
                gen.cancel()

    async def start(self, spec: ExpertSpec) -> str:
        """Deploy ``spec`` as its own application (bounded by the launcher); not routed until a
        committed pool record names it. A failed or abandoned start leaves no application."""
        task = asyncio.ensure_future(asyncio.to_thread(self.launcher.start, spec))
        try:
            app = await asyncio.shield(task)
        except asyncio.CancelledError:  # the admin call was abandoned: delete what it deployed
            with contextlib.suppress(Exception):
                app = await task
                await asyncio.to_thread(self.launcher.stop, app)
            raise
        except ProtocolError:
            raise
        except Exception as exc:
            raise ProtocolError(f"could not start expert {spec.name!r}: {exc}", status=400,
                                code="expert_start_failed", param="expert") from None
        return app

    async def fingerprint(self, name: str, plan: Any, app: str | None = None) -> list[float]:
        handle = self.handles.get(name)
        if app is not None:  # started, not yet in a record
            handle = self.launcher.handle(ExpertSpec(name=name, model="-"), app)
        if handle is None:
            raise ProtocolError(f"expert {name!r} is not served", status=404, code="expert_not_found")
        try:
            return await handle.fingerprint.remote(plan)  # type: ignore[no-any-return]
        except Exception as exc:
            raise _unwrap(exc) from None

    async def discard(self, app: str) -> None:
        """Delete an expert's own application, freeing its replicas."""
        await asyncio.to_thread(self.launcher.stop, app)

    async def stop(self, name: str) -> None:
        app = self.apps.get(name)
        if app is not None:
            await self.discard(app)


@serve.deployment(name="Ingress", num_replicas=1, max_ongoing_requests=512,
                  ray_actor_options={"num_cpus": 0.1})
@serve.ingress()
class Ingress:
    async def __init__(self, router: Any, controller: Any,  # type: ignore[misc]  # Serve awaits it
                       experts: dict[str, Any], completion: dict[str, Any],
                       edge: dict[str, Any], launcher: Launcher, admin: dict[str, Any],
                       local_router: dict[str, Any] | None = None) -> None:
        """``router``: the Router deployment's handle; or None with ``local_router``, the keyword
        arguments of a ``RouterCore`` this replica holds (it routes without a hop)."""
        from cscr.serve.metrics import ServeMetrics

        self.core = RouterCore(controller=controller, **local_router) if local_router is not None else None
        self.router: RouterCore | HandleRouter = self.core if self.core is not None else HandleRouter(router)
        settings = CompletionSettings(**completion)
        self.experts = ServeExperts(experts, launcher, settings.connect_timeout_s)
        self.completion = CompletionService(self.router, self.experts, settings, ServeMetrics())
        self.admin = AdminService(self.router, self.experts, self.completion, state=HandleState(controller),
                                  **admin)
        self.edge = EdgeSettings(**edge)
        self.controller = controller
        self.gate: EdgeGate | None = None  # the ASGI middleware (built with the app)
        self.follower = PoolFollower(controller, "Ingress", self.apply,
                                     inflight=lambda: self.gate.inflight if self.gate is not None else 0)
        await self.follower.start()
        self.admin.replica = self.follower.replica
        self._posts: set[asyncio.Task[None]] = set()  # circuit posts in flight (kept from the GC)
        self.completion.share = self._post_circuit
        self._circuits = asyncio.get_running_loop().create_task(self._follow_circuits())

    def _post_circuit(self, name: str, is_open: bool) -> None:
        """This replica's breaker opened or closed a circuit: tell the board (without waiting)."""
        async def post() -> None:
            try:
                await self.controller.circuit.remote(name, is_open, self.completion.settings.breaker_cooldown_s)
            except Exception as exc:  # the controller restarting: the others learn at their own failure
                log.warning("%s: could not share the circuit of %r (%r)", self.follower.replica, name, exc)

        task = asyncio.get_running_loop().create_task(post())
        self._posts.add(task)
        task.add_done_callback(self._posts.discard)

    async def _follow_circuits(self) -> None:
        """Long-poll the shared board and apply it to this replica's breaker."""
        seen = -1

        async def step() -> None:
            nonlocal seen
            view = await self.controller.circuits_since.remote(seen, POLL_S)
            seen = int(view["seq"])
            self.completion.apply_board(view)

        await keep_polling(self.follower.replica, "circuit", step)

    async def apply(self, record: PoolRecord) -> None:
        """Serve ``record``: its expert handles, and its index when this replica routes (both
        change before the loop runs anything else: the core's first await comes after its index)."""
        self.experts.apply(record)
        self.completion.forget_removed()
        if self.core is not None:
            await self.core.apply(record)

    async def batch_stats(self) -> dict[str, int]:
        """The encoder batching of this replica's router (routing in ingress only)."""
        if self.core is None:
            raise ProtocolError("this ingress routes through the Router deployment: ask it", status=404,
                                code="not_found")
        return await self.core.batch_stats()

    def __serve_build_asgi_app__(self) -> Any:
        budgets = None
        if self.edge.key_budgets:  # one spend tally for every ingress replica, in the controller
            budgets = KeyBudgets.from_entries(self.edge.key_budgets, ledger=ControllerLedger(self.controller))
        app = build_api(self.completion, self.admin, self.edge, budgets)
        app.add_middleware(self._gate)
        return app

    def _gate(self, app: Any) -> EdgeGate:
        self.gate = EdgeGate(app, self.follower)
        return self.gate


class EdgeGate:
    """ASGI middleware of an ingress replica: every response says which pool version this replica
    serves (``x-cscr-pool-version``, unless the handler set the version it routed under); it counts
    the HTTP requests in flight, and while the server drains (a graceful stop) it answers new ones
    with a 503 in OpenAI's shape, ``Retry-After`` and ``Connection: close`` (the openai client and
    load balancers retry it), so the requests in flight finish before the port closes."""

    def __init__(self, app: Any, follower: PoolFollower) -> None:
        self.app = app
        self.follower = follower
        self.inflight = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.follower.draining:
            await self._refuse(scope, receive, send)
            return

        async def send_with_version(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                if not any(k.lower() == b"x-cscr-pool-version" for k, _ in headers):
                    headers.append((b"x-cscr-pool-version", str(self.follower.version).encode()))
                message = {**message, "headers": headers}
            await send(message)

        self.inflight += 1
        try:
            await self.app(scope, receive, send_with_version)
        finally:
            self.inflight -= 1

    async def _refuse(self, scope: Any, receive: Any, send: Any) -> None:
        response = error_response(503, "the server is restarting or stopping: retry shortly", "server_draining",
                                  headers={"retry-after": "2", "connection": "close",
                                           "x-cscr-pool-version": str(self.follower.version)})
        await response(scope, receive, send)
