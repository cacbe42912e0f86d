"""RouterBench (Hu et al., 2024): 11 models, 0/1 correctness, recorded responses and USD costs.

Two upstream formats, the same columns (``sample_id``, ``prompt``, ``eval_name``, then per model
``<model>`` (0/1), ``<model>|model_response``, ``<model>|total_cost``, ``oracle_model_to_route_to``):

- the CSV files of the RouterDC re-split (``<task>_train.csv`` / ``<task>_test.csv``): their
  train/test is the upstream split; validation and the probe set are carved out of train;
- the upstream ``routerbench_0shot.pkl`` (a pickled pandas DataFrame, Hub data set
  ``withmartian/routerbench``; 36k prompts, 86 task groups): no split upstream, so a test split
  is carved as well. Only load pickles you trust (the Hub file or your own).

Prompts and responses are Python-literal lists of strings (joined with newlines).
Category = ``eval_name``. Quality cells that are empty upstream are never zeros: they stay
missing (``missing="mask"``) or their rows are dropped (``"drop"``); both are counted in
``table.meta``. Empty costs are handled the same way (never silent zeros). Some ``sample_id``s
occur twice upstream (one question split over two rows, each with part of the models); those
ids are made unique with the upstream row index and counted in meta.

cost="usd": the recorded ``total_cost``; cost="params": parameter counts from
``registries/registry-routerbench.json`` (refused: the closed models have none).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cscr.config import DataConfig
from cscr.data import hub
from cscr.data.io import (
    build_table,
    check_options,
    csv_lines,
    experts_from_registry,
    load_registry,
    param_costs,
    registry_path,
    require_columns,
    source_dir,
    text_of,
    to_quality,
)
from cscr.data.registry import register_loader
from cscr.data.table import RoutingTable, TableError

PKL_NAME = "routerbench_0shot.pkl"
COST_SUFFIX = "|total_cost"
RESPONSE_SUFFIX = "|model_response"


def _models(df: pd.DataFrame, where: Any) -> list[str]:
    models = [c[: -len(COST_SUFFIX)] for c in df.columns if isinstance(c, str) and c.endswith(COST_SUFFIX)]
    if not models:
        raise TableError(f"{where}: no '<model>{COST_SUFFIX}' columns: not a RouterBench file")
    require_columns(df, ["sample_id", "prompt", "eval_name", *models], where)
    return models


def _read_csvs(folder: Path) -> tuple[pd.DataFrame, list[str]]:
    files = sorted(folder.glob("*_train.csv")) + sorted(folder.glob("*_test.csv"))
    if not files:
        raise FileNotFoundError(f"no RouterBench files (*_train.csv / *_test.csv or {PKL_NAME}) in {folder}")
    frames, models = [], None
    for f in files:
        try:
            df = pd.read_csv(f, index_col=0)
        except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
            raise TableError(f"{f}: malformed CSV ({exc})") from exc
        ms = _models(df, f)
        if models is not None and sorted(ms) != sorted(models):
            raise TableError(f"{f}: models {sorted(ms)} differ from the other files' {sorted(models)}")
        models = models or ms
        df["__split"] = "train" if f.name.endswith("_train.csv") else "test"
        df["__where"] = csv_lines(f)
        frames.append(df)
    assert models is not None
    return pd.concat(frames), models


def _read_pkl(path: Path) -> tuple[pd.DataFrame, list[str]]:
    try:
        df = pd.read_pickle(path)
    except Exception as exc:  # unpickling errors come in many types
        raise TableError(f"{path}: cannot read the pickle ({type(exc).__name__}: {exc})") from exc
    if not isinstance(df, pd.DataFrame):
        raise TableError(f"{path}: expected a pickled pandas DataFrame, got {type(df).__name__}")
    return df, _models(df, path)


@register_loader("routerbench")
def load_routerbench(cfg: DataConfig, **options: Any) -> RoutingTable:
    """Options: ``file`` (a .pkl or folder to read instead of ``<data_dir>/routerbench``),
    ``registry`` (a cost-registry JSON; default ``<data_dir>/registries/registry-routerbench.json``)."""
    check_options("routerbench", options, ["file", "registry"])
    if options.get("file"):
        target = Path(options["file"]).expanduser()
    elif cfg.data_dir is None:
        target = hub.download("routerbench") / PKL_NAME
    else:
        folder = source_dir(cfg, "routerbench")
        target = folder / PKL_NAME if (folder / PKL_NAME).exists() and not list(folder.glob("*_train.csv")) else folder
    if not target.exists():
        raise FileNotFoundError(f"{target} does not exist")
    if target.is_file():
        df, models = _read_pkl(target)
        base = None
        fmt = "pkl"
    else:
        df, models = _read_csvs(target)
        base = df["__split"].to_numpy()
        fmt = "csv"
    upstream_index = np.asarray(df.index)
    df = df.reset_index(drop=True)
    meta: dict[str, Any] = {"format": fmt, "path": str(target), "n_task_groups": int(df["eval_name"].nunique())}

    # prompt ids: sample_id, made unique with the upstream row index where it repeats
    sid = df["sample_id"].astype(str).to_numpy()
    dup = pd.Series(sid).duplicated(keep=False).to_numpy()
    ids = np.array([f"{s}#{ix}" if d else s for s, ix, d in zip(sid, upstream_index, dup, strict=True)], dtype=object)
    meta["duplicate_sample_ids"] = int(len(set(sid[dup])))
    if dup.any():
        meta["duplicate_sample_ids_note"] = "ids made unique as '<sample_id>#<upstream row index>'"

    texts = [text_of(v, f"{target}: prompt") or "" for v in df["prompt"]]
    rows = df["__where"].tolist() if "__where" in df.columns else [f"{target}: row {i + 1}" for i in range(len(df))]
    quality = to_quality(df[models], str(target), rows)

    reg_path = registry_path(cfg, options, "registry-routerbench.json")
    registry = load_registry(reg_path) if reg_path else None
    meta["registry"] = str(reg_path) if reg_path else None
    experts = experts_from_registry(models, registry, "routerbench registry")

    if cfg.cost == "usd":
        cost_cols = [m + COST_SUFFIX for m in models]
        cost = df[cost_cols].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64)
        meta["cost_source"] = "recorded <model>|total_cost (USD per call)"
    else:
        cost = param_costs(experts, len(df), "routerbench")
        meta["cost_source"] = f"parameter count (billions) from {reg_path}"

    responses = None
    if all(m + RESPONSE_SUFFIX in df.columns for m in models):
        responses = np.empty((len(df), len(models)), dtype=object)
        for j, m in enumerate(models):
            responses[:, j] = [text_of(v) for v in df[m + RESPONSE_SUFFIX]]

    return build_table(
        cfg=cfg,
        source=f"routerbench ({fmt}: {target})",
        prompt_ids=ids,
        texts=texts,
        categories=df["eval_name"].astype(str).to_numpy(),
        experts=experts,
        quality=quality,
        cost=cost,
        cost_unit=cfg.cost,
        base_splits=base,
        responses=responses,
        meta=meta,
        nan_cost="mask",
    )
