"""Softmax-gate baseline: a classifier over the pool trained on the cheapest adequate expert.

An MLP over the frozen prompt embedding (``cscr.routers._nn``) has one output head per expert
and a softmax over them, trained with cross-entropy on one label per train prompt: the
cheapest expert (by the normalised train cost c_m) among the prompt's positives, where
positives follow the same rule as the CSCR loss: ``Q[x, m] >= max_m Q[x, m] - tolerance``
(0/1 data: the correct experts). Prompts without a sure label are skipped: those with no
positive (every expert wrong, i.e. best quality 0: labelling them with an arbitrary "best"
would teach the gate noise), and those whose label a missing cell could change (a missing
expert cheaper than the label, or a missing cell while the best observed quality is below 1);
a missing cell is thus never read as a wrong answer. Utilities are the softmax probabilities (not log-probabilities), so lambda
trades against the same [0, 1] scale as the parametric router's p and Soft-MoE's w; with
log-probabilities a confident gate would ignore any moderate lambda. Routing:
``argmax_m w_m(x) - lambda * c_m``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from cscr.data.table import RoutingTable
from cscr.routers._nn import NeuralRouter, softmax
from cscr.routers.base import RouterError, register


def cheapest_positive(quality: np.ndarray, costs: np.ndarray, tolerance: float = 0.0) -> np.ndarray:
    """(n,) label per prompt: the cheapest positive expert, -1 where there is no usable label.

    quality: (n, M) in [0, 1], NaN = missing; costs: (M,). No usable label: no positive, or a
    missing cell could change the answer (a missing expert cheaper than the label, or any
    missing cell while the best observed quality is below 1 and could be beaten).
    """
    miss = np.isnan(quality)  # (n, M)
    q = np.where(miss, -np.inf, quality)  # (n, M) missing never positive
    best = q.max(axis=1, initial=-np.inf)  # (n,)
    pos = (q >= best[:, None] - tolerance) & (best[:, None] > 0)  # (n, M)
    label = np.argmin(np.where(pos, costs[None, :], np.inf), axis=1)  # (n,)
    cheaper_missing = (miss & (costs[None, :] < costs[label][:, None])).any(axis=1)  # (n,)
    beatable = miss.any(axis=1) & (best < 1.0)  # (n,)
    return np.where(pos.any(axis=1) & ~cheaper_missing & ~beatable, label, -1)


@register("softmax-gate")
class SoftmaxGateRouter(NeuralRouter):
    def __init__(self, tolerance: float = 0.0, **nn_kwargs: Any) -> None:
        super().__init__(**nn_kwargs)
        if not 0.0 <= tolerance <= 1.0:
            raise RouterError(f"tolerance must be in [0, 1], got {tolerance}")
        self.tolerance = tolerance

    def targets(self, table: RoutingTable, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        label = cheapest_positive(table.quality[rows], self.costs, self.tolerance)
        keep = label >= 0
        return rows[keep], label[keep].astype(np.int64)

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, targets)

    def to_utilities(self, logits: np.ndarray) -> np.ndarray:
        return softmax(logits)  # (n, M) gate probabilities
