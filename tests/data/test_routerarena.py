"""RouterArena's cached-results layout (github RouteWorks/RouterArena: cached_results/<model>.jsonl
plus model_cost/cost.json), read by the routerarena loader and by the generic loader's nested
fields and one-file-per-model layout. The small files are written here in the upstream schema
(llm_inference/pipeline.py writes the rows, llm_evaluation/evaluate_models.py adds
evaluation_result)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from cscr.cli import main

from cscr.config import DataConfig
from cscr.data import TableError, load_dataset
from cscr.data.table import RoutingTable

# prices as in upstream model_cost/cost.json (USD per million tokens)
COSTS = {
    "gpt-4o-mini": {"input_token_price_per_million": 0.15, "output_token_price_per_million": 0.6},
    "claude-3-haiku-20240307": {"input_token_price_per_million": 0.25, "output_token_price_per_million": 1.25},
    "gemini-2.0-flash-001": {"input_token_price_per_million": 0.1, "output_token_price_per_million": 0.4},
    "gpt-4o": {"input_token_price_per_million": 2.5, "output_token_price_per_million": 10.0},
}
MODELS = ["claude-3-haiku-20240307", "gemini-2.0-flash-001", "gpt-4o-mini"]
DATASETS = ["AIME", "MMLUPro", "SuperGLUE-CausalReasoning", "WMT19-de-en"]


def entry(i: int, model: str, score: float | None, tin: int, tout: int, success: bool = True,
          metric: str = "exact_match") -> dict:
    """One cached result line, every upstream field present."""
    gi = f"{DATASETS[i % len(DATASETS)]}_{100 + i}"
    prices = COSTS[model]
    cost = (tin * prices["input_token_price_per_million"] + tout * prices["output_token_price_per_million"]) / 1e6
    return {
        "global_index": gi,
        "question": f"Question {i}: what is {i} plus {i}? Answer in \\boxed{{}} format.",
        "llm_selected": model,
        "generated_answer": f"The answer is \\boxed{{{2 * i}}}" if success else "",
        "token_usage": {"input_tokens": tin if success else 0, "output_tokens": tout if success else 0,
                        "total_tokens": (tin + tout) if success else 0},
        "success": success,
        "provider": "openai",
        "error": None if success else "rate limited",
        "batch_size": None,
        "batch_number": None,
        "batch_index": None,
        "processing_mode": "individual",
        "evaluation_result": None if score is None else {
            "extracted_answer": f"\\boxed{{{2 * i}}}", "ground_truth": str(2 * i), "score": score,
            "metric": metric, "inference_cost": cost},
    }


def write_arena(root: Path, n: int = 24, seed: int = 0, out_of_range: float | None = None) -> dict[str, list[dict]]:
    """root/cached_results/<model>.jsonl and root/model_cost/cost.json. Special rows: gpt-4o-mini
    failed on prompt 1; claude has prompt 2 unscored and a scoring crash on prompt 3; gemini never
    ran prompt 4 (absent). ``out_of_range``: claude's score on prompt 5."""
    rng = np.random.default_rng(seed)
    rows: dict[str, list[dict]] = {}
    for k, model in enumerate(MODELS):
        rows[model] = []
        for i in range(n):
            if model == "gemini-2.0-flash-001" and i == 4:
                continue
            score = float(rng.random() < 0.4 + 0.2 * k)
            kw: dict = {}
            if model == "gpt-4o-mini" and i == 1:
                kw = {"success": False}
                score = None
            if model == "claude-3-haiku-20240307" and i == 2:
                score = None
            if model == "claude-3-haiku-20240307" and i == 3:
                score, kw = 0.0, {"metric": "error"}
            if model == "claude-3-haiku-20240307" and i == 5 and out_of_range is not None:
                score = out_of_range
            rows[model].append(entry(i, model, score, tin=40 + 3 * i, tout=10 + 5 * i + k, **kw))
    (root / "cached_results").mkdir(parents=True)
    for model, rs in rows.items():
        # upstream writes one json.dump per line; a blank line at the end as editors leave it
        (root / "cached_results" / f"{model}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rs) + "\n")
    (root / "model_cost").mkdir()
    (root / "model_cost" / "cost.json").write_text(json.dumps(COSTS, indent=2))
    return rows


def _cfg(root: Path, **kw) -> DataConfig:
    return DataConfig(dataset="routerarena", data_dir=str(root), probe_size=2, **kw)


def test_routerarena_layout_quality_costs_and_missing_cells(tmp_path):
    rows = write_arena(tmp_path)
    t = load_dataset("routerarena", _cfg(tmp_path))
    assert t.expert_names == MODELS and t.n == 24 and t.cost_unit == "usd"
    assert t.experts[2].input_price == 0.15 and t.experts[2].output_price == 0.6
    ids = list(t.prompt_ids)
    # every scored cell equals the file's score; cost = token_usage x the cost table's prices
    for j, model in enumerate(MODELS):
        for r in rows[model]:
            i = ids.index(r["global_index"])
            ev = r["evaluation_result"]
            if r["success"] and ev is not None and ev["metric"] != "error":
                assert t.quality[i, j] == ev["score"]
                p = COSTS[model]
                want = (r["token_usage"]["input_tokens"] * p["input_token_price_per_million"]
                        + r["token_usage"]["output_tokens"] * p["output_token_price_per_million"]) / 1e6
                assert t.cost[i, j] == pytest.approx(want)
    i1, i2, i3, i4 = (ids.index(f"{DATASETS[i % 4]}_{100 + i}") for i in (1, 2, 3, 4))
    assert math.isnan(t.quality[i1, 2]) and t.cost[i1, 2] > 0  # failed call: missing, cost never 0
    assert math.isnan(t.quality[i2, 0])  # not scored yet
    assert math.isnan(t.quality[i3, 0])  # scoring crash recorded as 0.0 upstream: not a real zero
    assert math.isnan(t.quality[i4, 1]) and t.cost[i4, 1] > 0  # absent from gemini's file
    assert t.meta["failed_calls"] == 1 and t.meta["unscored_rows"] == 1 and t.meta["scoring_errors"] == 1
    assert set(t.categories) == set(DATASETS)
    assert t.categories[ids.index("SuperGLUE-CausalReasoning_102")] == "SuperGLUE-CausalReasoning"
    assert t.texts[0].startswith("Question 0: what is 0 plus 0?")
    assert t.responses is not None and t.responses[0, 0] == "The answer is \\boxed{0}"
    assert (t.splits == "test").sum() == round(0.2 * 24)  # no upstream split: carved


def test_routerarena_recorded_costs_match_token_costs(tmp_path):
    write_arena(tmp_path)
    a = load_dataset("routerarena", _cfg(tmp_path))
    b = load_dataset("routerarena", _cfg(tmp_path), cost_source="recorded")
    scored = ~np.isnan(a.quality)
    assert np.allclose(a.cost[scored], b.cost[scored])


def test_routerarena_refuses_out_of_range_scores_unless_clipped(tmp_path):
    write_arena(tmp_path, out_of_range=7.5)
    path = tmp_path / "cached_results" / "claude-3-haiku-20240307.jsonl"
    # prompt 5 is line 6 of the file (1-based), named by its id
    with pytest.raises(TableError, match=rf"{path}:6: quality outside \[0, 1\]: 7.5 for prompt "
                                         r"'MMLUPro_105', model 'claude-3-haiku-20240307'.*clip_quality=true"):
        load_dataset("routerarena", _cfg(tmp_path))
    t = load_dataset("routerarena", _cfg(tmp_path), clip_quality="true")
    assert t.quality[list(t.prompt_ids).index("MMLUPro_105"), 0] == 1.0
    assert t.meta["quality_cells_clipped"] == 1


def test_routerarena_model_without_price_is_refused(tmp_path):
    write_arena(tmp_path)
    costs = {k: v for k, v in COSTS.items() if k != "gemini-2.0-flash-001"}
    (tmp_path / "model_cost" / "cost.json").write_text(json.dumps(costs))
    with pytest.raises(TableError, match=r"model\(s\) \['gemini-2.0-flash-001'\] have no price"):
        load_dataset("routerarena", _cfg(tmp_path))


def test_generic_reads_the_same_layout_with_nested_fields(tmp_path):
    """The generic loader on RouterArena's files: one file per model, dotted field paths, and either
    the recorded nested cost or the cost table times the nested token counts."""
    write_arena(tmp_path)
    arena = load_dataset("routerarena", _cfg(tmp_path))
    fields = {"prompt": "question", "prompt_id": "global_index", "quality": "evaluation_result.score"}
    folder = tmp_path / "cached_results"
    rec = load_dataset("generic", DataConfig(probe_size=2), file=str(folder), cost="evaluation_result.inference_cost",
                       **fields)
    assert rec.expert_names == MODELS and rec.meta["layout"] == "one file per model"
    assert rec.meta["fields"]["quality"] == "evaluation_result.score"
    priced = load_dataset("generic", DataConfig(data_dir=str(folder), probe_size=2),
                          prices=str(tmp_path / "model_cost" / "cost.json"),
                          input_tokens="token_usage.input_tokens", output_tokens="token_usage.output_tokens", **fields)
    both = ~np.isnan(arena.quality) & ~np.isnan(rec.quality)
    order = [list(rec.prompt_ids).index(p) for p in arena.prompt_ids]
    assert np.allclose(rec.cost[order][both], arena.cost[both])
    order = [list(priced.prompt_ids).index(p) for p in arena.prompt_ids]
    assert np.allclose(priced.cost[order][both], arena.cost[both])


def test_generic_nested_field_missing_everywhere_names_the_path(tmp_path):
    write_arena(tmp_path)
    with pytest.raises(TableError, match=r"missing column\(s\) \['evaluation_result.grade'\]"):
        load_dataset("generic", DataConfig(probe_size=2), file=str(tmp_path / "cached_results"), prompt="question",
                     quality="evaluation_result.grade", cost="evaluation_result.inference_cost")


def test_prepare_cli_routerarena(tmp_path, capsys):
    write_arena(tmp_path / "arena")
    assert main(["prepare", "--dataset", "routerarena", "--data-dir", str(tmp_path / "arena"),
                 "--out", str(tmp_path / "run"), "--no-embed", "--probe-size", "2"]) == 0
    t = RoutingTable.load(tmp_path / "run" / "table")
    assert t.expert_names == MODELS and t.n == 24
    write_arena(tmp_path / "bad", out_of_range=-0.5)
    assert main(["prepare", "--dataset", "routerarena", "--data-dir", str(tmp_path / "bad"),
                 "--out", str(tmp_path / "run2"), "--no-embed"]) == 2
    err = capsys.readouterr().err
    assert "quality outside [0, 1]: -0.5" in err and "clip_quality=true" in err
    assert not (tmp_path / "run2").exists()
