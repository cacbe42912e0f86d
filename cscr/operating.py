"""Operating points: what each value of the cost knob lambda costs and earns, so a caller can ask
for a budget or a quality target instead of a raw lambda (issue 11). Pure numpy; no Ray, no I/O
beyond ``save`` / ``load``.

A fitted router is swept over a dense knob grid (``Router.knob_grid``) on the prompts of one
split (validation by default), exactly as ``cscr evaluate`` sweeps it on test prompts; each knob
value becomes a point:

* ``cost``: the expected mean cost per request, in the table's unit (``RoutingTable.cost_unit``:
  USD or parameters; the raw C of the chosen experts, not the normalised c_m);
* ``quality``: the mean Q of the chosen experts;
* ``share``: the share of requests each expert gets;
* ``cost_sd`` / ``quality_sd``: the per-prompt standard deviations behind both means (the
  sampling error of a promise is ``sd / sqrt(n_prompts)``).

Prompts with a missing quality cell are dropped first, as the evaluation drops them
(``cscr.eval.evaluate.split_rows``; the count is kept). A point is *efficient* unless another
point is at most as costly and at least as good (and differs in one of the two); the efficient
points, by cost, have strictly rising quality: the upper envelope ``choose`` reads.

``choose(table, budget=..., quality_target=..., cost_weight=...)`` is the one call a server
makes per request: ``budget``: the best-quality efficient point whose expected cost is within
the budget; ``quality_target`` (absolute, e.g. ``0.7``, or relative to the best single expert's
quality on the same prompts, e.g. ``"0.95x"``): the cheapest efficient point that meets it;
both: that cheapest point, if it is within the budget; ``cost_weight``: the table's estimate at
that raw lambda. An unreachable or conflicting request raises ``OperatingPointError`` (a
``RouterError``, so serving answers it with a 400), which says what is reachable.

Pool changes (``pool_columns``): the table covers the router's current pool. An expert that was
added at run time has no answers on the validation prompts, so its quality column is estimated
by copying the column of the existing expert whose descriptor is nearest by cosine (with
probe-outcome descriptors that is the expert that answered the probe prompts most alike), and
its cost column is its normalised cost c_m times the table's scale (the largest mean train cost),
the same on every prompt. Each estimated expert is recorded in the table (``estimated``).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cscr.atomic import atomic_write_json
from cscr.routers.base import Router, RouterError, knob_values

FORMAT = "cscr-operating-points/1"
FILENAME = "operating_points.json"
#: relative slack when comparing an expected cost with a budget (means of floats)
_REL_TOL = 1e-9


class OperatingPointError(RouterError):
    """A budget / quality target no operating point meets, or a request that asks for two things
    at once that no point gives. ``reachable`` says what is: min_cost, max_quality, cost_unit."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None,
                 reachable: Mapping[str, Any] | None = None) -> None:
        super().__init__(message, param, code)
        self.reachable = dict(reachable or {})

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (str(self), self.param, self.code, self.reachable))


