"""Each bad input gives one clear error naming the problem."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from upstream_files import write_embedllm, write_generic, write_llmrouter

from cscr.config import DataConfig
from cscr.data import TableError, load_dataset


def _logs(tmp_path, mutate, name="logs.jsonl"):
    df = write_generic(tmp_path / "orig.jsonl", n_prompts=6)
    df = mutate(df)
    path = tmp_path / name
    if name.endswith(".parquet"):
        df.to_parquet(path, index=False)
    else:
        path.write_text("\n".join(json.dumps(r) for r in df.to_dict(orient="records")) + "\n")
    return path


def _load_generic(path):
    return load_dataset("generic", DataConfig(probe_size=1), file=str(path))


def test_unknown_data_set_lists_the_known_ones():
    with pytest.raises(TableError, match=r"unknown data set 'routerbnch'; known: embedllm, generic, llmrouter, mixinstruct, routellm, routerarena, routerbench"):
        load_dataset("routerbnch", DataConfig())


def test_missing_model_column(tmp_path):
    path = _logs(tmp_path, lambda d: d.drop(columns=["model"]), "logs.parquet")
    with pytest.raises(TableError, match=r"missing column\(s\) \['model'\]"):
        _load_generic(path)


def test_negative_cost(tmp_path):
    def neg(d):
        d.loc[3, "cost"] = -0.5
        return d

    with pytest.raises(TableError, match=r"negative cost -0.5 for prompt 'q1', model 'large'"):
        _load_generic(_logs(tmp_path, neg))


def test_nan_cost(tmp_path):
    def nan(d):
        d.loc[2, "cost"] = None
        return d

    with pytest.raises(TableError, match=r"cost is NaN or empty for prompt 'q1', model 'small'"):
        _load_generic(_logs(tmp_path, nan))


def test_quality_outside_unit_interval(tmp_path):
    def big(d):
        d.loc[4, "quality"] = 7.0
        return d

    with pytest.raises(TableError, match=r"quality outside \[0, 1\]: 7.0 for prompt 'q2', model 'small'"):
        _load_generic(_logs(tmp_path, big))


def test_duplicate_prompt_ids(tmp_path):
    with pytest.raises(TableError, match=r"duplicate prompt ids: prompt 'q0' has two rows for model 'small'"):
        _load_generic(_logs(tmp_path, lambda d: pd.concat([d, d.iloc[[0]]])))
    with pytest.raises(TableError, match=r"duplicate prompt ids: prompt id 'q0' has different prompt texts"):
        def retext(d):
            d.loc[1, "prompt"] = "something else"
            return d

        _load_generic(_logs(tmp_path, retext))


def test_duplicate_prompt_id_across_embedllm_files(tmp_path, shared_data):
    write_embedllm(tmp_path / "embedllm")
    test = pd.read_csv(tmp_path / "embedllm" / "test.csv", index_col=0)
    test.loc[test.prompt_id == test.prompt_id.iloc[0], "prompt_id"] = 0  # prompt 0 is a train prompt
    test.loc[test.prompt_id == 0, "prompt"] = "Prompt number 0?"
    test.to_csv(tmp_path / "embedllm" / "test.csv")
    with pytest.raises(TableError, match=r"duplicate prompt ids: prompt id '0' is in both the train and the test file"):
        load_dataset("embedllm", DataConfig(data_dir=str(tmp_path)), registry=str(shared_data / "registries" / "registry-embedllm.json"))


def test_malformed_json_line(tmp_path):
    path = tmp_path / "logs.jsonl"
    write_generic(path, n_prompts=3)
    lines = path.read_text().splitlines()
    lines[1] = lines[1][:-5]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(TableError, match=r"logs.jsonl:2: malformed JSON"):
        _load_generic(path)


def test_malformed_llmrouter_json(tmp_path):
    write_llmrouter(tmp_path / "llmrouter")
    (tmp_path / "llmrouter" / "train.json").write_text('[{"question": "q", "scores": ')
    with pytest.raises(TableError, match=r"train.json: malformed JSON"):
        load_dataset("llmrouter", DataConfig(data_dir=str(tmp_path)))


def test_csv_without_prompt_column(tmp_path, shared_data):
    folder = tmp_path / "routellm"
    (folder / "mmlu").mkdir(parents=True)
    df = pd.read_csv(shared_data / "routellm" / "mmlu" / "mmlu_anatomy.csv")
    df.drop(columns=["prompt"]).to_csv(folder / "mmlu" / "mmlu_anatomy.csv", index=False)
    with pytest.raises(TableError, match=r"mmlu_anatomy.csv: missing column\(s\) \['prompt'\]"):
        load_dataset("routellm", DataConfig(data_dir=str(tmp_path)), subset="mmlu")


def test_routerbench_csv_without_prompt_column(tmp_path, shared_data):
    folder = tmp_path / "routerbench"
    folder.mkdir()
    df = pd.read_csv(shared_data / "routerbench" / "mbpp_test.csv", index_col=0, nrows=5)
    df.drop(columns=["prompt"]).to_csv(folder / "mbpp_train.csv")
    with pytest.raises(TableError, match=r"mbpp_train.csv: missing column\(s\) \['prompt'\]"):
        load_dataset("routerbench", DataConfig(data_dir=str(tmp_path)))


def test_llmrouter_scored_model_missing_from_default_llm(tmp_path):
    write_llmrouter(tmp_path / "llmrouter", extra_model="mystery-13b")
    with pytest.raises(TableError, match=r"scored model\(s\) \['mystery-13b'\] are missing from default_llm.json"):
        load_dataset("llmrouter", DataConfig(data_dir=str(tmp_path)))


def test_unknown_loader_option(shared_data):
    with pytest.raises(TableError, match=r"routellm: unknown option\(s\) \['subsett'\]"):
        load_dataset("routellm", DataConfig(data_dir=str(shared_data)), subsett="mmlu")


def test_params_cost_without_parameter_counts(shared_data):
    with pytest.raises(TableError, match=r"model\(s\) \['gpt-4-1106-preview'\] have no parameter count"):
        load_dataset("routellm", DataConfig(data_dir=str(shared_data), cost="params"), subset="gsm8k")


def test_missing_data_dir_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_dataset("llmrouter", DataConfig(data_dir=str(tmp_path / "nowhere")))


def test_csv_errors_name_the_file_line(tmp_path):
    """CSV data row r (0-based) is file line r + 2: the header is line 1."""
    df = write_generic(tmp_path / "orig.jsonl", n_prompts=6)
    df.loc[4, "quality"] = 7.0  # data row 4 -> file line 6
    path = tmp_path / "logs.csv"
    df.to_csv(path, index=False)
    assert path.read_text().splitlines()[5].startswith("q2,")  # line 6 of the file holds that row
    with pytest.raises(TableError, match=rf"{path}:6: quality outside \[0, 1\]: 7.0 for prompt 'q2'"):
        _load_generic(path)


def test_jsonl_errors_name_the_file_line_past_blank_lines(tmp_path):
    df = write_generic(tmp_path / "orig.jsonl", n_prompts=3)
    df.loc[3, "cost"] = -1.0
    lines = [json.dumps(r) for r in df.to_dict(orient="records")]
    path = tmp_path / "logs.jsonl"
    path.write_text("\n".join(lines[:2]) + "\n\n" + "\n".join(lines[2:]) + "\n")  # a blank line 3
    with pytest.raises(TableError, match=rf"{path}:5: negative cost -1.0 for prompt 'q1', model 'large'"):
        _load_generic(path)


def test_errors_name_the_prompt_by_its_first_words_without_an_id_column(tmp_path):
    def no_ids(d):
        d = d.drop(columns=["prompt_id"])
        d.loc[2, "prompt"] = "Summarise the following article about river ecology in three short sentences please."
        d.loc[2, "cost"] = None
        return d

    path = _logs(tmp_path, no_ids)
    with pytest.raises(TableError, match=r"logs.jsonl:3: cost is NaN or empty for prompt 'Summarise the following article "
                                         r"about river ecology in \.\.\.', model 'small'"):
        _load_generic(path)


def test_mixinstruct_errors_name_the_file_line(tmp_path, shared_data):
    from upstream_files import mix_row

    rng = np.random.default_rng(0)
    folder = tmp_path / "mix-instruct"
    folder.mkdir()
    rows = [mix_row(i, rng) for i in range(3)]
    del rows[1]["candidates"]
    (folder / "train_data_prepared.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(TableError, match=r"train_data_prepared.jsonl:2: missing field 'candidates'"):
        load_dataset("mixinstruct", DataConfig(data_dir=str(tmp_path)),
                     registry=str(shared_data / "registries" / "registry-mix-instruct.json"))


def test_quality_outside_unit_interval_can_be_clipped_on_request(tmp_path):
    def big(d):
        d.loc[4, "quality"] = 7.0
        return d

    t = load_dataset("generic", DataConfig(probe_size=1), file=str(_logs(tmp_path, big)), clip_quality="true")
    assert t.quality[list(t.prompt_ids).index("q2"), 0] == 1.0 and t.meta["quality_cells_clipped"] == 1
    with pytest.raises(TableError, match=r"option clip_quality must be true or false"):
        load_dataset("generic", DataConfig(probe_size=1), file=str(_logs(tmp_path, big)), clip_quality="maybe")


def test_routerbench_csv_bad_cell_names_the_file_line(tmp_path, shared_data):
    folder = tmp_path / "routerbench"
    folder.mkdir()
    for f in ("arc_challenge_train.csv", "arc_challenge_test.csv"):
        df = pd.read_csv(shared_data / "routerbench" / f, index_col=0, nrows=40)
        if f.endswith("_test.csv"):
            col = df["gpt-4-1106-preview"].astype(object)
            col.iloc[6] = "yes?"  # data row 6 -> file line 8
            df["gpt-4-1106-preview"] = col
        df.to_csv(folder / f)
    with pytest.raises(TableError, match=r"arc_challenge_test.csv:8: non-numeric quality 'yes\?' for model "
                                         r"'gpt-4-1106-preview'"):
        load_dataset("routerbench", DataConfig(data_dir=str(tmp_path), probe_size=2))


def test_csv_line_numbers_count_quoted_newlines(tmp_path):
    """A prompt with newlines inside a quoted CSV field spans several file lines; later rows are
    named by the line they start on."""
    df = write_generic(tmp_path / "orig.jsonl", n_prompts=4)
    df.loc[0:1, "prompt"] = "Line one of the prompt.\nLine two.\nLine three."  # rows 0-1: prompt q0, 3 lines each
    df.loc[5, "quality"] = -0.25  # data row 5: after 1 header + 2 x 3 + 3 x 1 lines -> file line 11
    path = tmp_path / "logs.csv"
    df.to_csv(path, index=False)
    assert path.read_text().splitlines()[10].startswith("q2,")
    with pytest.raises(TableError, match=rf"{path}:11: quality outside \[0, 1\]: -0.25 for prompt 'q2'"):
        _load_generic(path)
