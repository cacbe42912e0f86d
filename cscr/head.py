"""The routing head g_theta (SPEC.md section 3): a two-layer MLP over the frozen prompt embedding.

    q = normalize( g_theta( Phi(x) ) ),   g_theta: in_dim -> hidden -> D'  (GELU or ReLU)

D' is the descriptor width, so that ``q . d_m`` compares a prompt with an expert's fingerprint.

With ``cfg.utility == "quality"`` (beyond the write-up, labelled so) the head also holds the
descriptor-conditioned quality map ``P(good | x, m) = sigmoid(a * q.d_m + w.d_m + b)``: one shared
slope ``a = exp(log_scale)`` and a bias computed from the descriptor by one linear map, so an
expert unseen in training still gets its utility from its descriptor alone.

With ``cfg.members = K > 1`` the head is an ensemble (variance reduction, beyond the write-up):
K such heads, each from its own initialisation, trained together (each on its own loss) and
combined by averaging what the router scores, which stays linear in the descriptor: the routing
query is ``mean_k q_k`` (similarity) or ``mean_k a_k q_k`` with bias ``mean_k b_k(d_m)`` (the
quality logits are averaged), so one FAISS search still ranks the experts.
"""

from __future__ import annotations

import dataclasses

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
        if self.cfg.members > 1:
            one = dataclasses.replace(self.cfg, members=1)
            self.members = nn.ModuleList([Head(one) for _ in range(self.cfg.members)])
            return
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
            if self.cfg.query_map:
                self.query_proj = nn.Linear(self.cfg.out_dim, self.cfg.out_dim, bias=False)  # P, from the identity
                with torch.no_grad():
                    self.query_proj.weight.copy_(torch.eye(self.cfg.out_dim))
        if self.cfg.categories > 0:  # the auxiliary category classifier (training only)
            self.category_map = nn.Linear(self.cfg.out_dim, self.cfg.categories)

    def parts(self) -> list[Head]:
        """The single heads: the ensemble's members, or [self]."""
        return list(self.members) if self.cfg.members > 1 else [self]  # type: ignore[arg-type]

    def forward(self, x: Tensor) -> Tensor:
        """(N, D') unit queries; an ensemble gives (K, N, D'), one row block per member."""
        if self.cfg.members > 1:
            return torch.stack([m(x) for m in self.parts()])  # (K, N, D')
        z = self.net(x)  # (N, D')
        return nn.functional.normalize(z, dim=-1)  # (N, D') unit rows

    def logits(self, q: Tensor, e: Tensor) -> Tensor:
        """(N, M) quality logits ``a * q.d_m + b(d_m)`` for unit queries (N, D') and descriptors (M, D')
        (a single head; an ensemble's members are its ``parts()``)."""
        if self.cfg.utility != "quality" or self.cfg.members > 1:
            raise ValueError("this head has no single quality map (utility 'similarity', or an ensemble: "
                             "use its parts())")
        bias = self.bias_map(e).squeeze(-1)  # (M,)
        return quality_logits(self.quality_query(q), e, self.log_scale.exp(), bias)  # (N, M)

    def category_logits(self, q: Tensor) -> Tensor:
        """(N, C) logits of the prompt's category from unit queries (N, D') (a single head with
        ``cfg.categories > 0``): the auxiliary task of ``loss.category_weight``."""
        if self.cfg.categories < 1 or self.cfg.members > 1:
            raise ValueError("this head has no single category map (categories 0, or an ensemble: use its parts())")
        return self.category_map(q)  # type: ignore[no-any-return]

    def quality_query(self, q: Tensor) -> Tensor:
        """(N, D') what the quality map compares with the descriptors: ``P q`` with a query map, else ``q``."""
        return self.query_proj(q) if self.cfg.utility == "quality" and self.cfg.query_map else q

    @torch.no_grad()
    def quality_map(self, descriptors: np.ndarray) -> tuple[float, np.ndarray]:
        """(a, (M,) biases b(d_m)) of the quality map for descriptors (M, D'), as numpy; an ensemble:
        (1, mean_k b_k(d_m)), its slopes being folded into ``encode``'s query."""
        if self.cfg.members > 1:
            return 1.0, np.mean([m.quality_map(descriptors)[1] for m in self.parts()], axis=0)
        e = torch.from_numpy(np.asarray(descriptors, dtype=np.float32)).to(self.log_scale.device)  # (M, D')
        return float(self.log_scale.exp()), self.bias_map(e).squeeze(-1).double().cpu().numpy()

    def _routing_query(self, x: Tensor) -> Tensor:
        """(N, D') what the router searches with: the unit query, or an ensemble's combination."""
        if self.cfg.members == 1:
            return self.quality_query(self(x))  # (N, D')
        qs = self(x)  # (K, N, D')
        if self.cfg.utility == "quality":
            scales = torch.stack([m.log_scale.exp() for m in self.parts()])  # (K,)
            mapped = torch.stack([m.quality_query(qs[k]) for k, m in enumerate(self.parts())])  # (K, N, D')
            return (scales[:, None, None] * mapped).mean(0)  # (N, D') mean_k a_k P_k q_k
        return qs.mean(0)  # (N, D')

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
            out[s:s + batch_size] = self._routing_query(xb).float().cpu().numpy()  # (b, D')
        self.train(was_training)
        return out
