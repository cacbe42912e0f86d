"""Significance of a difference between two routers (SPEC.md section 6): pure numpy.

* Paired bootstrap of the AUDC difference: B resamples of the test prompts (with replacement),
  the same resample for both routers. Each resample recomputes everything the AUDC depends on:
  every knob value's operating point, the curves, and the pool's cost range (single experts'
  mean costs on the resample). Vectorised: a resample is a weight vector w (n,) (counts / n), so
  the operating points of all resamples are ``W @ gather(C, choices).T`` (B, L), computed
  through the few cells that change between consecutive knob values (a sparse product).
  Returns the AUDC difference on the full test set, the 95% percentile interval, and the
  one-sided p = fraction of resamples with delta <= 0 (small p: A is better than B).
* McNemar's exact test on per-prompt correctness (quality >= binarize_at) of two routers'
  choices, each at its operating point for a matched budget: the point with the highest mean
  quality among those with mean cost <= the budget (default budget: the best single expert's
  mean test cost). Two-sided exact binomial p on the discordant pairs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import sparse

from cscr.eval.metrics import audc_batch, gather, hull_batch


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


@dataclass(frozen=True)
class BootstrapResult:
    delta: float  # AUDC(A) - AUDC(B) on the full test set
    ci_low: float  # 2.5th percentile of the resampled deltas
    ci_high: float  # 97.5th percentile
    p_one_sided: float  # fraction of resamples with delta <= 0
    resamples: int  # B


@dataclass(frozen=True)
class McNemarResult:
    a_only: int  # prompts A gets right and B wrong
    b_only: int  # prompts B gets right and A wrong
    p_value: float  # exact two-sided p (binomial on the discordant pairs, p = 1/2)


def resample_weights(n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """(size, n) bootstrap weights: how often each prompt is drawn in a resample of n, over n."""
    idx = rng.integers(0, n, size=(size, n), dtype=np.uint32)  # (size, n) drawn prompts
    out = np.empty((size, n))
    for b in range(size):  # row by row: cache-friendly, ~2x faster than one flat bincount
        out[b] = np.bincount(idx[b], minlength=n)
    out /= n
    return out


def _audc_of_points(x: np.ndarray, y: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    vx, vy, count = hull_batch(x, y)
    return audc_batch(vx, vy, count, lo, hi)


class _SweepSums:
    """Per-knob weighted means of one per-prompt value along a sweep, for weights w (B, n).

    ``w @ values[i, choices[l, i]]`` for every knob value l. A sweep changes few choices between
    consecutive knob values, so this is the first row's weighted sum plus the cumulative
    weighted sums of the changes, a sparse (L - 1, n) matrix: O(B * changes) instead of
    O(B * L * n). Consecutive identical rows are dropped first (the same point in every
    resample); when most cells change (not a sweep), a dense product is used.
    """

    def __init__(self, choices: np.ndarray, values: np.ndarray) -> None:
        choices = np.asarray(choices)
        keep = np.concatenate([[True], (choices[1:] != choices[:-1]).any(axis=1)])
        choices = choices[keep]
        n_l, n = choices.shape
        self.n_points = n_l
        self.first = gather(values, choices[0])[0]  # (n,)
        ll, ii = np.nonzero(choices[1:] != choices[:-1])  # changed cells
        self.dense = gather(values, choices).T.copy() if len(ll) > n_l * n // 4 else None  # (n, L)
        d = values[ii, choices[ll + 1, ii]] - values[ii, choices[ll, ii]]  # (K,) change of each cell
        self.steps = sparse.csr_matrix((d, (ll, ii)), shape=(max(n_l - 1, 0), n))  # (L - 1, n)

    def __call__(self, w: np.ndarray, wt: np.ndarray) -> np.ndarray:
        """(B, L) weighted sums for weights w (B, n); wt: the same weights as a C-ordered (n, B)."""
        if self.dense is not None:
            return w @ self.dense
        base = (w @ self.first)[:, None]  # (B, 1)
        if self.n_points == 1:
            return base
        steps = np.asarray(self.steps @ wt)  # (L - 1, B): csr rows times contiguous weight rows
        return np.concatenate([base, base + np.cumsum(steps, axis=0).T], axis=1)


def paired_bootstrap_audc(choices_a: np.ndarray, choices_b: np.ndarray, quality: np.ndarray, cost: np.ndarray,
                          resamples: int = 5000, seed: int = 0, chunk_elems: int = 20_000_000,
                          pool: np.ndarray | None = None) -> BootstrapResult:
    """Paired bootstrap of AUDC(A) - AUDC(B).

    choices_a (La, n), choices_b (Lb, n): int expert choices per knob value, in sweep order;
    quality, cost (n, M) without missing cells (the evaluated test prompts). ``pool``: the
    columns (experts) that define the pool's cost range (default: all). Resamples are
    processed in chunks of at most ``chunk_elems`` weights to bound memory.
    """
    _check(quality.ndim == 2 and quality.shape == cost.shape, f"quality/cost must be (n, M), got {quality.shape}, {cost.shape}")
    _check(not np.isnan(quality).any(), "quality has missing cells: drop those prompts first")
    _check(resamples >= 1, f"resamples must be >= 1, got {resamples}")
    n = quality.shape[0]
    ca, cb = np.atleast_2d(choices_a), np.atleast_2d(choices_b)
    _check(ca.shape[1] == n and cb.shape[1] == n, f"choices must have {n} columns, got {ca.shape}, {cb.shape}")
    xa, ya, xb, yb = _SweepSums(ca, cost), _SweepSums(ca, quality), _SweepSums(cb, cost), _SweepSums(cb, quality)

    pool_cost = cost if pool is None else cost[:, np.asarray(pool)]  # (n, M') single experts of the pool

    def deltas(w: np.ndarray) -> np.ndarray:  # w (b, n) -> (b,)
        ec = w @ pool_cost  # (b, M') expert mean costs on each resample
        lo, hi = ec.min(axis=1), ec.max(axis=1)
        wt = np.ascontiguousarray(w.T)  # (n, b): one transpose shared by the four products
        return _audc_of_points(xa(w, wt), ya(w, wt), lo, hi) - _audc_of_points(xb(w, wt), yb(w, wt), lo, hi)

    full = float(deltas(np.full((1, n), 1.0 / n))[0])
    rng = np.random.default_rng(seed)
    step = max(1, min(resamples, chunk_elems // max(n, 1)))
    out = np.empty(resamples)
    for s in range(0, resamples, step):
        size = min(step, resamples - s)
        out[s : s + size] = deltas(resample_weights(n, size, rng))
    lo_ci, hi_ci = np.percentile(out, [2.5, 97.5])
    return BootstrapResult(full, float(lo_ci), float(hi_ci), float((out <= 0).mean()), resamples)


def binom_two_sided_half(k: int, n: int) -> float:
    """Exact two-sided p of k successes in n trials with p = 1/2: min(1, 2 P(X <= min(k, n-k)))."""
    _check(0 <= k <= n, f"need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return 1.0
    m = min(k, n - k)
    # log C(n, j) - n log 2, summed in log space (stable for large n)
    logs = np.array([math.lgamma(n + 1) - math.lgamma(j + 1) - math.lgamma(n - j + 1) for j in range(m + 1)])
    logs -= n * math.log(2.0)
    top = logs.max()
    tail = math.exp(top) * float(np.exp(logs - top).sum())
    return min(1.0, 2.0 * tail)


def mcnemar_exact(correct_a: np.ndarray, correct_b: np.ndarray) -> McNemarResult:
    """McNemar's exact test on paired per-prompt correctness (n,) bool arrays."""
    a = np.asarray(correct_a, dtype=bool)
    b = np.asarray(correct_b, dtype=bool)
    _check(a.ndim == 1 and a.shape == b.shape, f"correctness must be two (n,) arrays, got {a.shape}, {b.shape}")
    a_only = int((a & ~b).sum())
    b_only = int((~a & b).sum())
    return McNemarResult(a_only, b_only, binom_two_sided_half(a_only, a_only + b_only))


def point_at_budget(costs: np.ndarray, qualities: np.ndarray, budget: float) -> int | None:
    """Index of the operating point with the highest quality at mean cost <= budget (the cheaper
    one on ties); None when every point costs more."""
    costs = np.asarray(costs, dtype=np.float64)
    qualities = np.asarray(qualities, dtype=np.float64)
    _check(costs.ndim == 1 and costs.shape == qualities.shape, "costs and qualities must be (L,) of one shape")
    ok = np.flatnonzero(costs <= budget * (1 + 1e-12) + 1e-300)
    if ok.size == 0:
        return None
    best = ok[qualities[ok] == qualities[ok].max()]
    return int(best[np.argmin(costs[best])])
