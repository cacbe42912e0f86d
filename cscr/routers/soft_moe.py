"""Soft-MoE baseline: a soft gate trained to maximise the expected quality of its mixture.

An MLP over the frozen prompt embedding (``cscr.routers._nn``) gives gate weights
``w(x) = softmax(logits)`` over the pool, trained to maximise ``sum_m w_m(x) Q[x, m]`` on the
train prompts (the loss is its negative mean). Missing cells are masked, not read as 0: the
softmax is taken over the prompt's observed experts only, i.e. the objective is the expected
quality given that an expert with a known answer is drawn, so a missing cell neither rewards
nor penalises its expert. Graded quality enters as is. Training stops early on the
validation prompts' loss. Routing: ``argmax_m w_m(x) - lambda * c_m``; utilities are the gate
weights over the whole pool.
"""

from __future__ import annotations

import numpy as np
import torch

from cscr.data.table import RoutingTable
from cscr.routers._nn import NeuralRouter, softmax
from cscr.routers.base import register


@register("soft-moe")
class SoftMoERouter(NeuralRouter):
    def targets(self, table: RoutingTable, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        q = table.quality[rows]  # (n, M), NaN = missing
        keep = ~np.isnan(q).all(axis=1)
        return rows[keep], q[keep].astype(np.float32)

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        mask = ~torch.isnan(targets)  # (B, M) observed cells
        w = torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=1)  # (B, M) over observed experts
        expected = (w * torch.nan_to_num(targets)).sum(dim=1)  # (B,)
        return -expected.mean()

    def to_utilities(self, logits: np.ndarray) -> np.ndarray:
        return softmax(logits)  # (n, M) gate weights
