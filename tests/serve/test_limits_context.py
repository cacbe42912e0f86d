"""max_tokens against an expert's context window over real HTTP (issue 13, item 7): the official
`openai` client against the HTTP edge (serve.routes) of a real CompletionService on a loopback
uvicorn server, with two real experts behind the transformers backend: SmolLM2-135M-Instruct
(the packaged model, an 8,192-token context) and a tiny random GPT-2 with SmolLM2's tokenizer
(1,024 positions), routed by a real CSCR router on MiniLM.

An explicit max_tokens that does not fit after the prompt is a 400 (``context_length_exceeded``,
OpenAI's message), never a silent cap; a request without one gets the default, shortened to the
room left; a routed request that one expert refuses falls back to the next ranked expert."""

from __future__ import annotations

import openai
import pytest
from cscr.serve.admin import AdminService
from cscr.serve.completion import CompletionService, CompletionSettings
from cscr.serve.experts import build_backend
from cscr.serve.local import LocalExperts, LocalRouter
from cscr.serve.metrics import Tally
from cscr.serve.routes import EdgeSettings, build_api
from serve_helpers import LiveServer, router_service

from cscr.llm import prompt_ids
from cscr.pool import ExpertSpec

pytestmark = pytest.mark.slow

KEY = "limits-key"
LIMIT = 10_000  # each expert's max_new_tokens: above both contexts, so the context decides
COSTS = {"tiny": 0.1, "smollm2": 1.0}  # at a high cost weight the tiny LM is ranked first


def router(encoder):
    """A real RouterService: CSCR from parts (a seeded random head) over the two experts."""
    from cscr.serve.service import CostReference

    return router_service(encoder, COSTS, CostReference(best_expert="smollm2", best_cost=1.0, scale=1.0, unit="params"))


@pytest.fixture(scope="module")
def served(encoder, tiny_lms):
    experts = {name: build_backend(ExpertSpec(name=name, model=model, max_new_tokens=LIMIT), torch_threads=1)
               for name, model in (("tiny", str(tiny_lms["a"])), ("smollm2", "smollm2"))}
    local = LocalRouter(router(encoder))
    pool = LocalExperts(experts, {n: LIMIT for n in experts})
    completion = CompletionService(local, pool, CompletionSettings(expert_timeout_s=300, default_max_tokens=8,
                                                                   max_prompt_chars=64_000), Tally())
    admin = AdminService(local, pool, completion)
    server = LiveServer(build_api(completion, admin, EdgeSettings(api_key=KEY, admin_key="limits-admin")))
    client = openai.OpenAI(base_url=f"{server.base}/v1", api_key=KEY, max_retries=0, timeout=600)
    try:
        yield completion, experts, client
    finally:
        server.close()


def chat_tokens(experts, text: str) -> int:
    return len(prompt_ids(experts["smollm2"].llm.tokenizer, [{"role": "user", "content": text}]))


def near_the_end(experts, tokens: int) -> str:
    """A user message whose chat prompt has ``tokens`` tokens or slightly fewer (the two experts
    share SmolLM2's tokenizer and chat template)."""
    k = tokens
    while chat_tokens(experts, "word " * k) > tokens:
        k -= 1
    return "word " * k


def refusal(exc: openai.BadRequestError) -> str:
    assert exc.status_code == 400 and exc.code == "context_length_exceeded", (exc.status_code, exc.body)
    return str(exc.body["message"])  # type: ignore[index]


def test_an_explicit_max_tokens_beyond_the_context_is_a_400_with_openais_message(served):
    completion, experts, client = served
    text = "Write a haiku about the sea."
    n = chat_tokens(experts, text)
    want = (f"This model's maximum context length is 8192 tokens. However, you requested {n + 8192} tokens "
            f"({n} in the messages, 8192 in the completion). Please reduce the length of the messages or of "
            f"the completion (at most {8192 - n} completion tokens fit).")
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": text}],
                                           max_tokens=8192, stream=stream)
        assert refusal(err.value) == want and err.value.param == "messages"
    with pytest.raises(openai.BadRequestError) as err:  # max_completion_tokens is the same limit
        client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": text}],
                                       max_completion_tokens=8192 - n + 1)
    assert f"you requested 8193 tokens ({n} in the messages, {8192 - n + 1} in the completion)" in refusal(err.value)
    with pytest.raises(openai.BadRequestError) as err:  # a raw completion: its prompt
        client.completions.create(model="smollm2", prompt=text, max_tokens=8192)
    assert "in the prompt, 8192 in the completion" in refusal(err.value) and err.value.param == "prompt"
    # exactly what fits is served
    fits = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": text}],
                                          max_tokens=4)
    assert fits.usage is not None and fits.usage.prompt_tokens == n and 0 < fits.usage.completion_tokens <= 4
    # a refusal is the client's error: no failure counted, the circuit stays closed
    assert completion.metrics.failures == {} and completion.health.state("smollm2") == "closed"


def test_without_max_tokens_the_default_is_shortened_to_the_room_left(served):
    _, experts, client = served
    answer = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "Say hi."}])
    assert answer.choices[0].message.content and answer.usage is not None
    assert 0 < answer.usage.completion_tokens <= 8  # the server's default_max_tokens
    text = near_the_end(experts, 1021)  # 3 tokens or more left of the tiny LM's 1,024
    n = chat_tokens(experts, text)
    assert 1024 - 8 < n < 1024
    answer = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": text}])
    assert answer.usage is not None and answer.usage.prompt_tokens == n
    assert answer.usage.completion_tokens <= 1024 - n
    if answer.usage.completion_tokens == 1024 - n:
        assert answer.choices[0].finish_reason == "length"
    with pytest.raises(openai.BadRequestError) as err:  # the same prompt with the default asked explicitly
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": text}], max_tokens=8)
    assert f"maximum context length is 1024 tokens. However, you requested {n + 8} tokens" in refusal(err.value)


def test_a_routed_request_that_one_expert_refuses_goes_to_the_next_ranked_expert(served):
    completion, experts, client = served
    text = near_the_end(experts, 1000)  # fits the tiny LM's context, but not with 30 tokens more
    n = chat_tokens(experts, text)
    assert n + 30 > 1024
    raw = client.chat.completions.with_raw_response.create(
        model="cscr:1000", messages=[{"role": "user", "content": text}], max_tokens=30,
        extra_body={"candidates": ["tiny", "smollm2"]})
    answer = raw.parse()
    assert answer.model == "smollm2" and raw.headers["x-cscr-failed"] == "tiny"
    assert answer.usage is not None and answer.usage.prompt_tokens == n and 0 < answer.usage.completion_tokens <= 30
    # every ranked expert refuses: the first refusal (the top-ranked expert's) is the answer
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="cscr:1000", messages=[{"role": "user", "content": "Hi"}],
                                       max_tokens=8192, extra_body={"candidates": ["tiny", "smollm2"]})
    assert "maximum context length is 1024 tokens" in refusal(err.value)
    assert completion.metrics.failures == {}
    assert {completion.health.state(n) for n in experts} == {"closed"}
