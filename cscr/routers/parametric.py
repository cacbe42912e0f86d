"""Parametric baseline: one sigmoid output per expert predicting its quality on the prompt.

An MLP over the frozen prompt embedding (``cscr.routers._nn``) has M outputs; output m is
trained with binary cross-entropy against ``Q[x, m]`` on the train prompts, graded quality
used as a soft target (a score of 0.7 is a 0.7 probability of "correct"). Missing cells are
masked out of the loss (never read as 0); a prompt with every cell missing contributes
nothing. Training stops early on the validation prompts' masked BCE. Routing:
``argmax_m p_m(x) - lambda * c_m`` with ``p_m = sigmoid(logit_m)``, so utilities are the
predicted probabilities of being correct, on the same [0, 1] scale as quality.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from cscr.data.table import RoutingTable
from cscr.routers._nn import NeuralRouter
from cscr.routers.base import register


@register("parametric")
class ParametricRouter(NeuralRouter):
    def targets(self, table: RoutingTable, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        q = table.quality[rows]  # (n, M), NaN = missing (kept: the loss masks it)
        keep = ~np.isnan(q).all(axis=1)
        return rows[keep], q[keep].astype(np.float32)

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        mask = ~torch.isnan(targets)  # (B, M) observed cells
        bce = F.binary_cross_entropy_with_logits(logits, torch.nan_to_num(targets), reduction="none")  # (B, M)
        return (bce * mask).sum() / mask.sum().clamp(min=1)

    def to_utilities(self, logits: np.ndarray) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-logits))  # (n, M) predicted P(correct)
