"""Operating points of a run: compute and store a router's table (``calibrate``), recompute it
for a changed pool, and check it on held-out prompts (``verify``: verified, not promised).

    table = calibrate("runs/rb", variant="cscr")             # writes models/cscr/operating_points.json
    point = cscr.operating.choose(table, budget=0.001)       # the knob value to route with
    checks = verify_run("runs/rb", table)                    # promised vs realised on the test split

The table's columns are the router's current pool: ``calibrate(run, router=r, new={...})`` after
``r.add_expert`` / ``r.remove_expert`` covers the changed pool (a new expert's columns are
estimated as ``cscr.operating.pool_columns`` documents).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cscr.operating import (
    FILENAME,
    NewExpert,
    OperatingPoint,
    OperatingTable,
    chosen_values,
    compute_table,
    for_budget,
    for_quality,
    pool_columns,
    table_rows,
)
from cscr.routers.base import Router
from cscr.runs.inputs import Run
from cscr.runs.paths import RunPaths

RunLike = Run | str | os.PathLike[str] | RunPaths


def table_path(run: RunLike, variant: str = "cscr") -> Path:
    """Where a run keeps the operating points of ``variant``: models/<variant>/operating_points.json."""
    return Run.of(run).paths.model(variant) / FILENAME


@dataclass(frozen=True)
class SplitArrays:
    """The prompts of one split in the router's pool columns (prompts with a missing cell dropped)."""

    rows: np.ndarray  # (n,) table rows kept
    emb: np.ndarray  # (n, d)
    quality: np.ndarray  # (n, M) router order
    cost: np.ndarray  # (n, M)
    n_dropped: int
    estimated: dict[str, str]


def split_arrays(run: RunLike, router: Router, split: str = "val",
                 new: Mapping[str, NewExpert] | None = None) -> SplitArrays:
    """Embeddings, quality and cost of ``split`` in ``router.expert_names`` order; experts in ``new``
    (added at run time) get estimated columns (``pool_columns``)."""
    run = Run.of(run)
    t = run.table
    rows = t.split_index(split)
    if rows.size == 0:
        raise ValueError(f"{run.root}: the table has no {split} prompts")
    in_table = [t.expert_index(n) for n in router.expert_names if n in t.expert_names]
    kept, dropped = table_rows(t.quality[:, in_table], rows)
    if kept.size == 0:
        raise ValueError(f"{run.root}: every {split} prompt misses a quality cell")
    descriptors = None
    added = {n: e for n, e in (new or {}).items() if n in router.expert_names}
    if added:
        basis = router.descriptor_basis
        if basis is None:
            raise ValueError(f"router {router.name!r} takes no descriptors: cannot estimate {sorted(added)}")
        descriptors, _, _ = run.descriptors(basis.kind, basis.basis_id)
    scale = float(t.cost[t.split_index("train")].mean(axis=0).max()) if t.split_index("train").size else 1.0
    q, c, notes = pool_columns(router.expert_names, t.quality[kept], t.cost[kept], t.expert_names, descriptors,
                               added, scale=scale if scale > 0 else 1.0)
    return SplitArrays(kept, run.embeddings[kept], q, c, dropped, notes)


def calibrate(run: RunLike, variant: str = "cscr", router: Router | None = None, split: str = "val",
              n_lambdas: int = 400, new: Mapping[str, NewExpert] | None = None,
              candidates: Sequence[str] | None = None, out: str | os.PathLike[str] | None = None,
              save: bool = True) -> OperatingTable:
    """The operating-point table of ``router`` (default: the run's ``variant``, loaded with
    ``cscr.runs.loader.load_router``) on ``split``, routing among ``candidates`` (None: the whole
    pool), written to ``out`` (default ``table_path``) unless ``save`` is False."""
    run = Run.of(run)
    if router is None:
        from cscr.runs.loader import load_router

        router = load_router(run, variant)
    a = split_arrays(run, router, split, new)
    t = run.table
    table = compute_table(router, a.emb, a.quality, a.cost, cost_unit=t.cost_unit, split=split, variant=variant,
                          n_lambdas=n_lambdas, candidates=candidates, n_dropped=a.n_dropped,
                          estimated=a.estimated, meta={"source": t.source, "run": str(run.root), "table_rows": t.n,
                                                       "candidates": None if candidates is None else list(candidates)})
    if save:
        table.save(out if out is not None else table_path(run, variant))
    return table


