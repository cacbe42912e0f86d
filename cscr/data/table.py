"""The routing table: one schema for every data source (SPEC.md section 1).

A table holds n prompts (id, text, split, category), M experts (name, kind, parameter count,
prices), quality ``Q`` (n x M in [0, 1], NaN where missing: never silently 0), cost ``C``
(n x M, >= 0) and, where a source records them, the experts' response texts.

On disk (a folder):
  table.parquet      prompt_id, text, split, category, then q::<expert> and c::<expert> columns
  responses.parquet  (optional) prompt_id, then r::<expert> columns (answer texts, null if none)
  manifest.json      source, cost unit, experts, row counts per split, checksum, created
Written atomically: into a temporary sibling folder, then renamed into place.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cscr.atomic import atomic_dir

SPLITS = ("train", "val", "probe", "test")
EXPERT_KINDS = ("open-weights", "black-box", "recorded")
COST_UNITS = ("usd", "params")


class TableError(ValueError):
    """A routing table (or a source file) is malformed; the message names the problem."""


@dataclass(frozen=True)
class Expert:
    name: str  # unique name in the pool
    kind: str = "black-box"  # open-weights | black-box | recorded
    n_params: float | None = None  # parameter count, billions
    input_price: float | None = None  # USD per million input tokens
    output_price: float | None = None  # USD per million output tokens
    hub_id: str | None = None  # Hugging Face Hub id, where one exists

    def __post_init__(self) -> None:
        if not self.name:
            raise TableError("expert with an empty name")
        if self.kind not in EXPERT_KINDS:
            raise TableError(f"expert {self.name!r}: unknown kind {self.kind!r}; expected one of {EXPERT_KINDS}")
        for f in ("n_params", "input_price", "output_price"):
            v = getattr(self, f)
            if v is not None and (not np.isfinite(v) or v < 0):
                raise TableError(f"expert {self.name!r}: {f} must be a finite number >= 0, got {v}")


@dataclass
class RoutingTable:
    prompt_ids: np.ndarray  # (n,) str, unique
    texts: np.ndarray  # (n,) str
    splits: np.ndarray  # (n,) str in SPLITS
    categories: np.ndarray  # (n,) str ("" when unknown)
    experts: list[Expert]  # (M,)
    quality: np.ndarray  # (n, M) float64 in [0, 1], NaN = missing
    cost: np.ndarray  # (n, M) float64 >= 0
    source: str = "unknown"  # loader name and origin
    cost_unit: str = "usd"  # usd | params
    responses: np.ndarray | None = None  # (n, M) object: answer text or None
    meta: dict[str, Any] = field(default_factory=dict)  # loader notes (dropped rows, ...)

    def __post_init__(self) -> None:
        self.prompt_ids = np.asarray(self.prompt_ids, dtype=object).astype(str)
        self.texts = np.asarray(self.texts, dtype=object)
        self.splits = np.asarray(self.splits, dtype=object).astype(str)
        self.categories = np.asarray(self.categories, dtype=object).astype(str)
        self.quality = np.asarray(self.quality, dtype=np.float64)
        self.cost = np.asarray(self.cost, dtype=np.float64)
        self.validate()

    # ---- shape and content checks, one clear error per problem ----
    def validate(self) -> None:
        n, m = len(self.prompt_ids), len(self.experts)
        if n == 0:
            raise TableError("routing table has no prompts")
        if m == 0:
            raise TableError("routing table has no experts")
        for name, arr in (("texts", self.texts), ("splits", self.splits), ("categories", self.categories)):
            if arr.shape != (n,):
                raise TableError(f"{name} has shape {arr.shape}, expected ({n},)")
        for name, arr in (("quality", self.quality), ("cost", self.cost)):
            if arr.shape != (n, m):
                raise TableError(f"{name} has shape {arr.shape}, expected ({n}, {m})")
        names = [e.name for e in self.experts]
        dup = sorted({x for x in names if names.count(x) > 1})
        if dup:
            raise TableError(f"duplicate expert names: {dup}")
        ids, counts = np.unique(self.prompt_ids, return_counts=True)
        if (counts > 1).any():
            raise TableError(f"duplicate prompt ids: {list(ids[counts > 1][:5])}")
        bad_split = sorted(set(self.splits) - set(SPLITS))
        if bad_split:
            raise TableError(f"unknown split(s) {bad_split}; expected {SPLITS}")
        q = self.quality[~np.isnan(self.quality)]
        if q.size and (q.min() < 0 or q.max() > 1):
            raise TableError(f"quality outside [0, 1]: min {q.min()}, max {q.max()}")
        if not np.isfinite(self.cost).all():
            i, j = np.argwhere(~np.isfinite(self.cost))[0]
            raise TableError(f"cost is NaN or infinite for prompt {self.prompt_ids[i]!r}, expert {names[j]!r}")
        if (self.cost < 0).any():
            i, j = np.argwhere(self.cost < 0)[0]
            raise TableError(f"negative cost {self.cost[i, j]} for prompt {self.prompt_ids[i]!r}, expert {names[j]!r}")
        if self.cost_unit not in COST_UNITS:
            raise TableError(f"unknown cost unit {self.cost_unit!r}; expected {COST_UNITS}")
        if self.responses is not None and self.responses.shape != (n, m):
            raise TableError(f"responses has shape {self.responses.shape}, expected ({n}, {m})")

    # ---- views ----
    @property
    def n(self) -> int:
        return len(self.prompt_ids)

    @property
    def expert_names(self) -> list[str]:
        return [e.name for e in self.experts]

    def expert_index(self, name: str) -> int:
        names = self.expert_names
        if name not in names:
            raise KeyError(f"unknown expert {name!r}; the pool has {names}")
        return names.index(name)

    def split_index(self, *splits: str) -> np.ndarray:
        """Row indices of the given splits, in table order."""
        bad = sorted(set(splits) - set(SPLITS))
        if bad:
            raise TableError(f"unknown split(s) {bad}; expected {SPLITS}")
        return np.flatnonzero(np.isin(self.splits, list(splits)))

    def expert_costs(self, rows: np.ndarray | None = None) -> np.ndarray:
        """c_m (M,): mean cost over ``rows`` (default: train) divided by the largest such mean
        (``cost_scale``: the routers' cost unit)."""
        mean = self._mean_costs(rows)
        top = mean.max()
        return mean / top if top > 0 else np.zeros_like(mean)

    def cost_scale(self, rows: np.ndarray | None = None) -> float:
        """The largest mean cost over ``rows`` (default: train): ``expert_costs`` divides by it, and
        so must any other cost put on the routers' scale (e.g. a prompt's own cost)."""
        return float(self._mean_costs(rows).max())

    def _mean_costs(self, rows: np.ndarray | None) -> np.ndarray:
        rows = self.split_index("train") if rows is None else rows
        return self.cost[rows].mean(axis=0)

    def subset(self, rows: np.ndarray | None = None, experts: Sequence[str] | None = None) -> RoutingTable:
        """A new table with the given rows and/or experts (by name, in the given order)."""
        rows = np.arange(self.n) if rows is None else np.asarray(rows)
        cols = np.arange(len(self.experts)) if experts is None else np.array([self.expert_index(e) for e in experts])
        return RoutingTable(
            prompt_ids=self.prompt_ids[rows],
            texts=self.texts[rows],
            splits=self.splits[rows],
            categories=self.categories[rows],
            experts=[self.experts[j] for j in cols],
            quality=self.quality[np.ix_(rows, cols)],
            cost=self.cost[np.ix_(rows, cols)],
            source=self.source,
            cost_unit=self.cost_unit,
            responses=None if self.responses is None else self.responses[np.ix_(rows, cols)],
            meta=dict(self.meta),
        )

    def checksum(self) -> str:
        h = hashlib.sha256()
        for arr in (self.prompt_ids, self.texts, self.splits, self.categories):
            h.update("\x1f".join(map(str, arr)).encode())
        h.update(np.ascontiguousarray(np.nan_to_num(self.quality, nan=-1.0)).tobytes())
        h.update(np.ascontiguousarray(self.cost).tobytes())
        h.update(json.dumps([asdict(e) for e in self.experts], sort_keys=True).encode())
        return h.hexdigest()

    # ---- persistence ----
    def save(self, folder: str | os.PathLike[str]) -> Path:
        def write(tmp: Path) -> None:
            cols: dict[str, Any] = {
                "prompt_id": self.prompt_ids,
                "text": self.texts.astype(str),
                "split": self.splits,
                "category": self.categories,
            }
            for j, e in enumerate(self.experts):
                cols[f"q::{e.name}"] = self.quality[:, j]
            for j, e in enumerate(self.experts):
                cols[f"c::{e.name}"] = self.cost[:, j]
            pd.DataFrame(cols).to_parquet(tmp / "table.parquet", index=False)
            if self.responses is not None:
                rcols: dict[str, Any] = {"prompt_id": self.prompt_ids}
                for j, e in enumerate(self.experts):
                    rcols[f"r::{e.name}"] = [None if r is None else str(r) for r in self.responses[:, j]]
                pd.DataFrame(rcols).to_parquet(tmp / "responses.parquet", index=False)
            manifest = {
                "source": self.source,
                "cost_unit": self.cost_unit,
                "experts": [asdict(e) for e in self.experts],
                "rows": {s: int((self.splits == s).sum()) for s in SPLITS},
                "n_prompts": self.n,
                "missing_quality_cells": int(np.isnan(self.quality).sum()),
                "has_responses": self.responses is not None,
                "checksum": self.checksum(),
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "meta": self.meta,
            }
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str))

        return atomic_dir(folder, write)

    @staticmethod
    def load(folder: str | os.PathLike[str], verify: bool = True) -> RoutingTable:
        folder = Path(folder)
        mpath, tpath = folder / "manifest.json", folder / "table.parquet"
        if not mpath.exists() or not tpath.exists():
            raise TableError(f"{folder} is not a routing table (needs manifest.json and table.parquet)")
        try:
            manifest = json.loads(mpath.read_text())
        except json.JSONDecodeError as exc:
            raise TableError(f"{mpath}: malformed JSON ({exc})") from exc
        experts = [Expert(**e) for e in manifest["experts"]]
        df = pd.read_parquet(tpath)
        names = [e.name for e in experts]
        missing = [c for n_ in names for c in (f"q::{n_}", f"c::{n_}") if c not in df.columns]
        if missing:
            raise TableError(f"{tpath}: missing column(s) {missing[:4]}")
        responses = None
        rpath = folder / "responses.parquet"
        if rpath.exists():
            rdf = pd.read_parquet(rpath)
            responses = np.empty((len(rdf), len(names)), dtype=object)
            for j, n_ in enumerate(names):
                responses[:, j] = rdf[f"r::{n_}"].to_numpy(dtype=object)
        table = RoutingTable(
            prompt_ids=df["prompt_id"].to_numpy(),
            texts=df["text"].to_numpy(dtype=object),
            splits=df["split"].to_numpy(),
            categories=df["category"].to_numpy(),
            experts=experts,
            quality=df[[f"q::{n_}" for n_ in names]].to_numpy(dtype=np.float64),
            cost=df[[f"c::{n_}" for n_ in names]].to_numpy(dtype=np.float64),
            source=manifest.get("source", "unknown"),
            cost_unit=manifest.get("cost_unit", "usd"),
            responses=responses,
            meta=manifest.get("meta", {}),
        )
        if verify and manifest.get("checksum") and table.checksum() != manifest["checksum"]:
            raise TableError(f"{folder}: checksum mismatch (the table files were changed after writing)")
        return table


