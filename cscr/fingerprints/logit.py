"""Logit footprints (SPEC.md section 2), for open-weights experts.

    d_logit(h) = normalize( 1/(N T) * sum_i sum_t [ p_h(v_k | x_i, t) ]_{k=1..K} )

``LogitFootprintUDF`` is a Ray Data UDF class (model loaded in ``__init__``, one batch of probes
per ``__call__``) that never imports Ray: it returns, per probe, the mean over the T steps of
the K basis probabilities; ``footprint_from_rows`` averages those over probes and normalises.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from cscr.fingerprints.basis import TokenBasis
from cscr.llm import make_backend


def l2_normalize(v: np.ndarray, what: str = "descriptor") -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    norm = float(np.linalg.norm(v))
    if not np.isfinite(norm) or norm == 0.0:
        raise ValueError(f"{what} is zero or not finite; cannot normalise")
    return v / norm


def footprint_from_probs(probs: np.ndarray) -> np.ndarray:
    """(N, T, K) basis probabilities -> the unit (K,) footprint."""
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 3:
        raise ValueError(f"expected (N, T, K) probabilities, got shape {probs.shape}")
    return l2_normalize(probs.mean(axis=(0, 1)), "logit footprint")


def footprint_from_rows(step_means: np.ndarray) -> np.ndarray:
    """(N, K) per-probe means over T steps (every probe has T steps) -> the unit footprint."""
    step_means = np.asarray(step_means, dtype=np.float64)
    if step_means.ndim != 2:
        raise ValueError(f"expected (N, K) per-probe means, got shape {step_means.shape}")
    return l2_normalize(step_means.mean(axis=0), "logit footprint")


def logit_footprint(backend: Any, probes: Sequence[str], basis: TokenBasis, steps: int = 10) -> np.ndarray:
    """The footprint of the backend's model on the probes (no Ray)."""
    ids = basis.token_ids(backend.tokenizer)
    return footprint_from_probs(backend.next_token_distributions(list(probes), steps, ids))


class LogitFootprintUDF:
    """Ray Data UDF: batch {"probe_id", "text", ...} -> the other input columns, "expert" and
    "step_mean" (B, K): each probe's basis probabilities averaged over the T steps."""

    def __init__(self, expert: str, model: str, basis: Sequence[str], steps: int = 10,
                 backend: str = "transformers", backend_kwargs: dict[str, Any] | None = None) -> None:
        self.expert = expert
        self.steps = steps
        self.basis = TokenBasis(tuple(basis))
        self.backend = make_backend(backend, model, **(backend_kwargs or {}))
        self.token_ids = self.basis.token_ids(self.backend.tokenizer)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        texts = [str(t) for t in batch["text"]]
        probs = self.backend.next_token_distributions(texts, self.steps, self.token_ids)  # (B, T, K)
        out = {k: np.asarray(v) for k, v in batch.items() if k != "text"}
        out["expert"] = np.array([self.expert] * len(texts), dtype=object)
        out["step_mean"] = probs.mean(axis=1)  # (B, K)
        return out
