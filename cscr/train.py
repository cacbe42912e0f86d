"""Training the routing head (SPEC.md section 4): the plain single-process loop and its parts.

The parts are plain functions over plain data so that the Ray Train worker (jobs/train.py) runs
exactly the same steps on its shard of the data:

* ``prepare_arrays(table, emb, descriptors, ...) -> TrainArrays``: everything a worker needs as
  numpy arrays (picklable; shipped once through the Ray object store);
* ``init_training(arrays, cfg)`` -> (head, optimizer, TrainState); ``epoch_batches`` (seeded,
  sharded by rank); ``train_epoch`` (one pass, AdamW on the cost-spectrum loss);
  ``validation_audc`` (the CSCR router on the validation prompts, AUDC of its deferral curve);
  ``record_epoch`` (history and the best epoch); ``TrainState.to_dict``/``from_dict`` (checkpoints).
* ``fit_head`` runs them in one process; ``train_run`` does it for a run folder and saves the best
  epoch's head (cscr/trained.py).

A variant picks the loss: ``cscr`` (cost-spectrum, the config's bands / gamma / alpha) or
``vanilla`` (B = 1, gamma = 0, alpha = 0: multi-positive InfoNCE at temperature tau_min).
"""

from __future__ import annotations

import copy
import dataclasses
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from cscr.config import LossConfig, TrainConfig
from cscr.data.table import RoutingTable
from cscr.head import Head
from cscr.losses import cost_bands, cost_spectrum_infonce, positives_from_quality

VARIANTS = ("cscr", "vanilla")
Log = Callable[[str], None]


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def variant_config(cfg: TrainConfig, variant: str) -> TrainConfig:
    """The config a variant trains with: ``vanilla`` = one band, no cost penalty, fixed temperature."""
    if variant == "cscr":
        return cfg
    if variant == "vanilla":
        loss = LossConfig(bands=1, tau_min=cfg.loss.tau_min, alpha=0.0, gamma=0.0, tolerance=cfg.loss.tolerance)
        return dataclasses.replace(cfg, loss=loss)
    raise ValueError(f"unknown training variant {variant!r}; expected one of {VARIANTS}")


@dataclass
class TrainArrays:
    """The training inputs as plain arrays (train prompts with >= 1 positive; complete val rows)."""

    x: np.ndarray  # (n, d) float32 train prompt embeddings
    positives: np.ndarray  # (n, M) bool P(i)
    observed: np.ndarray  # (n, M) bool, False for a missing quality cell
    descriptors: np.ndarray  # (M, D') float32 expert descriptors, unit rows
    costs: np.ndarray  # (M,) float64 c_m in [0, 1]
    expert_names: list[str]  # (M,)
    val_x: np.ndarray  # (v, d) float32 validation prompt embeddings (rows with every cell)
    val_quality: np.ndarray  # (v, M) float64
    val_cost: np.ndarray  # (v, M) float64
    meta: dict[str, Any] = field(default_factory=dict)  # descriptor kind, basis id, counts

    @property
    def n(self) -> int:
        return int(self.x.shape[0])


def prepare_arrays(table: RoutingTable, emb: np.ndarray, descriptors: Mapping[str, np.ndarray],
                   tolerance: float = 0.0, descriptor_kind: str = "", basis_id: str = "") -> TrainArrays:
    """Train arrays from a table, its embeddings (table.n, d) and one descriptor per table expert."""
    if emb.shape[0] != table.n:
        raise ValueError(f"embeddings have {emb.shape[0]} rows, the table has {table.n}")
    names = table.expert_names
    missing = [n for n in names if n not in descriptors]
    if missing:
        raise ValueError(f"no descriptor for expert(s) {missing}")
    desc = np.stack([np.asarray(descriptors[n], dtype=np.float32).reshape(-1) for n in names])  # (M, D')
    if len({v.size for v in desc}) > 1:
        raise ValueError("expert descriptors differ in dimension")
    desc = desc / np.maximum(np.linalg.norm(desc, axis=1, keepdims=True), 1e-12)
    train = table.split_index("train")
    if train.size == 0:
        raise ValueError("the table has no train prompts")
    pos, obs = positives_from_quality(table.quality[train], tolerance)
    pos_np, obs_np = pos.numpy(), obs.numpy()
    keep = pos_np.any(axis=1)  # prompts without a positive are skipped by the loss anyway
    if not keep.any():
        raise ValueError("no train prompt has a positive expert (every quality is 0 or missing)")
    val = table.split_index("val")
    val = val[~np.isnan(table.quality[val]).any(axis=1)]
    return TrainArrays(
        x=np.ascontiguousarray(emb[train][keep], dtype=np.float32),
        positives=pos_np[keep], observed=obs_np[keep], descriptors=desc.astype(np.float32),
        costs=table.expert_costs(train).astype(np.float64), expert_names=list(names),
        val_x=np.ascontiguousarray(emb[val], dtype=np.float32),
        val_quality=table.quality[val], val_cost=table.cost[val],
        meta={"descriptor_kind": descriptor_kind, "basis_id": basis_id, "n_train": int(train.size),
              "n_train_with_positive": int(keep.sum()), "n_val": int(val.size), "source": table.source},
    )


