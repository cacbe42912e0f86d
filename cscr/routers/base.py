"""One router interface for CSCR and every baseline (STYLE.md rule 4).

A router scores prompts: ``utilities(emb, rows) -> (n, M)``, higher is better, ``-inf`` for an
expert it will not consider (e.g. outside CSCR's top-k). The shared base turns utilities and the
cost knob lambda into choices:

    choice(x) = argmax_m  U[x, m] - lambda * penalty[x, m]

``penalty`` defaults to the normalised expert cost c_m (SPEC.md section 1); the oracle uses the
per-prompt cost instead. Evaluation and serving call only ``route`` / ``route_sweep`` /
``knob_grid``, so no router is special-cased anywhere.

Inputs: ``emb`` (n, d) float32 prompt embeddings; ``rows`` (n,) indices into the fitted table
when the prompts are table rows (hindsight routers such as the oracle need them; routers that
generalise to new prompts ignore them).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from cscr.data.table import RoutingTable
from cscr.routers.envelope import sweep_choices


class RouterError(ValueError):
    """A router was used wrongly (not fitted, unknown expert, bad knob value, ...)."""


@dataclass
class RouterContext:
    """What a router may learn from: the table, its cached embeddings and the row splits."""

    table: RoutingTable
    embeddings: np.ndarray  # (n, d) float32, aligned with table rows
    train_rows: np.ndarray  # indices of train prompts
    val_rows: np.ndarray  # indices of validation prompts
    run_dir: Path | None = None  # run folder (trained heads, descriptors), when there is one
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)  # router-specific inputs (descriptors, ...)

    @staticmethod
    def from_table(table: RoutingTable, embeddings: np.ndarray, run_dir: Path | None = None, seed: int = 0,
                   **extra: Any) -> RouterContext:
        if embeddings.shape[0] != table.n:
            raise RouterError(f"embeddings have {embeddings.shape[0]} rows, table has {table.n}")
        return RouterContext(table, embeddings, table.split_index("train"), table.split_index("val"),
                             run_dir, seed, dict(extra))


class Router(ABC):
    """Base class. Subclasses set ``name`` and implement ``fit`` and ``utilities``."""

    name: ClassVar[str] = "router"
    #: False for routers that are a single operating point whatever the knob (random, single experts)
    has_knob: ClassVar[bool] = True

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

    # ---- shared machinery ----
    def _check_fitted(self) -> None:
        if not self.expert_names:
            raise RouterError(f"router {self.name!r} is not fitted")

    def candidate_mask(self, candidates: Sequence[str] | None) -> np.ndarray:
        """(M,) bool: True for experts routing may choose."""
        self._check_fitted()
        if candidates is None:
            return np.ones(len(self.expert_names), dtype=bool)
        unknown = sorted(set(candidates) - set(self.expert_names))
        if unknown:
            raise RouterError(f"unknown expert(s) {unknown}; the pool has {self.expert_names}")
        if not candidates:
            raise RouterError("empty candidate list")
        return np.isin(self.expert_names, list(candidates))

    def scored(self, emb: np.ndarray, rows: np.ndarray | None = None,
               candidates: Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(utilities (n, M) with non-candidates at -inf, penalty broadcastable to (n, M))."""
        u = np.array(self.utilities(emb, rows), dtype=np.float64)  # (n, M)
        mask = self.candidate_mask(candidates)
        u[:, ~mask] = -np.inf
        # a prompt whose every candidate is excluded falls back to all candidates, scored equally
        dead = ~np.isfinite(u).any(axis=1)
        if dead.any():
            u[np.ix_(dead, mask)] = 0.0
        pen = np.asarray(self.penalty(emb, rows), dtype=np.float64)
        return u, pen

    def route_sweep(self, emb: np.ndarray, lambdas: np.ndarray, rows: np.ndarray | None = None,
                    candidates: Sequence[str] | None = None) -> np.ndarray:
        """(L, n) int expert choices, one row per knob value."""
        lambdas = np.asarray(lambdas, dtype=np.float64)
        if (lambdas < 0).any() or not np.isfinite(lambdas).all():
            raise RouterError("cost weight lambda must be finite and >= 0")
        u, pen = self.scored(emb, rows, candidates)
        return sweep_choices(u, pen, lambdas)  # argmax(u - lam * pen) per lambda, via per-prompt envelopes

    def route(self, emb: np.ndarray, lam: float = 0.0, rows: np.ndarray | None = None,
              candidates: Sequence[str] | None = None) -> np.ndarray:
        """(n,) int choices at one knob value."""
        return self.route_sweep(emb, np.array([lam]), rows, candidates)[0]

    def knob_grid(self, emb: np.ndarray, n: int = 200, rows: np.ndarray | None = None,
                  candidates: Sequence[str] | None = None) -> np.ndarray:
        """(n,) knob values from 0 to one at which every prompt gets its cheapest option.

        The top is computed from the utilities: for each prompt the smallest lambda at which
        its cheapest finite-utility candidate beats every other candidate; a geometric grid
        below it catches the cheap-end breakpoints, a linear one the rest.
        """
        if not self.has_knob:
            return np.zeros(1)
        u, pen = self.scored(emb, rows, candidates)
        pen = np.broadcast_to(pen, u.shape)
        finite = np.isfinite(u)
        p_masked = np.where(finite, pen, np.inf)
        cheap = np.argmin(p_masked, axis=1)  # (n,)
        u_c = np.take_along_axis(u, cheap[:, None], 1)  # (n, 1)
        p_c = np.take_along_axis(pen, cheap[:, None], 1)  # (n, 1)
        gap_u = u - u_c  # (n, M) utility advantage over the cheapest
        gap_p = pen - p_c  # (n, M) extra cost over the cheapest
        need = np.where(finite & (gap_u > 0) & (gap_p > 0), gap_u / np.maximum(gap_p, 1e-12), 0.0)
        top = float(need.max()) * 1.001 + 1e-9 if need.size else 1.0
        n_geo = n // 2
        geo = np.geomspace(top * 1e-4, top, n_geo)
        lin = np.linspace(0.0, top, n - n_geo)
        return np.unique(np.concatenate([lin, geo]))


_REGISTRY: dict[str, Callable[..., Router]] = {}

#: built-in router modules (cscr/routers/<module>.py), imported on first use of the registry
BUILTIN = ("oracle", "simple", "knn", "cscr", "umr", "thompson", "parametric", "softmax_gate", "soft_moe")


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


def get_router(name: str, **kwargs: Any) -> Router:
    _load_builtin()

    if name not in _REGISTRY:
        raise RouterError(f"unknown router {name!r}; available: {sorted(_REGISTRY)}")
    return _REGISTRY[name](**kwargs)


def available_routers() -> list[str]:
    _load_builtin()

    return sorted(_REGISTRY)
