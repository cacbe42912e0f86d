"""Deferral-curve metrics (SPEC.md section 6): pure numpy functions with shape checks.

Notation: n test prompts, M experts, L knob values, B curves in a batch.

* Operating point of a knob value: mean over prompts of ``C[i, choice_i]`` and ``Q[i, choice_i]``.
* Curve: the least concave, non-decreasing majorant of the operating points, starting at the
  router's own cheapest point. It is the best mean quality reachable with mean cost <= b by
  randomising between operating points: the upper convex hull, linearly interpolated, cut at
  its highest vertex and held flat to the right.
* AUDC: the area under the curve over the pool's cost range ``[lo, hi]`` (cheapest and most
  expensive single expert by mean test cost), divided by ``hi - lo``. Integration is clipped to
  ``[max(lo, x0), hi]`` where ``x0`` is the router's cheapest point: there is no area left of
  ``x0`` (and none left of ``lo`` for a router that can be cheaper than every single expert,
  such as the oracle), and a curve that goes on right of ``hi`` is cut there. So a
  constant-quality curve starting at ``lo`` has AUDC equal to that quality, and
  ``0 <= AUDC <= peak``. A degenerate pool (``hi == lo``) gets the curve's value at ``hi``
  (0 when the router cannot reach that cost).
* Peak: the highest quality on the curve (its last vertex); cost at peak: the least mean cost
  at which the curve reaches it.
* QNC: the least mean cost at which the curve reaches a target quality (the best single
  expert's mean test quality); ``None`` when it never does.

Second ruler (``audc_paper``, the write-up's, for comparison with published tables): the raw
operating points (no hull), linearly interpolated on a shared grid of 25 costs from the pool's
cheapest to its most expensive expert, held flat left of the router's cheapest point and right
of its dearest, trapezoid area over the grid width. Unlike AUDC it credits a router for costs
left of its cheapest point. The first ruler (AUDC) is the one that decides.

The hull is computed for a whole batch of point sets at once (``hull_batch``) so that the paired
bootstrap (cscr/eval/significance.py) uses exactly the same code as the point estimate.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: tolerance for "the curve reaches the target quality" (mean qualities are exact averages)
REACH_TOL = 1e-12


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def check_table_arrays(quality: np.ndarray, cost: np.ndarray) -> None:
    """Both (n, M), same shape, cost finite; quality without NaN (missing rows dropped first)."""
    _check(quality.ndim == 2, f"quality must be (n, M), got shape {quality.shape}")
    _check(cost.shape == quality.shape, f"cost shape {cost.shape} != quality shape {quality.shape}")
    _check(quality.shape[0] > 0 and quality.shape[1] > 0, f"empty table arrays {quality.shape}")
    _check(not np.isnan(quality).any(), "quality has missing cells: drop those prompts before evaluation")
    _check(bool(np.isfinite(cost).all()), "cost has NaN or infinite cells")


def _as_choices(choices: np.ndarray, n: int, m: int) -> np.ndarray:
    """Validated (L, n) int choices from (L, n) or (n,)."""
    choices = np.asarray(choices)
    if choices.ndim == 1:
        choices = choices[None, :]
    _check(choices.ndim == 2 and choices.shape[1] == n, f"choices must be (L, {n}), got shape {choices.shape}")
    _check(np.issubdtype(choices.dtype, np.integer), f"choices must be integers, got {choices.dtype}")
    if choices.size and (choices.min() < 0 or choices.max() >= m):
        raise ValueError(f"choices must be expert indices in [0, {m}), got [{choices.min()}, {choices.max()}]")
    return choices


def _flat_index(choices: np.ndarray, n: int, m: int) -> np.ndarray:
    """(L, n) indices into an (n, M) array's ravel()."""
    choices = _as_choices(choices, n, m)
    dt = np.int32 if n * m < 2**31 else np.int64
    offsets: np.ndarray = (np.arange(n) * m).astype(dt)  # (n,) start of each prompt's row
    return np.add(choices.astype(dt, copy=False), offsets[None, :])