@dataclass(frozen=True)
class OperatingTable:
    """Operating points of one router on one split. Arrays: L knob values, M experts."""

    lambdas: np.ndarray  # (L,) knob values, increasing
    cost: np.ndarray  # (L,) expected mean cost per request, table unit
    quality: np.ndarray  # (L,) expected mean quality
    share: np.ndarray  # (L, M) share of requests per expert (rows sum to 1)
    cost_sd: np.ndarray  # (L,) per-prompt standard deviation of the chosen cost
    quality_sd: np.ndarray  # (L,) per-prompt standard deviation of the chosen quality
    expert_names: tuple[str, ...]  # (M,) the pool the table covers, in the router's order
    expert_cost: np.ndarray  # (M,) each expert's own mean cost on the prompts (a single-expert point)
    expert_quality: np.ndarray  # (M,) each expert's own mean quality on the prompts
    cost_unit: str  # usd | params
    split: str  # the prompts the points are measured on (e.g. val)
    router: str  # registered router name
    variant: str  # the run's variant (models/<variant>)
    n_prompts: int  # prompts measured (after dropping missing cells)
    n_dropped: int  # prompts dropped for a missing quality cell
    estimated: dict[str, str] = field(default_factory=dict)  # expert -> how its columns were estimated
    meta: dict[str, Any] = field(default_factory=dict)  # source, table checksum, created, ...

    def __post_init__(self) -> None:
        n_l, m = len(self.lambdas), len(self.expert_names)
        if n_l == 0 or m == 0:
            raise ValueError(f"an operating table needs >= 1 knob value and >= 1 expert, got {n_l} and {m}")
        for name in ("cost", "quality", "cost_sd", "quality_sd"):
            if np.shape(getattr(self, name)) != (n_l,):
                raise ValueError(f"{name} has shape {np.shape(getattr(self, name))}, expected ({n_l},)")
        if np.shape(self.share) != (n_l, m):
            raise ValueError(f"share has shape {np.shape(self.share)}, expected ({n_l}, {m})")
        for name in ("expert_cost", "expert_quality"):
            if np.shape(getattr(self, name)) != (m,):
                raise ValueError(f"{name} has shape {np.shape(getattr(self, name))}, expected ({m},)")

    # ---- views ----
    @property
    def efficient(self) -> np.ndarray:
        """(L,) bool: the points no other point dominates (first of exact duplicates kept)."""
        order = np.lexsort((-self.quality, self.cost))  # by cost, then best quality first
        keep = np.zeros(len(self.cost), dtype=bool)
        best = -np.inf
        for i in order:
            if self.quality[i] > best:
                keep[i] = True
                best = self.quality[i]
        return keep

    @property
    def envelope(self) -> np.ndarray:
        """Indices of the efficient points by increasing cost (and strictly increasing quality)."""
        idx = np.flatnonzero(self.efficient)
        return idx[np.argsort(self.cost[idx], kind="stable")]

    @property
    def best_expert(self) -> str:
        """The single expert with the highest mean quality on the prompts (the cheaper one on ties)."""
        top = np.flatnonzero(self.expert_quality == self.expert_quality.max())
        return self.expert_names[int(top[np.argmin(self.expert_cost[top])])]

    @property
    def best_expert_quality(self) -> float:
        return float(self.expert_quality.max())

    def reachable(self) -> dict[str, Any]:
        """What a request can ask for: the cheapest point's cost, the best point's quality."""
        env = self.envelope
        return {"min_cost": float(self.cost[env[0]]), "max_quality": float(self.quality[env[-1]]),
                "cost_at_max_quality": float(self.cost[env[-1]]), "cost_unit": self.cost_unit,
                "best_expert": self.best_expert, "best_expert_quality": self.best_expert_quality}

    def point(self, i: int) -> OperatingPoint:
        shares = {n: float(s) for n, s in zip(self.expert_names, self.share[i], strict=True) if s > 0}
        return OperatingPoint(float(self.lambdas[i]), float(self.cost[i]), float(self.quality[i]), shares, int(i),
                              self.cost_unit)

    # ---- persistence ----
    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT, "router": self.router, "variant": self.variant, "split": self.split,
            "cost_unit": self.cost_unit, "n_prompts": self.n_prompts, "n_dropped": self.n_dropped,
            "pool": [{"name": n, "mean_cost": float(c), "mean_quality": float(q),
                      "estimated": self.estimated.get(n)}
                     for n, c, q in zip(self.expert_names, self.expert_cost, self.expert_quality, strict=True)],
            "best_expert": self.best_expert, "reachable": self.reachable(),
            "lambdas": self.lambdas.tolist(), "cost": self.cost.tolist(), "quality": self.quality.tolist(),
            "cost_sd": self.cost_sd.tolist(), "quality_sd": self.quality_sd.tolist(),
            "share": self.share.tolist(), "efficient": self.efficient.tolist(), "meta": self.meta,
        }

    @staticmethod
    def from_json(obj: Mapping[str, Any]) -> OperatingTable:
        if obj.get("format") != FORMAT:
            raise ValueError(f"not an operating-point table (format {obj.get('format')!r}, expected {FORMAT!r})")
        pool = obj["pool"]
        arr = {k: np.asarray(obj[k], dtype=np.float64) for k in ("lambdas", "cost", "quality", "cost_sd",
                                                                  "quality_sd", "share")}
        return OperatingTable(
            **arr, expert_names=tuple(p["name"] for p in pool),
            expert_cost=np.array([p["mean_cost"] for p in pool], dtype=np.float64),
            expert_quality=np.array([p["mean_quality"] for p in pool], dtype=np.float64),
            cost_unit=obj["cost_unit"], split=obj["split"], router=obj["router"], variant=obj["variant"],
            n_prompts=int(obj["n_prompts"]), n_dropped=int(obj["n_dropped"]),
            estimated={p["name"]: p["estimated"] for p in pool if p.get("estimated")}, meta=dict(obj.get("meta", {})))

    def save(self, path: str | os.PathLike[str]) -> Path:
        return atomic_write_json(path, self.to_json())

    @staticmethod
    def load(path: str | os.PathLike[str]) -> OperatingTable:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"{path}: no operating-point table; run `cscr calibrate --run RUN` first")
        return OperatingTable.from_json(json.loads(path.read_text()))


