"""RouterArena (github RouteWorks/RouterArena): cached model answers, one JSON Lines file per model.

Layout (the upstream repository's): ``cached_results/<model>.jsonl`` and the cost table
``model_cost/cost.json`` (``{model: {input_token_price_per_million,
output_token_price_per_million}}``); the data directory may be the repository root, or a folder
that holds the ``*.jsonl`` files directly (option ``prices=FILE`` then names the cost table, if it
is not ``cost.json`` beside them or ``../model_cost/cost.json``).

Each line of ``<model>.jsonl`` (written by upstream ``llm_inference/pipeline.py``, scored in
place by ``llm_evaluation/evaluate_models.py``): ``global_index`` (e.g. ``"AIME_112"``),
``question``, ``llm_selected``, ``generated_answer``, ``token_usage`` {``input_tokens``,
``output_tokens``, ``total_tokens``}, ``success``, ``provider``, ``error``, batch fields, and
``evaluation_result``: null until scored, then {``extracted_answer``, ``ground_truth``,
``score``, ``metric``, ``inference_cost``}.

Expert = the file name (upstream's universal model name). Prompt id = ``global_index``; category
= its data-set part (``AIME_112`` -> ``AIME``). Quality = ``evaluation_result.score``; a score
outside [0, 1] is refused unless option ``clip_quality=true``. Missing cells (counted in meta):
an unsuccessful call (``success`` false: its cost is masked too, never 0), a row not yet scored
(``evaluation_result`` null), and a scoring crash (``metric`` "error", which upstream records as
score 0.0: not a real zero). A prompt absent from a model's file is a missing cell.

Cost (usd): ``token_usage`` times the model's prices from the cost table (option
``cost_source=tokens``, default), or the recorded ``evaluation_result.inference_cost``
(``cost_source=recorded``; upstream writes 0.0 when a model has no price, so a recorded 0 is
refused). A model absent from the cost table is refused (upstream would count it as free).
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cscr.config import DataConfig
from cscr.data.generic import field_map, rows_frame, table_from_rows
from cscr.data.io import check_options, experts_from_registry, flag, read_price_table, source_dir
from cscr.data.registry import register_loader
from cscr.data.table import RoutingTable, TableError

FIELDS = {"prompt": "question", "prompt_id": "global_index", "quality": "evaluation_result.score",
          "response": "generated_answer", "input_tokens": "token_usage.input_tokens",
          "output_tokens": "token_usage.output_tokens"}
EXTRA = {"success": "success", "metric": "evaluation_result.metric", "recorded_cost": "evaluation_result.inference_cost"}
COST_SOURCES = ("tokens", "recorded")


def _cost_table(folder: Path, options: dict[str, Any]) -> Path:
    if options.get("prices"):
        path = Path(options["prices"]).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"cost table {path} does not exist")
        return path
    for cand in (folder / "cost.json", folder.parent / "model_cost" / "cost.json", folder / "model_cost" / "cost.json"):
        if cand.exists():
            return cand
    raise FileNotFoundError(f"routerarena: no cost table (model_cost/cost.json) beside {folder}; give option prices=FILE")


def category_of(global_index: str) -> str:
    """The data-set part of a RouterArena global index: ``AIME_112`` -> ``AIME``."""
    m = re.match(r"^(.*)_\d+$", global_index)
    return m.group(1) if m else global_index


@register_loader("routerarena")
def load_routerarena(cfg: DataConfig, **options: Any) -> RoutingTable:
    """Options: ``prices`` (the cost table), ``cost_source`` (tokens | recorded), ``clip_quality``."""
    check_options("routerarena", options, ["prices", "cost_source", "clip_quality"])
    if cfg.data_dir is None:
        raise TableError("routerarena has no Hub copy: give --data-dir (a clone of github RouteWorks/RouterArena "
                         "with cached_results/ scored by its llm_evaluation step)")
    if cfg.cost != "usd":
        raise TableError("routerarena: the cost table gives prices, not parameter counts; use cost='usd'")
    cost_source = options.get("cost_source", "tokens")
    if cost_source not in COST_SOURCES:
        raise TableError(f"routerarena: cost_source must be one of {COST_SOURCES}, got {cost_source!r}")
    folder = source_dir(cfg, "cached_results")
    files = sorted(folder.glob("*.jsonl"))
    if not files:
        raise FileNotFoundError(f"no RouterArena cached results (cached_results/<model>.jsonl) in {folder}")
    df = rows_frame(files, field_map(FIELDS), per_model=True, model_given=False,
                    required=["prompt", "prompt_id", "quality"], extra=EXTRA)
    meta: dict[str, Any] = {"folder": str(folder), "cost_source": cost_source}

    failed = df["success"].map(lambda v: v is False or str(v).lower() == "false")
    unscored = df["quality"].isna() & ~failed
    crashed = df["metric"].astype(str).eq("error") & ~failed
    df.loc[failed | crashed, "quality"] = np.nan
    meta.update(failed_calls=int(failed.sum()), unscored_rows=int(unscored.sum()), scoring_errors=int(crashed.sum()),
                missing_note="failed calls, unscored rows and scoring errors are missing cells (never 0)")
    df["category"] = [category_of(str(g)) for g in df["prompt_id"]]

    table_path = _cost_table(folder, options)
    models = list(dict.fromkeys(df["model"]))
    lookup = [m[: -len("_batch")] if m.endswith("_batch") else m for m in models]
    priced = experts_from_registry(lookup, read_price_table(table_path), f"cost table {table_path}", need="price")
    experts = [replace(e, name=m) for e, m in zip(priced, models, strict=True)]
    meta["cost_table"] = str(table_path)
    if cost_source == "tokens":
        by = {e.name: e for e in experts}
        tin = pd.to_numeric(df["input_tokens"], errors="coerce")
        tout = pd.to_numeric(df["output_tokens"], errors="coerce")
        pin = df["model"].map(lambda m: by[m].input_price).astype(np.float64)
        pout = df["model"].map(lambda m: by[m].output_price).astype(np.float64)
        df["cost"] = ((pin * tin + pout * tout) / 1e6).where(~failed)
        meta["cost_model"] = (f"usd = (input_price * token_usage.input_tokens + output_price * "
                              f"token_usage.output_tokens) / 1e6, prices from {table_path}")
    else:
        rec = pd.to_numeric(df["recorded_cost"], errors="coerce")
        zero = (rec == 0) & ~failed
        if zero.any():
            r = df[zero].iloc[0]
            raise TableError(f"{r['where']}: recorded inference_cost is 0 for model {r['model']!r} (upstream writes 0 "
                             "when it has no price); use cost_source=tokens")
        df["cost"] = rec.where(~failed)
        meta["cost_model"] = "usd = evaluation_result.inference_cost as recorded upstream"
    return table_from_rows(cfg, df, source=f"routerarena ({folder})", experts=experts, meta=meta,
                           clip_quality=flag(options.get("clip_quality", False), "clip_quality"), mask_nan_cost=True)
