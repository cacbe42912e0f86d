"""The routing head g_theta (SPEC.md section 3): a two-layer MLP over the frozen prompt embedding.

    q = normalize( g_theta( Phi(x) ) ),   g_theta: in_dim -> hidden -> D'  (GELU or ReLU)

D' is the descriptor width, so that ``q . d_m`` compares a prompt with an expert's fingerprint.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from cscr.config import HeadConfig


class Head(nn.Module):
    """Two-layer MLP with a unit-norm output (the routing query)."""

    def __init__(self, cfg: HeadConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg or HeadConfig()
        act: nn.Module = nn.GELU() if self.cfg.activation == "gelu" else nn.ReLU()
        self.net = nn.Sequential(
            nn.Linear(self.cfg.in_dim, self.cfg.hidden),
            act,
            nn.Dropout(self.cfg.dropout),
            nn.Linear(self.cfg.hidden, self.cfg.out_dim),
        )

    def forward(self, x: Tensor) -> Tensor:
        z = self.net(x)  # (N, D')
        return nn.functional.normalize(z, dim=-1)  # (N, D') unit rows

    @torch.no_grad()
    def encode(self, emb: np.ndarray, batch_size: int = 8192) -> np.ndarray:
        """(n, D') float32 unit queries for prompt embeddings (n, in_dim), in eval mode, batched."""
        emb = np.asarray(emb, dtype=np.float32)
        if emb.ndim != 2 or emb.shape[1] != self.cfg.in_dim:
            raise ValueError(f"head expects prompt embeddings of shape (n, {self.cfg.in_dim}), got {emb.shape}")
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        out = np.empty((emb.shape[0], self.cfg.out_dim), dtype=np.float32)
        for s in range(0, emb.shape[0], batch_size):
            xb = torch.from_numpy(emb[s:s + batch_size]).to(device)  # (b, in_dim)
            out[s:s + batch_size] = self(xb).float().cpu().numpy()  # (b, D')
        self.train(was_training)
        return out
