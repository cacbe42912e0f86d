"""Thin Ray Serve deployments over the plain layers (STYLE.md rule 7).

- ``RouterDeployment``: one ``RouterService``; encoder calls of concurrent requests are batched
  with ``@serve.batch`` (one MiniLM forward per batch); holds the live expert index, so it runs
  as a single replica (admin changes must reach every replica that routes).
- ``ExpertDeployment``: one per expert, wrapping a backend of ``serve.experts``.
- the OpenAI-compatible ingress is in ``serve.ingress``; ``build_graph`` binds the three.

Everything here is glue; the decisions live in ``serve.service`` and the HTTP shapes in
``serve.protocol``.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import numpy as np
from cscr.serve.experts import build_backend
from cscr.serve.protocol import (
    ExpertSpec,
    GenerationRequest,
    GenerationResult,
    ProtocolError,
    RouteDecision,
    check_lambda,
)
from cscr.serve.service import CostReference, RouterService
from ray import serve


def make_service(source: dict[str, Any]) -> RouterService:
    """A RouterService from a source: a run folder, or factories (tests, programmatic use)."""
    kwargs = {k: source[k] for k in ("default_lambda", "max_prompt_chars") if k in source}
    encoder = source["encoder_factory"]() if source.get("encoder_factory") else None
    if encoder is None:
        from cscr.config import EncoderConfig
        from cscr.encoder import Encoder

        encoder = Encoder(EncoderConfig(model=source.get("encoder")))
    if source.get("router_factory") is not None:
        router = source["router_factory"]()
        return RouterService(encoder, router, **kwargs)
    return RouterService.from_run(source["run"], source.get("variant", "cscr"), encoder=encoder, **kwargs)


@serve.deployment(name="Router", num_replicas=1, max_ongoing_requests=512,
                  ray_actor_options={"num_cpus": 0.25})
class RouterDeployment:
    def __init__(self, source: dict[str, Any], pool: list[str], max_batch_size: int = 32,
                 batch_wait_timeout_s: float = 0.002, torch_threads: int = 1) -> None:
        import torch

        torch.set_num_threads(torch_threads)
        self.service = make_service(source)
        self.service.check_pool(pool)
        self.embed_batch.set_max_batch_size(max_batch_size)  # type: ignore[attr-defined]  # @serve.batch
        self.embed_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)  # type: ignore[attr-defined]
        self.stats = {"batches": 0, "prompts": 0, "largest": 0}  # encoder batching

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.002)
    async def embed_batch(self, texts: list[str]) -> list[np.ndarray]:
        self.stats["batches"] += 1
        self.stats["prompts"] += len(texts)
        self.stats["largest"] = max(self.stats["largest"], len(texts))
        emb = await asyncio.to_thread(self.service.embed, texts)  # (n, d)
        return list(emb)

    async def route(self, text: str, lam: float, max_cost: float | None = None,
                    candidates: list[str] | None = None) -> RouteDecision:
        t0 = time.perf_counter()
        self.service.check_prompt(text, param="prompt")
        check_lambda(lam)
        self.service.candidate_names(candidates, max_cost)  # refuse bad filters before encoding
        emb = await self.embed_batch(text)
        decision = self.service.decide(np.asarray(emb)[None, :], lam, max_cost, candidates)[0]
        decision.routing_ms = (time.perf_counter() - t0) * 1e3
        return decision

    # async: they run on the replica's event loop, never concurrently with a decision
    async def experts(self) -> dict[str, float]:
        return self.service.expert_costs()

    async def reference(self) -> CostReference:
        return self.service.reference

    async def add_expert(self, name: str, cost: float, descriptor: list[float]) -> dict[str, float]:
        self.service.add_expert(name, cost, descriptor)
        return self.service.expert_costs()

    async def remove_expert(self, name: str) -> dict[str, float]:
        self.service.remove_expert(name)
        return self.service.expert_costs()

    async def fingerprint_plan(self) -> Any:
        return await asyncio.to_thread(self.service.fingerprint_plan)  # reads the run's files only

    async def check_descriptor(self, descriptor: list[float] | None) -> None:
        self.service.check_descriptor(descriptor)

    async def batch_stats(self) -> dict[str, int]:
        return dict(self.stats)


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
        model = getattr(self.backend, "path", self.spec.model)
        return await asyncio.to_thread(logit_footprint_of, model, plan)


def deployment_name(expert: str) -> str:
    return "Expert_" + re.sub(r"[^A-Za-z0-9_-]", "_", expert)


def expert_application(spec: ExpertSpec, torch_threads: int = 1) -> Any:
    return ExpertDeployment.options(  # type: ignore[attr-defined]  # a @serve.deployment class
        name=deployment_name(spec.name), max_ongoing_requests=spec.max_concurrency,
        ray_actor_options={"num_cpus": spec.num_cpus, "num_gpus": spec.num_gpus},
    ).bind(spec.model_dump(), torch_threads)


def build_graph(source: dict[str, Any], specs: list[ExpertSpec], settings: Any,
                router_options: dict[str, Any] | None = None, torch_threads: int = 1,
                router_factory: Callable[[], Any] | None = None, ingress_num_cpus: float = 0.1,
                max_batch_size: int = 32, batch_wait_s: float = 0.002) -> Any:
    """Bind the deployments into one application (expert handles passed in by ``bind``)."""
    from cscr.serve.ingress import Ingress

    if router_factory is not None:
        source = {**source, "router_factory": router_factory}
    pool = [s.name for s in specs]
    router = RouterDeployment.options(**(router_options or {})).bind(  # type: ignore[attr-defined]
        source, pool, max_batch_size=max_batch_size, batch_wait_timeout_s=batch_wait_s,
        torch_threads=torch_threads)
    experts = {s.name: expert_application(s, torch_threads) for s in specs}
    ingress = Ingress.options(ray_actor_options={"num_cpus": ingress_num_cpus})  # type: ignore[attr-defined]
    return ingress.bind(router, experts, {s.name: s.model_dump() for s in specs}, settings.model_dump())
