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

Operating points (``cscr.operating``, issue 11): the service holds the run's operating-point
table and picks lambda per request from a ``budget`` (the best point within it) or a
``quality_target`` (the cheapest point meeting it); every decision carries the chosen lambda and
the table's expected cost and quality. ``max_cost`` / ``candidates`` narrow the pool: the table
is then recomputed for the allowed experts (cached per set). A pool change recomputes it for the
current pool (an added expert's columns are estimated as ``cscr.operating.pool_columns`` says).
A server-wide ``default_budget`` / ``default_quality_target`` sets the lambda of requests that
ask for nothing.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from cscr.serve.protocol import ProtocolError, RankedExpert, RouteDecision

from cscr.data.table import RoutingTable
from cscr.operating import (
    NewExpert,
    OperatingPoint,
    OperatingPointError,
    OperatingTable,
    at_cost_weight,
    choose,
)
from cscr.routers.base import Router, RouterError

log = logging.getLogger("cscr.serve")
#: (new experts, candidates or None) -> the operating points of the router's current pool
Calibrator = Callable[[Mapping[str, NewExpert], Sequence[str] | None], OperatingTable]
_MAX_CACHED_TABLES = 32  # candidate sets whose table is kept (each costs one sweep of the val prompts)


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
        raise ProtocolError(str(exc), status=status, code=exc.code or "invalid_request", param=field,
                            reachable=getattr(exc, "reachable", None)) from exc


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
                 max_prompt_chars: int = 32_000, reference: CostReference | None = None,
                 table: OperatingTable | None = None, calibrator: Calibrator | None = None,
                 default_budget: float | None = None, default_quality_target: float | str | None = None) -> None:
        from cscr.routers.base import knob_values

        router.check_fitted()
        knob_values(default_lambda)  # RouterError at start-up: a configuration error, not a request's
        self.encoder = encoder
        self.router = router
        self.default_lambda = float(default_lambda)
        self.max_prompt_chars = int(max_prompt_chars)
        self.reference = reference or _default_reference(router)
        self.run_dir: Path | None = None  # the trained run, when loaded from one
        # operating points: the table of the current pool, how to recompute it, the defaults
        self.calibrator = calibrator
        self.new_experts: dict[str, NewExpert] = {}  # experts added at run time (estimated columns)
        self.default_budget = default_budget
        self.default_quality_target = default_quality_target
        self._tables: dict[tuple[str, ...], OperatingTable] = {}  # narrowed pools -> table
        self.table = table
        if table is not None and list(table.expert_names) != self.expert_names:
            if calibrator is None:
                raise ServiceError(f"the operating-point table covers {list(table.expert_names)}, the router "
                                   f"{self.expert_names}: run `cscr calibrate --run RUN`")
            self.table = calibrator({}, None)
        if self.has_default_point:
            if self.table is None:
                raise ServiceError("a default budget or quality target needs the run's operating-point table "
                                   "(cscr calibrate --run RUN writes it)")
            try:
                self.default_lambda = choose(self.table, default_budget, default_quality_target).lam  # type: ignore[union-attr]
            except OperatingPointError as exc:
                raise ServiceError(f"the server default cannot be met: {exc}") from None

    @property
    def has_default_point(self) -> bool:
        return self.default_budget is not None or self.default_quality_target is not None

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
        long-prompt mode its manifest records), with the run's lexical view appended when it has
        one, to whichever encoder is given; an encoder other than the run's is refused."""
        from cscr.runs.inputs import Run
        from cscr.runs.loader import attach_probes, load_router

        run = Run.of(run_dir)
        router = load_router(run, variant)
        if encoder is None:
            from cscr.encoder import encoder_config_for_run, get_encoder

            encoder = get_encoder(encoder_config_for_run(run.root))  # the view is appended below
        from cscr.lexical import WithLexical, for_run

        encoder = for_run(encoder, run.root)  # the run's lexical view, as training read it (idempotent)
        check_encoder(run, encoder)
        # newcomers may bring probe outcomes: the run's probe prompts, the lexical view loaded once
        choice = attach_probes(router, run, variant, encoder.view if isinstance(encoder, WithLexical) else None)
        if getattr(router, "probes", None) is not None:
            log.info("experts that join with probe outcomes are %s on them (%s)",
                     "calibrated" if choice is None or choice.use else "not calibrated",
                     "no recorded choice: the operator's, by sending them" if choice is None else
                     f"as cscr train chose: {choice.why}")
        kwargs.setdefault("reference", reference_from_table(run.table, router))
        if "table" not in kwargs:
            kwargs["table"], kwargs["calibrator"] = run_operating_points(run, variant, router)
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

    def check_outcomes(self, outcomes: Sequence[float | None] | None) -> None:
        """Refuse probe outcomes the router cannot use (before any expert is started for them)."""
        if outcomes is None:
            return
        check = getattr(self.router, "check_outcomes", None)  # CSCR routers calibrate newcomers on them
        if check is None:
            raise ProtocolError(f"router {self.router.name!r} takes no probe outcomes", param="probe_outcomes")
        with protocol_errors(param="probe_outcomes"):
            check(outcomes)

    def _live_pool(self) -> None:
        if not self.router.supports_live_pool:
            raise ProtocolError(f"router {self.router.name!r} does not support live expert changes",
                                status=400, code="unsupported")

    def add_expert(self, name: str, cost: float, descriptor: Sequence[float], refresh: bool = True,
                   outcomes: Sequence[float | None] | None = None) -> None:
        """Add an expert by its descriptor; with its ``outcomes`` on the run's probe prompts it is also
        calibrated on them (cscr/newcomer.py)."""
        self.check_descriptor(descriptor)
        self.check_outcomes(outcomes)
        if name in self.expert_names:
            raise ProtocolError(f"expert {name!r} is already in the pool", status=409, code="expert_exists")
        self._live_pool()
        vec = np.asarray(descriptor, dtype=np.float64).ravel()
        unit = (vec / np.linalg.norm(vec)).astype(np.float32)  # any scale: non-zero, finite (checked above)
        with protocol_errors(param="descriptor"):  # cost and dimension checked by the router
            self.router.add_expert(name, unit, float(cost), outcomes)
        self.new_experts[name] = NewExpert(unit, float(cost))
        if refresh:
            self.refresh_table()

    def remove_expert(self, name: str, refresh: bool = True) -> None:
        if name not in self.expert_names:
            raise ProtocolError(f"unknown expert {name!r}; the pool has {self.expert_names}",
                                status=404, code="expert_not_found")
        if len(self.expert_names) == 1:
            raise ProtocolError("cannot remove the last expert of the pool", status=409, code="last_expert")
        self._live_pool()
        with protocol_errors(param="expert"):
            self.router.remove_expert(name)
        self.new_experts.pop(name, None)
        if refresh:
            self.refresh_table()

    def apply_pool(self, added: Sequence[tuple[str, float, Sequence[float], Sequence[float | None] | None]],
                   removed: Sequence[str],
                   table: OperatingTable | None = None) -> OperatingTable | None:
        """Add and remove experts (name, cost, descriptor, probe outcomes or None) in one go, then route with ``table``
        when it covers the new pool; else recompute it (once). Returns the recomputed table (None:
        ``table`` was used, or the pool did not change and had one, or there is no calibrator)."""
        for name, cost, descriptor, outcomes in added:
            self.add_expert(name, cost, descriptor, refresh=False, outcomes=outcomes)
        for name in removed:
            self.remove_expert(name, refresh=False)
        if table is not None and list(table.expert_names) == self.expert_names:
            self._tables.clear()  # narrowed pools' tables were of the old pool
            self.table = table
            self._apply_default_point()
            return None
        if not added and not removed and self.table is not None:
            return self.table  # the run's own table of an unchanged pool: the record keeps it
        self.refresh_table()
        return self.table

    # ---- operating points ----
    def refresh_table(self) -> None:
        """Recompute the table for the current pool (after a pool change); without a calibrator,
        or when it fails, the service keeps routing with the knob and has no table."""
        self._tables.clear()
        if self.calibrator is None:
            self.table = None
            return
        try:
            self.table = self.calibrator(dict(self.new_experts), None)
        except (ValueError, OSError) as exc:
            log.warning("operating points not recomputed for the pool %s: %s", self.expert_names, exc)
            self.table = None
            return
        self._apply_default_point()

    def _apply_default_point(self) -> None:
        """The server default's lambda on the current table."""
        if self.has_default_point and self.table is not None:
            try:
                self.default_lambda = choose(self.table, self.default_budget, self.default_quality_target).lam  # type: ignore[union-attr]  # a budget or target: a point
            except OperatingPointError as exc:
                log.warning("the server default cannot be met by the new pool (%s); keeping lambda %g",
                            exc, self.default_lambda)

    def table_for(self, allowed: Sequence[str]) -> OperatingTable | None:
        """The operating points of routing among ``allowed`` (the whole pool: ``self.table``)."""
        if self.table is None or len(allowed) == len(self.expert_names):
            return self.table
        key = tuple(allowed)
        if key not in self._tables:
            if self.calibrator is None:
                return None
            if len(self._tables) >= _MAX_CACHED_TABLES:
                self._tables.pop(next(iter(self._tables)))
            self._tables[key] = self.calibrator(dict(self.new_experts), list(allowed))
        return self._tables[key]

    def operating_point(self, allowed: Sequence[str], cost_weight: float | None = None,
                        budget: float | None = None,
                        quality_target: float | str | None = None) -> OperatingPoint | None:
        """The point a request routes at (``cscr.operating.choose`` on the allowed pool's table);
        a request that asks for nothing gets the server default. None: no table (knob only)."""
        asks = budget is not None or quality_target is not None
        table = self.table_for(allowed)
        if table is None:
            if asks:
                raise ProtocolError("budget and quality_target need the run's operating-point table, and this "
                                    "server has none for this pool (cscr calibrate --run RUN writes it); send "
                                    "cost_weight instead", param="budget" if budget is not None else "quality_target",
                                    code="no_operating_points")
            return None
        with protocol_errors():
            point = choose(table, budget, quality_target, cost_weight)
        if point is not None:
            return point
        if self.has_default_point and len(allowed) < len(self.expert_names):
            with contextlib.suppress(OperatingPointError):  # the default within the narrowed pool
                return choose(table, self.default_budget, self.default_quality_target)
        return at_cost_weight(table, self.default_lambda)

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
        if max_cost is not None:  # a hard cap, in the run's unit (c_m x scale), as `cscr route --max-cost`
            if not np.isfinite(max_cost) or max_cost < 0:
                raise ProtocolError(f"max_cost must be a finite number >= 0, got {max_cost}",
                                    param="max_cost")
            costs = {n: c * self.reference.scale for n, c in self.expert_costs().items()}
            names = [n for n in names if costs[n] <= max_cost * (1 + 1e-9) + 1e-12]
            if not names:
                shown = {n: float(f"{c:.4g}") for n, c in costs.items()}
                raise ProtocolError(f"no candidate expert costs at most max_cost={max_cost} {self.reference.unit} "
                                    f"per request (costs: {shown})", param="max_cost", code="no_candidate")
        return names

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        emb = np.asarray(self.encoder.encode(list(texts)), dtype=np.float32)  # (n, d)
        if emb.ndim != 2 or emb.shape[0] != len(texts):
            raise ServiceError(f"encoder returned shape {emb.shape} for {len(texts)} texts")
        return emb

    def check_category(self, category: str | None) -> None:
        """A 400 unless the router takes ``category`` as a hint (None: no hint), before encoding."""
        if category is not None:
            with protocol_errors(param="category"):
                self.router.check_categories([category])

    def decide(self, emb: np.ndarray, lam: float | None = None, max_cost: float | None = None,
               candidates: Sequence[str] | None = None, budget: float | None = None,
               quality_target: float | str | None = None, category: str | None = None) -> list[RouteDecision]:
        """One decision per embedding row (n, d) at one knob value: ``Router.rank``. The knob is
        ``lam`` (the request's cost_weight), else the operating point ``budget`` /
        ``quality_target`` choose, else the server default. ``category``: the prompts' category, as
        their caller gave it (the operating points were computed without hints: their expected cost
        and quality are the router's, not this category's)."""
        allowed = self.candidate_names(candidates, max_cost)
        cands = None if len(allowed) == len(self.expert_names) else allowed
        point = self.operating_point(allowed, lam, budget, quality_target)
        lam = float(lam) if lam is not None else (point.lam if point is not None else self.default_lambda)
        with protocol_errors():
            ranked = self.router.rank(emb, lam, cands, categories=None if category is None else [category] * len(emb))
        expected: dict[str, Any] = {} if point is None else {
            "expected_cost": point.cost, "expected_quality": point.quality, "cost_unit": point.cost_unit}
        return [RouteDecision(chosen=r[0].expert, cost_weight=lam, category=category,
                              ranked=[RankedExpert(name=e.expert, score=e.score, similarity=e.utility, cost=e.cost)
                                      for e in r], **expected)
                for r in ranked]

    def route(self, texts: Sequence[str], lam: float | None = None, max_cost: float | None = None,
              candidates: Sequence[str] | None = None, budget: float | None = None,
              quality_target: float | str | None = None, category: str | None = None) -> list[RouteDecision]:
        """Encode then decide; ``routing_ms`` is the wall time of both, per request."""
        for t in texts:
            self.check_prompt(t, param="prompt")
        self.check_category(category)
        t0 = time.perf_counter()
        decisions = self.decide(self.embed(texts), lam, max_cost, candidates, budget, quality_target, category)
        ms = (time.perf_counter() - t0) * 1e3
        for d in decisions:
            d.routing_ms = ms
        return decisions


def run_operating_points(run: Any, variant: str, router: Router) -> tuple[OperatingTable | None, Calibrator]:
    """(the run's operating-point table of ``variant``, or None when it has none and none can be
    computed (no validation prompts), a calibrator for changed pools and narrowed candidates).
    A missing table is computed and written to the run (``cscr calibrate`` does the same)."""
    from cscr.operating_run import calibrate, table_path

    def calibrator(new: Mapping[str, NewExpert], candidates: Sequence[str] | None) -> OperatingTable:
        return calibrate(run, variant, router, new=new, candidates=candidates, save=False)

    path = table_path(run, variant)
    try:
        if path.exists():
            table = OperatingTable.load(path)
            if list(table.expert_names) == list(router.expert_names):
                return table, calibrator
        try:
            return calibrate(run, variant, router), calibrator
        except OSError:  # a read-only run folder: serve the table without storing it
            return calibrator({}, None), calibrator
    except ValueError as exc:
        log.warning("no operating points for %s/%s (%s): budget and quality_target are refused", run.root,
                    variant, exc)
        return None, calibrator


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
