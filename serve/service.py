"""RouterService: the routing decision as a plain object (no Ray, no HTTP; STYLE.md rule 7).

It holds the frozen prompt encoder, a fitted router (CSCR: head + FAISS expert index; any router
behind ``cscr.routers.base.Router`` works for decisions) and the cost knob. One decision:

    q = encode(prompt);  U = router utilities (top-k similarities, -inf elsewhere)
    ranked = experts of the top-k sorted by  U[m] - lambda * c_m  (best first)

The ranked list is also the fallback order when an expert fails; candidates outside the top-k
follow, cheapest first. Live pool changes (``add_expert`` / ``remove_expert``) are index updates
delegated to the router; the head is never retrained.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from cscr.serve.protocol import ProtocolError, RankedExpert, RouteDecision, check_lambda


class ServiceError(ValueError):
    """The service cannot start as configured (e.g. the index does not match the pool)."""


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

    def __init__(self, encoder: TextEncoder, router: Any, default_lambda: float = 0.0,
                 max_prompt_chars: int = 32_000, reference: CostReference | None = None) -> None:
        check_lambda(default_lambda)
        router._check_fitted()
        self.encoder = encoder
        self.router = router
        self.default_lambda = float(default_lambda)
        self.max_prompt_chars = int(max_prompt_chars)
        self.reference = reference or _default_reference(router)
        self.run_dir: Path | None = None  # the trained run, when loaded from one
        self.descriptors: dict[str, str] = {}  # descriptor kind and basis id of the index

    def fingerprint_plan(self) -> Any:
        """What an on-the-fly fingerprint of a new expert must compute (serve.fingerprint)."""
        from cscr.serve.fingerprint import fingerprint_plan

        if self.run_dir is None:
            raise ProtocolError("this router was not loaded from a run: send the expert's descriptor",
                                param="fingerprint", code="unsupported")
        return fingerprint_plan(self.run_dir, self.descriptors.get("kind", ""),
                                self.descriptors.get("basis_id", ""))

    # ---- construction from a trained run ----
    @staticmethod
    def from_run(run_dir: str | Path, variant: str = "cscr", encoder: TextEncoder | None = None,
                 **kwargs: Any) -> RouterService:
        """The run's trained router and the encoder its embeddings were made with (MiniLM by
        default); an encoder other than the run's is refused."""
        router, table, meta = load_router(run_dir, variant)
        if encoder is None:
            from cscr.encoder import Encoder

            encoder = Encoder()
        check_encoder(run_dir, encoder)
        kwargs.setdefault("reference", reference_from_table(table, router))
        service = RouterService(encoder, router, **kwargs)
        service.run_dir = Path(run_dir)
        service.descriptors = meta
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
        dim = getattr(getattr(self.router, "index", None), "dim", None)
        if dim is not None and vec.size != dim:
            raise ProtocolError(f"descriptor has dimension {vec.size}; the router's index takes {dim}",
                                param="descriptor", code="bad_descriptor")
        if not np.isfinite(vec).all() or not np.any(vec):
            raise ProtocolError("descriptor is zero or not finite", param="descriptor", code="bad_descriptor")

    def add_expert(self, name: str, cost: float, descriptor: Sequence[float]) -> None:
        self.check_descriptor(descriptor)
        if name in self.expert_names:
            raise ProtocolError(f"expert {name!r} is already in the pool", status=409, code="expert_exists")
        if not hasattr(self.router, "add_expert"):
            raise ProtocolError(f"router {self.router.name!r} does not support live expert changes",
                                status=400, code="unsupported")
        vec = np.asarray(descriptor, dtype=np.float32).ravel()
        norm = float(np.linalg.norm(vec))
        if not np.isfinite(norm) or norm == 0.0:
            raise ProtocolError("descriptor is zero or not finite", param="descriptor")
        if not np.isfinite(cost) or cost < 0:
            raise ProtocolError(f"cost must be a finite number >= 0, got {cost}", param="cost")
        try:
            self.router.add_expert(name, vec / norm, float(cost))
        except ValueError as exc:  # dimension mismatch and the like, named by the index
            raise ProtocolError(str(exc), param="descriptor") from exc

    def remove_expert(self, name: str) -> None:
        if name not in self.expert_names:
            raise ProtocolError(f"unknown expert {name!r}; the pool has {self.expert_names}",
                                status=404, code="expert_not_found")
        if len(self.expert_names) == 1:
            raise ProtocolError("cannot remove the last expert of the pool", status=409, code="last_expert")
        if not hasattr(self.router, "remove_expert"):
            raise ProtocolError(f"router {self.router.name!r} does not support live expert changes",
                                code="unsupported")
        self.router.remove_expert(name)

    # ---- requests ----
    def check_prompt(self, text: str, param: str = "messages") -> None:
        if not text or not text.strip():
            raise ProtocolError("the prompt is empty", param=param, code="empty_prompt")
        if len(text) > self.max_prompt_chars:
            raise ProtocolError(f"the prompt has {len(text)} characters; the limit is "
                                f"{self.max_prompt_chars}", param=param, code="prompt_too_long")

    def candidate_names(self, candidates: Sequence[str] | None, max_cost: float | None) -> list[str]:
        """The experts routing may choose, after ``candidates`` and ``max_cost``."""
        names = self.expert_names
        if candidates is not None:
            unknown = sorted(set(candidates) - set(names))
            if unknown:
                raise ProtocolError(f"unknown expert(s) in candidates: {unknown}; the pool has {names}",
                                    param="candidates", code="unknown_expert")
            if not candidates:
                raise ProtocolError("candidates is empty", param="candidates")
            names = [n for n in names if n in set(candidates)]
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
        """One decision per embedding row (n, d) at one knob value."""
        lam = self.default_lambda if lam is None else float(lam)
        check_lambda(lam)
        allowed = self.candidate_names(candidates, max_cost)
        names = self.expert_names
        cands = None if len(allowed) == len(names) else allowed
        u, pen = self.router.scored(emb, None, cands)  # (n, M), (M,) or (n, M)
        pen = np.broadcast_to(pen, u.shape)
        score = u - lam * pen  # (n, M); -inf outside the top-k and the candidates
        allowed_mask = np.isin(names, allowed)
        out = []
        for i in range(u.shape[0]):
            finite = np.isfinite(score[i])
            order = [int(j) for j in np.argsort(-score[i], kind="stable") if finite[j]]
            rest = [int(j) for j in np.argsort(pen[i], kind="stable") if allowed_mask[j] and not finite[j]]
            ranked = [RankedExpert(name=names[j], score=float(score[i, j]), similarity=float(u[i, j]),
                                   cost=float(pen[i, j])) for j in order]
            ranked += [RankedExpert(name=names[j], score=None, similarity=None,
                                    cost=float(pen[i, j])) for j in rest]
            out.append(RouteDecision(chosen=ranked[0].name, cost_weight=lam, ranked=ranked))
        return out

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

    def cost_saved(self, chosen: str) -> float:
        """Estimated cost saved (raw units) by answering with ``chosen`` instead of the best expert."""
        cost = self.expert_costs().get(chosen, self.reference.best_cost)
        return (self.reference.best_cost - cost) * self.reference.scale


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