def gather(values: np.ndarray, choices: np.ndarray) -> np.ndarray:
    """(L, n) ``values[i, choices[l, i]]`` for values (n, M) and int choices (L, n) or (n,)."""
    _check(values.ndim == 2, f"values must be (n, M), got shape {values.shape}")
    return values.ravel()[_flat_index(choices, *values.shape)]


def operating_points(choices: np.ndarray, quality: np.ndarray, cost: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean cost (L,) and mean quality (L,) of the choices (L, n) over the n prompts.

    A knob sweep changes few choices from one knob value to the next, so the sums are carried
    along the sweep through the changed cells only (dense gathers when most cells change).
    """
    check_table_arrays(quality, cost)
    n, m = quality.shape
    choices = _as_choices(choices, n, m)
    n_l = choices.shape[0]
    ll, ii = np.nonzero(choices[1:] != choices[:-1])  # changed cells between consecutive knob values
    if len(ll) > n_l * n // 4:
        flat = _flat_index(choices, n, m)
        return cost.ravel()[flat].mean(axis=1), quality.ravel()[flat].mean(axis=1)
    new, old = choices[ll + 1, ii], choices[ll, ii]
    out = []
    for v in (cost, quality):
        first = v[np.arange(n), choices[0]].sum()
        step = np.bincount(ll, weights=v[ii, new] - v[ii, old], minlength=n_l - 1)  # (L - 1,) change of the sum
        out.append(np.concatenate([[first], first + np.cumsum(step)]) / n)
    return out[0], out[1]


def expert_points(quality: np.ndarray, cost: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each single expert as an operating point: mean cost (M,), mean quality (M,)."""
    check_table_arrays(quality, cost)
    return cost.mean(axis=0), quality.mean(axis=0)


# ---------------------------------------------------------------- the curve (batched)

def hull_batch(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Vertices of the non-decreasing upper concave hull of each row's points.

    x, y: (B, L) costs and qualities (L points per curve). Returns vx, vy (B, L) padded with NaN
    and count (B,): row b's vertices are ``vx[b, :count[b]]`` with strictly increasing cost and
    strictly increasing quality; the first is the cheapest point (highest quality among ties),
    the last the peak at its least cost. Monotone chain, vectorised over the batch.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.ndim == 1:
        x, y = x[None, :], y[None, :]
    _check(x.ndim == 2 and x.shape == y.shape, f"x and y must be (B, L) of one shape, got {x.shape}, {y.shape}")
    _check(x.shape[1] >= 1, "a curve needs at least one operating point")
    _check(bool(np.isfinite(x).all() and np.isfinite(y).all()), "operating points must be finite")
    b, l_ = x.shape
    order = np.lexsort((-y, x), axis=-1)  # (B, L): by cost, then quality descending
    xs = np.take_along_axis(x, order, 1)
    ys = np.take_along_axis(y, order, 1)
    sx = np.full((b, l_), np.nan)  # (B, L) stack of hull vertices
    sy = np.full((b, l_), np.nan)
    top = np.zeros(b, dtype=np.int64)  # (B,) stack sizes
    r = np.arange(b)
    for j in range(l_):
        px, py = xs[:, j], ys[:, j]  # (B,)
        while True:
            can = top >= 2
            if not can.any():
                break
            i1, i2 = np.maximum(top - 1, 0), np.maximum(top - 2, 0)
            ax, ay, bx, by = sx[r, i2], sy[r, i2], sx[r, i1], sy[r, i1]
            # pop the last vertex while it lies on or below the chord from the one before to p
            pop = can & ((bx - ax) * (py - ay) - (by - ay) * (px - ax) >= 0)
            if not pop.any():
                break
            top -= pop
        sx[r, top] = px
        sy[r, top] = py
        top += 1
    cols = np.arange(l_)[None, :]
    masked = np.where(cols < top[:, None], sy, -np.inf)
    count = np.argmax(masked, axis=1) + 1  # cut at the first (cheapest) highest vertex
    keep = cols < count[:, None]
    return np.where(keep, sx, np.nan), np.where(keep, sy, np.nan), count


def _last(v: np.ndarray, count: np.ndarray) -> np.ndarray:
    return v[np.arange(v.shape[0]), count - 1]


def curve_value_batch(vx: np.ndarray, vy: np.ndarray, count: np.ndarray, at: np.ndarray) -> np.ndarray:
    """(B,) curve value at cost ``at`` (B,); 0 left of the curve's first vertex."""
    at = np.broadcast_to(np.asarray(at, dtype=np.float64), count.shape)
    b, l_ = vx.shape
    val = np.where(at >= vx[:, 0], _last(vy, count), 0.0)  # flat right of the peak
    for j in range(l_ - 1):
        valid = j + 1 < count
        x0, x1, y0, y1 = vx[:, j], vx[:, j + 1], vy[:, j], vy[:, j + 1]
        inside = valid & (at >= x0) & (at < x1)
        t = np.where(inside, (at - x0) / np.where(inside, x1 - x0, 1.0), 0.0)
        val = np.where(inside, y0 + t * (y1 - y0), val)
    return val


def audc_batch(vx: np.ndarray, vy: np.ndarray, count: np.ndarray, lo: np.ndarray | float,
               hi: np.ndarray | float) -> np.ndarray:
    """(B,) AUDC of each curve over the pool range [lo, hi] (scalars or (B,))."""
    b, l_ = vx.shape
    lo = np.broadcast_to(np.asarray(lo, dtype=np.float64), (b,))
    hi = np.broadcast_to(np.asarray(hi, dtype=np.float64), (b,))
    _check(bool((hi >= lo).all()), "pool cost range must have hi >= lo")
    start = np.maximum(lo, vx[:, 0])  # (B,) no area left of the router's cheapest point
    area = np.zeros(b)
    for j in range(l_ - 1):
        valid = j + 1 < count
        x0, x1, y0, y1 = vx[:, j], vx[:, j + 1], vy[:, j], vy[:, j + 1]
        a = np.maximum(x0, start)
        e = np.minimum(x1, hi)
        use = valid & (e > a)
        slope = np.where(use, (y1 - y0) / np.where(use, x1 - x0, 1.0), 0.0)
        ya, ye = y0 + slope * (a - x0), y0 + slope * (e - x0)
        area += np.where(use, (e - a) * (ya + ye) / 2.0, 0.0)
    xp, yp = _last(vx, count), _last(vy, count)
    area += np.maximum(hi - np.maximum(xp, start), 0.0) * yp  # flat right of the peak
    width = hi - lo
    degenerate = width <= 0
    out = np.where(degenerate, 0.0, area / np.where(degenerate, 1.0, width))
    if degenerate.any():
        out = np.where(degenerate, curve_value_batch(vx, vy, count, hi), out)
    return out


# ---------------------------------------------------------------- one curve

@dataclass(frozen=True)
class Curve:
    """A deferral curve: vertices (strictly increasing cost and quality), flat after the last."""

    x: np.ndarray  # (V,) vertex costs
    y: np.ndarray  # (V,) vertex qualities

    def value(self, b: np.ndarray | float) -> np.ndarray:
        """Curve value at budget(s) b; 0 left of the first vertex."""
        b = np.atleast_1d(np.asarray(b, dtype=np.float64))
        out = np.interp(b, self.x, self.y)  # flat right of the last vertex
        return np.where(b < self.x[0], 0.0, out)

    def plot_xy(self, hi: float) -> tuple[np.ndarray, np.ndarray]:
        """Vertices plus the flat extension to ``hi`` (for plots and reports)."""
        if hi > self.x[-1]:
            return np.append(self.x, hi), np.append(self.y, self.y[-1])
        return self.x.copy(), self.y.copy()


def deferral_curve(costs: np.ndarray, qualities: np.ndarray) -> Curve:
    """The deferral curve of operating points costs (L,), qualities (L,)."""
    costs = np.asarray(costs, dtype=np.float64)
    qualities = np.asarray(qualities, dtype=np.float64)
    _check(costs.ndim == 1 and costs.shape == qualities.shape,
           f"costs and qualities must be (L,) of one shape, got {costs.shape}, {qualities.shape}")
    vx, vy, count = hull_batch(costs[None, :], qualities[None, :])
    k = int(count[0])
    return Curve(vx[0, :k], vy[0, :k])


def audc(curve: Curve, lo: float, hi: float) -> float:
    """Area under the curve over the pool range [lo, hi] divided by hi - lo (see module doc)."""
    return float(audc_batch(curve.x[None, :], curve.y[None, :], np.array([len(curve.x)]), lo, hi)[0])


def peak(curve: Curve) -> tuple[float, float]:
    """(highest quality on the curve, least mean cost at which it is reached)."""
    return float(curve.y[-1]), float(curve.x[-1])


def qnc(curve: Curve, target: float) -> float | None:
    """Least mean cost at which the curve reaches quality ``target``; None if it never does."""
    hit = np.flatnonzero(curve.y >= target - REACH_TOL)
    if hit.size == 0:
        return None
    k = int(hit[0])
    if k == 0:
        return float(curve.x[0])
    x0, x1, y0, y1 = curve.x[k - 1], curve.x[k], curve.y[k - 1], curve.y[k]
    return float(x0 + (target - y0) / (y1 - y0) * (x1 - x0))


def pool_range(expert_mean_cost: np.ndarray) -> tuple[float, float]:
    """(lo, hi): cheapest and most expensive single expert by mean test cost."""
    expert_mean_cost = np.asarray(expert_mean_cost, dtype=np.float64)
    _check(expert_mean_cost.ndim == 1 and expert_mean_cost.size > 0, "expert costs must be a non-empty (M,) array")
    return float(expert_mean_cost.min()), float(expert_mean_cost.max())


def best_expert(expert_mean_quality: np.ndarray, expert_mean_cost: np.ndarray) -> int:
    """Index of the single best expert: highest mean test quality, the cheaper one on ties."""
    q = np.asarray(expert_mean_quality, dtype=np.float64)
    c = np.asarray(expert_mean_cost, dtype=np.float64)
    _check(q.shape == c.shape and q.ndim == 1 and q.size > 0, "expert qualities and costs must be (M,) arrays")
    top = np.flatnonzero(q == q.max())
    return int(top[np.argmin(c[top])])


# ---------------------------------------------------------------- the second ruler

#: grid points of the write-up's AUDC
PAPER_GRID = 25


def audc_paper(costs: np.ndarray, qualities: np.ndarray, lo: float, hi: float, n_grid: int = PAPER_GRID) -> float:
    """The write-up's AUDC of operating points costs (L,), qualities (L,) over the pool range
    [lo, hi]: the raw points sorted by cost (at a repeated cost, the highest quality), linearly
    interpolated at ``n_grid`` evenly spaced costs from lo to hi, flat left of the cheapest point
    and right of the dearest; trapezoid area divided by hi - lo (the value at lo when hi == lo)."""
    x = np.asarray(costs, dtype=np.float64)
    y = np.asarray(qualities, dtype=np.float64)
    _check(x.ndim == 1 and x.shape == y.shape and x.size > 0,
           f"costs and qualities must be non-empty (L,) arrays of one shape, got {x.shape}, {y.shape}")
    _check(bool(np.isfinite(x).all() and np.isfinite(y).all()), "operating points must be finite")
    _check(bool(np.isfinite(lo) and np.isfinite(hi) and hi >= lo), f"pool cost range must have hi >= lo, got [{lo}, {hi}]")
    _check(n_grid >= 2, f"n_grid must be >= 2, got {n_grid}")
    ux, inv = np.unique(x, return_inverse=True)  # sorted distinct costs
    uy = np.full(ux.shape, -np.inf)
    np.maximum.at(uy, np.asarray(inv).ravel(), y)  # best quality at each cost
    if hi == lo:
        return float(np.interp(lo, ux, uy))
    grid = np.linspace(lo, hi, n_grid)
    v = np.interp(grid, ux, uy)  # np.interp holds the end values flat outside [ux[0], ux[-1]]
    return float(np.sum((v[1:] + v[:-1]) * np.diff(grid)) / 2.0 / (hi - lo))
