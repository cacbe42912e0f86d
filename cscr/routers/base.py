"""One router interface for CSCR and every baseline (STYLE.md rule 4).

A router scores prompts: ``utilities(emb, rows) -> (n, M)``, higher is better, ``-inf`` for an
expert it will not consider (e.g. outside CSCR's top-k). The shared base turns utilities and the
cost knob lambda into choices:

    choice(x) = argmax_m  U[x, m] - lambda * penalty[x, m]

``penalty`` defaults to the normalised expert cost c_m (SPEC.md section 1); the oracle uses the
per-prompt cost instead. The knob is checked in one place (``knob_values``) and meets the
utilities in one function (``cscr.routers.envelope.score``); ``rank`` (serving: the decision and
its fallbacks), ``route`` and ``route_sweep`` (evaluation: every knob value at once, through the
exact per-prompt envelopes of the same scores) all go through them, so a router is served the
way it is evaluated. A router whose knob means something else (pareto-random, thompson)
overrides ``route_sweep`` and ``rank`` together. Evaluation and serving call only ``rank`` /
``route`` / ``route_sweep`` / ``knob_grid``, so no router is special-cased anywhere.

Inputs: ``emb`` (n, d) float32 prompt embeddings; ``rows`` (n,) indices into the fitted table
when the prompts are table rows (hindsight routers such as the oracle need them; routers that
generalise to new prompts ignore them).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import numpy as np

from cscr.data.table import RoutingTable
from cscr.routers.envelope import knob_grid_values, score, sweep_choices


class RouterError(ValueError):
    """A router was used wrongly (not fitted, unknown expert, bad knob value, ...).

    ``param`` names the input at fault when there is one (``lambda``, ``candidates``, ``expert``,
    ``descriptor``, ``cost``, ``rows``); ``code`` says what is wrong with it (e.g.
    ``unknown_expert``). Serving turns both into its HTTP error at the edge.
    """

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.code = code

    def __reduce__(self) -> tuple[Any, ...]:  # keep param and code across pickling
        return (type(self), (str(self), self.param, self.code))


def knob_values(lambdas: float | Sequence[float] | np.ndarray) -> np.ndarray:
    """(L,) float64 knob values: the one check of lambda (finite and >= 0, else RouterError)."""
    lam = np.atleast_1d(np.asarray(lambdas, dtype=np.float64))
    if lam.ndim != 1 or not np.isfinite(lam).all() or (lam < 0).any():
        shown = lam.tolist() if lam.size <= 4 else f"{lam.size} values"
        raise RouterError(f"cost weight lambda must be a finite number >= 0, got {shown}", param="lambda",
                          code="invalid_cost_weight")
    return lam


class Ranked(NamedTuple):
    """One expert in a routing decision: the first is the choice, the rest the fallbacks in order."""

    expert: str
    utility: float | None  # the router's utility; None: a fallback the router did not score
    score: float | None  # utility - lambda * penalty (what the choice maximises); None: not scored
    cost: float  # the penalty lambda multiplies (c_m; the oracle: the prompt's own cost)


def ranked_lists(u: np.ndarray, pen: np.ndarray, lam: float, allowed: np.ndarray,
                 names: Sequence[str]) -> list[list[Ranked]]:
    """Per prompt, the experts with a finite utility by ``score(u, pen, lam)``, best first (on
    equal scores the first expert, as ``argmax``), then the other ``allowed`` experts cheapest first."""
    pen = np.broadcast_to(np.asarray(pen, dtype=np.float64), u.shape)
    s = score(u, pen, lam)  # (n, M)
    finite = np.isfinite(u)
    out = []
    for i in range(u.shape[0]):
        order = [int(j) for j in np.argsort(-s[i], kind="stable") if finite[i, j]]
        rest = [int(j) for j in np.argsort(pen[i], kind="stable") if allowed[j] and not finite[i, j]]
        out.append([Ranked(names[j], float(u[i, j]), float(s[i, j]), float(pen[i, j])) for j in order]
                   + [Ranked(names[j], None, None, float(pen[i, j])) for j in rest])
    return out


@dataclass(frozen=True)
class DescriptorBasis:
    """The expert descriptors a router's live pool takes: kind, basis id and dimension."""

    kind: str
    basis_id: str
    dim: int


