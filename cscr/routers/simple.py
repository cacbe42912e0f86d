"""Baselines that learn nothing from prompts (SPEC.md section 7).

* ``random``: a uniformly random expert per prompt (one operating point; seeded).
* ``pareto-random``: random mixtures of the single experts on the upper convex hull of
  (mean train cost, mean train quality). The knob is a position along the hull: 0 = the hull's
  best (most expensive) expert, 1 = its cheapest; in between, the target mean cost is
  interpolated linearly and each prompt goes to one of the two hull experts around it with the
  probability that hits that target. A fixed uniform draw per prompt couples the knob values,
  so moving the knob moves prompts one way only. Its knob is no cost weight, so it overrides
  ``route_sweep`` and ``rank`` together (one function, ``_choices``, makes the choice for both).
* ``single`` (``expert=NAME``): one expert for every prompt, a single point; shown as
  ``single:NAME``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from cscr.routers.base import Ranked, Router, RouterContext, RouterError, knob_values, register


def _uniform(seed: int, emb: np.ndarray, rows: np.ndarray | None, width: int) -> np.ndarray:
    """(n, width) uniforms, reproducible for a seed and, when given, keyed by table row."""
    n = emb.shape[0]
    if rows is None:
        return np.random.default_rng(seed).random((n, width))
    rows = np.asarray(rows, dtype=np.int64)
    if rows.shape != (n,):
        raise RouterError(f"rows has shape {rows.shape}, expected ({n},)")
    top = int(rows.max()) + 1 if n else 0
    return np.random.default_rng(seed).random((top, width))[rows]


@register("random")
class RandomRouter(Router):
    """A uniformly random expert per prompt (among the candidates)."""

    has_knob = False

    def __init__(self, seed: int | None = None) -> None:
        super().__init__()
        self.seed = seed

    def fit(self, ctx: RouterContext) -> RandomRouter:
        super().fit(ctx)
        if self.seed is None:
            self.seed = ctx.seed
        return self

    def utilities(self, emb: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
        self.check_fitted()
        return _uniform(int(self.seed or 0), emb, rows, len(self.expert_names))  # argmax: uniform expert

    def penalty(self, emb: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
        return np.zeros(len(self.expert_names))


def upper_hull_experts(cost: np.ndarray, quality: np.ndarray) -> np.ndarray:
    """Indices of the experts on the non-decreasing upper convex hull of (cost, quality),
    cheapest first (on equal cost the better one; the hull stops at the best expert)."""
    order = np.lexsort((-quality, cost))
    hull: list[int] = []
    for j in order:
        if hull and cost[hull[-1]] == cost[j]:
            continue  # same cost, lower quality
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            cross = (cost[b] - cost[a]) * (quality[j] - quality[a]) - (quality[b] - quality[a]) * (cost[j] - cost[a])
            if cross >= 0:
                hull.pop()
            else:
                break
        hull.append(int(j))
    top = int(np.argmax([quality[h] for h in hull]))
    return np.array(hull[: top + 1], dtype=np.int64)


@register("pareto-random")
class ParetoRandomRouter(Router):
    """Random mixtures of neighbouring experts on the (train cost, train quality) hull."""

    def __init__(self, seed: int | None = None) -> None:
        super().__init__()
        self.seed = seed

    def fit(self, ctx: RouterContext) -> ParetoRandomRouter:
        super().fit(ctx)
        if self.seed is None:
            self.seed = ctx.seed
        if len(ctx.train_rows) == 0:
            raise RouterError("pareto-random needs train prompts")
        q = ctx.table.quality[ctx.train_rows]  # (n_train, M), NaN = missing
        seen = (~np.isnan(q)).sum(axis=0)
        self.train_cost = ctx.table.cost[ctx.train_rows].mean(axis=0)  # (M,)
        self.train_quality = np.nansum(q, axis=0) / np.maximum(seen, 1)  # (M,) missing cells masked
        return self

    def hull(self, candidates: Sequence[str] | None = None) -> np.ndarray:
        """Expert indices on the hull of the candidates, cheapest first."""
        idx = np.flatnonzero(self.candidate_mask(candidates))
        return idx[upper_hull_experts(self.train_cost[idx], self.train_quality[idx])]

    def utilities(self, emb: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
        self.check_fitted()
        u = np.full((emb.shape[0], len(self.expert_names)), -np.inf)
        h = self.hull()
        u[:, h] = self.train_quality[h]
        return u

    def knob_grid(self, emb: np.ndarray, n: int = 200, rows: np.ndarray | None = None,
                  candidates: Sequence[str] | None = None) -> np.ndarray:
        self.check_fitted()
        return np.linspace(0.0, 1.0, max(n, 2)) if len(self.hull(candidates)) > 1 else np.zeros(1)

    def _choices(self, emb: np.ndarray, lambdas: np.ndarray | Sequence[float], rows: np.ndarray | None,
                 candidates: Sequence[str] | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """((L, n) choices, hull (K,) cheapest first, (L,) target mean cost per knob value)."""
        t = np.minimum(knob_values(lambdas), 1.0)  # (L,) knob: position along the hull
        h = self.hull(candidates)
        n = emb.shape[0]
        hc = self.train_cost[h]  # (K,) increasing
        target = hc[-1] - t * (hc[-1] - hc[0])  # (L,) target mean cost
        if len(h) == 1:
            return np.full((len(t), n), h[0], dtype=np.int64), h, target
        seg = np.clip(np.searchsorted(hc, target, side="right") - 1, 0, len(h) - 2)  # (L,)
        p_up = (target - hc[seg]) / (hc[seg + 1] - hc[seg])  # (L,) share of the dearer expert
        u = _uniform(int(self.seed or 0) + 1, emb, rows, 1)[:, 0]  # (n,)
        up = u[None, :] < p_up[:, None]  # (L, n)
        return np.where(up, h[seg + 1][:, None], h[seg][:, None]).astype(np.int64), h, target

    def route_sweep(self, emb: np.ndarray, lambdas: np.ndarray | Sequence[float], rows: np.ndarray | None = None,
                    candidates: Sequence[str] | None = None) -> np.ndarray:
        """(L, n) choices; knob t in [0, 1] (values above 1 mean 1): position along the hull."""
        return self._choices(emb, lambdas, rows, candidates)[0]

    def rank(self, emb: np.ndarray, lam: float = 0.0, candidates: Sequence[str] | None = None,
             rows: np.ndarray | None = None, categories: Sequence[str | None] | None = None) -> list[list[Ranked]]:
        """Per prompt: the choice at knob value ``lam``, then the other hull experts by how close
        their mean train cost is to the knob's target cost, then the other candidates cheapest
        first. Utility: mean train quality (hull experts); no score (the knob is no cost weight)."""
        self.check_categories(categories)
        choices, h, target = self._choices(emb, [lam], rows, candidates)
        mask = self.candidate_mask(candidates)
        by_target = [int(j) for j in h[np.argsort(np.abs(self.train_cost[h] - target[0]), kind="stable")]]
        rest = [int(j) for j in np.argsort(self.costs, kind="stable") if mask[j] and j not in set(h.tolist())]
        out = []
        for c in choices[0]:
            order = [int(c)] + [j for j in by_target if j != c]
            out.append([Ranked(self.expert_names[j], float(self.train_quality[j]), None, float(self.costs[j]))
                        for j in order]
                       + [Ranked(self.expert_names[j], None, None, float(self.costs[j])) for j in rest])
        return out


@register("single")
class SingleExpertRouter(Router):
    """Always the same expert: a single operating point."""

    has_knob = False

    def __init__(self, expert: str | None = None) -> None:
        super().__init__()
        if not expert:
            raise RouterError("router 'single' needs an expert: get_router('single', expert=NAME) or 'single:NAME'")
        self.expert = expert

    @property
    def label(self) -> str:
        return f"single:{self.expert}"

    def fit(self, ctx: RouterContext) -> SingleExpertRouter:
        if self.expert not in ctx.table.expert_names:
            raise RouterError(f"single: unknown expert {self.expert!r}; the pool has {ctx.table.expert_names}")
        super().fit(ctx)
        return self

    def utilities(self, emb: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
        self.check_fitted()
        u = np.full((emb.shape[0], len(self.expert_names)), -np.inf)
        u[:, self.expert_names.index(self.expert)] = 0.0
        return u

    def candidate_mask(self, candidates: Sequence[str] | None) -> np.ndarray:
        mask = super().candidate_mask(candidates)
        if not mask[self.expert_names.index(self.expert)]:
            raise RouterError(f"single:{self.expert} cannot route among candidates that exclude {self.expert!r}")
        return mask
