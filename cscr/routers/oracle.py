"""The oracle: hindsight routing, the ceiling of every deferral curve (SPEC.md section 7).

Per prompt it picks ``argmax Q[i, m] - lambda * C[i, m] / c_max`` with the prompt's true
quality and true cost (``c_max``: the largest expert mean train cost, so lambda is on the same
scale as the other routers' knob). Missing quality cells are never chosen. It needs the table
rows of the prompts (``rows``); it cannot route new prompts.

For every lambda the choice maximises mean quality minus lambda times mean cost over all
per-prompt assignments, so its operating points are the vertices of the upper hull of
everything any router can reach. To find every vertex, ``knob_grid`` computes each prompt's
exact breakpoints (the lambdas at which its choice changes) and puts one knob value strictly
between consecutive breakpoints; when there are more breakpoints than grid slots it keeps
evenly spaced ones in rank order (quantiles of the breakpoints), so the curve is then a close
lower approximation of the ceiling.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from cscr.routers.base import Router, RouterContext, RouterError, register
from cscr.routers.envelope import breakpoints


def breakpoint_grid(bp: np.ndarray, n: int) -> np.ndarray:
    """(<= n,) knob values: 0, one value strictly inside each gap between breakpoints (evenly
    spaced in rank order when there are too many), and one above the last breakpoint."""
    if bp.size == 0:
        return np.zeros(1)
    mids = np.concatenate([[bp[0] / 2], (bp[:-1] + bp[1:]) / 2, [bp[-1] * 1.5 + 1e-12]])
    if len(mids) > n - 1:
        keep = np.unique(np.round(np.linspace(0, len(mids) - 1, n - 1)).astype(np.int64))
        mids = mids[keep]
    return np.concatenate([[0.0], mids])


@register("oracle")
class OracleRouter(Router):
    """Hindsight router: utilities are the true qualities, the penalty the true per-prompt cost."""

    def fit(self, ctx: RouterContext) -> OracleRouter:
        super().fit(ctx)
        self._quality = ctx.table.quality
        self._cost = ctx.table.cost
        top = float(ctx.table.cost[ctx.train_rows].mean(axis=0).max()) if len(ctx.train_rows) else 0.0
        self._scale = top if top > 0 else 1.0
        return self

    def _rows(self, emb: np.ndarray, rows: np.ndarray | None) -> np.ndarray:
        self.check_fitted()
        if rows is None:
            raise RouterError("the oracle routes with hindsight and needs the prompts' table rows (rows=...)")
        rows = np.asarray(rows, dtype=np.int64)
        if rows.shape != (emb.shape[0],):
            raise RouterError(f"rows has shape {rows.shape}, expected ({emb.shape[0]},)")
        return rows

    def utilities(self, emb: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
        q = self._quality[self._rows(emb, rows)]
        return np.where(np.isnan(q), -np.inf, q)  # (n, M)

    def penalty(self, emb: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
        return self._cost[self._rows(emb, rows)] / self._scale  # (n, M)

    def knob_grid(self, emb: np.ndarray, n: int = 200, rows: np.ndarray | None = None,
                  candidates: Sequence[str] | None = None) -> np.ndarray:
        u, pen = self.scored(emb, rows, candidates)
        return breakpoint_grid(breakpoints(u, pen), n)
