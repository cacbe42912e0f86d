"""LLMRouter (ulab-uiuc/LLMRouter, ``dcrouter_preprocessed``): 9 open models, graded scores in
[0, 1], 14 task types.

Files: ``train.json`` / ``test.json`` (items with ``question``, ``scores`` (a dict, sometimes a
Python-literal string: model -> score), ``cluster_id``): the upstream split; ``default_llm.json``
(per model ``size`` like "70B", ``input_price`` / ``output_price`` in USD per million tokens);
``default_query_train.jsonl`` / ``_test.jsonl`` (the same queries with ``task_name``).

Category = ``task_name``, joined by the query text (the query file of the same split first; a
text listed under several tasks takes the first in file order, counted in meta). Prompt ids are
``train-<i>`` / ``test-<i>`` (some questions occur in both files; counted in meta).

cost="params": parameter count (billions) from ``size``. cost="usd": input_price x prompt tokens
+ output_price x answer tokens, per million; the prompt tokens are estimated from the text; no
answer length exists in the data, so ``answer_tokens`` (option, default 128) is assumed, and
the rule is written to ``table.meta["cost_model"]``. A scored model missing from
default_llm.json is refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from cscr.config import DataConfig
from cscr.data.io import (
    build_table,
    check_options,
    estimate_tokens,
    expert_costs,
    literal,
    parse_size,
    read_json,
    read_jsonl,
    source_dir,
)
from cscr.data.registry import register_loader
from cscr.data.table import Expert, RoutingTable, TableError

DEFAULT_ANSWER_TOKENS = 128


def _items(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        raise FileNotFoundError(f"LLMRouter file {path} does not exist")
    data = read_json(path)
    if not isinstance(data, list):
        raise TableError(f"{path}: expected a JSON array of items")
    for i, item in enumerate(data, 1):  # items counted from 1, as every position in an error
        if not isinstance(item, dict) or "question" not in item or "scores" not in item:
            raise TableError(f"{path}: item {i} needs 'question' and 'scores'")
        scores = literal(item["scores"], f"{path}: item {i} scores")
        if not isinstance(scores, dict):
            raise TableError(f"{path}: item {i}: scores must be a mapping model -> score")
        item["scores"] = scores
    return data


def _categories(folder: Path, split: str) -> tuple[dict[str, str], dict[str, str], int]:
    """(query -> task from this split's query file, from the other file, ambiguous count)."""
    maps, ambiguous = [], 0
    for s in (split, "test" if split == "train" else "train"):
        path = folder / f"default_query_{s}.jsonl"
        m: dict[str, str] = {}
        if path.exists():
            for row in read_jsonl(path):
                q, task = row.get("query"), row.get("task_name")
                if q is None or task is None:
                    continue
                if q in m and m[q] != task and s == split:
                    ambiguous += 1
                m.setdefault(q, str(task))
        maps.append(m)
    return maps[0], maps[1], ambiguous


@register_loader("llmrouter")
def load_llmrouter(cfg: DataConfig, **options: Any) -> RoutingTable:
    """Options: ``answer_tokens`` (assumed answer length for cost="usd", default 128)."""
    check_options("llmrouter", options, ["answer_tokens"])
    if cfg.data_dir is None:
        raise TableError("llmrouter has no Hub copy: give --data-dir (files from github ulab-uiuc/LLMRouter)")
    folder = source_dir(cfg, "llmrouter")
    answer_tokens = float(options.get("answer_tokens", DEFAULT_ANSWER_TOKENS))
    llm_path = folder / "default_llm.json"
    if not llm_path.exists():
        raise FileNotFoundError(f"{llm_path} does not exist (needed for the experts' sizes and prices)")
    llm = read_json(llm_path)
    if not isinstance(llm, dict):
        raise TableError(f"{llm_path}: expected a JSON object model -> fields")

    ids, texts, splits, cats, rows = [], [], [], [], []
    meta: dict[str, Any] = {"ambiguous_category_joins": 0, "unjoined_categories": 0}
    by_split: dict[str, set[str]] = {}
    for split in ("train", "test"):
        items = _items(folder / f"{split}.json")
        own, other, amb = _categories(folder, split)
        meta["ambiguous_category_joins"] += amb
        by_split[split] = {it["question"] for it in items}
        for i, it in enumerate(items):
            q = str(it["question"])
            cat = own.get(q, other.get(q))
            if cat is None:
                meta["unjoined_categories"] += 1
            ids.append(f"{split}-{i}")
            texts.append(q)
            splits.append(split)
            cats.append(cat or "")
            rows.append(it["scores"])
    meta["train_test_overlap"] = len(by_split["train"] & by_split["test"])

    models: list[str] = []
    for r in rows:
        models.extend(m for m in r if m not in models)
    unknown = [m for m in models if m not in llm]
    if unknown:
        raise TableError(f"{llm_path}: scored model(s) {unknown} are missing from default_llm.json")
    quality = np.full((len(rows), len(models)), np.nan)
    for i, r in enumerate(rows):
        for j, m in enumerate(models):
            v = r.get(m)
            if v is None:
                continue
            try:
                quality[i, j] = float(v)
            except (TypeError, ValueError) as exc:
                raise TableError(f"llmrouter {ids[i]}: score of {m!r} is not a number: {v!r}") from exc

    experts = []
    for m in models:
        e = llm[m]
        for f in ("size", "input_price", "output_price"):
            if f not in e:
                raise TableError(f"{llm_path}: model {m!r} has no {f!r}")
        experts.append(
            Expert(
                name=m,
                kind="open-weights",
                n_params=parse_size(e["size"], f"{llm_path}: {m}"),
                input_price=float(e["input_price"]),
                output_price=float(e["output_price"]),
            )
        )
    meta["api_ids"] = {m: llm[m].get("model") for m in models}
    cost, meta["cost_model"] = expert_costs(
        cfg, experts, estimate_tokens(texts), np.full(len(rows), answer_tokens), "llmrouter",
        f"answer length not in the data: answer_tokens = {answer_tokens:g} assumed")
    if cfg.cost == "params":
        meta["cost_model"] = "parameter count (billions) from default_llm.json 'size'"
    return build_table(
        cfg=cfg,
        source=f"llmrouter ({folder})",
        prompt_ids=ids,
        texts=texts,
        categories=cats,
        experts=experts,
        quality=quality,
        cost=cost,
        cost_unit=cfg.cost,
        base_splits=splits,
        meta=meta,
    )
