"""UMR (UniRoute): route by each expert's error on the prompt's cluster.

The train prompts' embeddings are clustered with seeded k-means (``faiss.Kmeans``; k = 20 by
default, clamped to the number of train prompts). Each expert is represented by its feature
vector of per-cluster errors on the *validation* prompts: ``err[k, m]`` = mean of
``1 - Q[x, m]`` over validation prompts x assigned to cluster k whose cell for m is observed
(missing cells are masked, never read as 0); a cluster with no observed validation answer for
m falls back to m's global validation error. A prompt goes to
``argmin_m err[cluster(x), m] + lambda * c_m`` (utilities ``-err``). The clusters need no
expert labels, and an expert's feature needs only its validation answers, so experts unseen
in training take part: ``fit(ctx, experts=[...], val_rows=...)`` builds the router for an
explicit pool from its validation answers alone (the unseen-experts experiment).
"""

from __future__ import annotations

from collections.abc import Sequence

import faiss
import numpy as np

from cscr.routers.base import Router, RouterContext, RouterError, register


def cluster_errors(assign: np.ndarray, quality: np.ndarray, k: int) -> np.ndarray:
    """(k, M) mean error per cluster and expert; cells with no observed answer take the expert's
    global error. assign: (n,) cluster ids; quality: (n, M), NaN = missing."""
    obs = ~np.isnan(quality)  # (n, M)
    err = np.where(obs, 1.0 - np.nan_to_num(quality), 0.0)  # (n, M)
    onehot = np.zeros((k, len(assign)))
    onehot[assign, np.arange(len(assign))] = 1.0  # (k, n)
    sums, counts = onehot @ err, onehot @ obs.astype(np.float64)  # (k, M) each
    n_obs = obs.sum(axis=0)  # (M,)
    if (n_obs == 0).any():
        raise RouterError("expert(s) with no observed validation answer cannot be placed by UMR")
    glob = err.sum(axis=0) / n_obs  # (M,)
    return np.where(counts > 0, sums / np.maximum(counts, 1), glob[None, :])


@register("umr")
class UMRRouter(Router):
    def __init__(self, n_clusters: int = 20, niter: int = 25) -> None:
        super().__init__()
        if n_clusters < 1 or niter < 1:
            raise RouterError(f"n_clusters and niter must be >= 1, got {n_clusters}, {niter}")
        self.n_clusters = n_clusters
        self.niter = niter
        self.centroids: np.ndarray = np.zeros((0, 0), dtype=np.float32)  # (k, d)
        self.err: np.ndarray = np.zeros((0, 0))  # (k, M)
        self._index: faiss.Index | None = None

    def fit(self, ctx: RouterContext, experts: Sequence[str] | None = None,
            val_rows: np.ndarray | None = None) -> UMRRouter:
        """Cluster the train prompts; score ``experts`` (default: the table's pool) on ``val_rows``
        (default: the context's validation rows)."""
        table = ctx.table
        names = list(table.expert_names if experts is None else experts)
        if not names:
            raise RouterError("umr: empty expert list")
        cols = np.array([table.expert_index(e) for e in names])
        val = np.asarray(ctx.val_rows if val_rows is None else val_rows)
        train = np.asarray(ctx.train_rows)
        if len(train) == 0 or len(val) == 0:
            raise RouterError(f"umr needs train and validation prompts, got {len(train)} and {len(val)}")
        mean_cost = table.cost[np.ix_(train, cols)].mean(axis=0)
        self.expert_names = names
        self.costs = mean_cost / mean_cost.max() if mean_cost.max() > 0 else np.zeros_like(mean_cost)

        x = np.ascontiguousarray(ctx.embeddings[train], dtype=np.float32)
        k = min(self.n_clusters, len(train))
        km = faiss.Kmeans(x.shape[1], k, niter=self.niter, seed=ctx.seed, verbose=False,
                          min_points_per_centroid=1, max_points_per_centroid=1_000_000)
        km.train(x)
        self.centroids = np.asarray(km.centroids, dtype=np.float32)
        self._index = None
        assign = self.assign(ctx.embeddings[val])
        self.err = cluster_errors(assign, table.quality[np.ix_(val, cols)], k)
        return self

    def assign(self, emb: np.ndarray) -> np.ndarray:
        """(n,) nearest centroid (L2) for each prompt."""
        if self._index is None:
            if self.centroids.size == 0:
                raise RouterError("router 'umr' is not fitted")
            self._index = faiss.IndexFlatL2(self.centroids.shape[1])
            self._index.add(self.centroids)
        _, idx = self._index.search(np.ascontiguousarray(emb, dtype=np.float32), 1)
        return idx[:, 0]

    def utilities(self, emb: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
        self.check_fitted()
        return -self.err[self.assign(emb)]  # (n, M)
