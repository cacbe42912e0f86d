"""The CSCR router (SPEC.md section 5) and its vanilla ablation.

For prompt embeddings ``Phi(x)`` (the encoder is outside the router: cscr/encoder.py), the head
gives unit queries ``q = normalize(g(Phi(x)))``; the FAISS expert index returns the top-k experts
by ``q . d_m`` (k = 0: every expert), searched within the candidate experts when a request names some.
Utilities are those similarities for the top-k and -inf elsewhere; the shared base then chooses

    r(x) = argmax_{m in top-k(x)}  q . d_m  -  lambda * c_m

With a head trained for quality utilities (``HeadConfig.utility == "quality"``, beyond the
write-up, labelled so) the retrieved experts' utilities are expected quality instead,
``sigmoid(a * q.d_m + b(d_m))`` (cscr/head.py), so that lambda trades P(good) against cost in
commensurate units; the bias comes from the descriptor, so a new expert still needs only that.

An optional out-of-distribution guard (cscr/guard.py, beyond the write-up, labelled so; ``cscr
guard``) shrinks those expected qualities towards each expert's mean on prompts far from the
training prompts; ``set_guard`` attaches it, the loader does so when the run has one.

The category prior (cscr/prior.py, beyond the write-up, labelled so) blends the expected qualities
with the train split's per-category quality table, weighted by the category a softmax regression
reads from the prompt; ``set_prior`` attaches it (before the guard), ``cscr train`` fits it with its
weight chosen on validation and the loader attaches it. An expert that joins later gets the head's
own per-category means, so it still needs only its descriptor.

Newcomer levels (cscr/newcomer.py, beyond the write-up, labelled so): an expert that joins after
training can be calibrated on its probe outcomes (``set_level``), a Platt map on the logit of the
head's expected quality, since a probe-outcome descriptor is standardised and carries no level;
``add_expert(..., outcomes=...)`` does so when the router holds the run's probe prompts
(``set_probes``; ``cscr.runs.loader.attach_probes`` gives it them, as serving does) and
``calibrate_newcomers`` is true (the loader sets it from the choice ``cscr train`` recorded).

Adding or removing an expert is an index update (``add_expert`` / ``remove_expert``): the head is
not retrained. The router does no file I/O: ``from_parts`` builds it from a head, descriptors and
costs, ``from_trained`` from a trained head's record; ``cscr.runs.loader.load_router`` builds it
from a run folder.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, ClassVar, Protocol

import numpy as np

from cscr.config import TrainConfig
from cscr.head import Head
from cscr.index import ExpertIndex, ExpertIndexError
from cscr.routers.base import DescriptorBasis, Router, RouterContext, RouterError, register

if TYPE_CHECKING:
    from cscr.guard import Guard
    from cscr.prior import CategoryPrior


class TrainedHeadLike(Protocol):
    """A trained head with its config (cscr.runs.heads.TrainedHead, the training TrainResult)."""

    head: Head
    config: TrainConfig


@register("cscr")
class CSCRRouter(Router):
    """Top-k by similarity to the expert descriptors, then similarity minus lambda * cost."""

    supports_live_pool: ClassVar[bool] = True

    def __init__(self, top_k: int | None = None, use_gpu: bool | None = None) -> None:
        super().__init__()
        if top_k is not None and int(top_k) < 0:
            raise RouterError(f"{self.name}: top_k must be >= 1 (or 0: every expert), got {top_k}")
        self.top_k: int | None = None if top_k is None else int(top_k)
        self.use_gpu = use_gpu
        self.head: Head | None = None
        self.index: ExpertIndex | None = None
        self.basis_id = ""  # what the descriptor coordinates mean (the store's basis id)
        self.guard: Guard | None = None  # the out-of-distribution guard (cscr/guard.py), if attached
        self.prior: CategoryPrior | None = None  # the category prior (cscr/prior.py), if attached
        self.levels: dict[str, tuple[float, float]] = {}  # newcomers' probe-outcome maps (cscr/newcomer.py)
        self.probes: np.ndarray | None = None  # (R, d) the run's probe prompts, for newcomers' maps
        # add_expert calibrates a newcomer that brings probe outcomes (False: the run's recorded choice
        # said the maps do not pay; the outcomes are still checked)
        self.calibrate_newcomers = True

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
                   costs: Mapping[str, float] | Sequence[float], top_k: int = 0, encoder_dim: int | None = None,
                   use_gpu: bool | None = None, kind: str = "", basis_id: str = "") -> CSCRRouter:
        """A router from a head, expert descriptors (a dict or a built ExpertIndex) and costs c_m
        (a dict by name, or a sequence in descriptor order). ``encoder_dim`` checks the head input."""
        if encoder_dim is not None and head.cfg.in_dim != int(encoder_dim):
            raise RouterError(f"the head takes {head.cfg.in_dim}-d prompt embeddings, the encoder gives {encoder_dim}")
        router = cls(top_k=top_k, use_gpu=use_gpu)
        names = descriptors.names if isinstance(descriptors, ExpertIndex) else list(descriptors)
        cost_map = dict(costs) if isinstance(costs, Mapping) else dict(zip(names, costs, strict=True))
        router._set_parts(head, descriptors, cost_map, top_k, kind)
        router.basis_id = basis_id
        return router

    @classmethod
    def from_trained(cls, trained: TrainedHeadLike, descriptors: Mapping[str, np.ndarray],
                     costs: Mapping[str, float], top_k: int | None = None, use_gpu: bool | None = None,
                     kind: str = "", basis_id: str = "") -> CSCRRouter:
        """The router of a trained head over the experts named in ``descriptors`` (top-k: the
        one it was trained with unless given)."""
        k = top_k if top_k is not None else trained.config.index.top_k
        return cls.from_parts(trained.head, descriptors, costs, top_k=k, use_gpu=use_gpu, kind=kind,
                              basis_id=basis_id)

    def fit(self, ctx: RouterContext) -> CSCRRouter:
        raise RouterError(f"{self.name}: a trained head is loaded, not fitted: use "
                          f"cscr.runs.loader.load_router(run, {self.name!r}) (after `cscr train`) or "
                          "CSCRRouter.from_parts / from_trained")

    def set_guard(self, guard: Guard | None) -> None:
        """Attach an out-of-distribution guard (None: detach). Experts it has no mean quality for
        (they joined after training) get the head's mean expected quality over its training prompts."""
        self._check_parts()
        if guard is None:
            self.guard = None
            return
        if guard.reference.ndim != 2 or guard.reference.shape[1] != self.head.cfg.in_dim:  # type: ignore[union-attr]
            raise RouterError(f"{self.name}: the guard's training prompts have shape {guard.reference.shape}, the "
                              f"head takes {self.head.cfg.in_dim}-d embeddings")  # type: ignore[union-attr]
        self.guard = guard
        missing = [n for n in self.expert_names if n not in guard.qbar]
        if missing:
            self.guard = guard.with_means({n: self._head_mean(n) for n in missing})

    def set_prior(self, prior: CategoryPrior | None) -> None:
        """Attach a category prior (None: detach). Experts it has no per-category quality for (they
        joined after training) get the head's own per-category means over its reference prompts."""
        self._check_parts()
        if prior is None:
            self.prior = None
            return
        if prior.weight.shape[0] != self.head.cfg.in_dim:  # type: ignore[union-attr]
            raise RouterError(f"{self.name}: the category prior reads {prior.weight.shape[0]}-d embeddings, the "
                              f"head takes {self.head.cfg.in_dim}-d ones")  # type: ignore[union-attr]
        missing = [n for n in self.expert_names if n not in prior.table]
        self.prior = prior.with_means({n: self._head_category_means(prior, n) for n in missing}) if missing else prior

    def set_level(self, name: str, probe_emb: np.ndarray, outcomes: np.ndarray) -> bool:
        """Calibrate expert ``name`` (one that joined after training) on its probe outcomes (R,) at the
        probe prompts' embeddings (R, d) (cscr/newcomer.py); False when there is nothing to fit (the map
        is then removed). Only for a head whose utilities are expected qualities."""
        from cscr.newcomer import fit_level

        self._check_parts()
        if name not in self.expert_names:
            raise RouterError(f"unknown expert {name!r}; the pool has {self.expert_names}", param="expert",
                              code="unknown_expert")
        if self.head.cfg.utility != "quality":  # type: ignore[union-attr]
            raise RouterError(f"{self.name}: newcomer levels need a head whose utilities are expected qualities")
        self.levels.pop(name, None)
        u = self._raw_utilities(np.asarray(probe_emb, dtype=np.float32), [name])[:, self.expert_names.index(name)]
        try:
            level = fit_level(u, outcomes)
        except ValueError as exc:
            raise RouterError(f"{name!r}: {exc}", param="probe_outcomes") from exc
        if level is not None:
            self.levels[name] = level
        return level is not None

    def _head_category_means(self, prior: CategoryPrior, name: str) -> np.ndarray:
        """(C,) the head's mean expected quality for expert ``name`` per category of ``prior``'s reference prompts."""
        return prior.category_means_of(self._raw_utilities(prior.reference, [name])[:, self.expert_names.index(name)])

    def _head_mean(self, name: str) -> float:
        """The head's mean expected quality for expert ``name`` over (a sample of) the guard's training prompts."""
        sample = self.guard.sample()  # type: ignore[union-attr]
        u = self._raw_utilities(sample, [name])[:, self.expert_names.index(name)]
        return float(np.mean(u[np.isfinite(u)])) if np.isfinite(u).any() else 0.0

    # ---- pool updates at run time (no retraining) ----
    @property
    def descriptor_basis(self) -> DescriptorBasis | None:
        if self.index is None:
            return None
        return DescriptorBasis(self.index.kind, self.basis_id, self.index.dim)

    def set_probes(self, emb: np.ndarray | None) -> None:
        """The probe prompts' embeddings (R, d) whose outcomes an expert that joins later may bring
        (``add_expert(..., outcomes=...)``); None: newcomers join by their descriptors only."""
        self._check_parts()
        if emb is None:
            self.probes = None
            return
        emb = np.asarray(emb, dtype=np.float32)
        if emb.ndim != 2 or emb.shape[1] != self.head.cfg.in_dim or len(emb) < 2:  # type: ignore[union-attr]
            raise RouterError(f"{self.name}: probe embeddings must be (R >= 2, {self.head.cfg.in_dim}), "  # type: ignore[union-attr]
                              f"got {emb.shape}")
        self.probes = emb

    def check_outcomes(self, outcomes: Sequence[float | None] | np.ndarray | None) -> np.ndarray | None:
        """A newcomer's probe outcomes as (R,) floats (NaN: not answered), or RouterError (param
        ``probe_outcomes``) when this router cannot use them or they do not fit its probes."""
        if outcomes is None:
            return None
        if self.probes is None or self.head is None or self.head.cfg.utility != "quality":
            raise RouterError(f"{self.name}: this router takes no probe outcomes (its run has no probe prompts, "
                              "or its head's utilities are not expected qualities)", param="probe_outcomes")
        from cscr.newcomer import as_outcomes

        try:
            y = as_outcomes(outcomes)
        except ValueError as exc:
            raise RouterError(str(exc), param="probe_outcomes") from exc
        if y.size != len(self.probes):
            raise RouterError(f"probe outcomes: {y.size} given, the run has {len(self.probes)} probe prompts",
                              param="probe_outcomes")
        return y

    def add_expert(self, name: str, descriptor: np.ndarray, cost: float,
                   outcomes: Sequence[float | None] | np.ndarray | None = None) -> None:
        """Add an expert by its descriptor and normalised cost c_m (>= 0); with its ``outcomes`` on the
        run's probe prompts (``set_probes``) it is also calibrated on them (``set_level``)."""
        self._check_parts()
        if not np.isfinite(cost) or cost < 0:
            raise RouterError(f"cost of {name!r} must be a finite number >= 0, got {cost}", param="cost")
        y = self.check_outcomes(outcomes)  # before the index changes: a refused request changes nothing
        try:
            self.index.add(name, descriptor)  # type: ignore[union-attr]
        except ExpertIndexError as exc:
            raise RouterError(str(exc), param="descriptor") from exc
        self.expert_names = list(self.index.names)  # type: ignore[union-attr]
        self.costs = np.append(self.costs, float(cost))
        if y is not None and self.calibrate_newcomers:
            self.set_level(name, self.probes, y)  # type: ignore[arg-type]
        if self.prior is not None and name not in self.prior.table:  # trained experts keep their table
            self.prior = self.prior.with_means({name: self._head_category_means(self.prior, name)})
        if self.guard is not None and name not in self.guard.qbar:  # trained experts keep their label mean
            self.guard = self.guard.with_means({name: self._head_mean(name)})

    def remove_expert(self, name: str) -> None:
        self._check_parts()
        if name not in self.expert_names:
            raise RouterError(f"unknown expert {name!r}; the pool has {self.expert_names}", param="expert",
                              code="unknown_expert")
        if len(self.expert_names) == 1:
            raise RouterError(f"cannot remove {name!r}: it is the last expert in the pool", param="expert",
                              code="last_expert")
        pos = self.expert_names.index(name)
        self.index.remove(name)  # type: ignore[union-attr]
        self.expert_names = list(self.index.names)  # type: ignore[union-attr]
        self.costs = np.delete(self.costs, pos)
        self.levels.pop(name, None)

    # ---- scoring ----
    def _check_parts(self) -> None:
        if self.head is None or self.index is None:
            raise RouterError(f"router {self.name!r} is not fitted", code="not_fitted")

    def check_fitted(self) -> None:
        self._check_parts()

    def queries(self, emb: np.ndarray) -> np.ndarray:
        """(n, D') unit routing queries for prompt embeddings (n, d)."""
        self._check_parts()
        emb = np.asarray(emb, dtype=np.float32)
        if emb.ndim != 2 or emb.shape[1] != self.head.cfg.in_dim:  # type: ignore[union-attr]
            raise RouterError(f"{self.name}: prompt embeddings must be (n, {self.head.cfg.in_dim}), "  # type: ignore[union-attr]
                              f"got {emb.shape}")
        return self.head.encode(emb)  # type: ignore[union-attr]

    def _hint_codes(self, categories: Sequence[str | None] | None, n: int | None = None) -> np.ndarray | None:
        """(n,) codes of the categories callers gave (-1: none), or None when no prompt has one."""
        if categories is None or all(c is None for c in categories):
            return None
        if self.prior is None:
            raise RouterError(f"{self.name}: this head has no category prior, so it takes no category hint "
                              "(`cscr train` fits one when the table has 2 or more train categories)",
                              param="category", code="unsupported")
        if n is not None and len(categories) != n:
            raise RouterError(f"{self.name}: {len(categories)} categories for {n} prompts", param="category")
        from cscr.prior import PriorError

        try:
            return self.prior.hint_codes(categories)
        except PriorError as exc:
            raise RouterError(str(exc), param="category", code="unknown_category") from exc

    def check_categories(self, categories: Sequence[str | None] | None) -> None:
        self._hint_codes(categories)

    def _utilities(self, emb: np.ndarray, candidates: Sequence[str] | None,
                   categories: Sequence[str | None] | None = None) -> np.ndarray:
        u = self._raw_utilities(emb, candidates)
        codes = self._hint_codes(categories, len(u))
        if self.prior is not None:
            u = self.prior.apply(u, self.expert_names, emb) if codes is None else \
                self.prior.apply_hinted(u, self.expert_names, emb, codes)
        return u if self.guard is None else self.guard.apply(u, self.expert_names, emb)

    def _raw_utilities(self, emb: np.ndarray, candidates: Sequence[str] | None) -> np.ndarray:
        q = self.queries(emb)  # (n, D')
        k = self.top_k or len(self.expert_names)  # 0 (or unset): every expert
        scores, pos = self.index.search(q, k, candidates)  # type: ignore[union-attr]
        u = np.full((q.shape[0], len(self.expert_names)), -np.inf)  # (n, M)
        ok = pos >= 0  # (n, k)
        rows = np.broadcast_to(np.arange(q.shape[0])[:, None], pos.shape)
        if self.head.cfg.utility == "quality":  # type: ignore[union-attr]
            a, bias = self.head.quality_map(self.index.vectors())  # type: ignore[union-attr]
            safe = np.where(ok, pos, 0)  # (n, k)
            scores = 1.0 / (1.0 + np.exp(-(a * scores.astype(np.float64) + bias[safe])))  # (n, k) P(good)
        u[rows[ok], pos[ok]] = scores[ok]
        if self.levels:
            from cscr.newcomer import apply_level

            for name, level in self.levels.items():
                j = self.expert_names.index(name)
                u[:, j] = apply_level(u[:, j], level)
        return u

    def utilities(self, emb: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
        return self._utilities(emb, None)

    def scored(self, emb: np.ndarray, rows: np.ndarray | None = None, candidates: Sequence[str] | None = None,
               categories: Sequence[str | None] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k searched within the candidates (not top-k of the pool, then filtered); a prompt whose
        caller gave its category is blended with that category's row of the prior's table."""
        self.candidate_mask(candidates)  # validates the names
        return self._utilities(emb, candidates, categories), np.asarray(self.costs, dtype=np.float64)


@register("vanilla")
class VanillaRouter(CSCRRouter):
    """CSCR trained with one band and no cost penalty (plain multi-positive InfoNCE)."""


@register("cscr+category")
class GivenCategoryRouter(Router):
    """The ``cscr`` router handed each prompt's category, as the per-category router is (evaluation
    only; beyond the write-up, labelled so): its category prior blends the per-category quality of
    the prompt's true category (the table's label) instead of the category it reads from the prompt,
    with its own weight w chosen on the validation split the same way (``cscr train`` records the
    same choice as the prior's ``w_given``, which a served request's category hint uses); the guard
    after it, when ``cscr guard`` wrote one, as ``cscr`` evaluates and serves. It answers "does the
    head add anything to the label the per-category table is given?" on the same footing. Like
    per-category it reads the label from the table row (``rows``), so it routes table rows only;
    ``cscr.runs.loader.load_router`` builds it from the run's ``cscr`` router."""

    wraps = "cscr"  # the trained head (models/<wraps>) the loader hands to the constructor

    def __init__(self, inner: CSCRRouter | None = None) -> None:
        super().__init__()
        self.inner = inner
        self._codes = np.zeros(0, dtype=np.int64)
        self.w = 0.0
        self.search: dict[str, object] = {}

    def fit(self, ctx: RouterContext) -> GivenCategoryRouter:
        from cscr.prior import choose_w

        inner = self.inner
        if inner is None or inner.prior is None:
            raise RouterError(f"{self.name}: needs a trained cscr head with a category prior (`cscr train` "
                              "fits one when the table has 2 or more train categories)", code="not_fitted")
        prior = inner.prior
        chosen = choose_w(prior, lambda e: inner._raw_utilities(e, None), inner.expert_names,
                          np.asarray(inner.costs), ctx.table, ctx.embeddings, ctx.val_rows, given=True)
        self.w, self.search = chosen.w, chosen.search  # as `cscr train` chooses w_given (older runs have none)
        self._codes = prior.codes(np.asarray(ctx.table.categories, dtype=str))  # every table row's category
        self.expert_names, self.costs = list(inner.expert_names), np.asarray(inner.costs)
        return self

    def utilities(self, emb: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
        self.check_fitted()
        assert self.inner is not None and self.inner.prior is not None  # fit checked both
        n = emb.shape[0]
        if rows is None:
            raise RouterError(f"{self.name}: reads each prompt's category from its table row; route table rows")
        rows = np.asarray(rows, dtype=np.int64)
        if rows.shape != (n,) or (n and (rows.min() < 0 or rows.max() >= len(self._codes))):
            raise RouterError(f"{self.name}: rows must be ({n},) indices of the fitted table (0..{len(self._codes) - 1})")
        u = self.inner.prior.apply(self.inner._raw_utilities(emb, None), self.expert_names, emb, self.w,
                                   self._codes[rows])
        return u if self.inner.guard is None else self.inner.guard.apply(u, self.expert_names, emb)
