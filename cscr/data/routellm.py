"""RouteLLM evaluation data (lm-sys/RouteLLM ``routellm/evals/``): two models,
``mistralai/Mixtral-8x7B-Instruct-v0.1`` and ``gpt-4-1106-preview``, boolean correctness.

- MMLU: ``mmlu/mmlu_<subject>.csv`` (57 subjects, 14,042 prompts; columns prompt, then one
  boolean column per model); category = the subject (STEM / non-STEM splits use it);
- GSM8K: ``gsm8k_responses.csv`` (1,319 prompts, correctness plus ``<model>_response`` texts);
  category = "gsm8k".

``subset`` option: "mmlu", "gsm8k" or "both" (default). No split upstream: a test split is
carved with ``assign_splits`` (then val and probe out of train).

No costs in the data. cost="usd": per-token prices from the cost registry
(``<data_dir>/registries/registry.json``, ``cost_usd_per_1k_tokens``) or from a user price table
(option ``prices``: JSON/YAML model -> {input_price, output_price} USD per million tokens, or a
CSV model,input_price,output_price), times token estimates: prompt tokens from the prompt text;
answer tokens from the recorded response (GSM8K) or ``mmlu_answer_tokens`` (default 1: the
evaluation asks for one letter). cost="params": the registry's parameter counts (refused if a
model has none). Which source was used is written to ``table.meta``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cscr.config import DataConfig
from cscr.data.io import (
    build_table,
    check_options,
    csv_lines,
    estimate_tokens,
    expert_costs,
    experts_from_registry,
    read_csv,
    read_price_table,
    registry_experts,
    registry_path,
    source_dir,
    to_quality,
)
from cscr.data.registry import register_loader
from cscr.data.table import RoutingTable, TableError

MODELS = ["mistralai/Mixtral-8x7B-Instruct-v0.1", "gpt-4-1106-preview"]
SUBSETS = ("mmlu", "gsm8k", "both")


def _mmlu(folder: Path) -> pd.DataFrame:
    files = sorted((folder / "mmlu").glob("mmlu_*.csv"))
    if not files:
        raise FileNotFoundError(f"no MMLU files (mmlu/mmlu_<subject>.csv) in {folder}")
    frames = []
    for f in files:
        df = read_csv(f, ["prompt", *MODELS])
        subject = f.stem[len("mmlu_") :]
        df = df.assign(category=subject, prompt_id=[f"mmlu/{subject}/{i}" for i in range(len(df))],
                       where=csv_lines(f))
        frames.append(df)
    return pd.concat(frames, ignore_index=True)


def _gsm8k(folder: Path) -> pd.DataFrame:
    path = folder / "gsm8k_responses.csv"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    df = read_csv(path, ["prompt", *MODELS])
    return df.assign(category="gsm8k", prompt_id=[f"gsm8k/{i}" for i in range(len(df))],
                     where=csv_lines(path))


@register_loader("routellm")
def load_routellm(cfg: DataConfig, **options: Any) -> RoutingTable:
    """Options: ``subset`` (mmlu | gsm8k | both), ``prices`` (user price table file),
    ``registry`` (cost registry JSON), ``mmlu_answer_tokens`` (default 1)."""
    check_options("routellm", options, ["subset", "prices", "registry", "mmlu_answer_tokens"])
    subset = options.get("subset", "both")
    if subset not in SUBSETS:
        raise TableError(f"routellm: subset must be one of {SUBSETS}, got {subset!r}")
    if cfg.data_dir is None:
        raise TableError("routellm has no Hub copy: give --data-dir (files from github lm-sys/RouteLLM routellm/evals)")
    folder = source_dir(cfg, "routellm")
    parts = []
    if subset in ("mmlu", "both"):
        parts.append(_mmlu(folder))
    if subset in ("gsm8k", "both"):
        parts.append(_gsm8k(folder))
    df = pd.concat(parts, ignore_index=True)
    texts = df["prompt"].astype(str).tolist()
    quality = to_quality(df[MODELS], f"routellm {folder}", df["where"].tolist())
    meta: dict[str, Any] = {"subset": subset, "rows_per_subset": df["category"].eq("gsm8k").map({True: "gsm8k", False: "mmlu"}).value_counts().to_dict()}

    responses = None
    resp_cols = [f"{m}_response" for m in MODELS]
    if all(c in df.columns for c in resp_cols):
        responses = np.empty((len(df), len(MODELS)), dtype=object)
        for j, c in enumerate(resp_cols):
            responses[:, j] = [None if pd.isna(v) else str(v) for v in df[c]]

    if options.get("prices"):
        if cfg.cost == "params":
            raise TableError("routellm: a price table gives prices, not parameter counts; use cost='usd'")
        experts = experts_from_registry(MODELS, read_price_table(Path(options["prices"])),
                                        f"price table {options['prices']}", need="price")
        meta["cost_source"] = f"user price table {options['prices']}"
    else:
        if registry_path(cfg, options, "registry.json") is None:
            raise FileNotFoundError(
                "routellm has no costs in its files: put the cost registries in <data_dir>/registries "
                "or give a price table (option prices=FILE)"
            )
        experts, reg_path = registry_experts(cfg, options, "registry.json", MODELS, "routellm")
        meta["cost_source"] = f"cost registry {reg_path} ({'n_params' if cfg.cost == 'params' else 'cost_usd_per_1k_tokens'})"

    mmlu_ans = float(options.get("mmlu_answer_tokens", 1))
    out_tok = np.full((len(df), len(MODELS)), mmlu_ans)
    if responses is not None:
        is_gsm = df["category"].eq("gsm8k").to_numpy()
        for j in range(len(MODELS)):
            out_tok[is_gsm, j] = estimate_tokens(list(responses[is_gsm, j]))
    cost, meta["cost_model"] = expert_costs(
        cfg, experts, estimate_tokens(texts), out_tok, "routellm",
        f"GSM8K answer tokens from the recorded responses; MMLU answer tokens = {mmlu_ans:g} (one letter)")
    return build_table(
        cfg=cfg,
        source=f"routellm ({subset}: {folder})",
        prompt_ids=df["prompt_id"].tolist(),
        texts=texts,
        categories=df["category"].astype(str).tolist(),
        experts=experts,
        quality=quality,
        cost=cost,
        cost_unit=cfg.cost,
        base_splits=None,
        responses=responses,
        meta=meta,
    )
