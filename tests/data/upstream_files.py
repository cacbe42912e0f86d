"""Small files written in exactly the upstream schemas (RouterBench pkl, EmbedLLM CSVs,
MixInstruct JSONL, LLMRouter JSON), for loader tests that cannot use the full sets."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

RB_MODELS = ["gpt-4-1106-preview", "mistralai/mistral-7b-chat", "meta/llama-2-70b-chat"]


def write_routerbench_pkl(path: Path, n: int = 40, seed: int = 0) -> pd.DataFrame:
    """``routerbench_0shot.pkl``: a pickled DataFrame, prompt/responses as Python-literal lists.
    Row 3 has an empty correctness cell (model 1), row 5 an empty cost (model 2)."""
    rng = np.random.default_rng(seed)
    cols: dict[str, list] = {
        "sample_id": [f"{'mmlu' if i % 2 else 'gsm8k'}.test.{i}" for i in range(n)],
        "prompt": [repr([f"Question {i}: what is {i} + {i}?"]) for i in range(n)],
        "eval_name": ["mmlu-astronomy" if i % 2 else "grade-school-math" for i in range(n)],
    }
    for m in RB_MODELS:
        cols[m] = list(rng.integers(0, 2, n).astype(float))
    for m in RB_MODELS:
        cols[f"{m}|model_response"] = [repr([f"{m} says {2 * i}"]) for i in range(n)]
    for k, m in enumerate(RB_MODELS):
        cols[f"{m}|total_cost"] = list((k + 1) * 1e-4 * (1 + rng.random(n)))
    cols["oracle_model_to_route_to"] = [RB_MODELS[1]] * n
    df = pd.DataFrame(cols, index=np.arange(1000, 1000 + n))
    df.loc[1003, RB_MODELS[1]] = np.nan
    df.loc[1005, f"{RB_MODELS[2]}|total_cost"] = np.nan
    df.to_pickle(path)
    return df


EMB_MODELS = ["mistralai__Mistral-7B-Instruct-v0.1", "google__gemma-2b-it", "01-ai__Yi-34B-Chat"]


def write_embedllm(folder: Path, n_train: int = 30, n_val: int = 6, n_test: int = 8, seed: int = 0) -> None:
    """EmbedLLM ``train.csv`` / ``val.csv`` / ``test.csv``: long rows (one per prompt x model);
    the pair (train prompt 2, model 0) is absent."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    pid = 0
    for name, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        rows = []
        for _ in range(n):
            for mid, m in enumerate(EMB_MODELS):
                if name == "train" and pid == 2 and mid == 0:
                    continue
                rows.append({"prompt_id": pid, "model_id": mid, "model_name": m, "label": int(rng.integers(0, 2)),
                             "category": ["math", "law", "biology"][pid % 3], "prompt": f"Prompt number {pid}?"})
            pid += 1
        pd.DataFrame(rows).to_csv(folder / f"{name}.csv")


MIX_MODELS = ["alpaca-native", "vicuna-13b-1.1", "flan-t5-xxl"]


def mix_row(i: int, rng: np.random.Generator, test: bool = False) -> dict:
    row = {
        "id": f"{['unified_chip2', 'alpaca_gpt4', 'dolly_15k'][i % 3]}/{1000 + i}",
        "instruction": "" if i % 2 else "Answer the question.",
        "input": f"What is the capital of country {i}?",
        "output": f"Capital {i}.",
        "candidates": [
            {
                "decoding_method": "top_p_sampling",
                "model": m,
                "text": f"{m} thinks it is capital {i}" + "." * k,
                "scores": {
                    "logprobs": float(-rng.random()),
                    "bleu": float(100 * rng.random()),
                    "bertscore": float(0.5 + 0.4 * rng.random()),
                    "rouge1": float(rng.random()),
                    "rouge2": float(rng.random()),
                    "rougeL": float(rng.random()),
                    "rougeLsum": float(rng.random()),
                    "bartscore": float(-2 - 3 * rng.random()),
                },
            }
            for k, m in enumerate(MIX_MODELS)
        ],
    }
    if test:
        row["cmp_results"] = json.dumps({"model_A,model_B": "A is better"})
    return row


def write_mixinstruct(folder: Path, sizes: tuple[int, int, int] = (30, 5, 8), seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    i = 0
    for split, n in zip(("train", "val", "test"), sizes, strict=True):
        with open(folder / f"{split}_data_prepared.jsonl", "w") as fh:
            for _ in range(n):
                fh.write(json.dumps(mix_row(i, rng, test=split == "test")) + "\n")
                i += 1


def write_llmrouter(folder: Path, extra_model: str | None = None, n: int = 40) -> None:
    """LLMRouter train/test.json (one item with a literal-string scores), default_llm.json,
    default_query_*.jsonl. ``extra_model``: a scored model missing from default_llm.json."""
    folder.mkdir(parents=True, exist_ok=True)
    llm = {
        "small-7b": {"size": "7B", "input_price": 0.2, "output_price": 0.2, "model": "org/small-7b", "feature": "x"},
        "big-70b": {"size": "70B", "input_price": 0.9, "output_price": 0.9, "model": "org/big-70b", "feature": "y"},
    }
    (folder / "default_llm.json").write_text(json.dumps(llm))
    for split, k in (("train", n), ("test", n // 4)):
        items, queries = [], []
        for i in range(k):
            q = f"{split} question {i}?"
            scores = {"small-7b": round(i % 3 / 2, 2), "big-70b": 1.0}
            if extra_model:
                scores[extra_model] = 0.5
            items.append({"question": q, "scores": str(scores) if i == 0 else scores, "cluster_id": i % 2})
            queries.append({"task_name": "math" if i % 2 else "mmlu", "query": q, "ground_truth": "A", "metric": "em_mc"})
        (folder / f"{split}.json").write_text(json.dumps(items))
        (folder / f"default_query_{split}.jsonl").write_text("\n".join(json.dumps(r) for r in queries) + "\n")


def write_generic(path: Path, n_prompts: int = 20, models: tuple[str, ...] = ("small", "large"), seed: int = 0,
                  with_split: bool = False) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_prompts):
        for k, m in enumerate(models):
            row = {"prompt_id": f"q{i}", "prompt": f"User prompt {i}: explain topic {i % 5}.", "model": m,
                   "quality": float(rng.random()), "cost": 0.001 * (k + 1), "category": f"topic{i % 5}",
                   "response": f"{m} answer {i}"}
            if with_split:
                row["split"] = "test" if i % 4 == 0 else "train"
            rows.append(row)
    df = pd.DataFrame(rows)
    if path.suffix == ".parquet":
        df.to_parquet(path, index=False)
    else:
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return df


def write_registry(path: Path, names: list[str], n_params: list[float | None], price_1k: list[float]) -> None:
    reg = {}
    for name, p, c in zip(names, n_params, price_1k, strict=True):
        entry = {"hf_id": name.replace("__", "/"), "modality": "text", "latency_ms": 0, "cost_usd_per_1k_tokens": c}
        if p is not None:
            entry["n_params"] = p
        reg[name] = entry
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(reg))