def assign_splits(
    n: int,
    base: np.ndarray | None = None,
    val_fraction: float = 0.1,
    probe_size: int = 192,
    seed: int = 0,
) -> np.ndarray:
    """Split labels for n rows: keep ``base`` test rows, carve val and probe out of the rest.

    ``base`` is an (n,) array of "train"/"test" from the source (None: all train, and a 20%
    test split is carved out too). Deterministic for a seed.
    """
    rng = np.random.default_rng(seed)
    splits = np.array(["train"] * n, dtype=object) if base is None else np.asarray(base, dtype=object).copy()
    if base is None:
        perm = rng.permutation(n)
        splits[perm[: int(round(0.2 * n))]] = "test"
    train = np.flatnonzero(splits == "train")
    perm = rng.permutation(train)
    n_probe = min(probe_size, max(len(train) // 4, 0))
    n_val = int(round(val_fraction * len(train)))
    splits[perm[:n_probe]] = "probe"
    splits[perm[n_probe : n_probe + n_val]] = "val"
    return splits.astype(str)


def category_means(quality: np.ndarray, groups: np.ndarray, n_groups: int) -> tuple[np.ndarray, np.ndarray]:
    """(means (G, M) with NaN where a group never observed an expert, overall means (M,)) of
    quality (n, M) (NaN = missing) over the rows of each group id in ``groups`` (n,) < n_groups."""
    seen = ~np.isnan(quality)  # (n, M)
    q = np.nan_to_num(quality, nan=0.0)
    total = np.zeros((n_groups, quality.shape[1]))
    count = np.zeros((n_groups, quality.shape[1]))
    np.add.at(total, groups, q)
    np.add.at(count, groups, seen)
    means = np.where(count > 0, total / np.maximum(count, 1), np.nan)
    overall = q.sum(axis=0) / np.maximum(seen.sum(axis=0), 1)
    return means, overall
