"""(c) black-box experts behind an OpenAI-compatible endpoint, against a real local server
serving a real (tiny) causal LM: answers, bounded concurrency, timeouts and retries."""

from __future__ import annotations

import numpy as np
import pytest
from openai_server import LocalServer, ServerState

from cscr.fingerprints.perplexity import GenerateUDF, Scorer, perplexity_fingerprint
from cscr.llm.openai_api import OpenAIBackend


@pytest.fixture(scope="module")
def server(tiny_lm):
    with LocalServer(ServerState(str(tiny_lm), slow_s=2.0, flaky_failures=2, delay_s=0.2)) as srv:
        yield srv


def test_answers_match_the_served_model_and_concurrency_is_bounded(server, tiny_lm):
    api = OpenAIBackend(server.base_url, "tiny", max_concurrency=2, timeout_s=30)
    prompts = [f"What is {i} + {i}?" for i in range(6)]
    server.state.max_in_flight = 0
    gens = api.generate(prompts, max_new_tokens=4)
    local = server.state.backend.generate(prompts, 4)
    assert [g.text or "." for g in local] == [g.text for g in gens]  # the server's real model answered
    assert all(g.error is None and g.output_tokens <= 4 and g.prompt_tokens > 0 for g in gens)
    assert server.state.max_in_flight == 2  # never more than max_concurrency, and it did run in parallel


def test_timeouts_give_missing_answers_and_retries_recover(server):
    slow = OpenAIBackend(server.base_url, "slow", timeout_s=0.5, max_retries=0)
    g = slow.generate(["hi"], 4)[0]
    assert g.error is not None and "Timeout" in g.error and g.text == ""
    with pytest.raises(Exception, match="[Tt]imed? ?out"):
        OpenAIBackend(server.base_url, "slow", timeout_s=0.5, max_retries=0, on_error="raise").generate(["hi"], 4)
    before = server.state.requests
    flaky = OpenAIBackend(server.base_url, "flaky", max_retries=3, timeout_s=30)
    g = flaky.generate(["hi"], 4)[0]
    assert g.error is None and server.state.requests - before == 3  # two 503s, then an answer


def test_black_box_perplexity_fingerprint_end_to_end(server, tiny_lm):
    udf = GenerateUDF("api-expert", "tiny", backend="openai", max_new_tokens=6,
                      backend_kwargs={"base_url": server.base_url, "max_concurrency": 4})
    texts = [f"Is {i} an even number? Answer yes or no." for i in range(8)]
    out = udf({"probe_idx": np.arange(8), "text": np.array(texts, dtype=object)})
    assert (out["error"] == "").all()
    d = perplexity_fingerprint(Scorer(str(tiny_lm)), texts, list(out["answer"]), "api-expert")
    assert d.shape == (8,) and abs(np.linalg.norm(d) - 1) < 1e-9