# ---------------------------------------------------------------- the steps of one training run

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
    head_cfg = dataclasses.replace(cfg.head, in_dim=int(arrays.x.shape[1]), out_dim=int(arrays.descriptors.shape[1]))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return Head(head_cfg)


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
    """TrainArrays on a device (built once per worker)."""

    x: torch.Tensor  # (n, d)
    positives: torch.Tensor  # (n, M) bool
    observed: torch.Tensor  # (n, M) bool
    descriptors: torch.Tensor  # (M, D')
    costs: torch.Tensor  # (M,)
    bands: torch.Tensor  # (M,) int64 band ids

    @staticmethod
    def of(arrays: TrainArrays, cfg: TrainConfig, device: torch.device | str = "cpu") -> Tensors:
        return Tensors(
            x=torch.from_numpy(arrays.x).to(device),
            positives=torch.from_numpy(arrays.positives).to(device),
            observed=torch.from_numpy(arrays.observed).to(device),
            descriptors=torch.from_numpy(arrays.descriptors).to(device),
            costs=torch.from_numpy(arrays.costs.astype(np.float32)).to(device),
            bands=cost_bands(arrays.costs, cfg.loss.bands).to(device),
        )


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
        q = model(t.x[ib])  # (b, D') unit queries
        loss = cost_spectrum_infonce(q, t.descriptors, t.positives[ib], t.costs, t.bands,
                                     loss_cfg.tau_min, loss_cfg.alpha, loss_cfg.gamma, t.observed[ib])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total += float(loss.detach()) * len(idx)
        count += len(idx)
    seconds = time.perf_counter() - t0
    return {"train_loss": total / max(count, 1), "prompts": float(count), "train_seconds": seconds}


def validation_audc(head: Head, arrays: TrainArrays, top_k: int, n_lambdas: int = 100) -> float | None:
    """AUDC of the CSCR router (this head, top-k) on the validation prompts; None without any."""
    if arrays.val_x.shape[0] == 0:
        return None
    from cscr.eval import metrics as M
    from cscr.routers.cscr import CSCRRouter

    router = CSCRRouter.from_parts(head, dict(zip(arrays.expert_names, arrays.descriptors, strict=True)),
                                   dict(zip(arrays.expert_names, arrays.costs, strict=True)), top_k=top_k,
                                   use_gpu=False)
    lambdas = router.knob_grid(arrays.val_x, n_lambdas)
    choices = router.route_sweep(arrays.val_x, lambdas)
    x, y = M.operating_points(choices, arrays.val_quality, arrays.val_cost)
    lo, hi = M.pool_range(arrays.val_cost.mean(axis=0))
    return M.audc(M.deferral_curve(x, y), lo, hi)


def record_epoch(state: TrainState, head: Head, opt: torch.optim.Optimizer, metrics: dict[str, Any]) -> TrainState:
    """Append the epoch's metrics, advance the epoch, keep the best head (by val AUDC, else -loss)."""
    state.epoch += 1
    metrics = {"epoch": state.epoch, **metrics}
    score = metrics.get("val_audc")
    score = -float(metrics["train_loss"]) if score is None else float(score)
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


@dataclass
class TrainResult:
    head: Head  # the best epoch's head, eval mode
    config: TrainConfig  # the variant's config (head widths set)
    variant: str
    history: list[dict[str, Any]]
    best_epoch: int
    best_val_audc: float | None
    meta: dict[str, Any]


def fit_head(arrays: TrainArrays, cfg: TrainConfig | None = None, variant: str = "cscr",
             log: Log | None = _stderr, state: TrainState | None = None,
             on_epoch: Callable[[TrainState], None] | None = None) -> TrainResult:
    """The plain single-process loop: ``cfg.epochs`` epochs, validation AUDC after each, best kept."""
    cfg = variant_config(cfg or TrainConfig(), variant)
    head, opt, state = init_training(arrays, cfg, state)
    t = Tensors.of(arrays, cfg)
    for epoch in range(state.epoch, cfg.epochs):
        t0 = time.perf_counter()
        m: dict[str, Any] = train_epoch(head, opt, t, epoch_batches(arrays.n, cfg.batch_size, cfg.seed, epoch), cfg.loss)
        m["val_audc"] = validation_audc(head, arrays, cfg.index.top_k)
        m["epoch_seconds"] = time.perf_counter() - t0
        state = record_epoch(state, head, opt, m)
        if log:
            log(epoch_line(variant, state.history[-1], cfg.epochs))
        if on_epoch:
            on_epoch(state)
    return result_from_state(state, arrays, cfg, variant)


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


# ---------------------------------------------------------------- a run folder

def train_run(run_dir: str, variant: str = "cscr", cfg: TrainConfig | None = None,
              descriptor_kind: str | None = None, log: Log | None = _stderr) -> TrainResult:
    """Load the run's table, embeddings and descriptors, train with the plain loop, save the head."""
    from cscr.trained import load_training_arrays, save_trained

    cfg = cfg or TrainConfig()
    arrays = load_training_arrays(run_dir, cfg.loss.tolerance, descriptor_kind, log=log)
    if log:
        log(f"train[{variant}]: {arrays.n} train prompts with a positive, {arrays.val_x.shape[0]} val prompts, "
            f"{len(arrays.expert_names)} experts, {arrays.meta['descriptor_kind']} descriptors "
            f"(D' = {arrays.descriptors.shape[1]}), plain loop")
    result = fit_head(arrays, cfg, variant, log=log)
    path = save_trained(run_dir, result)
    if log:
        log(f"train[{variant}]: best epoch {result.best_epoch} (val AUDC {result.best_val_audc}); saved {path}")
    return result


def load_trained(run_dir: str, variant: str = "cscr") -> Any:
    """``cscr.trained.load_trained``: the trained head of a variant in a run folder."""
    from cscr.trained import load_trained as _load

    return _load(run_dir, variant)
