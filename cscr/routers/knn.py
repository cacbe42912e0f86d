"""kNN router (SPEC.md section 7): each expert's mean train quality over the k nearest train
prompts (cosine similarity of the prompt embeddings, exact search with faiss IndexFlatIP),
minus lambda * c_m. Missing quality cells are left out of a neighbour mean; an expert with no
observed neighbour falls back to its mean train quality. Neighbour means are coarse (multiples
of 1/k on 0/1 data), so exact ties are common: they are broken towards the expert with the
higher mean train quality (a 1e-6 * prior term, far below the 1/k resolution), not by the
experts' order in the table.
"""

from __future__ import annotations

import faiss
import numpy as np

from cscr.routers.base import Router, RouterContext, RouterError, register

TIE_BREAK = 1e-6  # weight of the mean train quality in the utilities (breaks exact ties only)


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


@register("knn")
class KNNRouter(Router):
    """Mean quality of the k nearest train prompts per expert."""

    def __init__(self, k: int = 10) -> None:
        super().__init__()
        if int(k) < 1:
            raise RouterError(f"knn: k must be >= 1, got {k}")
        self.k = int(k)

    def fit(self, ctx: RouterContext) -> KNNRouter:
        super().fit(ctx)
        rows = ctx.train_rows
        if len(rows) == 0:
            raise RouterError("knn needs train prompts")
        emb = _unit(ctx.embeddings[rows])
        self.index = faiss.IndexFlatIP(emb.shape[1])
        self.index.add(emb)
        q = ctx.table.quality[rows]  # (n_train, M), NaN = missing
        self._seen = (~np.isnan(q)).astype(np.float32)  # (n_train, M)
        self._q = np.nan_to_num(q, nan=0.0).astype(np.float32)  # (n_train, M)
        self._prior = self._q.sum(0) / np.maximum(self._seen.sum(0), 1)  # (M,) mean train quality
        return self

    def neighbours(self, emb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(similarities (n, k), train-row positions (n, k)) of the k nearest train prompts."""
        self.check_fitted()
        if emb.ndim != 2 or emb.shape[1] != self.index.d:
            raise RouterError(f"knn: embeddings must be (n, {self.index.d}), got {emb.shape}")
        k = min(self.k, self.index.ntotal)
        return self.index.search(_unit(emb), k)

    def utilities(self, emb: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
        _, idx = self.neighbours(emb)  # (n, k)
        total = self._q[idx].sum(axis=1)  # (n, M)
        seen = self._seen[idx].sum(axis=1)  # (n, M)
        mean = np.where(seen > 0, total / np.maximum(seen, 1), self._prior[None, :]).astype(np.float64)
        return mean + TIE_BREAK * self._prior[None, :]  # (n, M)
