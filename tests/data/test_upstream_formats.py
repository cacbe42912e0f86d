"""Loaders on small files written in exactly the upstream schemas: RouterBench's pickle,
EmbedLLM's CSVs, MixInstruct's JSONL, a user's JSONL / Parquet logs."""

from __future__ import annotations

import numpy as np
import pytest
from upstream_files import (
    EMB_MODELS,
    MIX_MODELS,
    RB_MODELS,
    write_embedllm,
    write_generic,
    write_llmrouter,
    write_mixinstruct,
    write_routerbench_pkl,
)

from cscr.config import DataConfig
from cscr.data import load_dataset


@pytest.fixture
def data_dir(tmp_path, shared_data):
    """A data directory with the real cost registries beside the small files."""
    (tmp_path / "registries").symlink_to(shared_data / "registries")
    return tmp_path


def test_routerbench_pkl_format(data_dir):
    folder = data_dir / "routerbench"
    folder.mkdir()
    df = write_routerbench_pkl(folder / "routerbench_0shot.pkl", n=40)
    t = load_dataset("routerbench", DataConfig(data_dir=str(data_dir), probe_size=4))
    assert t.n == 40 and t.expert_names == RB_MODELS
    assert t.meta["format"] == "pkl" and t.meta["upstream_split"] is False
    assert (t.splits == "test").sum() == 8 and (t.splits == "probe").sum() == 4  # test carved: no upstream split
    assert set(t.categories) == {"mmlu-astronomy", "grade-school-math"}
    assert t.texts[0] == "Question 0: what is 0 + 0?"
    assert t.responses[2, 1] == "mistralai/mistral-7b-chat says 4"
    i = list(t.prompt_ids).index(df["sample_id"].iloc[3])
    assert np.isnan(t.quality[i, 1])
    # the empty cost is not a zero: the cell is masked and the cost filled with the median
    k = list(t.prompt_ids).index(df["sample_id"].iloc[5])
    assert np.isnan(t.quality[k, 2]) and t.cost[k, 2] > 0
    assert t.meta["missing_cost_cells"] == 1 and t.meta["missing_quality_cells"] == 2
    assert t.experts[2].n_params == 70.0  # from the real registry-routerbench.json
    drop = load_dataset("routerbench", DataConfig(data_dir=str(data_dir), probe_size=4, missing="drop"))
    assert drop.n == 38


def test_embedllm_long_format_pivot(data_dir):
    write_embedllm(data_dir / "embedllm")
    t = load_dataset("embedllm", DataConfig(data_dir=str(data_dir), probe_size=3))
    assert t.n == 30 + 6 + 8 and t.expert_names == EMB_MODELS
    assert (t.splits == "test").sum() == 8 and (t.splits == "val").sum() == 6  # upstream val kept
    assert (t.splits == "probe").sum() == 3
    assert int(np.isnan(t.quality).sum()) == 1 and np.isnan(t.quality[list(t.prompt_ids).index("2"), 0])
    assert set(t.categories) == {"math", "law", "biology"}
    params = load_dataset("embedllm", DataConfig(data_dir=str(data_dir), cost="params"))
    assert params.cost[0].tolist() == [7.0, 2.0, 34.0]
    assert "answer_tokens = 64 assumed" in t.meta["cost_model"]


def test_mixinstruct_jsonl_schema_and_quality_rule(data_dir):
    write_mixinstruct(data_dir / "mix-instruct")
    t = load_dataset("mixinstruct", DataConfig(data_dir=str(data_dir), probe_size=3))
    assert t.n == 43 and t.expert_names == MIX_MODELS
    assert (t.splits == "test").sum() == 8 and (t.splits == "val").sum() == 5
    assert t.meta["metric"] == "bertscore" and "bertscore" in t.meta["quality_rule"]
    assert t.quality.min() >= 0.5 and t.quality.max() <= 0.9  # bertscore kept as is
    assert t.texts[0] == "Answer the question.\nWhat is the capital of country 0?"
    assert t.texts[1] == "What is the capital of country 1?"  # empty instruction left out
    assert t.responses[0, 1].startswith("vicuna-13b-1.1 thinks")
    assert set(t.categories) == {"unified_chip2", "alpaca_gpt4", "dolly_15k"}
    bart = load_dataset("mixinstruct", DataConfig(data_dir=str(data_dir)), metric="bartscore")
    assert bart.quality.min() == 0.0 and bart.quality.max() == 1.0  # min-max normalised
    assert bart.meta["quality_min_max"][0] < bart.meta["quality_min_max"][1] < 0
    # usd cost grows with the response length (candidate k has k extra characters)
    assert (t.cost > 0).all() and t.experts[0].n_params == 13


def test_generic_jsonl_and_parquet_give_the_same_table(tmp_path):
    df = write_generic(tmp_path / "logs.jsonl", n_prompts=20)
    (tmp_path / "pq").mkdir()
    write_generic(tmp_path / "pq" / "logs.parquet", n_prompts=20)
    a = load_dataset("generic", DataConfig(data_dir=str(tmp_path / "logs.jsonl"), probe_size=2))
    b = load_dataset("generic", DataConfig(data_dir=str(tmp_path / "pq"), probe_size=2))
    assert a.n == b.n == 20 and a.expert_names == ["small", "large"]
    assert a.checksum() == b.checksum()
    first = df[(df.prompt_id == "q3") & (df.model == "large")].iloc[0]
    i = list(a.prompt_ids).index("q3")
    assert a.quality[i, 1] == pytest.approx(first.quality) and a.cost[i, 1] == pytest.approx(0.002)
    assert a.responses[i, 0] == "small answer 3" and a.categories[i] == "topic3"
    assert (a.splits == "test").sum() == 4  # carved: the logs have no split


def test_generic_with_splits_and_absent_pairs(tmp_path):
    df = write_generic(tmp_path / "x.jsonl", n_prompts=24, with_split=True)
    df = df[~((df.prompt_id == "q1") & (df.model == "large"))]  # one pair never logged
    path = tmp_path / "y.jsonl"
    df.to_json(path, orient="records", lines=True)
    t = load_dataset("generic", DataConfig(probe_size=2), file=str(path))
    assert (t.splits == "test").sum() == 6  # the logs' own test rows
    i = list(t.prompt_ids).index("q1")
    assert np.isnan(t.quality[i, 1]) and t.cost[i, 1] == pytest.approx(0.002)
    assert t.meta["absent_pairs"] == 1


def test_llmrouter_small_files_literal_scores(tmp_path):
    write_llmrouter(tmp_path / "llmrouter")
    t = load_dataset("llmrouter", DataConfig(data_dir=str(tmp_path), probe_size=2))
    assert t.n == 50 and t.expert_names == ["small-7b", "big-70b"]
    assert t.quality[0].tolist() == [0.0, 1.0]  # item 0's scores were a Python-literal string
    assert set(t.categories) == {"math", "mmlu"}
