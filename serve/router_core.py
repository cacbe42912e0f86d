"""The router's work inside a Serve replica, in one place: ``RouterCore``.

A ``RouterService`` (``make_service``) whose index follows the pool record (``apply``), with the
encoder calls of concurrent requests batched into one MiniLM forward (``serve.batching.EncoderBatcher``:
continuous batching, no fixed wait) and the decisions made on the replica's event loop. Two replicas hold one:

- ``serve.deployments.RouterDeployment``: the Router as its own deployment (the default graph:
  HTTP proxy -> Ingress -> Router), a thin wrapper that Ingress replicas call through handles;
- ``serve.deployments.Ingress`` with ``router_in_ingress``: each Ingress replica routes itself
  (no ingress-to-router hop; Router replicas then scale with the Ingress replicas).

``RouterCore`` has the async interface of the router client of the completion and admin services
(``route``, ``experts``, ``reference``, ``check_descriptor``, ``fingerprint_plan``), the same as
``serve.deployments.HandleRouter``, so an Ingress uses either. Its batcher runs on the event loop
of its first call (the replica's).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import numpy as np
from cscr.serve.batching import EncoderBatcher
from cscr.serve.protocol import RouteDecision, check_lambda
from cscr.serve.service import CostReference, RouterService
from cscr.serve.state import PoolRecord

log = logging.getLogger("cscr.serve")


def make_service(source: dict[str, Any]) -> RouterService:
    """A RouterService from a source: a run folder, or factories (tests, programmatic use)."""
    kwargs = {k: source[k] for k in ("default_lambda", "max_prompt_chars", "default_budget",
                                     "default_quality_target") if source.get(k) is not None}
    encoder = source["encoder_factory"]() if source.get("encoder_factory") else None
    if encoder is None and (source.get("encoder") or source.get("router_factory") is not None):
        from cscr.config import EncoderConfig
        from cscr.encoder import Encoder

        if source.get("run") is not None and not source.get("encoder"):
            encoder = Encoder.from_run(source["run"])  # embeds as the run's prompts were embedded
        else:  # a named encoder: from_run below appends the run's view to it, a router factory takes it as is
            encoder = Encoder(EncoderConfig(model=source.get("encoder")))
    if source.get("router_factory") is not None:
        router = source["router_factory"]()
        return RouterService(encoder, router, **kwargs)
    # no encoder given: RouterService.from_run loads the run's encoder and its view, once
    return RouterService.from_run(source["run"], source.get("variant", "cscr"), encoder=encoder, **kwargs)


class RouterCore:
    """One replica's router: build it (it loads the encoder and the run), then ``apply`` every
    pool record the replica's ``PoolFollower`` reports before and while it serves ``route``.

    ``controller``: the PoolController's handle, where the first replica to compute a record's
    operating-point table attaches it. ``torch_threads`` is set for the whole process."""

    def __init__(self, source: dict[str, Any], controller: Any, max_batch_size: int = 32,
                 batch_wait_timeout_s: float = 0.0, torch_threads: int = 1) -> None:
        import torch

        torch.set_num_threads(torch_threads)
        self.service = make_service(source)
        self.batcher = EncoderBatcher(self._embed, max_batch_size, batch_wait_timeout_s)
        self.stats = self.batcher.stats  # encoder batching: batches, prompts, largest
        self.controller = controller
        self.version = 0  # the pool version the index holds (0: none applied yet)

    async def apply(self, record: PoolRecord) -> None:
        """Make the index hold the record's experts (add the new ones by their descriptors, drop
        the removed ones; the run's experts are in the index from the start), then route with the
        record's operating-point table, or compute it and attach it to the record."""
        added: list[tuple[str, float, list[float], list[float | None] | None]] = []
        for entry in record.experts:
            if entry.name in self.service.expert_names:
                continue
            if entry.descriptor is None:
                log.error("pool v%d: expert %r has no descriptor and is not in the run's index; not routed",
                          record.version, entry.name)
                continue
            added.append((entry.name, entry.cost, entry.descriptor, entry.probe_outcomes))
        want = set(record.names())
        removed = [n for n in self.service.expert_names if n not in want]
        table = None
        if record.operating_points is not None:
            from cscr.operating import OperatingTable

            table = OperatingTable.from_json(record.operating_points)
        computed = self.service.apply_pool(added, removed, table)
        self.version = record.version  # decisions from here on are made on this index
        if computed is not None:  # the first replica on this version: the record keeps it
            with contextlib.suppress(Exception):  # best effort: another replica may attach it
                await self.controller.attach_table.remote(record.version, computed.to_json())

    async def _embed(self, texts: list[str]) -> list[np.ndarray]:
        emb = await asyncio.to_thread(self.service.embed, texts)  # (n, d), off the event loop
        return list(emb)

    async def route(self, text: str, lam: float | None, max_cost: float | None = None,
                    candidates: list[str] | None = None, budget: float | None = None,
                    quality_target: float | str | None = None, category: str | None = None) -> RouteDecision:
        t0 = time.perf_counter()
        self.service.check_prompt(text, param="prompt")
        if lam is not None:  # None: the service picks it (operating point or its default)
            check_lambda(lam)
        self.service.candidate_names(candidates, max_cost)  # refuse bad filters before encoding
        self.service.check_category(category)
        emb = await self.batcher.submit(text)
        version = self.version  # the index the decision is made on (apply runs on this loop)
        decision = self.service.decide(np.asarray(emb)[None, :], lam, max_cost, candidates, budget,
                                       quality_target, category)[0]
        decision.routing_ms = (time.perf_counter() - t0) * 1e3
        decision.pool_version = version
        return decision

    # async: they run on the replica's event loop, never concurrently with a decision
    async def experts(self) -> dict[str, float]:
        return self.service.expert_costs()

    async def pool_version(self) -> int:
        return self.version

    async def reference(self) -> CostReference:
        return self.service.reference

    async def fingerprint_plan(self) -> Any:
        return await asyncio.to_thread(self.service.fingerprint_plan)  # reads the run's files only

    async def check_descriptor(self, descriptor: list[float] | None) -> None:
        self.service.check_descriptor(descriptor)

    async def check_outcomes(self, outcomes: list[float | None] | None) -> None:
        self.service.check_outcomes(outcomes)

    async def batch_stats(self) -> dict[str, int]:
        return dict(self.stats)
