"""RouterService: the routing decision as a plain object (no Ray, no HTTP; STYLE.md rule 7).

It holds the frozen prompt encoder, a fitted ``cscr.routers.base.Router`` (CSCR: head + FAISS
expert index; any registered router works for decisions) and the cost knob. One decision is
``Router.rank`` on the prompt's embedding, the same scoring ``cscr evaluate`` sweeps:

    q = encode(prompt);  ranked = router.rank(q, lambda, candidates)
    (CSCR: the top-k by  q . d_m - lambda * c_m, best first; the other candidates cheapest first)

The ranked list is also the fallback order when an expert fails. Live pool changes
(``add_expert`` / ``remove_expert``) go to routers that support them (``supports_live_pool``;
CSCR: index updates, the head is never retrained). A ``RouterError`` (bad knob value, unknown
candidate, ...) becomes the ``ProtocolError`` the HTTP edge answers with here, and only here.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from cscr.serve.protocol import ProtocolError, RankedExpert, RouteDecision

from cscr.data.table import RoutingTable
from cscr.routers.base import Router, RouterError


class ServiceError(ValueError):
    """The service cannot start as configured (e.g. the index does not match the pool)."""


_PROTOCOL_PARAM = {"lambda": "cost_weight"}  # router input names -> request field names


@contextlib.contextmanager
def protocol_errors(param: str | None = None, status: int = 400) -> Iterator[None]:
    """Turn the router's RouterError into the ProtocolError the HTTP edge answers with."""
    try:
        yield
    except RouterError as exc:
        field = _PROTOCOL_PARAM.get(exc.param or "", exc.param) or param
        raise ProtocolError(str(exc), status=status, code=exc.code or "invalid_request", param=field) from exc


class TextEncoder(Protocol):
    def encode(self, texts: Sequence[str]) -> np.ndarray: ...


@dataclass(frozen=True)
class CostReference:
    """What "always use the best expert" would cost, for the cost-saved metric."""

    best_expert: str | None = None  # the expert with the highest mean train quality
    best_cost: float = 1.0  # its normalised cost c_m
    scale: float = 1.0  # raw cost units per normalised unit (largest mean train cost)
    unit: str = "normalised"  # usd | params | normalised


