"""The training inputs as plain arrays (SPEC.md section 4): what every training loop consumes.

``prepare_arrays(table, emb, descriptors, ...) -> TrainArrays``: numpy arrays only, so that a
Ray worker receives them once through the object store (jobs/train.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cscr.data.table import RoutingTable, category_means
from cscr.losses import positives_from_quality


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
    quality: np.ndarray | None = None  # (n, M) float32 quality in [0, 1], 0 where missing (the BCE target)
    # (n, M) float32 each train prompt's category mean quality per expert (over the whole train split,
    # prompts without a positive included; an expert never seen in the category: its overall mean)
    category_quality: np.ndarray | None = None
    # (n,) int64 each train prompt's category, an index into meta["categories"] (the auxiliary
    # category loss's target; one category when the table has none)
    category_ids: np.ndarray | None = None

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
    if not pos_np.any():
        raise ValueError("no train prompt has a positive expert (every quality is 0 or missing)")
    # every prompt with an observed cell: one nobody answered well has no positive (the InfoNCE skips it)
    # but teaches the quality map that such prompts fail everywhere (cheap experts are then as good)
    keep = obs_np.any(axis=1)
    quality = np.nan_to_num(table.quality[train][keep].astype(np.float32), nan=0.0)  # (n, M) masked by observed
    cats, groups = np.unique(np.asarray(table.categories[train], dtype=str), return_inverse=True)
    means, overall = category_means(table.quality[train], groups.reshape(-1), len(cats))  # (G, M), (M,)
    means = np.where(np.isnan(means), overall[None, :], means)  # (G, M)
    val = table.split_index("val")
    val = val[~np.isnan(table.quality[val]).any(axis=1)]
    return TrainArrays(
        x=np.ascontiguousarray(emb[train][keep], dtype=np.float32),
        positives=pos_np[keep], observed=obs_np[keep], descriptors=desc.astype(np.float32),
        costs=table.expert_costs(train).astype(np.float64), expert_names=list(names),
        val_x=np.ascontiguousarray(emb[val], dtype=np.float32),
        val_quality=table.quality[val], val_cost=table.cost[val],
        meta={"descriptor_kind": descriptor_kind, "basis_id": basis_id, "n_train": int(train.size),
              "n_train_with_positive": int(pos_np.any(axis=1).sum()), "n_val": int(val.size), "source": table.source,
              "categories": [str(c) for c in cats]},
        quality=np.clip(quality, 0.0, 1.0),
        category_quality=np.clip(means[groups.reshape(-1)][keep], 0.0, 1.0).astype(np.float32),
        category_ids=groups.reshape(-1)[keep].astype(np.int64),
    )
