"""Thompson sampling: a context-free Beta-Bernoulli bandit over the pool, learning along the stream.

Each expert m has a Beta(a_m, b_m) posterior on its chance of answering well. Prompts arrive
in the order given (``rows``, the test stream); for each, one sample ``theta_m ~ Beta(a_m,
b_m)`` is drawn per expert and the prompt goes to ``argmax_m theta_m - lambda * c_m``. The
chosen expert's realised quality ``q = Q[x, m]`` then updates its posterior as a fractional
Bernoulli outcome (``a_m += q``, ``b_m += 1 - q``; graded quality counts as a partial
success); a missing cell leaves the posterior unchanged (the outcome is unknown, not a
failure). The router therefore needs the table rows of the prompts (hindsight of one cell per
prompt, as a bandit gets in deployment). Because what it learns depends on its own choices,
and so on lambda, ``route_sweep`` runs the stream once per knob value, each with its own
generator seeded alike: the choices at a knob value do not depend on which other knob values
are swept, so ``rank`` at lambda (one stream) makes exactly the choices the sweep makes at
lambda. The draws meet the knob in the shared scoring function (cscr.routers.envelope.score).
Prior: uniform Beta(1, 1) by default, so that everything
is learned on the stream as in the bandit formulation; ``prior="train"`` instead starts from
each expert's mean train quality worth ``prior_strength`` pseudo-observations
(``a = 1 + s * mean``, ``b = 1 + s * (1 - mean)``). Seeded by the context's seed: the same
stream gives the same choices.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from cscr.routers.base import (
    Ranked,
    Router,
    RouterContext,
    RouterError,
    knob_values,
    ranked_lists,
    register,
)
from cscr.routers.envelope import score


@dataclass
class ThompsonStream:
    """One pass over a stream for L knob values."""

    choices: np.ndarray  # (L, n) int chosen expert per knob value and prompt
    alpha: np.ndarray  # (L, M) final posterior successes (prior included)
    beta: np.ndarray  # (L, M) final posterior failures (prior included)
    samples: np.ndarray | None = None  # (n, M) draws at the first knob value, when recorded

    @property
    def posterior_mean(self) -> np.ndarray:  # (L, M)
        return self.alpha / (self.alpha + self.beta)


@register("thompson")
class ThompsonRouter(Router):
    def __init__(self, prior: str = "uniform", prior_strength: float = 10.0) -> None:
        super().__init__()
        if prior not in ("uniform", "train"):
            raise RouterError(f"thompson prior must be 'uniform' or 'train', got {prior!r}")
        if not np.isfinite(prior_strength) or prior_strength < 0:
            raise RouterError(f"prior_strength must be >= 0, got {prior_strength}")
        self.prior, self.prior_strength = prior, float(prior_strength)
        self.a0: np.ndarray = np.zeros(0)  # (M,)
        self.b0: np.ndarray = np.zeros(0)  # (M,)
        self.quality: np.ndarray = np.zeros((0, 0))  # (n_table, M) the fitted table's Q
        self.seed = 0

    def fit(self, ctx: RouterContext) -> ThompsonRouter:
        super().fit(ctx)
        self.quality = ctx.table.quality
        self.seed = ctx.seed
        m = len(self.expert_names)
        self.a0, self.b0 = np.ones(m), np.ones(m)
        if self.prior == "train":
            q = self.quality[ctx.train_rows]
            obs = ~np.isnan(q)
            mean = np.where(obs.any(0), np.nansum(q, 0) / np.maximum(obs.sum(0), 1), 0.5)  # (M,)
            self.a0 = 1.0 + self.prior_strength * mean
            self.b0 = 1.0 + self.prior_strength * (1.0 - mean)
        return self

    def _rows(self, emb: np.ndarray, rows: np.ndarray | None) -> np.ndarray:
        self.check_fitted()
        if rows is None:
            raise RouterError("thompson learns from the realised quality of its choices: pass the table rows")
        rows = np.asarray(rows)
        if len(rows) != len(emb):
            raise RouterError(f"{len(emb)} embeddings but {len(rows)} rows")
        if len(rows) and (rows.min() < 0 or rows.max() >= len(self.quality)):
            raise RouterError("rows out of range of the fitted table")
        return rows

    def stream(self, emb: np.ndarray, lambdas: np.ndarray | Sequence[float], rows: np.ndarray | None,
               candidates: Sequence[str] | None = None, record_samples: bool = False) -> ThompsonStream:
        """Run the stream (rows in order) once per knob value, each from a generator of this seed."""
        rows = self._rows(emb, rows)
        lam = knob_values(lambdas)
        mask = self.candidate_mask(candidates)  # (M,)
        L, m = len(lam), len(self.expert_names)
        a, b = np.tile(self.a0, (L, 1)), np.tile(self.b0, (L, 1))  # (L, M) each
        choices = np.empty((L, len(rows)), dtype=np.int64)
        samples = np.empty((len(rows), m)) if record_samples else None
        q_rows = self.quality[rows].tolist()  # (n, M) as lists: fast scalar reads in the loop
        excluded = np.flatnonzero(~mask)
        for li in range(L):
            draw = np.random.default_rng(self.seed).beta
            al, bl, lam_l, ch_l = a[li], b[li], float(lam[li]), choices[li]  # views: updated in place
            for t in range(len(rows)):
                theta = draw(al, bl)  # (M,)
                if samples is not None and li == 0:
                    samples[t] = theta
                if excluded.size:
                    theta[excluded] = -np.inf
                ch = int(score(theta, self.costs, lam_l).argmax())
                ch_l[t] = ch
                q = q_rows[t][ch]  # realised quality of the choice; NaN: unknown, no update
                if q == q:
                    al[ch] += q
                    bl[ch] += 1.0 - q
        return ThompsonStream(choices, a, b, samples)

    def route_sweep(self, emb: np.ndarray, lambdas: np.ndarray | Sequence[float], rows: np.ndarray | None = None,
                    candidates: Sequence[str] | None = None) -> np.ndarray:
        return self.stream(emb, lambdas, rows, candidates).choices

    def rank(self, emb: np.ndarray, lam: float = 0.0, candidates: Sequence[str] | None = None,
             rows: np.ndarray | None = None, categories: Sequence[str | None] | None = None) -> list[list[Ranked]]:
        """Per prompt of the stream, the experts by ``draw - lam * c_m`` at that step (the draws the
        stream made at this knob value), best first; the first is the sweep's choice at ``lam``."""
        self.check_categories(categories)
        st = self.stream(emb, [lam], rows, candidates, record_samples=True)
        assert st.samples is not None
        mask = self.candidate_mask(candidates)
        u = np.where(mask, st.samples, -np.inf)  # (n, M)
        return ranked_lists(u, self.costs, float(knob_values(lam)[0]), mask, self.expert_names)

    def utilities(self, emb: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
        """(n, M) the posterior draws made along the stream at lambda = 0."""
        samples = self.stream(emb, np.zeros(1), rows, record_samples=True).samples
        assert samples is not None
        return samples

    def knob_grid(self, emb: np.ndarray, n: int = 200, rows: np.ndarray | None = None,
                  candidates: Sequence[str] | None = None) -> np.ndarray:
        """Draws lie in [0, 1], so lambda > 1 / (c_2nd - c_cheapest) always picks the cheapest."""
        c = np.unique(self.costs[self.candidate_mask(candidates)])
        if len(c) < 2:
            return np.zeros(1)
        top = 1.001 / (c[1] - c[0])
        n_geo = n // 2
        return np.unique(np.concatenate([np.linspace(0.0, top, n - n_geo),
                                         np.geomspace(top * 1e-4, top, n_geo)]))
