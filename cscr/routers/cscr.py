"""The CSCR router (SPEC.md section 5) and its vanilla ablation.

For prompt embeddings ``Phi(x)`` (the encoder is outside the router: cscr/encoder.py), the head
gives unit queries ``q = normalize(g(Phi(x)))``; the FAISS expert index returns the top-k experts
by ``q . d_m`` (default k = 4), searched within the candidate experts when a request names some.
Utilities are those similarities for the top-k and -inf elsewhere; the shared base then chooses

    r(x) = argmax_{m in top-k(x)}  q . d_m  -  lambda * c_m

Adding or removing an expert is an index update (``add_expert`` / ``remove_expert``): the head is
not retrained. ``fit(ctx)`` loads the head trained for the variant (``cscr train``) from the run
folder and the descriptors of the table's experts from the run's descriptor store;
``from_parts`` builds a router from in-memory parts (serving, validation during training).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np

from cscr.head import Head
from cscr.index import ExpertIndex, ExpertIndexError
from cscr.routers.base import Router, RouterContext, RouterError, register


@register("cscr")
class CSCRRouter(Router):
    """Top-k by similarity to the expert descriptors, then similarity minus lambda * cost."""

    variant: ClassVar[str] = "cscr"

    def __init__(self, top_k: int | None = None, variant: str | None = None, descriptor_kind: str | None = None,
                 use_gpu: bool | None = None) -> None:
        super().__init__()
        if top_k is not None and int(top_k) < 1:
            raise RouterError(f"{self.name}: top_k must be >= 1, got {top_k}")
        self.top_k: int | None = None if top_k is None else int(top_k)
        self.model_variant = variant or type(self).variant  # models/<variant> folder to load
        self.descriptor_kind = descriptor_kind  # None: the kind the head was trained with
        self.use_gpu = use_gpu
        self.head: Head | None = None
        self.index: ExpertIndex | None = None

    # ---- building ----
    def _set_parts(self, head: Head, descriptors: Mapping[str, np.ndarray] | ExpertIndex,
                   costs: Mapping[str, float], top_k: int, kind: str = "") -> None:
        index = descriptors if isinstance(descriptors, ExpertIndex) else \
            ExpertIndex.from_descriptors(descriptors, use_gpu=self.use_gpu, kind=kind)
        if index.dim != head.cfg.out_dim:
            raise RouterError(f"{self.name}: descriptors have dimension {index.dim}, the head outputs "
                              f"{head.cfg.out_dim} (trained with another descriptor kind?)")
        missing = [n for n in index.names if n not in costs]
        if missing:
            raise RouterError(f"{self.name}: no cost for expert(s) {missing}")
        head.eval()
        self.head, self.index = head, index
        self.expert_names = list(index.names)
        self.costs = np.array([float(costs[n]) for n in index.names], dtype=np.float64)
        self.top_k = int(top_k)

    @classmethod
    def from_parts(cls, head: Head, descriptors: Mapping[str, np.ndarray] | ExpertIndex,
                   costs: Mapping[str, float] | Sequence[float], top_k: int = 4, encoder_dim: int | None = None,
                   use_gpu: bool | None = None, kind: str = "") -> CSCRRouter:
        """A router from a head, expert descriptors (a dict or a built ExpertIndex) and costs c_m
        (a dict by name, or a sequence in descriptor order). ``encoder_dim`` checks the head input."""
        if encoder_dim is not None and head.cfg.in_dim != int(encoder_dim):
            raise RouterError(f"the head takes {head.cfg.in_dim}-d prompt embeddings, the encoder gives {encoder_dim}")
        router = cls(top_k=top_k, use_gpu=use_gpu)
        names = descriptors.names if isinstance(descriptors, ExpertIndex) else list(descriptors)
        cost_map = dict(costs) if isinstance(costs, Mapping) else dict(zip(names, costs, strict=True))
        router._set_parts(head, descriptors, cost_map, top_k, kind)
        return router

    def fit(self, ctx: RouterContext) -> CSCRRouter:
        """Load the trained head for this variant and the table experts' descriptors.

        ``ctx.extra`` may carry ``trained`` (a cscr.trained.TrainedHead) and/or ``descriptors``
        ({name: vector}) instead of the run folder's files.
        """
        from cscr.trained import ensure_descriptors, load_trained

        super().fit(ctx)
        trained = ctx.extra.get("trained")
        if trained is None:
            if ctx.run_dir is None:
                raise RouterError(f"{self.name}: needs a run folder with a trained head (cscr train) "
                                  "or ctx.extra['trained']")
            trained = load_trained(ctx.run_dir, self.model_variant)
        descriptors = ctx.extra.get("descriptors")
        kind = self.descriptor_kind or trained.descriptor_kind
        if descriptors is None:
            if ctx.run_dir is None:
                raise RouterError(f"{self.name}: needs a run folder with a descriptor store or ctx.extra['descriptors']")
            descriptors, kind, _ = ensure_descriptors(ctx.run_dir, ctx.table, kind)
        missing = [n for n in ctx.table.expert_names if n not in descriptors]
        if missing:
            raise RouterError(f"{self.name}: no descriptor for expert(s) {missing}")
        costs = dict(zip(ctx.table.expert_names, ctx.table.expert_costs(ctx.train_rows), strict=True))
        ordered = {n: descriptors[n] for n in ctx.table.expert_names}
        top_k = self.top_k if self.top_k is not None else trained.config.index.top_k
        self._set_parts(trained.head, ordered, costs, top_k, kind)
        return self

    # ---- pool updates at run time (no retraining) ----
    def add_expert(self, name: str, descriptor: np.ndarray, cost: float) -> None:
        """Add an expert by its descriptor and normalised cost c_m (>= 0)."""
        self._check_parts()
        if not np.isfinite(cost) or cost < 0:
            raise RouterError(f"cost of {name!r} must be a finite number >= 0, got {cost}")
        try:
            self.index.add(name, descriptor)  # type: ignore[union-attr]
        except ExpertIndexError as exc:
            raise RouterError(str(exc)) from exc
        self.expert_names = list(self.index.names)  # type: ignore[union-attr]
        self.costs = np.append(self.costs, float(cost))

    def remove_expert(self, name: str) -> None:
        self._check_parts()
        if name not in self.expert_names:
            raise RouterError(f"unknown expert {name!r}; the pool has {self.expert_names}")
        if len(self.expert_names) == 1:
            raise RouterError(f"cannot remove {name!r}: it is the last expert in the pool")
        pos = self.expert_names.index(name)
        self.index.remove(name)  # type: ignore[union-attr]
        self.expert_names = list(self.index.names)  # type: ignore[union-attr]
        self.costs = np.delete(self.costs, pos)

    # ---- scoring ----
    def _check_parts(self) -> None:
        if self.head is None or self.index is None:
            raise RouterError(f"router {self.name!r} is not fitted")

    def queries(self, emb: np.ndarray) -> np.ndarray:
        """(n, D') unit routing queries for prompt embeddings (n, d)."""
        self._check_parts()
        emb = np.asarray(emb, dtype=np.float32)
        if emb.ndim != 2 or emb.shape[1] != self.head.cfg.in_dim:  # type: ignore[union-attr]
            raise RouterError(f"{self.name}: prompt embeddings must be (n, {self.head.cfg.in_dim}), "  # type: ignore[union-attr]
                              f"got {emb.shape}")
        return self.head.encode(emb)  # type: ignore[union-attr]

    def _utilities(self, emb: np.ndarray, candidates: Sequence[str] | None) -> np.ndarray:
        q = self.queries(emb)  # (n, D')
        scores, pos = self.index.search(q, self.top_k or 4, candidates)  # type: ignore[union-attr]
        u = np.full((q.shape[0], len(self.expert_names)), -np.inf)  # (n, M)
        ok = pos >= 0  # (n, k)
        rows = np.broadcast_to(np.arange(q.shape[0])[:, None], pos.shape)
        u[rows[ok], pos[ok]] = scores[ok]
        return u

    def utilities(self, emb: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
        return self._utilities(emb, None)

    def scored(self, emb: np.ndarray, rows: np.ndarray | None = None,
               candidates: Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k searched within the candidates (not top-k of the pool, then filtered)."""
        self.candidate_mask(candidates)  # validates the names
        return self._utilities(emb, candidates), np.asarray(self.costs, dtype=np.float64)

    # ---- serving helpers ----
    def rank(self, emb: np.ndarray, lam: float = 0.0,
             candidates: Sequence[str] | None = None) -> list[list[tuple[str, float, float]]]:
        """Per prompt, the top-k experts as (name, similarity, score = similarity - lam * c_m),
        best score first: the routing decision and its fallbacks."""
        if not np.isfinite(lam) or lam < 0:
            raise RouterError("cost weight lambda must be finite and >= 0")
        u, pen = self.scored(emb, None, candidates)
        score = u - lam * pen[None, :]
        out = []
        for i in range(u.shape[0]):
            idx = [j for j in np.argsort(-score[i], kind="stable") if np.isfinite(u[i, j])]
            out.append([(self.expert_names[j], float(u[i, j]), float(score[i, j])) for j in idx])
        return out

    def route_embeddings(self, emb: np.ndarray, lam: float = 0.0, candidates: Sequence[str] | None = None) -> list[str]:
        """Expert name chosen for each prompt embedding at cost weight ``lam``."""
        return [self.expert_names[j] for j in self.route(emb, lam, None, candidates)]

    def describe(self) -> dict[str, Any]:
        self._check_parts()
        return {"router": self.name, "experts": list(self.expert_names), "costs": self.costs.tolist(),
                "top_k": self.top_k, "dimension": self.index.dim, "kind": self.index.kind}  # type: ignore[union-attr]


@register("vanilla")
class VanillaRouter(CSCRRouter):
    """CSCR trained with one band and no cost penalty (plain multi-positive InfoNCE)."""

    variant: ClassVar[str] = "vanilla"