class RouterService:
    """Encoder + router + cost knob. Thread-compatible, not thread-safe: call from one thread."""

    def __init__(self, encoder: TextEncoder, router: Router, default_lambda: float = 0.0,
                 max_prompt_chars: int = 32_000, reference: CostReference | None = None) -> None:
        from cscr.routers.base import knob_values

        router.check_fitted()
        knob_values(default_lambda)  # RouterError at start-up: a configuration error, not a request's
        self.encoder = encoder
        self.router = router
        self.default_lambda = float(default_lambda)
        self.max_prompt_chars = int(max_prompt_chars)
        self.reference = reference or _default_reference(router)
        self.run_dir: Path | None = None  # the trained run, when loaded from one

    def fingerprint_plan(self) -> Any:
        """What an on-the-fly fingerprint of a new expert must compute (serve.fingerprint)."""
        from cscr.serve.fingerprint import fingerprint_plan

        basis = self.router.descriptor_basis
        if basis is None:
            raise ProtocolError(f"router {self.router.name!r} takes no expert descriptors: it does not support "
                                "live expert changes", param="fingerprint", code="unsupported")
        if self.run_dir is None:
            raise ProtocolError("this router was not loaded from a run: send the expert's descriptor",
                                param="fingerprint", code="unsupported")
        return fingerprint_plan(self.run_dir, basis.kind, basis.basis_id)

    # ---- construction from a trained run ----
    @staticmethod
    def from_run(run_dir: str | Path, variant: str = "cscr", encoder: TextEncoder | None = None,
                 **kwargs: Any) -> RouterService:
        """The run's trained router and the encoder its embeddings were made with (the model and
        long-prompt mode its manifest records); an encoder other than the run's is refused."""
        from cscr.runs.inputs import Run
        from cscr.runs.loader import load_router

        run = Run.of(run_dir)
        router = load_router(run, variant)
        if encoder is None:
            from cscr.encoder import Encoder

            encoder = Encoder.from_run(run_dir)
        check_encoder(run, encoder)
        kwargs.setdefault("reference", reference_from_table(run.table, router))
        service = RouterService(encoder, router, **kwargs)
        service.run_dir = run.root
        return service

    # ---- pool ----
    @property
    def expert_names(self) -> list[str]:
        return list(self.router.expert_names)

    def expert_costs(self) -> dict[str, float]:
        return {n: float(c) for n, c in zip(self.router.expert_names, self.router.costs, strict=True)}

    def check_pool(self, pool: Sequence[str]) -> None:
        """Refuse to serve when the router's experts and the served pool differ."""
        problem = pool_mismatch(self.expert_names, pool)
        if problem:
            raise ServiceError(f"the router's expert index does not match the pool: {problem}")

    def check_descriptor(self, descriptor: Sequence[float] | None) -> None:
        """Refuse a descriptor the index cannot take (before any expert is started for it)."""
        if descriptor is None:
            return
        vec = np.asarray(descriptor, dtype=np.float64).ravel()
        basis = self.router.descriptor_basis
        dim = None if basis is None else basis.dim
        if dim is not None and vec.size != dim:
            raise ProtocolError(f"descriptor has dimension {vec.size}; the router's index takes {dim}",
                                param="descriptor", code="bad_descriptor")
        if not np.isfinite(vec).all() or not np.any(vec):
            raise ProtocolError("descriptor is zero or not finite", param="descriptor", code="bad_descriptor")

    def _live_pool(self) -> None:
        if not self.router.supports_live_pool:
            raise ProtocolError(f"router {self.router.name!r} does not support live expert changes",
                                status=400, code="unsupported")

    def add_expert(self, name: str, cost: float, descriptor: Sequence[float]) -> None:
        self.check_descriptor(descriptor)
        if name in self.expert_names:
            raise ProtocolError(f"expert {name!r} is already in the pool", status=409, code="expert_exists")
        self._live_pool()
        vec = np.asarray(descriptor, dtype=np.float64).ravel()
        unit = (vec / np.linalg.norm(vec)).astype(np.float32)  # any scale: non-zero, finite (checked above)
        with protocol_errors(param="descriptor"):  # cost and dimension checked by the router
            self.router.add_expert(name, unit, float(cost))

    def remove_expert(self, name: str) -> None:
        if name not in self.expert_names:
            raise ProtocolError(f"unknown expert {name!r}; the pool has {self.expert_names}",
                                status=404, code="expert_not_found")
        if len(self.expert_names) == 1:
            raise ProtocolError("cannot remove the last expert of the pool", status=409, code="last_expert")
        self._live_pool()
        with protocol_errors(param="expert"):
            self.router.remove_expert(name)

    # ---- requests ----
    def check_prompt(self, text: str, param: str = "messages") -> None:
        if not text or not text.strip():
            raise ProtocolError("the prompt is empty", param=param, code="empty_prompt")
        if len(text) > self.max_prompt_chars:
            raise ProtocolError(f"the prompt has {len(text)} characters; the limit is "
                                f"{self.max_prompt_chars}", param=param, code="prompt_too_long")

    def candidate_names(self, candidates: Sequence[str] | None, max_cost: float | None) -> list[str]:
        """The experts routing may choose, after ``candidates`` (checked by the router) and ``max_cost``."""
        with protocol_errors(param="candidates"):
            mask = self.router.candidate_mask(candidates)
        names = [n for n, ok in zip(self.expert_names, mask, strict=True) if ok]
        if max_cost is not None:
            if not np.isfinite(max_cost) or max_cost < 0:
                raise ProtocolError(f"max_cost must be a finite number >= 0, got {max_cost}",
                                    param="max_cost")
            costs = self.expert_costs()
            names = [n for n in names if costs[n] <= max_cost + 1e-12]
            if not names:
                raise ProtocolError(f"no candidate expert costs at most max_cost={max_cost} "
                                    f"(costs: {costs})", param="max_cost", code="no_candidate")
        return names

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        emb = np.asarray(self.encoder.encode(list(texts)), dtype=np.float32)  # (n, d)
        if emb.ndim != 2 or emb.shape[0] != len(texts):
            raise ServiceError(f"encoder returned shape {emb.shape} for {len(texts)} texts")
        return emb

    def decide(self, emb: np.ndarray, lam: float | None = None, max_cost: float | None = None,
               candidates: Sequence[str] | None = None) -> list[RouteDecision]:
        """One decision per embedding row (n, d) at one knob value: ``Router.rank``."""
        lam = self.default_lambda if lam is None else float(lam)
        allowed = self.candidate_names(candidates, max_cost)
        cands = None if len(allowed) == len(self.expert_names) else allowed
        with protocol_errors():
            ranked = self.router.rank(emb, lam, cands)
        return [RouteDecision(chosen=r[0].expert, cost_weight=lam,
                              ranked=[RankedExpert(name=e.expert, score=e.score, similarity=e.utility, cost=e.cost)
                                      for e in r])
                for r in ranked]

    def route(self, texts: Sequence[str], lam: float | None = None, max_cost: float | None = None,
              candidates: Sequence[str] | None = None) -> list[RouteDecision]:
        """Encode then decide; ``routing_ms`` is the wall time of both, per request."""
        for t in texts:
            self.check_prompt(t, param="prompt")
        t0 = time.perf_counter()
        decisions = self.decide(self.embed(texts), lam, max_cost, candidates)
        ms = (time.perf_counter() - t0) * 1e3
        for d in decisions:
            d.routing_ms = ms
        return decisions


