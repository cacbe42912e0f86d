"""Score fixed per-prompt utilities as a router is scored.

``utility_audc(names, costs, u, emb, quality, cost)`` routes each prompt by ``u - lambda * costs``
over the router knob grid (``Router.knob_grid``, 200 values) and returns SPEC's AUDC on the pool's
cost range of those rows. The guard's search (cscr/guard.py) and the probes in scripts/ use it to
score many utility variants of one trained head without rebuilding a router for each.
"""

from __future__ import annotations

import numpy as np

from cscr.eval import metrics as M
from cscr.routers.base import Router


class Given(Router):
    """A router whose utilities are fixed in advance, (n, M) for the n prompts it will be asked about."""

    def __init__(self, names: list[str], costs: np.ndarray, u: np.ndarray) -> None:
        super().__init__()
        self.expert_names, self.costs, self.u = list(names), costs, u

    def utilities(self, emb: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
        return self.u


def utility_audc(names: list[str], costs: np.ndarray, u: np.ndarray, emb: np.ndarray, quality: np.ndarray,
                 cost: np.ndarray) -> float:
    """AUDC of routing the prompts (emb, quality, cost: their rows, aligned with u) by fixed utilities u."""
    g = Given(names, costs, u)
    lam = g.knob_grid(emb, 200)
    x, y = M.operating_points(g.route_sweep(emb, lam), quality, cost)
    lo, hi = M.pool_range(cost.mean(axis=0))
    return float(M.audc(M.deferral_curve(x, y), lo, hi))