@dataclass(frozen=True)
class OperatingPoint:
    """One chosen point: the knob value to route with and what it is expected to give."""

    lam: float
    cost: float  # expected mean cost per request (cost_unit)
    quality: float  # expected mean quality
    share: dict[str, float]  # expert -> share of requests (non-zero only)
    index: int  # row in the table
    cost_unit: str

    def to_json(self) -> dict[str, Any]:
        return {"cost_weight": self.lam, "expected_cost": self.cost, "expected_quality": self.quality,
                "cost_unit": self.cost_unit, "share": self.share}


# ---------------------------------------------------------------- computing a table

def chosen_values(choices: np.ndarray, values: np.ndarray) -> np.ndarray:
    """(L, n) ``values[i, choices[l, i]]`` for int choices (L, n) and values (n, M)."""
    return np.take_along_axis(values[None, :, :], choices[:, :, None], axis=2)[:, :, 0]


def compute_table(router: Router, emb: np.ndarray, quality: np.ndarray, cost: np.ndarray, *,
                  cost_unit: str, split: str = "val", variant: str | None = None, n_lambdas: int = 400,
                  candidates: Sequence[str] | None = None, n_dropped: int = 0,
                  estimated: Mapping[str, str] | None = None, meta: Mapping[str, Any] | None = None) -> OperatingTable:
    """The operating points of a fitted ``router`` on prompts ``emb`` (n, d) whose quality and raw
    cost rows (n, M) have the router's experts as columns (``router.expert_names`` order) and no
    missing cell (drop those prompts first: ``table_rows``). ``n_lambdas``: the most knob values
    (``Router.knob_grid``: every distinct point when there are fewer)."""
    router.check_fitted()
    m = len(router.expert_names)
    quality = np.asarray(quality, dtype=np.float64)
    cost = np.asarray(cost, dtype=np.float64)
    if quality.ndim != 2 or quality.shape != cost.shape or quality.shape[1] != m:
        raise ValueError(f"quality {quality.shape} and cost {cost.shape} must be (n, {m}): one column per "
                         f"expert of the router {list(router.expert_names)}")
    if emb.shape[0] != quality.shape[0] or quality.shape[0] == 0:
        raise ValueError(f"{emb.shape[0]} embeddings for {quality.shape[0]} quality rows (need the same, >= 1)")
    if np.isnan(quality).any() or not np.isfinite(cost).all():
        raise ValueError("quality has missing cells or cost is not finite: drop those prompts first")
    lambdas = np.asarray(router.knob_grid(emb, n_lambdas, candidates=candidates), dtype=np.float64)
    choices = np.asarray(router.route_sweep(emb, lambdas, candidates=candidates), dtype=np.int64)  # (L, n)
    cc, qq = chosen_values(choices, cost), chosen_values(choices, quality)  # (L, n) each
    share = np.stack([np.bincount(row, minlength=m) for row in choices]) / choices.shape[1]  # (L, M)
    return OperatingTable(
        lambdas=lambdas, cost=cc.mean(axis=1), quality=qq.mean(axis=1), share=share,
        cost_sd=cc.std(axis=1), quality_sd=qq.std(axis=1), expert_names=tuple(router.expert_names),
        expert_cost=cost.mean(axis=0), expert_quality=quality.mean(axis=0), cost_unit=cost_unit, split=split,
        router=router.name, variant=variant or router.name, n_prompts=int(quality.shape[0]),
        n_dropped=int(n_dropped), estimated=dict(estimated or {}),
        meta={"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **dict(meta or {})})


def table_rows(quality: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, int]:
    """(the ``rows`` whose quality cells are all present, how many were dropped): the evaluation's rule."""
    rows = np.asarray(rows, dtype=np.int64)
    ok = ~np.isnan(quality[rows]).any(axis=1)
    return rows[ok], int((~ok).sum())


@dataclass(frozen=True)
class NewExpert:
    """An expert added at run time: its descriptor (the router's basis) and normalised cost c_m."""

    descriptor: np.ndarray
    cost: float


def pool_columns(names: Sequence[str], quality: np.ndarray, cost: np.ndarray, table_names: Sequence[str],
                 descriptors: Mapping[str, np.ndarray] | None = None,
                 new: Mapping[str, NewExpert] | None = None, scale: float = 1.0
                 ) -> tuple[np.ndarray, np.ndarray, dict[str, str]]:
    """Quality and cost columns (n, len(names)) for the router's current pool ``names`` from the
    table's columns (``quality`` / ``cost`` (n, M) in ``table_names`` order): removed experts are
    dropped; an expert in ``new`` gets the quality column of the table expert whose descriptor
    (``descriptors``, by name) is nearest by cosine, and the cost ``c_m * scale`` on every prompt.
    Returns (quality, cost, {new expert: how it was estimated})."""
    table_names = list(table_names)
    new = dict(new or {})
    q_out, c_out, notes = [], [], {}
    for name in names:
        if name in table_names:
            j = table_names.index(name)
            q_out.append(quality[:, j])
            c_out.append(cost[:, j])
            continue
        if name not in new:
            raise ValueError(f"expert {name!r} is neither in the table {table_names} nor described as new")
        known = [n for n in table_names if descriptors is not None and n in descriptors]
        if not known:
            raise ValueError(f"cannot estimate {name!r}: no descriptors of the table's experts to compare with")
        d = np.asarray(new[name].descriptor, dtype=np.float64).ravel()
        mat = np.stack([np.asarray(descriptors[n], dtype=np.float64).ravel() for n in known])  # type: ignore[index]
        if mat.shape[1] != d.size or not np.any(d):
            raise ValueError(f"descriptor of {name!r} has dimension {d.size}, the table's experts {mat.shape[1]}")
        cos = mat @ d / np.maximum(np.linalg.norm(mat, axis=1) * np.linalg.norm(d), 1e-12)  # (K,)
        near = known[int(np.argmax(cos))]
        q_out.append(quality[:, table_names.index(near)])
        c_out.append(np.full(quality.shape[0], float(new[name].cost) * scale))
        notes[name] = (f"quality copied from {near} (nearest by descriptor cosine {float(cos.max()):.3f}); "
                       f"cost c_m {float(new[name].cost):.4g} x scale {scale:.4g}, the same on every prompt")
    return np.stack(q_out, axis=1), np.stack(c_out, axis=1), notes


# ---------------------------------------------------------------- choosing a point

def parse_quality_target(target: float | str, table: OperatingTable) -> float:
    """An absolute target in (0, 1] (``0.7``) or one relative to the best single expert's quality
    on the table's prompts (``"0.95x"``); OperatingPointError otherwise."""
    text = str(target).strip().lower()
    relative = text.endswith("x")
    try:
        value = float(text[:-1] if relative else text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0 or (not relative and value > 1):
        raise OperatingPointError(f"quality_target must be a number in (0, 1] or a multiple of the best expert's "
                                  f"quality such as '0.95x', got {target!r}", param="quality_target",
                                  code="invalid_quality_target", reachable=table.reachable())
    return value * table.best_expert_quality if relative else value


def _check_budget(budget: float, table: OperatingTable) -> float:
    b = float(budget)
    if not math.isfinite(b) or b < 0:
        raise OperatingPointError(f"budget must be a finite number >= 0 ({table.cost_unit} per request), got {budget}",
                                  param="budget", code="invalid_budget", reachable=table.reachable())
    return b


def for_budget(table: OperatingTable, budget: float) -> OperatingPoint:
    """The best-quality point whose expected cost per request is at most ``budget``."""
    b = _check_budget(budget, table)
    env = table.envelope
    ok = env[table.cost[env] <= b * (1 + _REL_TOL) + 1e-300]
    if ok.size == 0:
        r = table.reachable()
        raise OperatingPointError(
            f"budget {b:.6g} {table.cost_unit} per request is below the cheapest operating point "
            f"({r['min_cost']:.6g} {table.cost_unit}, quality {float(table.quality[env[0]]):.4f}); reachable: "
            f"budget >= {r['min_cost']:.6g}", param="budget", code="budget_unreachable", reachable=r)
    return table.point(int(ok[-1]))


def for_quality(table: OperatingTable, target: float | str) -> OperatingPoint:
    """The cheapest point whose expected quality meets ``target`` (absolute or ``"0.95x"``)."""
    goal = parse_quality_target(target, table)
    env = table.envelope
    ok = env[table.quality[env] >= goal - 1e-12]
    if ok.size == 0:
        r = table.reachable()
        raise OperatingPointError(
            f"quality target {target} (= {goal:.4f}) is above the best operating point (quality "
            f"{r['max_quality']:.4f} at {r['cost_at_max_quality']:.6g} {table.cost_unit}; the best single expert "
            f"{r['best_expert']} gives {r['best_expert_quality']:.4f}); reachable: quality <= {r['max_quality']:.4f}",
            param="quality_target", code="quality_unreachable", reachable=r)
    return table.point(int(ok[0]))


def at_cost_weight(table: OperatingTable, lam: float) -> OperatingPoint:
    """The table's estimate at a raw knob value: the grid point with the largest lambda <= ``lam``
    (exact at grid values; between two grid values the choices may already have changed)."""
    value = float(knob_values(lam)[0])
    i = int(np.searchsorted(table.lambdas, value, side="right")) - 1
    p = table.point(max(i, 0))
    return OperatingPoint(value, p.cost, p.quality, p.share, p.index, p.cost_unit)


def choose(table: OperatingTable, budget: float | None = None, quality_target: float | str | None = None,
           cost_weight: float | None = None) -> OperatingPoint | None:
    """The point a request asks for (None: it asks for none; use the default knob). ``cost_weight``
    excludes the other two; ``budget`` with ``quality_target``: the cheapest point meeting the
    target, which must be within the budget."""
    if cost_weight is not None and (budget is not None or quality_target is not None):
        raise OperatingPointError("give cost_weight or budget / quality_target, not both: cost_weight fixes the "
                                  "knob the other two choose", param="cost_weight", code="conflicting_request",
                                  reachable=table.reachable())
    if cost_weight is not None:
        return at_cost_weight(table, cost_weight)
    if quality_target is None:
        return None if budget is None else for_budget(table, budget)
    p = for_quality(table, quality_target)
    if budget is not None and p.cost > _check_budget(budget, table) * (1 + _REL_TOL):
        best = for_budget(table, budget)
        raise OperatingPointError(
            f"quality target {quality_target} needs {p.cost:.6g} {table.cost_unit} per request, over the budget "
            f"{budget:.6g}; within the budget the best quality is {best.quality:.4f}", param="quality_target",
            code="conflicting_request", reachable={**table.reachable(), "quality_within_budget": best.quality})
    return p


def compact_rows(table: OperatingTable, n: int = 15) -> list[int]:
    """About ``n`` efficient points spread over the cost range (always the cheapest and the best)."""
    env = table.envelope
    if env.size <= n:
        return env.tolist()
    picks = np.unique(np.round(np.linspace(0, env.size - 1, n)).astype(int))
    return env[picks].tolist()