def pool_mismatch(index: Sequence[str], pool: Sequence[str]) -> str | None:
    """What differs between the experts of an index and a served pool (None: nothing)."""
    have, want = set(index), set(pool)
    parts = []
    if want - have:
        parts.append(f"pool experts with no descriptor in the index: {sorted(want - have)}")
    if have - want:
        parts.append(f"index experts missing from the pool: {sorted(have - want)}")
    if not parts:
        return None
    return "; ".join(parts) + " (serve the pool the run was trained on; add experts live with POST /v1/experts)"


def _default_reference(router: Router) -> CostReference:
    costs = np.asarray(router.costs, dtype=np.float64)
    j = int(np.argmax(costs))
    return CostReference(router.expert_names[j], float(costs[j]), 1.0, "normalised")


def reference_from_table(table: RoutingTable, router: Router) -> CostReference:
    """The best expert by mean train quality, and the raw scale of the normalised costs."""
    rows = table.split_index("train")
    if rows.size == 0:
        return _default_reference(router)
    with np.errstate(all="ignore"):
        quality = np.nanmean(table.quality[rows], axis=0)  # (M,)
    mean_cost = table.cost[rows].mean(axis=0)  # (M,)
    j = int(np.nanargmax(np.nan_to_num(quality, nan=-1.0)))
    top = float(mean_cost.max())
    scale = top if top > 0 else 1.0
    return CostReference(table.expert_names[j], float(mean_cost[j] / scale), scale, table.cost_unit)


def check_encoder(run: Any, encoder: Any) -> None:
    """Refuse an encoder other than the one the run's prompt embeddings were made with
    (``run``: a run folder or a cscr.runs.inputs.Run)."""
    from cscr.runs.inputs import Run

    want = Run.of(run).encoder_id
    have = getattr(encoder, "encoder_id", None)
    if want and have and want != have:
        raise ServiceError(f"the run was embedded with encoder {want}, the server loaded {have}: "
                           "serve with the run's encoder (encoder=PATH)")