def _default_reference(router: Any) -> CostReference:
    costs = np.asarray(router.costs, dtype=np.float64)
    j = int(np.argmax(costs))
    return CostReference(router.expert_names[j], float(costs[j]), 1.0, "normalised")


def reference_from_table(table: Any, router: Any) -> CostReference:
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


def load_router(run_dir: str | Path, variant: str = "cscr") -> tuple[Any, Any, dict[str, str]]:
    """(fitted router, routing table, {"kind", "basis_id"} of its descriptors) of a trained run.

    CSCR variants are built from their parts (trained head + the run's descriptors of the table's
    experts + c_m from the train split) without reading the prompt embeddings; any other
    registered router is fitted the way ``cscr evaluate`` fits it.
    """
    from cscr.data.table import RoutingTable
    from cscr.routers import RouterContext, get_router
    from cscr.routers.cscr import CSCRRouter
    from cscr.run import RunPaths

    paths = RunPaths.of(run_dir)
    table = RoutingTable.load(paths.require_table())
    router = get_router(variant)
    if isinstance(router, CSCRRouter):
        from cscr.fingerprints.store import DescriptorStore
        from cscr.trained import load_trained

        trained = load_trained(paths.root, variant)
        kind = trained.descriptor_kind or "probe-outcome"
        store = DescriptorStore(paths.descriptors)
        if not store.path.exists():
            raise FileNotFoundError(f"{paths.root} has no descriptor store ({store.path})")
        info = store.info(kind)
        if trained.basis_id and info["basis_id"] != trained.basis_id:
            raise ServiceError(f"the {kind} descriptors in {store.path} (basis {info['basis_id']}) are not the "
                               f"ones the head was trained with (basis {trained.basis_id}): retrain")
        descriptors = store.read(kind, experts=table.expert_names)
        costs = dict(zip(table.expert_names, table.expert_costs(table.split_index("train")), strict=True))
        router = type(router).from_parts(trained.head, descriptors, costs, top_k=trained.config.index.top_k,
                                         kind=kind)
        return router, table, {"kind": kind, "basis_id": str(info["basis_id"])}
    from cscr.encoder import load_run_embeddings

    emb = load_run_embeddings(paths.root)
    return router.fit(RouterContext.from_table(table, emb, paths.root)), table, {}


def check_encoder(run_dir: str | Path, encoder: Any) -> None:
    """Refuse an encoder other than the one the run's prompt embeddings were made with."""
    import json

    from cscr.run import RunPaths

    manifest = RunPaths.of(run_dir).embeddings / "manifest.json"
    want = json.loads(manifest.read_text()).get("encoder_id") if manifest.exists() else None
    have = getattr(encoder, "encoder_id", None)
    if want and have and want != have:
        raise ServiceError(f"the run was embedded with encoder {want}, the server loaded {have}: "
                           "serve with the run's encoder (encoder=PATH)")
