"""Routing data from a live pool: run every expert on prompts with reference answers, grade the
answers, record cost, and build a routing table (cscr.data.table).

Cost per call (the table's ``C[i, m]``):

- ``params`` (every expert has ``n_params``): n_params (billions) x (prompt + answer tokens) /
  1000, i.e. proportional to the forward FLOPs of the call (2 N tokens), in billion-parameter
  kilo-tokens;
- ``usd`` (every expert has prices): input_price x prompt tokens + output_price x answer
  tokens, prices in USD per million tokens.

Measured latency and token counts go to ``table.meta["label"]`` (per expert means) and to the
per-call records that ``calls_frame`` returns (jobs write them beside the table).

``LabelUDF`` is the Ray Data UDF (one per expert; no Ray import here); ``label_serial`` runs the
same thing in-process for small pools and tests.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from cscr.data.table import RoutingTable, assign_splits
from cscr.errors import InputError
from cscr.fingerprints.perplexity import GenerateUDF
from cscr.grading import grade
from cscr.pool import ExpertSpec, Pool
from cscr.tasks import Task

DEFAULT_MAX_NEW_TOKENS = 10  # the built-in tasks want a number, a word or a letter


def task_rows(tasks: Sequence[Task]) -> list[dict[str, Any]]:
    return [{"prompt_idx": i, "probe_id": t.id, "text": t.prompt, "reference": t.answer, "grader": t.grader}
            for i, t in enumerate(tasks)]


def udf_args(spec: ExpertSpec, max_new_tokens: int, backend_kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """Constructor kwargs of GenerateUDF / LabelUDF for one pool expert."""
    if spec.kind == "open-weights":
        return {"expert": spec.name, "model": spec.source.model, "backend": spec.backend,
                "max_new_tokens": max_new_tokens, "backend_kwargs": backend_kwargs or {}}
    if spec.kind == "black-box":
        return {"expert": spec.name, "model": spec.source.model, "backend": "openai",
                "max_new_tokens": max_new_tokens,
                "backend_kwargs": {"base_url": spec.source.base_url, "api_key_env": spec.source.api_key_env,
                                   "timeout_s": spec.timeout_s, "max_retries": spec.max_retries,
                                   "max_concurrency": spec.max_concurrency}}
    raise InputError(f"expert {spec.name!r} is 'recorded': it cannot answer new prompts")


class LabelUDF(GenerateUDF):
    """Ray Data UDF: batch {"prompt_idx", "probe_id", "text", "reference", "grader"} -> + answer, quality."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = super().__call__(batch)
        out["quality"] = np.array([grade(str(g), a, str(r)) for a, r, g in
                                   zip(out["answer"], batch["reference"], batch["grader"], strict=True)])
        return out


def call_cost(spec: ExpertSpec, unit: str, prompt_tokens: np.ndarray, output_tokens: np.ndarray) -> np.ndarray:
    c = spec.prices
    if unit == "params":
        return float(c.n_params or 0.0) * (prompt_tokens + output_tokens) / 1000.0
    return ((c.input_price or 0.0) * prompt_tokens + (c.output_price or 0.0) * output_tokens) / 1e6


def cost_unit(pool: Pool, experts: Sequence[ExpertSpec]) -> str:
    if all(e.prices.n_params is not None for e in experts):
        return "params"
    if all(e.prices.input_price is not None or e.prices.output_price is not None for e in experts):
        return "usd"
    raise InputError(f"pool {pool.name!r}: give every expert n_params, or every expert prices, "
                     "so that their costs share a unit")


def build_table(pool: Pool, tasks: Sequence[Task], records: pd.DataFrame, seed: int = 0,
                val_fraction: float = 0.1, probe_size: int = 192, source: str = "label") -> RoutingTable:
    """The routing table from per-call records (columns: expert, prompt_idx, answer, quality,
    prompt_tokens, output_tokens, latency_s)."""
    experts = [e for e in pool.experts if e.kind != "recorded"]
    unit = cost_unit(pool, experts)
    n, m = len(tasks), len(experts)
    quality = np.full((n, m), np.nan)
    cost = np.zeros((n, m))
    responses = np.full((n, m), None, dtype=object)
    meta: dict[str, Any] = {"cost_formula": "n_params_B * (prompt+output tokens) / 1000" if unit == "params"
                            else "(input_price * prompt_tokens + output_price * output_tokens) / 1e6",
                            "label": {}}
    for j, spec in enumerate(experts):
        rec = records[records["expert"] == spec.name].sort_values("prompt_idx")
        if len(rec) != n or not (rec["prompt_idx"].to_numpy() == np.arange(n)).all():
            raise InputError(f"expert {spec.name!r}: {len(rec)} labelled prompts, expected {n}")
        failed = rec["error"].astype(str).str.len().to_numpy() > 0 if "error" in rec else np.zeros(n, bool)
        q = rec["quality"].to_numpy(dtype=float)
        quality[:, j] = np.where(failed, np.nan, q)  # a failed call is a missing cell, never a 0
        pt, ot = rec["prompt_tokens"].to_numpy(), rec["output_tokens"].to_numpy()
        cost[:, j] = call_cost(spec, unit, pt, ot)
        responses[:, j] = rec["answer"].to_numpy(dtype=object)
        meta["label"][spec.name] = {
            "accuracy": float(np.nanmean(quality[:, j])) if (~np.isnan(quality[:, j])).any() else None,
            "mean_latency_s": float(rec["latency_s"].mean()),
            "mean_prompt_tokens": float(pt.mean()), "mean_output_tokens": float(ot.mean()),
            "failed_calls": int(failed.sum()),
        }
    given = [t.split for t in tasks]
    if all(s is not None for s in given):
        splits = np.array(given, dtype=object)
    else:
        splits = assign_splits(n, None, val_fraction=val_fraction, probe_size=probe_size, seed=seed)
    return RoutingTable(
        prompt_ids=np.array([t.id for t in tasks]), texts=np.array([t.prompt for t in tasks], dtype=object),
        splits=splits, categories=np.array([t.category for t in tasks]), experts=[e.to_expert() for e in experts],
        quality=quality, cost=cost, source=source, cost_unit=unit, responses=responses, meta=meta)


def label_serial(pool: Pool, tasks: Sequence[Task], max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                 backend_kwargs: dict[str, Any] | None = None, batch_size: int = 16) -> pd.DataFrame:
    """Every live expert on every task, in this process: the per-call records (no Ray)."""
    rows = task_rows(tasks)
    frames = []
    for spec in pool.experts:
        if spec.kind == "recorded":
            continue
        udf = LabelUDF(**udf_args(spec, max_new_tokens, backend_kwargs))
        for s in range(0, len(rows), batch_size):
            chunk = rows[s:s + batch_size]
            batch = {k: np.array([r[k] for r in chunk], dtype=object) for k in chunk[0]}
            frames.append(pd.DataFrame({k: list(v) for k, v in udf(batch).items()}))
    return pd.concat(frames, ignore_index=True)
