"""Evaluate fitted routers on table rows: knob sweep -> operating points -> curve -> metrics.

Every router goes through the same two calls of the router interface (``knob_grid``, then
``route_sweep``), so no router is special-cased. Test prompts with any missing quality cell
are dropped first (the count is reported). The single experts are always evaluated as points
(they define the pool's cost range and the best single expert that QNC refers to), whether or
not ``single`` routers are in the list.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from cscr.config import EvalConfig
from cscr.data.table import RoutingTable
from cscr.eval import metrics as M
from cscr.eval.significance import (
    BootstrapResult,
    McNemarResult,
    mcnemar_exact,
    paired_bootstrap_audc,
    point_at_budget,
)

if TYPE_CHECKING:  # no runtime import: router modules may import the metrics
    from cscr.routers.base import Router


@dataclass
class RouterEval:
    name: str
    lambdas: np.ndarray  # (L,) knob values swept
    choices: np.ndarray  # (L, n) int expert index per knob value and evaluated prompt
    costs: np.ndarray  # (L,) mean cost of each operating point
    qualities: np.ndarray  # (L,) mean quality of each operating point
    curve: M.Curve  # deferral curve (vertices)
    audc: float
    peak: float
    cost_at_peak: float
    qnc: float | None  # None: never reaches the best single expert's quality
    qnc_ratio: float | None  # qnc / best expert's mean cost
    seconds: float  # time for knob grid + sweep + metrics
    audc_paper: float = float("nan")  # the write-up's AUDC (second ruler: raw points, 25-cost grid)

    def summary(self) -> dict[str, Any]:
        return {
            "router": self.name,
            "audc": self.audc,
            "audc_paper": self.audc_paper,
            "qnc": self.qnc,
            "qnc_ratio": self.qnc_ratio,
            "qnc_reached": self.qnc is not None,
            "peak": self.peak,
            "cost_at_peak": self.cost_at_peak,
            "n_points": int(len(self.costs)),
            "n_distinct_points": int(len(np.unique(np.stack([self.costs, self.qualities]), axis=1)[0])),
            "seconds": self.seconds,
        }


@dataclass
class Significance:
    a: str  # the router under test
    b: str  # the router it is compared with
    bootstrap: BootstrapResult
    budget: float  # matched budget for McNemar (mean cost)
    point_a: int | None  # index of A's operating point at the budget (None: A cannot go that cheap)
    point_b: int | None
    mcnemar: McNemarResult | None  # None when either router has no point within the budget

    def to_dict(self) -> dict[str, Any]:
        bs = self.bootstrap
        mc = self.mcnemar
        return {
            "a": self.a, "b": self.b,
            "delta_audc": bs.delta, "ci95": [bs.ci_low, bs.ci_high], "p_one_sided": bs.p_one_sided,
            "resamples": bs.resamples, "budget": self.budget,
            "point_a": self.point_a, "point_b": self.point_b,
            "mcnemar": None if mc is None else {"a_only": mc.a_only, "b_only": mc.b_only, "p_value": mc.p_value},
        }

    def line(self) -> str:
        bs = self.bootstrap
        p = f"< {1 / bs.resamples:.2g}" if bs.p_one_sided == 0 else f"= {bs.p_one_sided:.4f}"
        s = (f"{self.a} vs {self.b}: dAUDC = {bs.delta:+.4f} (95% CI [{bs.ci_low:+.4f}, {bs.ci_high:+.4f}], "
             f"one-sided p {p}, B = {bs.resamples})")
        if self.mcnemar is None:
            who = self.a if self.point_a is None else self.b
            s += f"; McNemar at budget {self.budget:.4g}: n/a ({who} has no operating point within it)"
        else:
            mc = self.mcnemar
            s += (f"; McNemar at budget {self.budget:.4g}: {self.a} only {mc.a_only}, "
                  f"{self.b} only {mc.b_only}, exact p = {mc.p_value:.4g}")
        return s


@dataclass
class EvalResult:
    routers: dict[str, RouterEval]
    expert_names: list[str]  # the pool evaluated (the candidates, when given)
    expert_cost: np.ndarray  # (M',) mean test cost of each single expert of the pool
    expert_quality: np.ndarray  # (M',) mean test quality
    best_expert: str  # highest mean test quality (the cheaper on ties)
    pool_lo: float  # cheapest single expert's mean test cost
    pool_hi: float  # most expensive single expert's mean test cost
    rows: np.ndarray  # (n,) evaluated table rows
    n_dropped: int  # rows dropped for a missing quality cell
    quality: np.ndarray  # (n, M) Q on the evaluated rows (all table experts; choices index these)
    cost: np.ndarray  # (n, M) C on the evaluated rows
    config: EvalConfig
    source: str = "unknown"
    cost_unit: str = "usd"
    pool_columns: np.ndarray | None = None  # (M',) table columns of the evaluated pool (None: all)
    candidates: list[str] | None = None  # routing restricted to these experts (None: the whole pool)
    significance: list[Significance] = field(default_factory=list)

    @property
    def best_index(self) -> int:
        return self.expert_names.index(self.best_expert)

    @property
    def best_cost(self) -> float:
        return float(self.expert_cost[self.best_index])

    @property
    def best_quality(self) -> float:
        return float(self.expert_quality[self.best_index])

    def strongest_other(self, name: str, exclude: Sequence[str] = ()) -> str | None:
        """Highest-AUDC router other than ``name``, the oracle and ``exclude`` (None if there is none)."""
        others = [r for r in self.routers.values() if r.name not in (name, "oracle", *exclude)]
        return max(others, key=lambda r: r.audc).name if others else None


def split_rows(table: RoutingTable, rows: np.ndarray, cols: np.ndarray | None = None) -> tuple[np.ndarray, int]:
    """(rows with every quality cell present (in ``cols``, default all experts), number dropped)."""
    rows = np.asarray(rows, dtype=np.int64)
    q = table.quality[rows] if cols is None else table.quality[np.ix_(rows, cols)]
    ok = ~np.isnan(q).any(axis=1)
    return rows[ok], int((~ok).sum())


def evaluate_router(router: Router, name: str, emb: np.ndarray, rows: np.ndarray, quality: np.ndarray,
                    cost: np.ndarray, best_cost: float, best_quality: float, lo: float, hi: float,
                    n_lambdas: int, candidates: Sequence[str] | None = None) -> RouterEval:
    """Sweep one fitted router over the evaluated rows (emb aligned with rows), routing among
    ``candidates`` (expert names; None: the whole pool)."""
    t0 = time.perf_counter()
    lambdas = np.asarray(router.knob_grid(emb, n_lambdas, rows=rows, candidates=candidates), dtype=np.float64)
    choices = np.asarray(router.route_sweep(emb, lambdas, rows=rows, candidates=candidates))
    if choices.shape != (len(lambdas), len(rows)):
        raise ValueError(f"router {name!r} returned choices of shape {choices.shape}, "
                         f"expected {(len(lambdas), len(rows))}")
    if candidates is not None:
        allowed = np.isin(router.expert_names, list(candidates))
        if not allowed[choices].all():
            raise ValueError(f"router {name!r} chose an expert outside the candidates {list(candidates)}")
    x, y = M.operating_points(choices, quality, cost)
    curve = M.deferral_curve(x, y)
    pk, cpk = M.peak(curve)
    q = M.qnc(curve, best_quality)
    return RouterEval(
        name=name, lambdas=lambdas, choices=choices, costs=x, qualities=y, curve=curve,
        audc=M.audc(curve, lo, hi), peak=pk, cost_at_peak=cpk, qnc=q,
        qnc_ratio=None if q is None or best_cost <= 0 else q / best_cost,
        seconds=time.perf_counter() - t0, audc_paper=M.audc_paper(x, y, lo, hi),
    )


def evaluate_routers(routers: Mapping[str, Router], table: RoutingTable, emb: np.ndarray, rows: np.ndarray,
                     cfg: EvalConfig | None = None, compare: str | None = None,
                     budget: float | None = None, candidates: Sequence[str] | None = None) -> EvalResult:
    """Evaluate fitted routers (display name -> router) on ``rows`` of ``table``.

    emb: (table.n, d) embeddings aligned with the table rows. ``compare``: a router name to test
    against the strongest other router (paired bootstrap + McNemar at ``budget``, default the
    best single expert's mean test cost). ``candidates``: route among these experts only (e.g.
    held-out experts); the single experts, the pool's cost range and the best expert are then
    those of the candidates, and only their quality cells need to be present.
    """
    cfg = cfg or EvalConfig()
    if emb.shape[0] != table.n:
        raise ValueError(f"embeddings have {emb.shape[0]} rows, the table has {table.n}")
    if not routers:
        raise ValueError("no routers to evaluate")
    names = table.expert_names
    if candidates is not None:
        unknown = sorted(set(candidates) - set(names))
        if unknown or not candidates:
            raise ValueError(f"candidates must be a non-empty subset of the pool {names}; unknown: {unknown}")
    cols = np.flatnonzero(np.isin(names, list(candidates))) if candidates is not None else np.arange(len(names))
    kept, dropped = split_rows(table, rows, cols)
    if kept.size == 0:
        raise ValueError(f"no evaluable prompts: all {len(rows)} rows miss a quality cell")
    quality, cost = table.quality[kept], table.cost[kept]
    if candidates is not None:  # cells of experts that cannot be chosen: never read, but no NaN allowed
        quality = np.where(np.isin(np.arange(len(names)), cols)[None, :], quality, np.nan_to_num(quality))
    ec, eq = M.expert_points(quality[:, cols], cost[:, cols])
    lo, hi = M.pool_range(ec)
    b = M.best_expert(eq, ec)
    pool = [names[j] for j in cols]
    result = EvalResult(
        routers={}, expert_names=pool, expert_cost=ec, expert_quality=eq, best_expert=pool[b],
        pool_lo=lo, pool_hi=hi, rows=kept, n_dropped=dropped, quality=quality, cost=cost, config=cfg,
        source=table.source, cost_unit=table.cost_unit, pool_columns=cols,
        candidates=None if candidates is None else pool,
    )
    e = emb[kept]
    for name, router in routers.items():
        if router.expert_names and list(router.expert_names) != names:
            raise ValueError(f"router {name!r} was fitted on experts {router.expert_names}, the table has {names}")
        result.routers[name] = evaluate_router(router, name, e, kept, quality, cost, float(ec[b]), float(eq[b]),
                                               lo, hi, cfg.n_lambdas, result.candidates)
    if compare is not None:
        if compare not in result.routers:
            raise ValueError(f"--compare {compare!r} is not among the evaluated routers {sorted(result.routers)}")
        other = result.strongest_other(compare)
        if other is None:
            raise ValueError(f"nothing to compare {compare!r} with: evaluate at least one other router (not the oracle)")
        result.significance.append(compare_routers(result, compare, other, budget))
    return result


def compare_routers(result: EvalResult, a: str, b: str, budget: float | None = None) -> Significance:
    """Paired bootstrap of AUDC(a) - AUDC(b) and McNemar's exact test at a matched budget."""
    for n_ in (a, b):
        if n_ not in result.routers:
            raise ValueError(f"unknown router {n_!r}; evaluated: {sorted(result.routers)}")
    cfg = result.config
    ra, rb = result.routers[a], result.routers[b]
    bs = paired_bootstrap_audc(ra.choices, rb.choices, result.quality, result.cost, cfg.bootstrap, cfg.seed,
                               pool=result.pool_columns)
    budget = result.best_cost if budget is None else float(budget)
    pa = point_at_budget(ra.costs, ra.qualities, budget)
    pb = point_at_budget(rb.costs, rb.qualities, budget)
    mc = None
    if pa is not None and pb is not None:
        correct = result.quality >= cfg.binarize_at  # (n, M)
        ca = M.gather(correct.astype(np.int8), ra.choices[pa])[0].astype(bool)
        cb = M.gather(correct.astype(np.int8), rb.choices[pb])[0].astype(bool)
        mc = mcnemar_exact(ca, cb)
    return Significance(a, b, bs, budget, pa, pb, mc)
