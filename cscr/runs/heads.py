"""Trained heads on disk.

    runs/<name>/models/<variant>/
      head.pt        {"state_dict", "head_config"}: the best epoch's head
      config.json    variant, the full TrainConfig, descriptor kind and basis, the trained pool
      history.json   one entry per epoch (train loss, val AUDC, prompts/s, best epoch so far)

The folder is written into a temporary sibling and renamed into place (cscr.atomic), so a reader
sees either the previous model or the new one, never a mix. ``save_trained`` takes any training
result with the fields of ``HeadResult`` (the training layer's TrainResult); ``load_trained``
gives the head back with its record as a ``TrainedHead``.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from cscr.atomic import atomic_dir
from cscr.config import HeadConfig, TrainConfig, from_dict
from cscr.head import Head
from cscr.runs.paths import RunPaths


class HeadResult(Protocol):
    """What training hands over to be saved (cscr's TrainResult has these fields)."""

    head: Head
    config: TrainConfig
    variant: str
    history: list[dict[str, Any]]
    best_epoch: int
    best_val_audc: float | None
    meta: dict[str, Any]


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


def save_trained(run_dir: str | os.PathLike[str] | RunPaths | None, result: HeadResult,
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
    if out_dir is None:
        # models/<variant>@<kind> keeps this head beside heads trained with other descriptor
        # kinds, so that `cscr evaluate --routers cscr@perplexity,cscr@logit` compares them
        refresh_kind_copy(run_dir, result.variant)  # type: ignore[arg-type]
    return folder


def refresh_kind_copy(run_dir: str | os.PathLike[str] | RunPaths, variant: str) -> Path | None:
    """Replace ``models/<variant>@<kind>`` with a copy of ``models/<variant>`` as it stands now (the head
    and what ``cscr train`` wrote beside it after saving: category prior, newcomer-level choice,
    operating points), so that a router loaded from either folder routes alike. None (nothing
    written) for a ``<variant>@<kind>`` itself, a head without a descriptor kind, or no head."""
    from cscr.runs.settings import head_config

    config = None if "@" in variant else head_config(run_dir, variant)
    kind = (config or {}).get("descriptor_kind") or ""
    if not kind:
        return None
    paths = RunPaths.of(run_dir)
    folder = paths.model(variant)
    return atomic_dir(paths.model(f"{variant}@{kind}"),
                      lambda tmp: shutil.copytree(folder, tmp, dirs_exist_ok=True))


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


def load_trained(run_dir: str | os.PathLike[str] | RunPaths, variant: str = "cscr") -> TrainedHead:
    """The trained head of ``variant`` in a run folder (clear error when it was never trained)."""
    paths = RunPaths.of(run_dir)
    folder = paths.model(variant)
    if not (folder / "head.pt").exists():
        base, _, kind = variant.partition("@")
        how = f"--variant {base}" + (f" --descriptor-kind {kind}" if kind else "")
        raise FileNotFoundError(f"no trained {variant!r} head in {folder}: run "
                                f"`cscr train --run {paths.root} {how}` first")
    return load_trained_from(folder)
