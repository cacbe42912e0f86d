"""The run's settings record, ``runs/<name>/settings.json``: what each command that shaped the
run was asked for, so that later commands default to the run's settings, not to their own.

    {"prepare":     {"dataset": ..., "seed": ..., "probe_size": ..., "recorded": TIME},
     "fingerprint": {"pool": ..., "kinds": [...], "recorded": TIME},
     "train":       {"descriptor_kind": "perplexity", "train": {TrainConfig}, "variants": [...],
                     "trainer": "ray-train" | "plain", "recorded": TIME}}

Each command replaces its own section (``record_settings``, written atomically). The encoder
(its id and long-prompt mode) is not repeated: the embedding manifest
(``embeddings/manifest.json``) records it, and ``read_settings`` shows it as ``embeddings``.

``training_defaults(run, ...)`` is what ``cscr train``, ``cscr sweep`` and ``cscr experiment``
start from: the descriptor kind and the TrainConfig the run was last trained with (from the
``train`` section, or, for runs trained before the record existed, from ``models/cscr``), each
used unless the command line names it, and said in one line. ``head_line`` describes a trained
head (``cscr evaluate`` prints one per CSCR variant). Nothing here imports torch.
"""

from __future__ import annotations

from cscr.console import say

import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cscr.atomic import atomic_write_json
from cscr.config import ConfigError, TrainConfig
from cscr.runs.paths import RunPaths

SETTINGS_FILE = "settings.json"
Log = Callable[[str], None]
RunLike = str | os.PathLike[str] | RunPaths

#: TrainConfig fields with a command-line option (the rest change with --config)
FLAGS = {"epochs": "--epochs", "batch_size": "--batch-size", "lr": "--lr", "seed": "--seed",
         "index.top_k": "--top-k", "loss.bands": "--bands", "loss.gamma": "--gamma", "head.hidden": "--hidden"}
#: TrainConfig fields that describe the machine or the data, not a choice: never carried over
NOT_CARRIED = ("head.in_dim", "head.out_dim", "index.use_gpu")


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is not valid JSON ({exc}): remove it, or repair it by hand") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object, not {type(data).__name__}")
    return data


def settings_path(run: RunLike) -> Path:
    return RunPaths.of(run).root / SETTINGS_FILE


def read_settings(run: RunLike) -> dict[str, Any]:
    """Every recorded section (empty when none), with ``embeddings`` from the embedding manifest
    (encoder id, model, dimension, long-prompt mode) when the run has embeddings."""
    paths = RunPaths.of(run)
    path = settings_path(paths)
    out = _read_json(path) if path.exists() else {}
    manifest = paths.embeddings / "manifest.json"
    if manifest.exists():
        info = _read_json(manifest)
        out["embeddings"] = {k: info[k] for k in ("encoder_id", "model", "dim", "long_prompt", "n_prompts")
                             if k in info}
    return out


def record_settings(run: RunLike, section: str, values: Mapping[str, Any]) -> Path:
    """Replace ``section`` of the run's settings record (the others are kept), atomically."""
    if section == "embeddings":
        raise ValueError("the embedding manifest records the encoder: 'embeddings' is not a settings section")
    path = settings_path(run)
    data = _read_json(path) if path.exists() else {}
    data[section] = {**dict(values), "recorded": _now()}
    return atomic_write_json(path, data)


# ---------------------------------------------------------------- training settings

def flat(cfg: TrainConfig) -> dict[str, Any]:
    """{"epochs": 10, "loss.bands": 5, ...}: the config's fields by dotted name."""
    out: dict[str, Any] = {}
    for k, v in dataclasses.asdict(cfg).items():
        if isinstance(v, dict):
            out.update({f"{k}.{kk}": vv for kk, vv in v.items()})
        else:
            out[k] = v
    return out


