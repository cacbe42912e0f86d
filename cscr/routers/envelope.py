"""Knob sweeps through each prompt's upper envelope: exact and fast.

For one prompt, ``argmax_m u_m - lambda * p_m`` as a function of lambda >= 0 is the upper
envelope of M lines: it starts at the best expert (the cheapest among equal utilities) and
moves to cheaper experts at breakpoints. Walking that envelope costs at most M - 1 vectorised
steps over (n, M); the choices for a whole grid of L knob values then follow from the
breakpoints by a searchsorted and a cumulative sum, O(L n) with no per-lambda argmax over
experts. Same choices as the per-lambda argmax, except possibly at a knob value exactly equal
to a breakpoint (two experts with equal score; either is a correct argmax). At lambda == 0
exactly, the first expert of highest utility is chosen, as ``np.argmax`` does.

``score`` is the one place the knob meets the utilities (``u - lambda * pen``); the envelope
walk is its exact vectorised form over every lambda at once.
"""

from __future__ import annotations

import numpy as np


def score(u: np.ndarray, pen: np.ndarray, lam: float | np.ndarray) -> np.ndarray:
    """``u - lam * pen``: utilities net of the cost knob times the penalty (broadcasting)."""
    return u - lam * pen


def walk_envelope(u: np.ndarray, pen: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each prompt's envelope: start (n,), breakpoints (S, n) and experts (S, n).

    u: (n, M) utilities, -inf = excluded (every row needs a finite entry); pen: (M,) or (n, M).
    ``bps[s, i]`` is the lambda at which prompt i moves to ``exps[s, i]`` (inf: no more moves);
    non-decreasing in s. S <= M - 1.
    """
    u = np.asarray(u, dtype=np.float64)
    n, m = u.shape
    pen = np.broadcast_to(np.asarray(pen, dtype=np.float64), (n, m))
    finite = np.isfinite(u)
    if not finite.any(axis=1).all():
        raise ValueError("every prompt needs at least one expert with a finite utility")
    umax = np.where(finite, u, -np.inf).max(axis=1, keepdims=True)  # (n, 1)
    start = np.argmin(np.where(finite & (u == umax), pen, np.inf), axis=1)  # (n,) cheapest of the best
    cur, lam_cur = start.copy(), np.zeros(n)
    live = np.arange(n)  # prompts whose envelope may still move
    bps, exps = [], []
    for _ in range(m - 1):
        uu, pp, ff = u[live], pen[live], finite[live]  # (k, M) the live prompts only
        rr = np.arange(len(live))
        c = cur[live]
        dp = pp[rr, c][:, None] - pp  # (k, M) how much cheaper each expert is
        cand = ff & (dp > 0)
        lam = np.where(cand, (uu[rr, c][:, None] - uu) / np.where(cand, dp, 1.0), np.inf)  # (k, M) crossings
        lam = np.maximum(lam, lam_cur[live][:, None])
        best = lam.min(axis=1)  # (k,)
        moves = np.isfinite(best)
        if not moves.any():
            break
        tie = cand & (lam == best[:, None])
        nxt = np.argmin(np.where(tie, pp, np.inf), axis=1)  # on ties, the cheapest
        live, best, nxt = live[moves], best[moves], nxt[moves]
        bp_s = np.full(n, np.inf)
        bp_s[live] = best
        cur[live] = nxt
        lam_cur[live] = best
        bps.append(bp_s)
        exps.append(cur.copy())
    if not bps:
        return start, np.zeros((0, n)), np.zeros((0, n), dtype=np.int64)
    return start, np.stack(bps), np.stack(exps)


def breakpoints(u: np.ndarray, pen: np.ndarray) -> np.ndarray:
    """Sorted unique lambdas > 0 at which some prompt's choice changes."""
    _, bps, _ = walk_envelope(u, pen)
    bp = np.unique(bps[np.isfinite(bps)])
    return bp[bp > 0]


def sweep_choices(u: np.ndarray, pen: np.ndarray, lambdas: np.ndarray) -> np.ndarray:
    """(L, n) ``argmax_m u - lambda * pen`` for every lambda (>= 0) in ``lambdas``."""
    lambdas = np.asarray(lambdas, dtype=np.float64)
    n = u.shape[0]
    if len(lambdas) <= 2:  # one or two decisions (serving): the plain argmax is cheaper
        out = np.empty((len(lambdas), n), dtype=np.int64)
        for i, lam in enumerate(lambdas):
            out[i] = np.argmax(score(u, pen, lam), axis=1)
        return out
    start, bps, exps = walk_envelope(u, pen)
    order = np.argsort(lambdas, kind="stable")
    ls = lambdas[order]  # (L,) sorted
    n_l = len(ls)
    prev = start
    cols = np.arange(n)
    inc = np.zeros((n_l + 1) * n, dtype=np.int32)  # (L + 1, n) flattened: change of expert index
    for s in range(bps.shape[0]):
        moved = np.isfinite(bps[s])
        pos = np.searchsorted(ls, bps[s][moved], side="right")  # first sorted knob value past the breakpoint
        inc[pos * n + cols[moved]] += (exps[s] - prev)[moved].astype(np.int32)  # one entry per prompt: no repeats
        prev = exps[s]
    sorted_choices = np.cumsum(inc.reshape(n_l + 1, n)[:n_l], axis=0, dtype=np.int32)  # (L, n)
    sorted_choices += start.astype(np.int32)[None, :]
    if (order == np.arange(n_l)).all():
        out = sorted_choices.astype(np.int64)
    else:
        out = np.empty((n_l, n), dtype=np.int64)
        out[order] = sorted_choices
    zero = lambdas == 0
    if zero.any():
        out[zero] = np.argmax(np.asarray(u, dtype=np.float64), axis=1)
    return out


def knob_grid_values(u: np.ndarray, pen: np.ndarray, n: int) -> np.ndarray:
    """At most ``n`` (>= 2) sorted knob values that realise a sweep's distinct choices: 0, the
    midpoint between each two consecutive breakpoints, and one past the last breakpoint (every
    prompt at its cheapest option). Between two breakpoints no choice changes, so these values
    trace the whole curve exactly; with more gaps than ``n - 2``, that many of them, evenly
    spaced by rank (the last value is always kept)."""
    bp = breakpoints(u, pen)
    if bp.size == 0:
        return np.zeros(1)
    mids = (bp[:-1] + bp[1:]) / 2.0
    if mids.size > n - 2:
        mids = mids[np.unique(np.linspace(0, mids.size - 1, max(n - 2, 0)).round().astype(np.int64))]
    return np.concatenate([[0.0], mids, [bp[-1] * 1.001 + 1e-9]])
