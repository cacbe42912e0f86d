"""Shared machinery of the neural baselines (parametric, softmax-gate, soft-moe).

One small MLP over the frozen prompt embedding (``in_dim -> hidden -> M``), one seeded
mini-batch loop (AdamW, early stopping on validation loss, best weights restored) and one
``NeuralRouter`` base class. A subclass says only what differs: its training targets
(``targets``), its loss on a batch (``loss``) and how logits become utilities
(``to_utilities``). Everything runs inside ``torch.random.fork_rng`` seeded from the router's
seed, so fitting is reproducible and never disturbs the caller's global torch RNG.
"""

from __future__ import annotations

import copy
from abc import abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from cscr.config import ConfigError, from_dict
from cscr.data.table import RoutingTable
from cscr.routers.base import Router, RouterContext, RouterError


@dataclass(frozen=True)
class NNConfig:
    hidden: int = 256  # hidden width of the MLP
    dropout: float = 0.1  # dropout after the hidden layer
    lr: float = 1e-3  # AdamW learning rate
    weight_decay: float = 1e-4  # AdamW weight decay
    batch_size: int = 128  # prompts per step
    max_epochs: int = 60  # upper bound on passes over the train prompts
    patience: int = 6  # epochs without a validation-loss improvement before stopping
    val_fraction: float = 0.1  # share of train held out for early stopping when ctx has no val rows
    threads: int | None = 1  # torch intra-op threads while training (a tiny MLP is fastest on one); None: as set

    def __post_init__(self) -> None:
        if self.hidden < 1 or self.batch_size < 1 or self.max_epochs < 1 or self.patience < 1:
            raise ConfigError("hidden, batch_size, max_epochs and patience must be >= 1")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.lr <= 0 or self.weight_decay < 0:
            raise ConfigError(f"lr must be > 0 and weight_decay >= 0, got {self.lr}, {self.weight_decay}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"threads must be >= 1 or None, got {self.threads}")
        if not 0.0 < self.val_fraction < 0.5:
            raise ConfigError(f"val_fraction must be in (0, 0.5), got {self.val_fraction}")


class MLP(nn.Module):
    """``in_dim -> hidden -> out_dim`` with GELU and dropout; outputs raw logits."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int = 256, dropout: float = 0.1) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(hidden, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, in_dim) -> (B, out_dim)
        return self.net(x)


LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (logits (B, M), targets (B, ...)) -> scalar


def _batched_loss(model: nn.Module, loss_fn: LossFn, x: torch.Tensor, y: torch.Tensor, bs: int) -> float:
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(x), bs):
            xb, yb = x[s:s + bs], y[s:s + bs]
            total += float(loss_fn(model(xb), yb)) * len(xb)
            count += len(xb)
    return total / max(count, 1)


def train_mlp(x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
              loss_fn: LossFn, out_dim: int, cfg: NNConfig, seed: int = 0) -> tuple[MLP, list[dict[str, float]]]:
    """Train an MLP on (x, y) with early stopping on the validation loss; returns (best model, history).

    ``y`` arrays are whatever ``loss_fn`` expects as targets (float (n, M) or int (n,)).
    """
    if len(x_train) == 0:
        raise RouterError("no training prompts to fit on")
    threads = torch.get_num_threads()
    try:
        if cfg.threads is not None:
            torch.set_num_threads(cfg.threads)
        return _train(x_train, y_train, x_val, y_val, loss_fn, out_dim, cfg, seed)
    finally:
        torch.set_num_threads(threads)


def _train(x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
           loss_fn: LossFn, out_dim: int, cfg: NNConfig, seed: int) -> tuple[MLP, list[dict[str, float]]]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        model = MLP(x_train.shape[1], out_dim, cfg.hidden, cfg.dropout)
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        xt, yt = torch.as_tensor(x_train, dtype=torch.float32), torch.as_tensor(y_train)
        xv, yv = torch.as_tensor(x_val, dtype=torch.float32), torch.as_tensor(y_val)
        best, best_state, bad, history = float("inf"), copy.deepcopy(model.state_dict()), 0, []
        for epoch in range(cfg.max_epochs):
            model.train()
            perm = torch.randperm(len(xt), generator=gen)
            tr_total = 0.0
            for s in range(0, len(xt), cfg.batch_size):
                idx = perm[s:s + cfg.batch_size]
                loss = loss_fn(model(xt[idx]), yt[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                tr_total += float(loss.detach()) * len(idx)
            val = _batched_loss(model, loss_fn, xv, yv, 4096) if len(xv) else tr_total / len(xt)
            history.append({"epoch": epoch, "train_loss": tr_total / len(xt), "val_loss": val})
            if val < best - 1e-5:
                best, best_state, bad = val, copy.deepcopy(model.state_dict()), 0
            else:
                bad += 1
                if bad >= cfg.patience:
                    break
        model.load_state_dict(best_state)
        model.eval()
    return model, history


def predict_logits(model: nn.Module, x: np.ndarray, batch: int = 8192) -> np.ndarray:
    """(n, out_dim) float64 logits."""
    model.eval()
    out = []
    with torch.no_grad():
        for s in range(0, max(len(x), 1), batch):  # an empty input still gives (0, out_dim)
            out.append(model(torch.as_tensor(x[s:s + batch], dtype=torch.float32)).numpy())
    return np.concatenate(out).astype(np.float64)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of (n, M) logits."""
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


class NeuralRouter(Router):
    """Base of the MLP baselines: fit trains on train rows, stops early on validation rows."""

    def __init__(self, **nn_kwargs: Any) -> None:
        super().__init__()
        self.cfg = from_dict(NNConfig, nn_kwargs)  # unknown keys refused by name
        self.model: MLP | None = None
        self.history: list[dict[str, float]] = []

    # ---- what a subclass defines ----
    @abstractmethod
    def targets(self, table: RoutingTable, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(kept rows, targets for those rows) in the form ``loss`` expects."""

    @abstractmethod
    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Scalar loss of a batch."""

    @abstractmethod
    def to_utilities(self, logits: np.ndarray) -> np.ndarray:
        """(n, M) utilities from (n, M) logits."""

    # ---- shared ----
    def fit(self, ctx: RouterContext) -> NeuralRouter:
        super().fit(ctx)
        train, val = np.asarray(ctx.train_rows), np.asarray(ctx.val_rows)
        if len(val) == 0:  # carve a seeded early-stopping split out of train
            perm = np.random.default_rng(ctx.seed).permutation(train)
            n_val = max(1, int(round(self.cfg.val_fraction * len(train))))
            val, train = np.sort(perm[:n_val]), np.sort(perm[n_val:])
        tr_rows, y_tr = self.targets(ctx.table, train)
        va_rows, y_va = self.targets(ctx.table, val)
        if len(tr_rows) == 0:
            raise RouterError(f"router {self.name!r}: no train prompt has a usable target")
        emb = np.asarray(ctx.embeddings, dtype=np.float32)
        self.model, self.history = train_mlp(emb[tr_rows], y_tr, emb[va_rows], y_va, self.loss,
                                             len(self.expert_names), self.cfg, ctx.seed)
        return self

    def utilities(self, emb: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
        self.check_fitted()
        assert self.model is not None
        return self.to_utilities(predict_logits(self.model, np.asarray(emb, dtype=np.float32)))
