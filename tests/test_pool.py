from __future__ import annotations

import pytest

from cscr.config import ConfigError
from cscr.pool import ExpertSpec, load_pool, pool_from_dict


def test_example_pools_load(repo_root):
    local = load_pool(repo_root / "examples/pools/local-small.yaml")
    assert local.names == ["smollm2-135m", "gemma3-270m", "qwen2.5-coder-0.5b"]
    assert all(e.kind == "open-weights" and e.backend == "transformers" for e in local.experts)
    assert [e.to_expert().n_params for e in local.experts] == [0.135, 0.268, 0.494]
    rb = load_pool(repo_root / "examples/pools/routerbench.yaml")
    assert len(rb.experts) == 11 and {e.kind for e in rb.experts} == {"recorded"}
    assert rb.get("gpt-4-1106-preview").cost.input_price == pytest.approx(8.3)


def _write(tmp_path, text):
    p = tmp_path / "pool.yaml"
    p.write_text(text)
    return p


GOOD = """
experts:
  - name: a
    kind: open-weights
    source: {model: smollm2}
    cost: {n_params: 0.1}
"""


@pytest.mark.parametrize("text, message", [
    ("experts: [unclosed", "malformed YAML"),
    ("- just\n- a list", "a pool is a mapping"),
    ("experts: []", "experts: List should have at least 1 item"),
    (GOOD.replace("cost: {n_params: 0.1}", "cost: {n_params: -1}"), "experts.0.cost.n_params: Input should be greater than or equal to 0"),
    (GOOD.replace("cost: {n_params: 0.1}", "cost: {}"), "cost needs n_params"),
    (GOOD.replace("    kind: open-weights", "    kind: open-weights\n    colour: red"), "experts.0.colour: unknown field"),
    (GOOD.replace("{model: smollm2}", "{model: smollm2, port: 1}"), "experts.0.source.port: unknown field"),
    (GOOD.replace("kind: open-weights", "kind: magic"), "experts.0.kind: Input should be 'open-weights', 'black-box' or 'recorded'"),
    (GOOD.replace("source: {model: smollm2}", "source: {}"), "open-weights expert 'a' needs source.model"),
    (GOOD.replace("kind: open-weights", "kind: black-box"), "black-box expert 'a' needs source.base_url"),
    (GOOD.replace("kind: open-weights", "kind: recorded"), "recorded expert 'a' reads a routing table"),
    (GOOD + GOOD.replace("experts:\n", ""), "duplicate expert names ['a']"),
    (GOOD.replace("    cost:", "    backend: tgi\n    cost:"),
     "experts.0.backend: Input should be 'transformers', 'vllm' or 'openai'"),
    (GOOD.replace("    cost:", "    backend: openai\n    cost:"), "open-weights expert 'a': backend is transformers or vllm"),
    (GOOD.replace("    cost: {n_params: 0.1}\n", ""), "expert(s) ['a'] need a cost"),
    (GOOD.replace("name: a", "name: 'a b!'"), "experts.0.name: String should match pattern"),
])
def test_bad_pools_give_one_clear_error(tmp_path, text, message):
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as exc:
        load_pool(path)
    assert message in str(exc.value)
    assert str(path) in str(exc.value)


def test_missing_file_and_relative_paths(tmp_path):
    with pytest.raises(ConfigError, match="pool file not found"):
        load_pool(tmp_path / "nope.yaml")
    (tmp_path / "models" / "m").mkdir(parents=True)
    pool = load_pool(_write(tmp_path, GOOD.replace("{model: smollm2}", "{model: models/m}")))
    assert pool.experts[0].source.model == str((tmp_path / "models" / "m").resolve())
    # a name that is not a path next to the YAML (a packaged model, a Hub id) stays as written
    assert load_pool(_write(tmp_path, GOOD)).experts[0].source.model == "smollm2"


def test_black_box_and_recorded_experts():
    pool = pool_from_dict({"experts": [
        {"name": "api", "kind": "black-box", "source": {"base_url": "http://127.0.0.1:1/v1", "model": "m"},
         "cost": {"input_price": 1, "output_price": 2}, "timeout_s": 5, "max_concurrency": 3},
        {"name": "rec", "kind": "recorded", "source": {"table": "runs/x", "column": "gpt"}, "cost": {"n_params": 7}},
    ]})
    assert [e.kind for e in pool.to_experts()] == ["black-box", "recorded"]
    assert pool.get("api").max_concurrency == 3
    with pytest.raises(KeyError, match="unknown expert 'zz'"):
        pool.get("zz")


def test_cli_reports_a_bad_pool_in_one_line(tmp_path, capsys):
    from cscr.cli import main

    bad = _write(tmp_path, GOOD.replace("cost: {n_params: 0.1}", "cost: {n_params: -2}"))
    assert main(["fingerprint", "--pool", str(bad), "--run", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("cscr: error: ") and "n_params" in err[0]
    assert main(["label", "--pool", str(bad), "--tasks", "builtin", "--out", str(tmp_path / "run")]) == 2


def test_one_spec_type_for_the_pool_and_the_admin_api():
    """The admin API's short form and a pool entry are the same ExpertSpec."""
    short = ExpertSpec.model_validate({"name": "org/m-1.5b", "backend": "openai", "model": "up",
                                       "base_url": "http://127.0.0.1:9/v1", "api_key_env": "K", "retries": 4})
    entry = ExpertSpec.model_validate({"name": "org/m-1.5b", "kind": "black-box", "max_retries": 4,
                                       "source": {"base_url": "http://127.0.0.1:9/v1", "model": "up", "api_key_env": "K"}})
    assert short == entry and entry.backend == "openai" and entry.model == "up" and entry.cost is None
    local = ExpertSpec.model_validate({"name": "m", "model": "smollm2", "max_new_tokens": 8})
    assert (local.kind, local.backend, local.source.model, local.max_new_tokens) == ("open-weights", "transformers",
                                                                                    "smollm2", 8)
    assert ExpertSpec.model_validate(local.model_dump()) == local  # what travels to a replica comes back whole
    with pytest.raises(ValueError, match="unknown|Extra inputs"):
        ExpertSpec.model_validate({"name": "m", "model": "x", "surprise": 1})
    with pytest.raises(ValueError, match="black-box expert 'm' is called through its OpenAI-compatible API"):
        ExpertSpec.model_validate({"name": "m", "kind": "black-box", "backend": "vllm",
                                   "source": {"base_url": "http://h/v1", "model": "x"}})
