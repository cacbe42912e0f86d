"""Calibrated utilities: router scores mapped into expected quality (beyond the write-up).

CSCR scores a prompt-expert pair by a similarity ``s = q . d_m`` and routes by
``s - lambda * c_m``: a cosine minus a cost, units that do not match (SPEC.md section 5 allows,
labelled, utilities calibrated into expected quality). This module fits monotone maps
``f(s) ~ P(correct)`` on VALIDATION prompts (never test) and applies them, so the knob trades
expected quality against cost:

    r(x) = argmax_m  f_m(q . d_m)  -  lambda * c_m

* per expert where validation answers exist (at least ``min_count`` observed cells);
* a SHARED map fitted on every expert's validation pairs, used for experts without enough
  answers, so a new expert still joins by its descriptor alone (no answers, no retraining).

Two families: ``isotonic`` (pool-adjacent-violators, then linear interpolation between the
fitted blocks, so the map is continuous and non-decreasing) and ``logistic`` (``sigmoid(a s +
b)`` with ``a >= 0``, Newton steps with a small ridge). Excluded scores (``-inf``, e.g. outside
CSCR's top-k) stay ``-inf``. Pure numpy; a fitted calibration is a small dict (``to_dict`` /
``from_dict``) a run can store beside its head.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

METHODS = ("isotonic", "logistic")


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


# ---------------------------------------------------------------- one map

def isotonic_fit(s: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Knots (xs, ys) of the non-decreasing least-squares fit of y (n,) on s (n,): one knot per
    pooled block (its mean score, its mean target); interpolate linearly between them."""
    s = np.asarray(s, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    _check(s.ndim == 1 and s.shape == y.shape and s.size > 0, f"s and y must be non-empty (n,), got {s.shape}, {y.shape}")
    order = np.argsort(s, kind="stable")
    xs_in, ys_in = s[order], y[order]
    # blocks: running (sum of y, sum of s, count); merge while the last two violate monotonicity
    sy: list[float] = []
    sx: list[float] = []
    cnt: list[float] = []
    for xv, yv in zip(xs_in, ys_in, strict=True):
        sy.append(float(yv))
        sx.append(float(xv))
        cnt.append(1.0)
        while len(sy) > 1 and sy[-2] / cnt[-2] >= sy[-1] / cnt[-1]:
            y_last, x_last, c_last = sy.pop(), sx.pop(), cnt.pop()
            sy[-1] += y_last
            sx[-1] += x_last
            cnt[-1] += c_last
    c = np.array(cnt)
    return np.array(sx) / c, np.array(sy) / c


def logistic_fit(s: np.ndarray, y: np.ndarray, ridge: float = 1e-3, steps: int = 50) -> tuple[float, float]:
    """(a, b) of ``sigmoid(a s + b)`` fitted to y (n,) in [0, 1] on s (n,) by Newton steps on the
    cross-entropy plus ``ridge * a**2``; a is clipped at 0 (the map never decreases)."""
    s = np.asarray(s, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    _check(s.ndim == 1 and s.shape == y.shape and s.size > 0, f"s and y must be non-empty (n,), got {s.shape}, {y.shape}")
    mu, sd = float(s.mean()), float(s.std()) or 1.0
    z = (s - mu) / sd  # standardised for a well-conditioned Newton step
    x = np.stack([z, np.ones_like(z)], axis=1)  # (n, 2)
    w = np.zeros(2)
    pen = np.array([ridge * len(s), 1e-9 * len(s)])
    for _ in range(steps):
        p = 1.0 / (1.0 + np.exp(-(x @ w)))
        grad = x.T @ (p - y) + pen * w
        hess = (x * (p * (1 - p))[:, None]).T @ x + np.diag(pen)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-10:
            break
    a = max(float(w[0]), 0.0) / sd
    return a, float(w[1]) - a * mu


@dataclass(frozen=True)
class MonotoneMap:
    """A fitted non-decreasing map from score to expected quality."""

    method: str  # isotonic | logistic
    params: tuple[float, ...]  # logistic: (a, b); isotonic: knots x then knots y, flattened
    n: int  # pairs it was fitted on

    @staticmethod
    def fit(s: np.ndarray, y: np.ndarray, method: str = "isotonic") -> MonotoneMap:
        _check(method in METHODS, f"calibration method must be one of {METHODS}, got {method!r}")
        if method == "logistic":
            return MonotoneMap(method, logistic_fit(s, y), int(np.size(s)))
        xs, ys = isotonic_fit(s, y)
        return MonotoneMap(method, tuple(np.concatenate([xs, ys]).tolist()), int(np.size(s)))

    def __call__(self, s: np.ndarray) -> np.ndarray:
        s = np.asarray(s, dtype=np.float64)
        finite = np.isfinite(s)
        safe = np.where(finite, s, 0.0)
        if self.method == "logistic":
            a, b = self.params
            out = 1.0 / (1.0 + np.exp(-(a * safe + b)))
        else:
            k = len(self.params) // 2
            out = np.interp(safe, np.asarray(self.params[:k]), np.asarray(self.params[k:]))  # flat outside
        return np.where(finite, out, -np.inf)


# ---------------------------------------------------------------- per expert, with a shared fallback

@dataclass(frozen=True)
class Calibration:
    """Per-expert maps (where validation answers exist) and the shared map for every other expert."""

    shared: MonotoneMap
    per_expert: Mapping[str, MonotoneMap] = field(default_factory=dict)

    @staticmethod
    def fit(scores: np.ndarray, quality: np.ndarray, expert_names: Sequence[str], method: str = "isotonic",
            min_count: int = 30, per_expert: bool = True) -> Calibration:
        """Fit on validation scores (v, M) (``-inf`` = not scored) and quality (v, M) (NaN =
        missing); pairs with a non-finite score or a missing quality are left out."""
        scores = np.asarray(scores, dtype=np.float64)
        quality = np.asarray(quality, dtype=np.float64)
        _check(scores.ndim == 2 and scores.shape == quality.shape,
               f"scores and quality must be (v, M) of one shape, got {scores.shape}, {quality.shape}")
        _check(scores.shape[1] == len(expert_names), f"{scores.shape[1]} score columns for {len(expert_names)} experts")
        ok = np.isfinite(scores) & ~np.isnan(quality)
        _check(bool(ok.any()), "no validation pair with both a finite score and a quality: nothing to calibrate on")
        shared = MonotoneMap.fit(scores[ok], quality[ok], method)
        maps = {}
        if per_expert:
            for j, name in enumerate(expert_names):
                if ok[:, j].sum() >= min_count:
                    maps[str(name)] = MonotoneMap.fit(scores[ok[:, j], j], quality[ok[:, j], j], method)
        return Calibration(shared, maps)

    def apply(self, scores: np.ndarray, expert_names: Sequence[str]) -> np.ndarray:
        """(n, M) expected quality of scores (n, M) for the named experts (in column order);
        an expert without its own map uses the shared one; ``-inf`` stays ``-inf``."""
        scores = np.asarray(scores, dtype=np.float64)
        _check(scores.ndim == 2 and scores.shape[1] == len(expert_names),
               f"scores must be (n, {len(expert_names)}), got {scores.shape}")
        out = np.empty_like(scores)
        for j, name in enumerate(expert_names):
            out[:, j] = self.per_expert.get(str(name), self.shared)(scores[:, j])
        return out

    def to_dict(self) -> dict[str, Any]:
        def one(m: MonotoneMap) -> dict[str, Any]:
            return {"method": m.method, "params": list(m.params), "n": m.n}

        return {"shared": one(self.shared), "per_expert": {k: one(v) for k, v in self.per_expert.items()}}

    @staticmethod
    def from_dict(d: Mapping[str, Any]) -> Calibration:
        def one(x: Mapping[str, Any]) -> MonotoneMap:
            _check(x.get("method") in METHODS, f"unknown calibration method {x.get('method')!r}")
            return MonotoneMap(str(x["method"]), tuple(float(v) for v in x["params"]), int(x["n"]))

        return Calibration(one(d["shared"]), {k: one(v) for k, v in d.get("per_expert", {}).items()})
