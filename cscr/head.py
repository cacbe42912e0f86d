"""The routing head g_theta (SPEC.md section 3): a two-layer MLP over the frozen prompt embedding.

    q = normalize( g_theta( Phi(x) ) ),   g_theta: in_dim -> hidden -> D'  (GELU or ReLU)

D' is the descriptor width, so that ``q . d_m`` compares a prompt with an expert's fingerprint.

With ``cfg.utility == "quality"`` (beyond the write-up, labelled so) the head also holds the
descriptor-conditioned quality map ``P(good | x, m) = sigmoid(a * q.d_m + w.d_m + b)``: one shared
slope ``a = exp(log_scale)`` and a bias computed from the descriptor by one linear map, so an
expert unseen in training still gets its utility from its descriptor alone.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from cscr.config import HeadConfig
from cscr.losses import quality_logits

#: initial shared slope a of the quality map (cosines in [-1, 1] reach probabilities near 0 and 1)
INIT_SCALE = 10.0


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
        if self.cfg.utility == "quality":
            self.log_scale = nn.Parameter(torch.tensor(float(np.log(INIT_SCALE))))  # () log a
            self.bias_map = nn.Linear(self.cfg.out_dim, 1)  # d_m -> bias b(d_m)
            nn.init.zeros_(self.bias_map.weight)
            nn.init.zeros_(self.bias_map.bias)

    def forward(self, x: Tensor) -> Tensor:
        z = self.net(x)  # (N, D')
        return nn.functional.normalize(z, dim=-1)  # (N, D') unit rows

    def logits(self, q: Tensor, e: Tensor) -> Tensor:
        """(N, M) quality logits ``a * q.d_m + b(d_m)`` for unit queries (N, D') and descriptors (M, D')."""
        if self.cfg.utility != "quality":
            raise ValueError("this head scores similarities (utility 'similarity'): it has no quality map")
        bias = self.bias_map(e).squeeze(-1)  # (M,)
        return quality_logits(q, e, self.log_scale.exp(), bias)  # (N, M)

    @torch.no_grad()
    def quality_map(self, descriptors: np.ndarray) -> tuple[float, np.ndarray]:
        """(a, (M,) biases b(d_m)) of the quality map for descriptors (M, D'), as numpy."""
        e = torch.from_numpy(np.asarray(descriptors, dtype=np.float32)).to(self.log_scale.device)  # (M, D')
        return float(self.log_scale.exp()), self.bias_map(e).squeeze(-1).double().cpu().numpy()

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
