"""A user's own logs: JSONL (or a JSON array), Parquet or CSV rows of ``prompt``, ``model``,
``quality`` (in [0, 1]; empty = missing cell), ``cost`` (>= 0, never empty), plus optional
``prompt_id``, ``split`` (train / val / probe / test), ``category`` and ``response``.

Rows are pivoted to one row per prompt (by ``prompt_id``, or by the prompt text when there is
no id). Where no split is given, a test split is carved; val and probe are carved out of train
unless the file already has them. The cost unit is ``cfg.cost`` (usd or params).

Option ``file``: the log file (default: the only ``*.jsonl`` / ``*.json`` / ``*.parquet`` /
``*.csv`` in the data directory, or the data directory itself when it is a file).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cscr.config import DataConfig
from cscr.data.io import build_table, check_options, read_csv, read_records, require_columns
from cscr.data.registry import register_loader
from cscr.data.table import Expert, RoutingTable, TableError

REQUIRED = ["prompt", "model", "quality", "cost"]
SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")


def _find_file(cfg: DataConfig, options: dict[str, Any]) -> Path:
    if options.get("file"):
        path = Path(options["file"]).expanduser()
    elif cfg.data_dir is None:
        raise TableError("generic: give the log file (option file=PATH or --data-dir)")
    else:
        path = Path(cfg.data_dir).expanduser()
        if path.is_dir():
            files = [f for f in sorted(path.iterdir()) if f.suffix in SUFFIXES]
            if len(files) != 1:
                raise TableError(f"generic: expected one log file ({'/'.join(SUFFIXES)}) in {path}, found {len(files)}; use option file=PATH")
            path = files[0]
    if not path.exists():
        raise FileNotFoundError(f"log file {path} does not exist")
    return path


def read_logs(path: Path) -> pd.DataFrame:
    if path.suffix == ".parquet":
        try:
            df = pd.read_parquet(path)
        except Exception as exc:  # pyarrow raises several types for a bad file
            raise TableError(f"{path}: malformed Parquet ({type(exc).__name__}: {exc})") from exc
    elif path.suffix == ".csv":
        df = read_csv(path)
    elif path.suffix in (".jsonl", ".json"):
        df = pd.DataFrame(read_records(path))
    else:
        raise TableError(f"{path}: unsupported log format {path.suffix!r}; use one of {SUFFIXES}")
    if df.empty:
        raise TableError(f"{path}: no rows")
    require_columns(df, REQUIRED, path)
    return df


@register_loader("generic")
def load_generic(cfg: DataConfig, **options: Any) -> RoutingTable:
    """Options: ``file`` (the log file)."""
    check_options("generic", options, ["file"])
    path = _find_file(cfg, options)
    df = read_logs(path)
    if df["prompt"].isna().any() or df["model"].isna().any():
        col = "prompt" if df["prompt"].isna().any() else "model"
        raise TableError(f"{path}: empty {col!r} in row {int(np.flatnonzero(df[col].isna())[0])}")
    df["prompt"] = df["prompt"].astype(str)
    df["model"] = df["model"].astype(str)
    if "prompt_id" in df.columns:
        if df["prompt_id"].isna().any():
            raise TableError(f"{path}: empty prompt_id in row {int(np.flatnonzero(df['prompt_id'].isna())[0])}")
        df["prompt_id"] = df["prompt_id"].astype(str)
    else:
        df["prompt_id"] = [hashlib.sha1(p.encode()).hexdigest()[:16] for p in df["prompt"]]
    for col in ("quality", "cost"):
        num = pd.to_numeric(df[col], errors="coerce")
        bad = df[col].notna() & num.isna()
        if bad.any():
            raise TableError(f"{path}: non-numeric {col} {df[col][bad].iloc[0]!r} in row {int(np.flatnonzero(bad)[0])}")
        df[col] = num.astype(np.float64)
    if df["cost"].isna().any():
        r = df[df["cost"].isna()].iloc[0]
        raise TableError(f"{path}: cost is NaN or empty for prompt {r.prompt_id!r}, model {r.model!r}")
    if (df["cost"] < 0).any():
        r = df[df["cost"] < 0].iloc[0]
        raise TableError(f"{path}: negative cost {r.cost} for prompt {r.prompt_id!r}, model {r.model!r}")
    q = df["quality"]
    if ((q < 0) | (q > 1)).any():
        r = df[(q < 0) | (q > 1)].iloc[0]
        raise TableError(f"{path}: quality outside [0, 1]: {r.quality} for prompt {r.prompt_id!r}, model {r.model!r}")
    dup = df.duplicated(["prompt_id", "model"])
    if dup.any():
        r = df[dup].iloc[0]
        raise TableError(f"{path}: duplicate prompt ids: prompt {r.prompt_id!r} has two rows for model {r.model!r}")
    per_id = df.groupby("prompt_id", sort=False)
    texts = per_id["prompt"].nunique()
    if (texts > 1).any():
        raise TableError(f"{path}: duplicate prompt ids: prompt id {texts[texts > 1].index[0]!r} has different prompt texts")

    prompts = per_id.first()
    models = list(dict.fromkeys(df["model"]))
    quality = df.pivot(index="prompt_id", columns="model", values="quality").reindex(index=prompts.index, columns=models)
    cost = df.pivot(index="prompt_id", columns="model", values="cost").reindex(index=prompts.index, columns=models)
    absent = cost.isna().to_numpy()
    meta: dict[str, Any] = {"file": str(path), "absent_pairs": int(absent.sum())}
    cost_arr = cost.to_numpy(dtype=np.float64)
    if absent.any():
        # a (prompt, model) pair with no log row: quality missing; cost = that model's median
        med = np.nanmedian(cost_arr, axis=0)
        cost_arr = np.where(absent, med[None, :], cost_arr)
        meta["absent_pairs_policy"] = "quality missing; cost filled with the model's median cost (never 0)"
    responses = None
    if "response" in df.columns:
        r = df.pivot(index="prompt_id", columns="model", values="response").reindex(index=prompts.index, columns=models)
        responses = r.astype(object).where(r.notna(), None).to_numpy(dtype=object)
    base = None
    if "split" in df.columns:
        splits = per_id["split"].nunique()
        if (splits > 1).any():
            raise TableError(f"{path}: prompt {splits[splits > 1].index[0]!r} has rows in different splits")
        base = prompts["split"].astype(str).to_numpy()
    return build_table(
        cfg=cfg,
        source=f"generic ({path})",
        prompt_ids=prompts.index.to_numpy(dtype=object),
        texts=prompts["prompt"].to_numpy(dtype=object),
        categories=prompts["category"].fillna("").astype(str).to_numpy() if "category" in prompts.columns else None,
        experts=[Expert(name=m, kind="black-box") for m in models],
        quality=quality.to_numpy(dtype=np.float64),
        cost=cost_arr,
        cost_unit=cfg.cost,
        base_splits=base,
        responses=responses,
        meta=meta,
    )