def carried(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with the NOT_CARRIED fields at their defaults (what a later command builds on)."""
    d = TrainConfig()
    return dataclasses.replace(
        cfg, head=dataclasses.replace(cfg.head, in_dim=d.head.in_dim, out_dim=d.head.out_dim),
        index=dataclasses.replace(cfg.index, use_gpu=d.index.use_gpu))


@dataclass(frozen=True)
class RecordedTraining:
    """How a run was last trained."""

    source: Path  # settings.json, or models/<variant>/config.json for runs trained before it
    descriptor_kind: str | None
    train: TrainConfig | None  # the requested TrainConfig (None: not recorded)
    variants: tuple[str, ...] = ()


def head_config(run: RunLike, variant: str) -> dict[str, Any] | None:
    """``models/<variant>/config.json`` of a trained head (None when there is none)."""
    path = RunPaths.of(run).model(variant) / "config.json"
    return _read_json(path) if path.exists() else None


def recorded_training(run: RunLike) -> RecordedTraining | None:
    """The ``train`` section of the run's record; for a run trained before the record existed,
    what ``models/cscr`` (else ``models/vanilla``) was trained with; None when never trained."""
    paths = RunPaths.of(run)
    section = read_settings(paths).get("train") if settings_path(paths).exists() else None
    if section:
        cfg = TrainConfig.from_nested(section["train"]) if section.get("train") else None
        return RecordedTraining(settings_path(paths), section.get("descriptor_kind") or None,
                                carried(cfg) if cfg else None, tuple(section.get("variants", ())))
    for variant in ("cscr", "vanilla"):
        config = head_config(paths, variant)
        if config is not None:
            # a vanilla head's config is the ablation's (one band, no penalty), not a run setting
            cfg = carried(TrainConfig.from_nested(config["train"])) if variant == "cscr" and "train" in config else None
            return RecordedTraining(paths.model(variant) / "config.json", config.get("descriptor_kind") or None,
                                    cfg, (variant,))
    return None


def record_training(run: RunLike, kind: str, train: TrainConfig, variants: Collection[str], trainer: str) -> Path:
    """The ``train`` section after a training: the descriptor kind and the requested TrainConfig."""
    return record_settings(run, "train", {"descriptor_kind": kind, "train": dataclasses.asdict(carried(train)),
                                          "variants": list(variants), "trainer": trainer})


@dataclass(frozen=True)
class TrainingDefaults:
    descriptor_kind: str | None  # the kind named on the command line, else the recorded one, else None
    train: TrainConfig | None  # the recorded TrainConfig to build on (None: TrainConfig())
    line: str | None  # the line said (None: nothing recorded was used)


def _where(run: RunLike) -> str:
    """The run folder as shown: relative to the working directory when inside it, else absolute."""
    root = RunPaths.of(run).root
    try:
        return str(root.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(root)


def training_defaults(run: RunLike | None, *, kind: str | None, kind_flag: str = "--descriptor-kind",
                      given: Collection[str] = (), use_train: bool = True, log: Log | None = say,
                      prefix: str = "cscr") -> TrainingDefaults:
    """The run's recorded settings for a command that trains: the descriptor kind unless ``kind``
    is given, and (``use_train``) the recorded TrainConfig, whose fields in ``given`` (dotted names
    the command line sets) are the command line's. Says in one line which recorded settings it
    uses (the kind always; TrainConfig fields where they differ from the defaults)."""
    if run is None or not RunPaths.of(run).root.is_dir():
        return TrainingDefaults(kind, None, None)
    rec = recorded_training(run)
    if rec is None:
        return TrainingDefaults(kind, None, None)
    used: list[str] = []
    flags: list[str] = []
    if kind is None and rec.descriptor_kind:
        kind = rec.descriptor_kind
        used.append(f"descriptor kind {kind!r}")
        flags.append(kind_flag)
    base = rec.train if use_train else None
    if base is not None:
        default = flat(TrainConfig())
        for name, value in flat(base).items():
            if name in given or name in NOT_CARRIED or value == default.get(name):
                continue
            shown = "0 (every expert)" if name == "index.top_k" and value == 0 else value
            used.append(f"{name.split('.')[-1]} {shown}")
            flags.append(FLAGS.get(name, "--config"))
    line = None
    if used:
        line = (f"{prefix}: using {', '.join(used)} recorded in {_where(run)} "
                f"(pass {', '.join(dict.fromkeys(flags))} to change)")
        if log:
            log(line)
    return TrainingDefaults(kind, base, line)


def overwrite_line(run: RunLike, variant: str, kind: str, prefix: str = "cscr") -> str | None:
    """One line when training ``variant`` with descriptor ``kind`` would replace ``models/<variant>``
    trained with another kind (None otherwise)."""
    config = head_config(run, variant)
    old = (config or {}).get("descriptor_kind") or ""
    if config is None or not old or old == kind:
        return None
    paths = RunPaths.of(run)
    kept = paths.model(f"{variant}@{old}")
    where = os.path.join(_where(run), "models", variant)
    keep = (f"that head stays in {where}@{old}" if (kept / "head.pt").exists()
            else f"copy it to {where}@{old} first to keep it")
    return (f"{prefix}: {where} was trained with {old!r} descriptors and is replaced by this {kind!r} "
            f"training ({keep}; `cscr evaluate --routers {variant}@{old},{variant}@{kind}` compares them)")


def head_line(run: RunLike, variant: str) -> str | None:
    """Which head ``variant`` (``cscr``, ``vanilla``, ``cscr@KIND``) of a run is: folder, descriptor
    kind, basis, k, when it was trained, its best epoch and validation AUDC, its category prior and
    guard (None: not trained)."""
    config = head_config(run, variant)
    if config is None:
        return None
    train = config.get("train") or {}
    k = (train.get("index") or {}).get("top_k")
    audc = config.get("best_val_audc")
    parts = [f"descriptor kind {config.get('descriptor_kind') or '?'!r}",
             f"basis {config.get('basis_id') or '?'}",
             "k = every expert" if k == 0 else f"k = {k}",
             f"trained {config.get('created', '?')}",
             f"best epoch {config.get('best_epoch', '?')} (val AUDC {'n/a' if audc is None else f'{audc:.4f}'})"]
    prior = RunPaths.of(run).model(variant) / "prior" / "prior.json"  # cscr.prior.FOLDER
    if prior.exists():
        try:
            w = json.loads(prior.read_text())["w"]
            parts.append(f"category prior w = {w:g}" + (" (chose no blend on validation)" if w == 0 else ""))
        except (OSError, ValueError, KeyError, TypeError):
            parts.append("an unreadable category prior folder")
    guard = RunPaths.of(run).model(variant) / "guard" / "guard.json"  # cscr.guard.FOLDER
    if guard.exists():
        try:
            g = json.loads(guard.read_text())
            parts.append(f"out-of-distribution guard w = {g['w']}, gate = {g['gate']} (`cscr guard`)")
        except (OSError, ValueError, KeyError):
            parts.append("an unreadable guard folder")
    return f"head {variant}: {os.path.join(_where(run), 'models', variant)}: {', '.join(parts)}"
