"""Loaders on the real files in ../shared/data: row counts, missing cells, splits, round trip."""

from __future__ import annotations

import numpy as np
import pytest

from cscr.config import DataConfig
from cscr.data import RoutingTable, load_dataset


@pytest.fixture(scope="module")
def rb(shared_data):
    return load_dataset("routerbench", DataConfig(data_dir=str(shared_data)))


@pytest.fixture(scope="module")
def lr(shared_data):
    return load_dataset("llmrouter", DataConfig(data_dir=str(shared_data)))


@pytest.fixture(scope="module")
def rl(shared_data):
    return load_dataset("routellm", DataConfig(data_dir=str(shared_data)))


def _count(t, *splits):
    return int(np.isin(t.splits, splits).sum())


def test_routerbench_rows_experts_and_upstream_split(rb):
    assert rb.n == 3178
    assert len(rb.experts) == 11
    assert "gpt-4-1106-preview" in rb.expert_names and "mistralai/mistral-7b-chat" in rb.expert_names
    assert _count(rb, "test") == 445 + 128 + 380  # the upstream *_test.csv rows
    assert _count(rb, "train", "val", "probe") == 1039 + 299 + 887
    assert _count(rb, "probe") == 192
    assert _count(rb, "val") == round(0.1 * (3178 - 953))
    assert sorted(set(rb.categories)) == ["arc-challenge", "mbpp", "winogrande"]
    assert rb.cost_unit == "usd" and (rb.cost > 0).all()
    assert set(np.unique(rb.quality[~np.isnan(rb.quality)])) == {0.0, 1.0}


def test_routerbench_missing_cells_are_masked_and_counted(rb):
    assert int(np.isnan(rb.quality).sum()) == 154
    assert int(np.isnan(rb.quality).any(axis=1).sum()) == 28
    assert rb.meta["missing_quality_cells"] == 154 and rb.meta["rows_with_missing_quality"] == 28
    assert rb.meta["missing_policy"] == "mask"
    assert rb.meta["duplicate_sample_ids"] == 14  # upstream splits 14 questions over two rows
    assert len(set(rb.prompt_ids)) == rb.n


def test_routerbench_drop_policy_drops_the_28_rows(shared_data):
    t = load_dataset("routerbench", DataConfig(data_dir=str(shared_data), missing="drop"))
    assert t.n == 3178 - 28
    assert not np.isnan(t.quality).any()
    assert t.meta["rows_dropped"] == 28 and t.meta["missing_quality_cells"] == 154


def test_routerbench_texts_and_responses_are_parsed(rb):
    assert not any(t.startswith("['") for t in rb.texts)
    assert rb.responses is not None and rb.responses.shape == (rb.n, 11)
    r = [x for x in rb.responses.ravel() if x is not None]
    assert len(r) == rb.n * 11 and not any(x.startswith("['") for x in r)
    two_part = [t for t, pid in zip(rb.texts, rb.prompt_ids, strict=True) if "#" in pid]
    assert len(two_part) == 28


def test_routerbench_params_cost_is_refused(shared_data):
    with pytest.raises(ValueError, match="parameter count.*claude"):
        load_dataset("routerbench", DataConfig(data_dir=str(shared_data), cost="params"))


def test_splits_are_deterministic_for_a_seed_and_probe_is_disjoint(shared_data, lr):
    again = load_dataset("llmrouter", DataConfig(data_dir=str(shared_data)))
    other = load_dataset("llmrouter", DataConfig(data_dir=str(shared_data), seed=1))
    assert (again.splits == lr.splits).all()
    assert (other.splits != lr.splits).any()
    probe = set(lr.prompt_ids[lr.splits == "probe"])
    rest = set(lr.prompt_ids[lr.splits != "probe"])
    assert len(probe) == 192 and not probe & rest
    assert all(p.startswith("train-") for p in probe)  # carved out of train, never test


