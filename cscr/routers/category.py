"""Per-category lookup router (SPEC.md section 7): the bar a prompt-aware router must clear.

For each category of the table (all prompts form one group when the table has none), each
expert's mean train quality; route ``argmax_m  Qbar[category(x), m] - lambda * c_m``. It reads
the prompt's category from the table row, so it needs ``rows``; a prompt without a row (a new
request) or of a category with no train prompt gets the whole train split's means. Missing
quality cells are left out of a mean; an expert never observed in a category falls back to its
mean over all train prompts. Exact ties are broken towards the expert with the higher overall
mean train quality (a 1e-6 * prior term), not by the experts' order in the table.
"""

from __future__ import annotations

import numpy as np

from cscr.data.table import category_means
from cscr.routers.base import Router, RouterContext, RouterError, register

TIE_BREAK = 1e-6  # weight of the overall mean train quality in the utilities (breaks exact ties only)


@register("per-category")
class PerCategoryRouter(Router):
    """Best mean train quality minus lambda * cost, per category."""

    def fit(self, ctx: RouterContext) -> PerCategoryRouter:
        rows = ctx.train_rows
        if len(rows) == 0:
            raise RouterError("per-category needs train prompts")
        super().fit(ctx)
        cats = np.asarray(ctx.table.categories, dtype=str)
        self.categories = sorted(set(cats[rows].tolist()))  # categories with train prompts
        code = {c: i for i, c in enumerate(self.categories)}
        groups = np.array([code[c] for c in cats[rows]], dtype=np.int64)
        means, self._prior = category_means(ctx.table.quality[rows], groups, len(self.categories))
        self._table = np.where(np.isnan(means), self._prior[None, :], means)  # (G, M)
        # table row -> category index (-1: a category without train prompts -> the overall means)
        self._row_group = np.array([code.get(c, -1) for c in cats], dtype=np.int64)
        return self

    def utilities(self, emb: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
        self.check_fitted()
        n = emb.shape[0]
        group = np.full(n, -1, dtype=np.int64)
        if rows is not None:
            rows = np.asarray(rows, dtype=np.int64)
            if rows.shape != (n,):
                raise RouterError(f"per-category: rows has shape {rows.shape}, expected ({n},)")
            if n and (rows.min() < 0 or rows.max() >= len(self._row_group)):
                raise RouterError(f"per-category: rows must index the fitted table (0..{len(self._row_group) - 1})")
            group = self._row_group[rows]
        table = np.vstack([self._table, self._prior[None, :]])  # the last row: no known category
        return table[group] + TIE_BREAK * self._prior[None, :]  # (n, M); group -1 picks the last row
