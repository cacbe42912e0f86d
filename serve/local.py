"""In-process clients of the completion and admin services (no Ray): tests and single-process use.

- ``LocalRouter``: a ``RouterService`` as the router client (and the admin's router);
- ``LocalExperts``: expert backends in this process (``serve.experts.build_backend``, or any
  object with async ``generate(req)`` and ``stream(req)``) as the expert client and live pool.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, TypeVar

from cscr.serve.protocol import GenerationRequest, GenerationResult, ProtocolError, RouteDecision
from cscr.serve.service import CostReference

T = TypeVar("T")


class LocalRouter:
    """A ``RouterService`` as the router client of the completion and admin services (one call
    at a time, off the event loop: the service is not thread-safe)."""

    def __init__(self, service: Any) -> None:
        self.service = service
        self._lock = asyncio.Lock()

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        async with self._lock:
            return await asyncio.to_thread(fn, *args)

    async def route(self, text: str, lam: float | None, max_cost: float | None = None,
                    candidates: list[str] | None = None, budget: float | None = None,
                    quality_target: float | str | None = None, category: str | None = None) -> RouteDecision:
        decisions = await self._run(self.service.route, [text], lam, max_cost, candidates, budget, quality_target,
                                    category)
        return decisions[0]  # type: ignore[no-any-return]

    async def experts(self) -> dict[str, float]:
        return dict(self.service.expert_costs())

    async def reference(self) -> CostReference:
        return self.service.reference  # type: ignore[no-any-return]

    async def check_descriptor(self, descriptor: list[float] | None) -> None:
        self.service.check_descriptor(descriptor)

    async def check_outcomes(self, outcomes: list[float | None] | None) -> None:
        self.service.check_outcomes(outcomes)

    async def fingerprint_plan(self) -> Any:
        return await self._run(self.service.fingerprint_plan)

    async def add_expert(self, name: str, cost: float, descriptor: list[float],
                         outcomes: list[float | None] | None = None) -> dict[str, float]:
        await self._run(self.service.add_expert, name, cost, descriptor, True, outcomes)
        return await self.experts()

    async def remove_expert(self, name: str) -> dict[str, float]:
        await self._run(self.service.remove_expert, name)
        return await self.experts()


class LocalExperts:
    """In-process expert backends (``serve.experts.build_backend``, or any object with async
    ``generate(req)`` and ``stream(req)``) as the expert client and live pool of the services."""

    def __init__(self, backends: Mapping[str, Any], limits: Mapping[str, int] | None = None,
                 default_limit: int = 256) -> None:
        self.backends = dict(backends)
        self.limits = dict(limits or {})
        self.default_limit = default_limit

    def names(self) -> set[str]:
        return set(self.backends)

    def limit(self, name: str) -> int:
        return self.limits.get(name, self.default_limit)

    def backend(self, name: str) -> str | None:
        return getattr(getattr(self.backends.get(name), "spec", None), "backend", None)

    async def generate(self, name: str, req: GenerationRequest) -> GenerationResult:
        return await self.backends[name].generate(req)  # type: ignore[no-any-return]

    def stream(self, name: str, req: GenerationRequest) -> AsyncIterator[str]:
        return self.backends[name].stream(req)  # type: ignore[no-any-return]

    async def start(self, spec: Any) -> None:
        from cscr.serve.experts import build_backend

        try:
            self.backends[spec.name] = await asyncio.to_thread(build_backend, spec)
        except Exception as exc:
            raise ProtocolError(f"could not start expert {spec.name!r}: {exc}", status=400,
                                code="expert_start_failed", param="expert") from None
        self.limits[spec.name] = spec.max_new_tokens

    async def fingerprint(self, name: str, plan: Any) -> list[float]:
        from cscr.serve.fingerprint import logit_footprint_of

        path = getattr(self.backends[name], "path", None)
        if not path:
            raise ProtocolError(f"expert {name!r} has no local weights (no logits): send its descriptor",
                                param="fingerprint", code="unsupported")
        return await asyncio.to_thread(logit_footprint_of, path, plan)

    async def stop(self, name: str) -> None:
        backend = self.backends.pop(name, None)
        self.limits.pop(name, None)
        aclose = getattr(backend, "aclose", None)
        if aclose is not None:
            await aclose()
