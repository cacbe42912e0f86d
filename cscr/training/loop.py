"""The one epoch loop (SPEC.md section 4) and its steps, over plain data.

``run_epochs`` is the only loop that trains a head: ``fit_head`` (cscr/training/fit.py) runs it
in one process, and the Ray Train worker of jobs/train.py runs it on its shard of every epoch
(``rank`` / ``world``) with a DDP-wrapped ``model`` and its own ``on_epoch`` hook (report and
checkpoint). What differs between them is passed in, never branched on here:

* ``validate(head) -> float | None``: the epoch's validation score (AUDC; None: no validation,
  the best epoch is then the lowest train loss). cscr/training/validation.py builds the default;
* ``on_epoch(state)``: called after each epoch with the TrainState (checkpoints, reports);
* ``extra``: fields added to each epoch's record (workers, nodes, attempt).

A variant picks the loss: ``cscr`` (cost-spectrum, the config's bands / gamma / alpha) or
``vanilla`` (B = 1, gamma = 0, alpha = 0: multi-positive InfoNCE at temperature tau_min). A head
with quality utilities (beyond the write-up) adds ``bce_weight * BCE`` of its quality map to the
InfoNCE (cscr/losses.py), and ``regret_weight`` times that map's routing regret where it is set
(off by default). The best epoch is the one with the best trailing mean of ``cfg.select_window``
epochs' validation AUDC (1: its own AUDC).
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import torch

from cscr.config import LossConfig, TrainConfig
from cscr.head import Head
from cscr.losses import cost_bands, cost_spectrum_infonce, quality_bce, routing_regret
from cscr.training.arrays import TrainArrays

VARIANTS = ("cscr", "vanilla")
Log = Callable[[str], None]
Validator = Callable[[Head], "float | None"]


def variant_config(cfg: TrainConfig, variant: str) -> TrainConfig:
    """The config a variant trains with: ``vanilla`` = one band, no cost penalty, fixed temperature."""
    if variant == "cscr":
        return cfg
    if variant == "vanilla":
        # the cost-spectrum terms off; everything else (the quality BCE, its targets, the category task) kept
        return dataclasses.replace(cfg, loss=dataclasses.replace(cfg.loss, bands=1, alpha=0.0, gamma=0.0))
    raise ValueError(f"unknown training variant {variant!r}; expected one of {VARIANTS}")


@dataclass
class TrainState:
    """What a checkpoint holds: resume from it and the run continues exactly."""

    epoch: int = 0  # epochs completed
    model: dict[str, Any] | None = None  # head state_dict
    optimizer: dict[str, Any] | None = None  # AdamW state_dict
    best_epoch: int = -1  # 1-based epoch of the best validation score (-1: none yet)
    best_score: float = float("-inf")  # validation AUDC (or -train loss without val prompts)
    best_model: dict[str, Any] | None = None  # head state_dict of the best epoch
    history: list[dict[str, Any]] = field(default_factory=list)  # one dict per epoch

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @staticmethod
    def from_dict(d: Mapping[str, Any]) -> TrainState:
        return TrainState(**dict(d))


def head_for(arrays: TrainArrays, cfg: TrainConfig) -> Head:
    """A fresh head of the right widths (in: embedding width, out: descriptor width), seeded."""
    head_cfg = dataclasses.replace(cfg.head, in_dim=int(arrays.x.shape[1]), out_dim=int(arrays.descriptors.shape[1]),
                                   categories=category_count(arrays, cfg))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return Head(head_cfg)


def category_count(arrays: TrainArrays, cfg: TrainConfig) -> int:
    """Categories of the head's auxiliary classifier: the train split's, when ``loss.category_weight`` > 0
    and the table has more than one; else 0 (no classifier)."""
    if cfg.loss.category_weight <= 0 or arrays.category_ids is None:
        return 0
    n = len(arrays.meta.get("categories", [])) or int(arrays.category_ids.max(initial=-1)) + 1
    return n if n > 1 else 0


def init_training(arrays: TrainArrays, cfg: TrainConfig, state: TrainState | None = None,
                  device: torch.device | str = "cpu") -> tuple[Head, torch.optim.Optimizer, TrainState]:
    """(head, AdamW, state); with ``state`` the head and optimizer continue from it."""
    head = head_for(arrays, cfg).to(device)
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    state = state or TrainState()
    if state.model is not None:
        head.load_state_dict(state.model)
    if state.optimizer is not None:
        opt.load_state_dict(state.optimizer)
    return head, opt, state


@dataclass
class Tensors:
    """TrainArrays on a device (built once per loop)."""

    x: torch.Tensor  # (n, d)
    positives: torch.Tensor  # (n, M) bool
    observed: torch.Tensor  # (n, M) bool
    descriptors: torch.Tensor  # (M, D')
    costs: torch.Tensor  # (M,)
    bands: torch.Tensor  # (M,) int64 band ids
    quality: torch.Tensor  # (n, M) float32 BCE targets (0 where missing)
    categories: torch.Tensor | None = None  # (n,) int64 category ids (the auxiliary category loss)
    # (n, M) float32 what the routing regret scores a choice by (``loss.regret_on``: the recorded quality
    # or the BCE's targets), 0 where missing; None when the regret is off
    outcome: torch.Tensor | None = None

    @staticmethod
    def of(arrays: TrainArrays, cfg: TrainConfig, device: torch.device | str = "cpu") -> Tensors:
        quality = torch.from_numpy(bce_targets(arrays, cfg.loss.category_smoothing)).to(device)
        outcome = None  # the routing regret's: off, the BCE's targets themselves, or the recorded quality
        if cfg.loss.regret_weight > 0:
            outcome = quality if cfg.loss.regret_on == "targets" else torch.from_numpy(bce_targets(arrays)).to(device)
        return Tensors(
            x=torch.from_numpy(arrays.x).to(device),
            positives=torch.from_numpy(arrays.positives).to(device),
            observed=torch.from_numpy(arrays.observed).to(device),
            descriptors=torch.from_numpy(arrays.descriptors).to(device),
            costs=torch.from_numpy(arrays.costs.astype(np.float32)).to(device),
            bands=cost_bands(arrays.costs, cfg.loss.bands).to(device),
            quality=quality,
            categories=None if category_count(arrays, cfg) == 0 else torch.from_numpy(arrays.category_ids).to(device),
            outcome=outcome,
        )


def bce_targets(arrays: TrainArrays, smoothing: float = 0.0) -> np.ndarray:
    """(n, M) float32 targets of the quality BCE: each cell's quality (the positives on arrays without
    one), shrunk towards its category's mean quality by ``smoothing`` (the category mean carries the
    task's signal with less noise than one 0/1 answer; 0 leaves the cells as they are)."""
    own = arrays.quality if arrays.quality is not None else arrays.positives.astype(np.float32)  # (n, M)
    if smoothing <= 0 or arrays.category_quality is None:
        return np.ascontiguousarray(own, dtype=np.float32)
    return ((1.0 - smoothing) * own + smoothing * arrays.category_quality).astype(np.float32)  # (n, M)


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, rank: int = 0, world: int = 1) -> list[np.ndarray]:
    """Index batches of one epoch for worker ``rank`` of ``world``: one seeded permutation per epoch
    shared by every worker, cut into equal shards (every worker takes the same number of steps,
    as DDP requires), then into batches of ``ceil(batch_size / world)``: the global batch stays
    ``batch_size`` whatever the number of workers."""
    if n < world:
        raise ValueError(f"{n} train prompts cannot be shared by {world} workers")
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    per = n // world
    shard = perm[rank * per:(rank + 1) * per]
    local = max(1, -(-batch_size // world))
    return [shard[s:s + local] for s in range(0, per, local)]


def train_epoch(model: torch.nn.Module, opt: torch.optim.Optimizer, t: Tensors, batches: Sequence[np.ndarray],
                loss_cfg: LossConfig) -> dict[str, float]:
    """One pass over ``batches`` (index arrays into ``t``); ``model`` may be a DDP wrapper."""
    model.train()
    total, count = 0.0, 0
    t0 = time.perf_counter()
    for idx in batches:
        ib = torch.from_numpy(idx).to(t.x.device)
        q = model(t.x[ib])  # (b, D') unit queries; an ensemble: (K, b, D'), one block per member
        parts = cast(Head, getattr(model, "module", model)).parts()  # a DDP wrapper holds the head as .module
        qs = q if q.ndim == 3 else q[None]  # (K, b, D')
        loss = q.new_zeros(())
        for k, member in enumerate(parts):  # each member on its own loss (their sum: independent gradients)
            loss = loss + cost_spectrum_infonce(qs[k], t.descriptors, t.positives[ib], t.costs, t.bands,
                                                loss_cfg.tau_min, loss_cfg.alpha, loss_cfg.gamma, t.observed[ib])
            if loss_cfg.bce_weight > 0:
                logits = member.logits(qs[k], t.descriptors)  # (b, M) the quality map's logits
                loss = loss + loss_cfg.bce_weight * quality_bce(logits, t.quality[ib], t.observed[ib])
                if loss_cfg.regret_weight > 0 and t.outcome is not None:
                    loss = loss + loss_cfg.regret_weight * routing_regret(
                        logits, t.outcome[ib], t.observed[ib], t.costs, loss_cfg.regret_temperature)
            if loss_cfg.category_weight > 0 and t.categories is not None:
                loss = loss + loss_cfg.category_weight * torch.nn.functional.cross_entropy(
                    member.category_logits(qs[k]), t.categories[ib])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total += float(loss.detach()) * len(idx)
        count += len(idx)
    seconds = time.perf_counter() - t0
    return {"train_loss": total / max(count, 1), "prompts": float(count), "train_seconds": seconds}


def record_epoch(state: TrainState, head: Head, opt: torch.optim.Optimizer, metrics: dict[str, Any],
                 window: int = 1) -> TrainState:
    """Append the epoch's metrics, advance the epoch, keep the best head (by the trailing mean of
    ``window`` epochs' val AUDC, else -loss)."""
    state.epoch += 1
    metrics = {"epoch": state.epoch, **metrics}
    score = metrics.get("val_audc")
    if score is None:
        score = -float(metrics["train_loss"])
    else:
        recent = [h["val_audc"] for h in state.history[-(window - 1):] if h.get("val_audc") is not None] \
            if window > 1 else []
        score = float(np.mean([*recent, float(score)]))
        metrics["val_select"] = score
    if score > state.best_score:
        state.best_score, state.best_epoch = score, state.epoch
        state.best_model = copy.deepcopy({k: v.detach().cpu() for k, v in head.state_dict().items()})
    metrics["best_epoch"] = state.best_epoch
    state.history.append(metrics)
    state.model = {k: v.detach().cpu() for k, v in head.state_dict().items()}
    state.optimizer = opt.state_dict()
    return state


def epoch_line(variant: str, m: Mapping[str, Any], epochs: int) -> str:
    val = "n/a" if m.get("val_audc") is None else f"{m['val_audc']:.4f}"
    return (f"train[{variant}] epoch {m['epoch']}/{epochs}: loss {m['train_loss']:.4f}, val AUDC {val}, "
            f"{m['prompts'] / max(m['train_seconds'], 1e-9):,.0f} prompts/s, best epoch {m['best_epoch']}")


def run_epochs(arrays: TrainArrays, cfg: TrainConfig, head: Head, opt: torch.optim.Optimizer, state: TrainState,
               validate: Validator | None, *, variant: str = "cscr", model: torch.nn.Module | None = None,
               rank: int = 0, world: int = 1, extra: Mapping[str, Any] | None = None,
               on_epoch: Callable[[TrainState], None] | None = None, log: Log | None = None) -> TrainState:
    """Train from ``state.epoch`` to ``cfg.epochs``: the one epoch loop of every trainer.

    ``cfg`` is the variant's config (``variant_config``); ``head`` and ``opt`` come from
    ``init_training``; ``model`` is what the forward pass runs (``head`` itself, or a DDP wrapper
    of it); worker ``rank`` of ``world`` trains its shard of each epoch's permutation.
    ``validate(head)`` scores the epoch (None: not validated on this worker). After each epoch
    the record is logged (``log``) and ``on_epoch(state)`` is called.
    """
    model = head if model is None else model
    t = Tensors.of(arrays, cfg, next(head.parameters()).device)
    for epoch in range(state.epoch, cfg.epochs):
        t0 = time.perf_counter()
        batches = epoch_batches(arrays.n, cfg.batch_size, cfg.seed, epoch, rank, world)
        with torch.random.fork_rng(devices=[]):  # dropout: seeded per epoch, so a resumed run continues exactly
            torch.manual_seed(int(np.random.SeedSequence([cfg.seed, epoch, rank]).generate_state(1)[0]))
            m: dict[str, Any] = train_epoch(model, opt, t, batches, cfg.loss)
        m["prompts"] = m["prompts"] * world  # every worker trains an equal shard
        m["val_audc"] = validate(head) if validate is not None else None
        m["epoch_seconds"] = time.perf_counter() - t0
        m.update(extra or {})
        state = record_epoch(state, head, opt, m, cfg.select_window)
        if log:
            log(epoch_line(variant, state.history[-1], cfg.epochs))
        if on_epoch:
            on_epoch(state)
    return state


@dataclass
class TrainResult:
    head: Head  # the best epoch's head, eval mode
    config: TrainConfig  # the variant's config (head widths set)
    variant: str
    history: list[dict[str, Any]]
    best_epoch: int
    best_val_audc: float | None
    meta: dict[str, Any]


def result_from_state(state: TrainState, arrays: TrainArrays, cfg: TrainConfig, variant: str) -> TrainResult:
    """The best epoch's head and the run's record, from a finished TrainState."""
    cfg = variant_config(cfg, variant)
    head = head_for(arrays, cfg)
    head.load_state_dict(state.best_model if state.best_model is not None else state.model)  # type: ignore[arg-type]
    head.eval()
    best = next((h for h in state.history if h["epoch"] == state.best_epoch), {})
    cfg = dataclasses.replace(cfg, head=head.cfg)
    return TrainResult(head, cfg, variant, list(state.history), state.best_epoch, best.get("val_audc"),
                       dict(arrays.meta, experts=list(arrays.expert_names)))
