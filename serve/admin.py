"""The admin API: live pool changes and the detailed health report, behind their own key.

    GET    /v1/experts          the pool (names, costs, backends)
    POST   /v1/experts          add an expert (a descriptor, or fingerprint=true), no restart
    DELETE /v1/experts/{name}   remove one
    GET    /healthz             "ok" to anyone; the pool, costs, traffic counts and circuits with the admin key

Admin endpoints need the admin key (``Authorization: Bearer <admin key>``); with none configured
they are disabled (403), never opened to the API key. ``AdminService`` is plain async code over
the router's admin side (``AdminRouter``), the served experts (``LivePool``) and, when serving,
the versioned pool record (``PoolStateClient``, ``serve.state``): serving binds Ray handles to
them (``serve.deployments``); in-process use (``serve.local``) changes the router directly.

With a pool state, a change holds no lock across a deploy: the new expert's application is
deployed first (its resources checked up front, its deploy bounded by the launcher), then the
record is compare-and-set against the version it was made from (409 if another change won);
any failure or abandonment deletes the application it deployed. The answer comes once every
Router and Ingress replica serves the new version (or, after ``converge_timeout_s``, names the
replicas that do not). DELETE commits the smaller record, then deletes the expert's application.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection
from typing import Any, Protocol

from cscr.serve.budgets import KeyBudgets
from cscr.serve.completion import CompletionService
from cscr.serve.policy import SourcePolicy
from cscr.serve.protocol import (
    ROUTER_MODEL,
    AddExpertRequest,
    ExpertInfo,
    ExpertList,
    ExpertSpec,
    ProtocolError,
    check_bearer,
)
from cscr.serve.state import PoolEntry, PoolRecord
from fastapi import APIRouter, Depends, Request
from fastapi.routing import APIRoute


class AdminRouter(Protocol):
    async def experts(self) -> dict[str, float]: ...

    async def check_descriptor(self, descriptor: list[float] | None) -> None: ...

    async def check_outcomes(self, outcomes: list[float | None] | None) -> None: ...

    async def fingerprint_plan(self) -> Any: ...

    async def add_expert(self, name: str, cost: float, descriptor: list[float],
                         outcomes: list[float | None] | None = None) -> dict[str, float]: ...

    async def remove_expert(self, name: str) -> dict[str, float]: ...


class LivePool(Protocol):
    def names(self) -> set[str]: ...

    def backend(self, name: str) -> str | None: ...

    async def start(self, spec: ExpertSpec) -> None: ...  # serve it (not routed until the router knows it)

    async def fingerprint(self, name: str, plan: Any) -> list[float]: ...

    async def stop(self, name: str) -> None: ...  # stop serving it


class VersionedPool(Protocol):
    """The served experts when the pool is a versioned record (serve.deployments.ServeExperts)."""

    def names(self) -> set[str]: ...

    async def start(self, spec: ExpertSpec) -> str: ...  # -> its application, not yet routed

    async def fingerprint(self, name: str, plan: Any, app: str | None = None) -> list[float]: ...

    async def discard(self, app: str) -> None: ...  # delete an application, freeing its replicas


class PoolStateClient(Protocol):
    async def get(self) -> PoolRecord: ...

    async def commit(self, expected: int, record: PoolRecord) -> PoolRecord: ...  # 409 when stale

    async def converged(self, version: int, timeout_s: float) -> dict[str, list[str]]: ...

    async def replicas(self) -> dict[str, dict[str, object]]: ...


class AdminService:
    """Add and remove experts live; one change at a time."""

    def __init__(self, router: AdminRouter, pool: LivePool, completion: CompletionService,
                 expert_num_cpus: float = 0.25, state: PoolStateClient | None = None,
                 converge_timeout_s: float = 30.0, policy: SourcePolicy | dict[str, Any] | None = None) -> None:
        self.router = router
        # what added experts may load or call (serve.policy); None: only packaged models, no upstream
        self.policy = policy if isinstance(policy, SourcePolicy) else SourcePolicy(**(policy or {}))
        self.pool = pool
        self.completion = completion
        self.expert_num_cpus = expert_num_cpus
        self.state = state
        self.converge_timeout_s = converge_timeout_s
        self._lock = asyncio.Lock()  # in-process changes only (no pool state)
        self.budgets: KeyBudgets | None = None  # per-key spend budgets (set by serve.routes.build_api)
        self.replica: str | None = None  # the serving replica's id (set by serve.deployments.Ingress)

    async def list(self) -> ExpertList:
        if self.state is not None:
            record = await self.state.get()
            costs = {e.name: e.cost for e in record.experts}
        else:
            costs = await self.router.experts()
        served = self.pool.names()
        return ExpertList(data=[ExpertInfo(name=n, cost=c, backend=self.pool.backend(n), routable=n in served)
                                for n, c in costs.items()])

    async def add(self, body: AddExpertRequest) -> dict[str, Any]:
        if body.descriptor is None and not body.fingerprint:
            raise ProtocolError("give a descriptor, or fingerprint=true to compute one", param="descriptor")
        if body.descriptor is not None and body.fingerprint:
            raise ProtocolError("give a descriptor or fingerprint=true, not both", param="fingerprint")
        if self.state is not None:
            return await self._add_versioned(body, self.state)
        async with self._lock:
            names = set(await self.router.experts()) | set(self.pool.names())
            spec, plan = await self._checked(body, names)
            await self.pool.start(spec)
            try:
                descriptor = body.descriptor
                if plan is not None:
                    descriptor = await self.pool.fingerprint(spec.name, plan)
                if descriptor is None:  # unreachable: checked above
                    raise ProtocolError("no descriptor", param="descriptor")
                await self.router.add_expert(spec.name, body.cost, descriptor, body.probe_outcomes)
            except BaseException:
                await self.pool.stop(spec.name)
                raise
        return ExpertInfo(name=spec.name, cost=body.cost, backend=spec.backend).model_dump()

    @staticmethod
    def _refuse_existing(name: str, names: Collection[str]) -> None:
        if name in names or name == ROUTER_MODEL:
            raise ProtocolError(f"expert {name!r} already exists", status=409, code="expert_exists",
                                param="expert.name")

    async def _checked(self, body: AddExpertRequest, names: Collection[str]) -> tuple[ExpertSpec, Any]:
        """(the spec to start, the fingerprint plan or None) after every check that needs no
        deployment: a new name, a descriptor the index takes, logits for a fingerprint."""
        spec = body.expert
        self.policy.check(spec)  # first: nothing the operator did not declare is looked at
        self._refuse_existing(spec.name, names)
        await self.router.check_descriptor(body.descriptor)
        await self.router.check_outcomes(body.probe_outcomes)
        plan = await self.router.fingerprint_plan() if body.fingerprint else None
        if plan is not None and spec.backend == "openai":
            raise ProtocolError(f"expert {spec.name!r} is black-box (no logits): send its descriptor",
                                param="fingerprint", code="unsupported")
        if spec.num_cpus == ExpertSpec.model_fields["num_cpus"].default:
            spec = spec.model_copy(update={"num_cpus": self.expert_num_cpus})
        return spec, plan

    async def _add_versioned(self, body: AddExpertRequest, state: PoolStateClient) -> dict[str, Any]:
        pool: VersionedPool = self.pool  # type: ignore[assignment]  # ServeExperts when serving
        spec, plan = await self._checked(body, (await state.get()).names())
        app = await pool.start(spec)  # no lock held: the commit below is a compare-and-set
        try:
            descriptor = body.descriptor
            if plan is not None:
                descriptor = await pool.fingerprint(spec.name, plan, app)
            if descriptor is None:  # unreachable: checked above
                raise ProtocolError("no descriptor", param="descriptor")
            current = await state.get()
            self._refuse_existing(spec.name, current.names())
            outcomes = None if body.probe_outcomes is None else [None if v is None else float(v)
                                                                 for v in body.probe_outcomes]
            entry = PoolEntry(spec=spec, cost=float(body.cost), descriptor=[float(x) for x in descriptor],
                              probe_outcomes=outcomes, app=app)
            record = await state.commit(current.version, current.with_expert(entry))
        except BaseException:  # failed, refused, lost the race or abandoned: no orphan application
            await asyncio.shield(pool.discard(app))
            raise
        replicas = await state.converged(record.version, self.converge_timeout_s)
        return {**ExpertInfo(name=spec.name, cost=float(body.cost), backend=spec.backend).model_dump(),
                "pool_version": record.version, "replicas": replicas}

    async def _remove_versioned(self, name: str, state: PoolStateClient) -> dict[str, Any]:
        pool: VersionedPool = self.pool  # type: ignore[assignment]
        for _ in range(5):  # another change may win the compare-and-set: re-read and retry
            current = await state.get()
            entry = current.entry(name)
            if entry is None:
                raise ProtocolError(f"unknown expert {name!r}; the pool has {current.names()}",
                                    status=404, code="expert_not_found")
            if len(current.experts) == 1:
                raise ProtocolError("cannot remove the last expert of the pool", status=409, code="last_expert")
            try:
                record = await state.commit(current.version, current.without_expert(name))
                break
            except ProtocolError as exc:
                if exc.code != "pool_changed":
                    raise
        else:
            raise ProtocolError("the pool kept changing: retry", status=409, code="pool_changed")
        replicas = await state.converged(record.version, self.converge_timeout_s)
        if entry.app is not None:  # its own application: delete it, freeing its replicas
            await pool.discard(entry.app)
        return {"deleted": name, "experts": {e.name: e.cost for e in record.experts},
                "pool_version": record.version, "replicas": replicas}

    async def remove(self, name: str) -> dict[str, Any]:
        if self.state is not None:
            return await self._remove_versioned(name, self.state)
        async with self._lock:
            remaining = await self.router.remove_expert(name)
            await self.pool.stop(name)
            self.completion.forget_removed()
        return {"deleted": name, "experts": remaining}

    async def health(self) -> dict[str, Any]:
        costs = await self.router.experts()
        ref = await self.completion.reference()
        out = {"status": "ok", "experts": costs, "best_expert": ref.best_expert,
               "metrics": self.completion.metrics.as_dict(),
               "circuits": self.completion.health.snapshot()}  # this replica's: experts that failed
        if self.replica is not None:  # which ingress replica answered (its metrics and circuits are its own)
            out["replica"] = self.replica
        if self.state is not None:
            record = await self.state.get()
            out["experts"] = {e.name: e.cost for e in record.experts}
            out["pool_version"] = record.version
            out["replicas"] = await self.state.replicas()
            if record.operating_points is not None:  # what budgets and quality targets can reach
                out["operating_points"] = {"experts": record.table_names(),
                                           "reachable": record.operating_points.get("reachable")}
        if self.budgets is not None:  # per-key spend (serve.budgets), shared by every ingress replica
            out["keys"] = await self.budgets.usage()
        return out


def admin_routes(admin: AdminService, admin_key: str | None,
                 route_class: type[APIRoute] = APIRoute) -> APIRouter:
    """The admin endpoints; without an admin key they answer 403."""

    def require_admin(request: Request) -> None:
        if admin_key is None:
            raise ProtocolError("the admin API is disabled: start the server with an admin key "
                                "(--admin-key or $CSCR_ADMIN_KEY)", status=403, code="admin_disabled")
        check_bearer(request.headers.get("authorization"), admin_key, what="admin key")

    guarded = APIRouter(dependencies=[Depends(require_admin)], route_class=route_class)
    errors: dict[int | str, dict[str, Any]] = {401: {"description": "no or wrong admin key"},
                                               403: {"description": "admin API disabled"}}

    @guarded.get("/v1/experts", responses=errors)
    async def list_experts() -> ExpertList:
        return await admin.list()

    @guarded.post("/v1/experts", status_code=201, responses=errors)
    async def add_expert(body: AddExpertRequest) -> dict[str, Any]:
        return await admin.add(body)

    @guarded.delete("/v1/experts/{name:path}", responses=errors)
    async def remove_expert(name: str) -> dict[str, Any]:
        return await admin.remove(name)

    routes = APIRouter(route_class=route_class)

    @routes.get("/healthz")
    async def healthz(request: Request) -> dict[str, Any]:
        header = request.headers.get("authorization")
        if admin_key is None or not header:
            return {"status": "ok"}
        check_bearer(header, admin_key, what="admin key")
        return await admin.health()

    routes.include_router(guarded)
    return routes