def calibrate_after_training(run: RunLike, variant: str, log: Callable[[str], None] | None = None) -> Path | None:
    """What ``cscr train`` runs after saving a head: write its operating-point table; a run with no
    usable validation prompts gets one line saying so (training does not fail for it)."""
    try:
        calibrate(run, variant)
    except ValueError as exc:
        if log:
            log(f"train[{variant}]: no operating-point table ({exc}); `cscr calibrate --run RUN --split S` "
                "writes one from another split")
        return None
    path = table_path(run, variant)
    if log:
        log(f"train[{variant}]: operating points written to {path}")
    return path


# ---------------------------------------------------------------- verified, not promised

@dataclass(frozen=True)
class Check:
    """One request checked on held-out prompts: what the table promised, what routing gave."""

    request: str  # e.g. "budget=0.0012" or "quality_target=0.95x"
    lam: float
    promised_cost: float
    promised_quality: float
    realised_cost: float  # mean cost of the router's choices at ``lam`` on the held-out prompts
    realised_quality: float
    cost_ci: tuple[float, float]  # bootstrap 95% interval of the realised mean cost
    quality_ci: tuple[float, float]
    cost_tol: float  # z * sqrt(sd_promise^2 / n_promise + sd_held_out^2 / n_held_out)
    quality_tol: float

    @property
    def cost_error(self) -> float:
        return self.realised_cost - self.promised_cost

    @property
    def quality_error(self) -> float:
        return self.realised_quality - self.promised_quality

    @property
    def ok(self) -> bool:
        return abs(self.cost_error) <= self.cost_tol and abs(self.quality_error) <= self.quality_tol


def default_requests(table: OperatingTable, k: int = 8) -> tuple[list[float], list[float | str]]:
    """(budgets, quality targets) across the reachable range: ``k`` budgets log-spaced from the
    cheapest point to the best (linear when the cheapest costs 0), ``k`` absolute targets evenly
    spaced between the cheapest point's quality and the best, and the relative targets 0.9x,
    0.95x and 1x that are reachable."""
    r = table.reachable()
    lo, hi = r["min_cost"], r["cost_at_max_quality"]
    budgets = np.geomspace(lo, hi, k) if lo > 0 else np.linspace(lo, hi, k)
    q_lo = float(table.quality[table.envelope[0]])
    targets: list[float | str] = [float(t) for t in np.linspace(q_lo, r["max_quality"], k)]
    targets += [f"{x}x" for x in (0.9, 0.95, 1.0) if x * table.best_expert_quality <= r["max_quality"] + 1e-12]
    return [float(b) for b in budgets], targets


def verify(table: OperatingTable, router: Router, emb: np.ndarray, quality: np.ndarray, cost: np.ndarray,
           budgets: Sequence[float], targets: Sequence[float | str], *, n_boot: int = 1000, z: float = 1.96,
           seed: int = 0, candidates: Sequence[str] | None = None) -> list[Check]:
    """Route held-out prompts ``emb`` (n, d) (quality / cost (n, M) in the router's expert order, no
    missing cell) at the knob value ``for_budget`` / ``for_quality`` chooses for each request, and
    compare the realised means with the table's promise. The tolerance is the z-interval of the
    difference of two independent means (the table's prompts and the held-out ones)."""
    if list(table.expert_names) != list(router.expert_names):
        raise ValueError(f"the table covers {list(table.expert_names)}, the router {list(router.expert_names)}")
    picks = [(f"budget={b:.6g}", for_budget(table, b)) for b in budgets]
    picks += [(f"quality_target={t if isinstance(t, str) else f'{t:.4f}'}", for_quality(table, t)) for t in targets]
    if not picks:
        return []
    lams = np.array([p.lam for _, p in picks])
    choices = np.asarray(router.route_sweep(emb, lams, candidates=candidates), dtype=np.int64)  # (R, n)
    return check_choices(table, picks, choices, quality, cost, n_boot=n_boot, z=z, seed=seed)


