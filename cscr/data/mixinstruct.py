"""MixInstruct (Hub data set ``llm-blender/mix-instruct``, LLM-Blender): 11 open models,
graded scores against a reference answer.

Upstream files ``train_data_prepared.jsonl``, ``val_data_prepared.jsonl``,
``test_data_prepared.jsonl`` (any ``*.jsonl`` / ``*.json`` whose name holds train / val / test
is read; JSON Lines or a JSON array). Each row: ``id``, ``instruction``, ``input``, ``output``
(the reference), ``candidates``: a list of {``decoding_method``, ``model``, ``text``,
``scores``: {logprobs, bleu, bertscore, rouge1, rouge2, rougeL, rougeLsum, bleurt?,
bartscore?}}; test rows may also carry ``cmp_results`` (ChatGPT comparisons; not used).

Prompt = instruction and input joined by a newline (empty parts left out); responses are the
candidates' texts; category = the source part of the id (``unified_chip2/69962`` ->
``unified_chip2``).

Quality (option ``metric``, default "bertscore"): BERTScore F1 against the reference, which
already lies in [0, 1] (values a hair outside are clipped and counted). Other metrics: rouge1,
rouge2, rougeL, rougeLsum (already in [0, 1]); bleu (0-100, divided by 100); bartscore, bleurt,
logprobs (unbounded: min-max normalised over the loaded cells, min and max written to meta).
A candidate without the metric is a missing cell.

Costs from ``registries/registry-mix-instruct.json``: cost="params": ``n_params``;
cost="usd": ``cost_usd_per_1k_tokens`` x (prompt tokens + response tokens) / 1000.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from cscr.config import DataConfig
from cscr.data import hub
from cscr.data.io import (
    build_table,
    check_options,
    estimate_tokens,
    expert_costs,
    read_records_at,
    registry_experts,
    source_dir,
)
from cscr.data.registry import register_loader
from cscr.data.table import RoutingTable, TableError

BOUNDED = ("bertscore", "rouge1", "rouge2", "rougeL", "rougeLsum")
MINMAX = ("bartscore", "bleurt", "logprobs")
METRICS = (*BOUNDED, "bleu", *MINMAX)


def _split_of(name: str) -> str | None:
    n = name.lower()
    for key, split in (("train", "train"), ("val", "val"), ("dev", "val"), ("test", "test")):
        if key in n:
            return split
    return None


def _files(folder: Path) -> list[tuple[str, Path]]:
    out = []
    for f in sorted(folder.glob("*.json*")):
        split = _split_of(f.name)
        if f.suffix in (".json", ".jsonl") and split is not None:
            out.append((split, f))
    out.sort(key=lambda sp: ("train", "val", "test").index(sp[0]))
    if not out:
        raise FileNotFoundError(f"no MixInstruct files (*train*.jsonl / *val*.jsonl / *test*.jsonl) in {folder}")
    return out


def normalise(raw: np.ndarray, metric: str, meta: dict[str, Any]) -> np.ndarray:
    """Metric values (n, M) -> quality in [0, 1] (NaN kept)."""
    q = raw.copy()
    ok = ~np.isnan(q)
    if metric in BOUNDED:
        outside = int(((q[ok] < 0) | (q[ok] > 1)).sum())
        meta["quality_cells_clipped"] = outside
        q[ok] = np.clip(q[ok], 0.0, 1.0)
        meta["quality_rule"] = f"{metric} (in [0, 1]; {outside} cells clipped)"
    elif metric == "bleu":
        q[ok] = np.clip(q[ok] / 100.0, 0.0, 1.0)
        meta["quality_rule"] = "bleu / 100"
    else:
        lo, hi = (float(q[ok].min()), float(q[ok].max())) if ok.any() else (0.0, 1.0)
        q[ok] = (q[ok] - lo) / (hi - lo) if hi > lo else 1.0
        meta["quality_rule"] = f"{metric} min-max normalised over the loaded cells: (x - {lo:g}) / ({hi:g} - {lo:g})"
        meta["quality_min_max"] = [lo, hi]
    return q


@register_loader("mixinstruct")
def load_mixinstruct(cfg: DataConfig, **options: Any) -> RoutingTable:
    """Options: ``metric`` (see module doc; default bertscore), ``registry`` (cost registry JSON)."""
    check_options("mixinstruct", options, ["metric", "registry"])
    metric = options.get("metric", "bertscore")
    if metric not in METRICS:
        raise TableError(f"mixinstruct: unknown metric {metric!r}; known: {list(METRICS)}")
    folder = hub.download("mixinstruct") if cfg.data_dir is None else source_dir(cfg, "mix-instruct", "mixinstruct")
    ids, texts, splits, per_row = [], [], [], []
    models: list[str] = []
    for split, path in _files(folder):
        for where, row in read_records_at(path):
            for field in ("id", "instruction", "input", "candidates"):
                if field not in row:
                    raise TableError(f"{where}: missing field {field!r}")
            if not isinstance(row["candidates"], list):
                raise TableError(f"{where}: 'candidates' must be a list")
            cands: dict[str, tuple[float, str]] = {}
            for c in row["candidates"]:
                if not isinstance(c, dict) or "model" not in c or "scores" not in c:
                    raise TableError(f"{where}: each candidate needs 'model' and 'scores'")
                if c["model"] in cands:
                    raise TableError(f"{where}: model {c['model']!r} has two candidates")
                v = c["scores"].get(metric) if isinstance(c["scores"], dict) else None
                val = float(v) if v is not None and math.isfinite(float(v)) else math.nan
                cands[c["model"]] = (val, str(c.get("text", "")))
                if c["model"] not in models:
                    models.append(c["model"])
            ids.append(str(row["id"]))
            texts.append("\n".join(p for p in (str(row["instruction"] or ""), str(row["input"] or "")) if p.strip()))
            splits.append(split)
            per_row.append(cands)
    n, m = len(ids), len(models)
    raw = np.full((n, m), np.nan)
    responses = np.full((n, m), None, dtype=object)
    for i, cands in enumerate(per_row):
        for j, name in enumerate(models):
            if name in cands:
                raw[i, j], responses[i, j] = cands[name]
    meta: dict[str, Any] = {"metric": metric}
    quality = normalise(raw, metric, meta)

    experts, reg_path = registry_experts(cfg, options, "registry-mix-instruct.json", models, "mixinstruct")
    out_tok = np.stack([estimate_tokens(list(responses[:, j])) for j in range(m)], axis=1)
    cost, meta["cost_model"] = expert_costs(cfg, experts, estimate_tokens(texts), out_tok, "mixinstruct",
                                            "answer tokens from the candidates' responses")
    meta["registry"] = str(reg_path)
    return build_table(
        cfg=cfg,
        source=f"mixinstruct ({folder})",
        prompt_ids=ids,
        texts=texts,
        categories=[i.split("/")[0] for i in ids],
        experts=experts,
        quality=quality,
        cost=cost,
        cost_unit=cfg.cost,
        base_splits=splits,
        responses=responses,
        meta=meta,
    )
