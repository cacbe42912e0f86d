"""Trained heads on disk and the run-folder inputs of training.

    runs/<name>/models/<variant>/
      head.pt        {"state_dict", "head_config"}: the best epoch's head
      config.json    variant, the full TrainConfig, descriptor kind and basis, the trained pool
      history.json   one entry per epoch (train loss, val AUDC, prompts/s, best epoch so far)

The folder is written into a temporary sibling and renamed into place, so a reader sees either the
previous model or the new one, never a mix. ``load_trained(run_dir, variant)`` gives the head back
with its record; the CSCR router (cscr/routers/cscr.py) and serving use it.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cscr.atomic import atomic_dir
from cscr.config import HeadConfig, TrainConfig, from_dict
from cscr.data.table import RoutingTable
from cscr.fingerprints.probe_outcome import KIND as PROBE_OUTCOME
from cscr.fingerprints.probe_outcome import probe_basis_id, probe_outcome_descriptors
from cscr.fingerprints.store import DescriptorStore
from cscr.head import Head
from cscr.run import RunPaths
from cscr.train import Log, TrainArrays, TrainResult, prepare_arrays

DEFAULT_KIND = PROBE_OUTCOME


@dataclass
class TrainedHead:
    head: Head  # eval mode
    config: TrainConfig  # the config it was trained with (head widths included)
    variant: str  # cscr | vanilla
    descriptor_kind: str  # the store kind its descriptors come from
    basis_id: str  # what the descriptor coordinates mean
    experts: list[str]  # the pool it was trained on (routing may use any pool with descriptors)
    history: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int = -1
    best_val_audc: float | None = None
    meta: dict[str, Any] = field(default_factory=dict)




def save_trained(run_dir: str | os.PathLike[str] | None, result: TrainResult,
                 out_dir: str | os.PathLike[str] | None = None) -> Path:
    """Write the trained head to ``RunPaths.of(run_dir).model(variant)`` (or ``out_dir``), atomically."""
    if out_dir is None and run_dir is None:
        raise ValueError("save_trained needs a run folder or an output folder")
    folder = Path(out_dir) if out_dir is not None else RunPaths.of(run_dir).model(result.variant)  # type: ignore[arg-type]
    state = {k: v.detach().cpu() for k, v in result.head.state_dict().items()}
    kind = result.meta.get("descriptor_kind", "")
    config = {
        "variant": result.variant,
        "train": asdict(result.config),
        "descriptor_kind": kind,
        "basis_id": result.meta.get("basis_id", ""),
        "experts": result.meta.get("experts", []),
        "best_epoch": result.best_epoch,
        "best_val_audc": result.best_val_audc,
        "meta": {k: v for k, v in result.meta.items() if k not in ("experts",)},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }

    def write(tmp: Path) -> None:
        torch.save({"state_dict": state, "head_config": asdict(result.head.cfg)}, tmp / "head.pt")
        (tmp / "config.json").write_text(json.dumps(config, indent=2, default=str))
        (tmp / "history.json").write_text(json.dumps(result.history, indent=2, default=str))

    atomic_dir(folder, write)
    if out_dir is None and kind and "@" not in result.variant:
        # models/<variant>@<kind> keeps this head beside heads trained with other descriptor
        # kinds, so that `cscr evaluate --routers cscr@perplexity,cscr@logit` compares them
        atomic_dir(RunPaths.of(run_dir).model(f"{result.variant}@{kind}"), write)  # type: ignore[arg-type]
    return folder


def load_trained_from(folder: str | os.PathLike[str]) -> TrainedHead:
    """Load a trained-head folder (head.pt, config.json, history.json)."""
    folder = Path(folder)
    if not (folder / "head.pt").exists() or not (folder / "config.json").exists():
        raise FileNotFoundError(f"{folder} holds no trained head (head.pt + config.json)")
    config = json.loads((folder / "config.json").read_text())
    blob = torch.load(folder / "head.pt", map_location="cpu", weights_only=True)
    head = Head(from_dict(HeadConfig, blob["head_config"]))
    head.load_state_dict(blob["state_dict"])
    head.eval()
    hist_path = folder / "history.json"
    history = json.loads(hist_path.read_text()) if hist_path.exists() else []
    return TrainedHead(
        head=head, config=TrainConfig.from_nested(config["train"]), variant=config["variant"],
        descriptor_kind=config.get("descriptor_kind", ""), basis_id=config.get("basis_id", ""),
        experts=list(config.get("experts", [])), history=history, best_epoch=int(config.get("best_epoch", -1)),
        best_val_audc=config.get("best_val_audc"), meta=config.get("meta", {}),
    )


def load_trained(run_dir: str | os.PathLike[str], variant: str = "cscr") -> TrainedHead:
    """The trained head of ``variant`` in a run folder (clear error when it was never trained)."""
    folder = RunPaths.of(run_dir).model(variant)
    if not (folder / "head.pt").exists():
        base, _, kind = variant.partition("@")
        how = f"--variant {base}" + (f" --descriptor-kind {kind}" if kind else "")
        raise FileNotFoundError(f"no trained {variant!r} head in {folder}: run "
                                f"`cscr train --run {RunPaths.of(run_dir).root} {how}` first")
    return load_trained_from(folder)


# ---------------------------------------------------------------- run inputs

def ensure_descriptors(run_dir: str | os.PathLike[str], table: RoutingTable, kind: str | None = None,
                       log: Log | None = None) -> tuple[dict[str, np.ndarray], str, str]:
    """(descriptors of every table expert in table order, kind, basis id) from the run's store.

    Probe-outcome descriptors (the default kind) are computed from the table's probe split and
    written to the store when missing or computed on another probe set; other kinds must be in
    the store already (``cscr fingerprint``).
    """
    kind = kind or DEFAULT_KIND
    store = DescriptorStore(RunPaths.of(run_dir).descriptors)
    names = table.expert_names
    if kind == PROBE_OUTCOME:
        basis = probe_basis_id(table)
        have = store.experts(kind)
        stale = bool(have) and store.info(kind)["basis_id"] != basis
        if stale or set(names) - set(have):
            if stale:
                store.remove(kind=kind)
            store.write_many(probe_outcome_descriptors(table), kind, basis_id=basis,
                             source=f"probe split of {table.source}")
            if log:
                log(f"descriptors: wrote {len(names)} probe-outcome descriptors "
                    f"(D' = {len(table.split_index('probe'))}) to {store.path}")
    elif kind not in store.kinds():
        raise FileNotFoundError(f"no {kind!r} descriptors in {store.path} (kinds present: {store.kinds() or 'none'}): "
                                "compute them with `cscr fingerprint` or train with the probe-outcome kind")
    desc = store.read(kind, experts=names)
    return desc, kind, str(store.info(kind)["basis_id"])


def load_training_arrays(run_dir: str | os.PathLike[str], tolerance: float = 0.0, kind: str | None = None,
                         log: Log | None = None) -> TrainArrays:
    """TrainArrays from a prepared run folder (table, embeddings, descriptors)."""
    from cscr.encoder import load_run_embeddings

    paths = RunPaths.of(run_dir)
    table = RoutingTable.load(paths.require_table())
    emb = load_run_embeddings(paths.root)
    desc, kind, basis = ensure_descriptors(paths.root, table, kind, log)
    arrays = prepare_arrays(table, emb, desc, tolerance, kind, basis)
    arrays.meta["run_dir"] = str(paths.root)
    return arrays