def check_choices(table: OperatingTable, picks: Sequence[tuple[str, OperatingPoint]], choices: np.ndarray,
                  quality: np.ndarray, cost: np.ndarray, *, n_boot: int = 1000, z: float = 1.96,
                  seed: int = 0) -> list[Check]:
    """Promised vs realised for choices already made (e.g. by a server): ``choices`` (R, n) holds
    the expert index (the table's order) chosen for each of n held-out prompts under each of the
    R ``picks`` (request label, the point the table promised); quality / cost (n, M)."""
    choices = np.asarray(choices, dtype=np.int64)
    cc, qq = chosen_values(choices, cost), chosen_values(choices, quality)  # (R, n)
    n = cc.shape[1]
    boot = np.random.default_rng(seed).integers(0, n, (n_boot, n))  # (B, n) resampled prompts, shared

    def ci(v: np.ndarray) -> tuple[float, float]:
        lo, hi = np.percentile(v[boot].mean(axis=1), [2.5, 97.5])
        return float(lo), float(hi)

    out = []
    for r, (name, p) in enumerate(picks):
        i = p.index
        out.append(Check(
            request=name, lam=p.lam, promised_cost=p.cost, promised_quality=p.quality,
            realised_cost=float(cc[r].mean()), realised_quality=float(qq[r].mean()),
            cost_ci=ci(cc[r]), quality_ci=ci(qq[r]),
            cost_tol=z * math.sqrt(table.cost_sd[i] ** 2 / table.n_prompts + cc[r].var() / n),
            quality_tol=z * math.sqrt(table.quality_sd[i] ** 2 / table.n_prompts + qq[r].var() / n)))
    return out


def checks_markdown(checks: Sequence[Check], cost_unit: str) -> str:
    """The promised-vs-realised table (markdown)."""
    lines = ["| request | lambda | promised cost | realised cost [95% CI] | tol | promised Q | realised Q [95% CI] "
             "| tol | ok |", "|---|---|---|---|---|---|---|---|---|"]
    for c in checks:
        lines.append(f"| {c.request} | {c.lam:.4g} | {c.promised_cost:.4g} | {c.realised_cost:.4g} "
                     f"[{c.cost_ci[0]:.4g}, {c.cost_ci[1]:.4g}] | {c.cost_tol:.2g} | {c.promised_quality:.4f} | "
                     f"{c.realised_quality:.4f} [{c.quality_ci[0]:.4f}, {c.quality_ci[1]:.4f}] | "
                     f"{c.quality_tol:.3f} | {'yes' if c.ok else 'NO'} |")
    n_ok = sum(c.ok for c in checks)
    if checks:
        q_err = np.abs([c.quality_error for c in checks])
        c_rel = np.abs([c.cost_error / c.promised_cost for c in checks if c.promised_cost > 0] or [0.0])
        lines.append(f"\nquality error: mean |realised - promised| {q_err.mean():.4f}, max {q_err.max():.4f}; "
                     f"cost error: mean {c_rel.mean():.1%}, max {c_rel.max():.1%} of the promise")
    lines.append(f"\n{n_ok}/{len(checks)} within tolerance (cost in {cost_unit} per request)")
    return "\n".join(lines)


def verify_run(run: RunLike, table: OperatingTable, router: Router | None = None, split: str = "test",
               budgets: Sequence[float] | None = None, targets: Sequence[float | str] | None = None,
               n_boot: int = 1000, seed: int = 0) -> list[Check]:
    """``verify`` on a run's held-out ``split`` (default test) for ``default_requests`` unless given."""
    run = Run.of(run)
    if router is None:
        from cscr.runs.loader import load_router

        router = load_router(run, table.variant)
    a = split_arrays(run, router, split)
    b, q = default_requests(table)
    return verify(table, router, a.emb, a.quality, a.cost, b if budgets is None else budgets,
                  q if targets is None else targets, n_boot=n_boot, seed=seed, candidates=table.meta.get("candidates"))
