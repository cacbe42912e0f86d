"""EmbedLLM (Hub data set ``RZ412/EmbedLLM``): 112 models, 0/1 correctness, long format.

Files ``train.csv``, ``val.csv`` (optional), ``test.csv``: one row per (prompt, model) with
columns ``prompt_id``, ``model_name``, ``label`` (0/1), ``category``, ``prompt`` (upstream also
has ``model_id`` and an unnamed index; both ignored). Pivoted to one row per prompt; a
(prompt, model) pair absent upstream is a missing cell. The file is the split (val kept as
val; the probe set is carved out of train). A prompt id in two files is refused.

Costs from ``<data_dir>/registries/registry-embedllm.json`` (option ``registry``):
cost="params": ``n_params``; cost="usd": ``cost_usd_per_1k_tokens`` x (prompt tokens +
``answer_tokens``, default 64, assumed: the data has no answers), written to table.meta.
Without a data directory the three CSVs are downloaded from the Hub (train.csv is 2.7 GB).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from cscr.config import DataConfig
from cscr.data import hub
from cscr.data.io import (
    build_table,
    check_options,
    estimate_tokens,
    expert_costs,
    read_csv,
    registry_experts,
    source_dir,
)
from cscr.data.registry import register_loader
from cscr.data.table import RoutingTable, TableError

COLUMNS = ["prompt_id", "model_name", "label", "category", "prompt"]
DEFAULT_ANSWER_TOKENS = 64


def pivot_long(frames: list[tuple[str, pd.DataFrame]], where: str) -> tuple[pd.DataFrame, list[str], np.ndarray]:
    """Long (prompt_id, model_name, label, ...) rows of each split -> prompts (one row each,
    with split, category, prompt), the model list, and quality (n, M) with NaN where absent."""
    seen: dict[str, str] = {}
    prompts, longs = [], []
    for split, df in frames:
        df = df.assign(prompt_id=df["prompt_id"].astype(str), model_name=df["model_name"].astype(str))
        dup = df.duplicated(["prompt_id", "model_name"])
        if dup.any():
            r = df[dup].iloc[0]
            raise TableError(f"{where} ({split}): duplicate prompt ids: prompt {r.prompt_id!r} has two rows for model {r.model_name!r}")
        p = df.drop_duplicates("prompt_id")[["prompt_id", "prompt", "category"]]
        texts = df.groupby("prompt_id")["prompt"].nunique()
        if (texts > 1).any():
            raise TableError(f"{where} ({split}): duplicate prompt ids: prompt id {texts[texts > 1].index[0]!r} has different prompt texts")
        for pid in p["prompt_id"]:
            if pid in seen:
                raise TableError(f"{where}: duplicate prompt ids: prompt id {pid!r} is in both the {seen[pid]} and the {split} file")
            seen[pid] = split
        prompts.append(p.assign(split=split))
        longs.append(df[["prompt_id", "model_name", "label"]])
    pdf = pd.concat(prompts, ignore_index=True)
    long = pd.concat(longs, ignore_index=True)
    models = list(dict.fromkeys(long["model_name"]))
    labels = pd.to_numeric(long["label"], errors="coerce")
    bad = long["label"].notna() & labels.isna()
    if bad.any():
        raise TableError(f"{where}: non-numeric label {long['label'][bad].iloc[0]!r}")
    wide = long.assign(label=labels).pivot(index="prompt_id", columns="model_name", values="label")
    wide = wide.reindex(index=pdf["prompt_id"], columns=models)
    return pdf, models, wide.to_numpy(dtype=np.float64)


@register_loader("embedllm")
def load_embedllm(cfg: DataConfig, **options: Any) -> RoutingTable:
    """Options: ``registry`` (cost registry JSON), ``answer_tokens`` (default 64)."""
    check_options("embedllm", options, ["registry", "answer_tokens"])
    folder = hub.download("embedllm") if cfg.data_dir is None else source_dir(cfg, "embedllm", "EmbedLLM")
    frames = []
    for split, name in (("train", "train.csv"), ("val", "val.csv"), ("test", "test.csv")):
        path = folder / name
        if path.exists():
            frames.append((split, read_csv(path, COLUMNS)))
        elif split != "val":
            raise FileNotFoundError(f"EmbedLLM file {path} does not exist")
    pdf, models, quality = pivot_long(frames, f"embedllm {folder}")

    experts, reg_path = registry_experts(cfg, options, "registry-embedllm.json", models, "embedllm")
    texts = pdf["prompt"].astype(str).tolist()
    ans = float(options.get("answer_tokens", DEFAULT_ANSWER_TOKENS))
    cost, rule = expert_costs(cfg, experts, estimate_tokens(texts), np.full(len(pdf), ans), "embedllm",
                              f"no answers in the data: answer_tokens = {ans:g} assumed")
    meta: dict[str, Any] = {"registry": str(reg_path), "cost_model": rule}
    return build_table(
        cfg=cfg,
        source=f"embedllm ({folder})",
        prompt_ids=pdf["prompt_id"].tolist(),
        texts=texts,
        categories=pdf["category"].fillna("").astype(str).tolist(),
        experts=experts,
        quality=quality,
        cost=cost,
        cost_unit=cfg.cost,
        base_splits=pdf["split"].tolist(),
        meta=meta,
    )