@dataclass
class RouterContext:
    """What a router may learn from: the table, its cached embeddings and the row splits."""

    table: RoutingTable
    embeddings: np.ndarray  # (n, d) float32, aligned with table rows
    train_rows: np.ndarray  # indices of train prompts
    val_rows: np.ndarray  # indices of validation prompts
    seed: int = 0

    @staticmethod
    def from_table(table: RoutingTable, embeddings: np.ndarray, seed: int = 0) -> RouterContext:
        if embeddings.shape[0] != table.n:
            raise RouterError(f"embeddings have {embeddings.shape[0]} rows, table has {table.n}")
        return RouterContext(table, embeddings, table.split_index("train"), table.split_index("val"), seed)


class Router(ABC):
    """Base class. Subclasses set ``name`` and implement ``fit`` and ``utilities``."""

    name: ClassVar[str] = "router"
    #: False for routers that are a single operating point whatever the knob (random, single experts)
    has_knob: ClassVar[bool] = True
    #: True for routers whose pool changes at run time (``add_expert`` / ``remove_expert``)
    supports_live_pool: ClassVar[bool] = False

    def __init__(self) -> None:
        self.expert_names: list[str] = []
        self.costs: np.ndarray = np.zeros(0)  # c_m (M,), in [0, 1]

    # ---- to implement ----
    def fit(self, ctx: RouterContext) -> Router:
        """Learn from ``ctx``; the default keeps the pool and its normalised costs."""
        self.expert_names = ctx.table.expert_names
        self.costs = ctx.table.expert_costs(ctx.train_rows)
        return self

    @abstractmethod
    def utilities(self, emb: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
        """(n, M) scores, higher is better; -inf excludes an expert for that prompt."""

    def penalty(self, emb: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
        """(M,) or (n, M) cost that lambda multiplies. Default: c_m."""
        return self.costs

    # ---- live pool (routers with ``supports_live_pool``) ----
    @property
    def descriptor_basis(self) -> DescriptorBasis | None:
        """The descriptors ``add_expert`` takes; None for a router that takes none."""
        return None

    def add_expert(self, name: str, descriptor: np.ndarray, cost: float) -> None:
        """Add an expert by its descriptor and normalised cost c_m, without retraining."""
        raise RouterError(f"router {self.name!r} does not support live expert changes", code="unsupported")

    def remove_expert(self, name: str) -> None:
        raise RouterError(f"router {self.name!r} does not support live expert changes", code="unsupported")

    # ---- shared machinery ----
    def check_fitted(self) -> None:
        """RouterError unless the router has been fitted (it has a pool)."""
        if not self.expert_names:
            raise RouterError(f"router {self.name!r} is not fitted", code="not_fitted")

    def candidate_mask(self, candidates: Sequence[str] | None) -> np.ndarray:
        """(M,) bool: True for experts routing may choose (the one check of candidate names)."""
        self.check_fitted()
        if candidates is None:
            return np.ones(len(self.expert_names), dtype=bool)
        unknown = sorted(set(candidates) - set(self.expert_names))
        if unknown:
            raise RouterError(f"unknown expert(s) {unknown} in candidates; the pool has {self.expert_names}",
                              param="candidates", code="unknown_expert")
        if not candidates:
            raise RouterError("empty candidate list", param="candidates")
        return np.isin(self.expert_names, list(candidates))

    def check_categories(self, categories: Sequence[str | None] | None) -> None:
        """RouterError unless this router takes the categories callers gave (None: no hint); a router
        takes none unless it says otherwise (the cscr router with a category prior)."""
        if categories is not None and any(c is not None for c in categories):
            raise RouterError(f"router {self.name!r} takes no category hint (the cscr router with a category "
                              "prior does)", param="category", code="unsupported")

    def scored(self, emb: np.ndarray, rows: np.ndarray | None = None, candidates: Sequence[str] | None = None,
               categories: Sequence[str | None] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(utilities (n, M) with non-candidates at -inf, penalty broadcastable to (n, M)). ``categories``:
        per prompt, the category its caller gave (None: none); only routers that take hints accept any."""
        self.check_categories(categories)
        u = np.array(self.utilities(emb, rows), dtype=np.float64)  # (n, M)
        mask = self.candidate_mask(candidates)
        u[:, ~mask] = -np.inf
        # a prompt whose every candidate is excluded falls back to all candidates, scored equally
        dead = ~np.isfinite(u).any(axis=1)
        if dead.any():
            u[np.ix_(dead, mask)] = 0.0
        pen = np.asarray(self.penalty(emb, rows), dtype=np.float64)
        return u, pen

    def rank(self, emb: np.ndarray, lam: float = 0.0, candidates: Sequence[str] | None = None,
             rows: np.ndarray | None = None, categories: Sequence[str | None] | None = None) -> list[list[Ranked]]:
        """Per prompt, the decision at knob value ``lam`` and its fallbacks: the experts the router
        scores, by ``utility - lam * penalty`` best first, then the candidates it does not score
        (e.g. outside CSCR's top-k), cheapest first. The first is ``route``'s choice. ``categories``:
        the category each prompt's caller gave, if any (``scored``)."""
        lam_v = knob_values(lam)
        if lam_v.shape != (1,):
            raise RouterError(f"rank takes one knob value, got {lam_v.size}", param="lambda")
        mask = self.candidate_mask(candidates)
        u, pen = self.scored(emb, rows, candidates, categories)
        return ranked_lists(u, pen, float(lam_v[0]), mask, self.expert_names)

    def route_sweep(self, emb: np.ndarray, lambdas: np.ndarray | Sequence[float], rows: np.ndarray | None = None,
                    candidates: Sequence[str] | None = None) -> np.ndarray:
        """(L, n) int expert choices, one row per knob value: ``rank``'s first choice at each."""
        lam = knob_values(lambdas)
        u, pen = self.scored(emb, rows, candidates)
        return sweep_choices(u, pen, lam)  # argmax score(u, pen, lam) per lambda, via per-prompt envelopes

    def route(self, emb: np.ndarray, lam: float = 0.0, rows: np.ndarray | None = None,
              candidates: Sequence[str] | None = None) -> np.ndarray:
        """(n,) int choices at one knob value."""
        return self.route_sweep(emb, [lam], rows, candidates)[0]

    def knob_grid(self, emb: np.ndarray, n: int = 200, rows: np.ndarray | None = None,
                  candidates: Sequence[str] | None = None) -> np.ndarray:
        """(<= n,) knob values from 0 to one at which every prompt gets its cheapest option:
        0, then one value between each two consecutive breakpoints of the prompts' envelopes
        (every distinct operating point, exactly; evenly spaced by rank when there are more
        than n), then one past the last (``cscr.routers.envelope.knob_grid_values``)."""
        if not self.has_knob:
            return np.zeros(1)
        u, pen = self.scored(emb, rows, candidates)
        return knob_grid_values(u, pen, n)


_REGISTRY: dict[str, type[Router]] = {}

#: built-in router modules (cscr/routers/<module>.py), imported on first use of the registry
BUILTIN = ("oracle", "simple", "knn", "category", "cscr", "umr", "thompson", "parametric", "softmax_gate", "soft_moe")


def _load_builtin() -> None:
    import importlib

    for mod in BUILTIN:
        importlib.import_module(f"cscr.routers.{mod}")


def register(name: str) -> Callable[[type[Router]], type[Router]]:
    def deco(cls: type[Router]) -> type[Router]:
        if name in _REGISTRY:
            raise RouterError(f"router name {name!r} registered twice")
        _REGISTRY[name] = cls
        cls.name = name
        return cls

    return deco


def router_class(name: str) -> type[Router]:
    """The router class registered as ``name``."""
    _load_builtin()

    if name not in _REGISTRY:
        raise RouterError(f"unknown router {name!r}; available: {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def get_router(name: str, **kwargs: Any) -> Router:
    return router_class(name)(**kwargs)


def available_routers() -> list[str]:
    _load_builtin()

    return sorted(_REGISTRY)