def test_llmrouter_counts_graded_scores_and_categories(lr):
    assert _count(lr, "train", "val", "probe") == 5608
    assert _count(lr, "test") == 500
    assert len(lr.experts) == 9
    q = lr.quality[~np.isnan(lr.quality)]
    assert q.min() >= 0 and q.max() <= 1 and ((q > 0) & (q < 1)).any()  # graded
    cats = set(lr.categories)
    assert len(cats) == 14 and {"math", "gsm8k", "mbpp", "human_eval", "gpqa"} <= cats
    assert lr.meta["unjoined_categories"] == 0 and lr.meta["ambiguous_category_joins"] == 6
    assert lr.meta["train_test_overlap"] == 119
    by = {e.name: e for e in lr.experts}
    assert by["llama3-chatqa-1.5-70b"].n_params == 70.0
    assert by["gemma-2-9b-it"].input_price == pytest.approx(0.1)
    assert "answer_tokens = 128 assumed" in lr.meta["cost_model"]


def test_llmrouter_cost_selectable(shared_data, lr):
    params = load_dataset("llmrouter", DataConfig(data_dir=str(shared_data), cost="params"))
    assert params.cost_unit == "params" and lr.cost_unit == "usd"
    j = params.expert_index("llama3-chatqa-1.5-70b")
    assert (params.cost[:, j] == 70.0).all()
    # usd: price ratio between two experts is constant across prompts (same token counts)
    a, b = lr.expert_index("gemma-2-9b-it"), lr.expert_index("llama3-chatqa-1.5-70b")
    assert np.allclose(lr.cost[:, b] / lr.cost[:, a], 9.0)


def test_routellm_counts_categories_and_costs(rl):
    assert rl.n == 14042 + 1319
    assert (rl.categories == "gsm8k").sum() == 1319
    assert len(set(rl.categories)) == 57 + 1
    assert rl.expert_names == ["mistralai/Mixtral-8x7B-Instruct-v0.1", "gpt-4-1106-preview"]
    assert set(np.unique(rl.quality)) == {0.0, 1.0}
    assert _count(rl, "test") == round(0.2 * rl.n)  # no upstream split: test carved
    assert "registry.json" in rl.meta["cost_source"]
    assert (rl.cost[:, 1] > rl.cost[:, 0]).all()  # gpt-4 dearer per token
    gsm = rl.categories == "gsm8k"
    assert all(r is not None for r in rl.responses[gsm].ravel())
    assert all(r is None for r in rl.responses[~gsm].ravel())


def test_routellm_subsets_and_user_price_table(shared_data, tmp_path):
    import json

    prices = tmp_path / "prices.json"
    prices.write_text(json.dumps({"mistralai/Mixtral-8x7B-Instruct-v0.1": {"input_price": 0.6, "output_price": 0.6},
                                  "gpt-4-1106-preview": {"input_price": 10.0, "output_price": 30.0}}))
    t = load_dataset("routellm", DataConfig(data_dir=str(shared_data)), subset="gsm8k", prices=str(prices))
    assert t.n == 1319 and "user price table" in t.meta["cost_source"]
    assert t.experts[1].output_price == 30.0
    m = load_dataset("routellm", DataConfig(data_dir=str(shared_data)), subset="mmlu")
    assert m.n == 14042 and m.responses is None
    with pytest.raises(ValueError, match="subset must be one of"):
        load_dataset("routellm", DataConfig(data_dir=str(shared_data)), subset="hellaswag")


def test_round_trip_save_load(rb, tmp_path):
    folder = rb.save(tmp_path / "table")
    back = RoutingTable.load(folder)
    assert back.checksum() == rb.checksum()
    assert (back.prompt_ids == rb.prompt_ids).all() and (back.splits == rb.splits).all()
    np.testing.assert_array_equal(np.isnan(back.quality), np.isnan(rb.quality))
    np.testing.assert_allclose(back.cost, rb.cost)
    assert back.responses is not None and back.responses[5, 3] == rb.responses[5, 3]
    assert back.meta["missing_quality_cells"] == 154
    assert [e.name for e in back.experts] == rb.expert_names
