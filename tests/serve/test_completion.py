"""CompletionService without Ray: the plan, the one fallback loop (unary and streamed), SSE
framing, request limits and cost accounting, the circuit breaker (health-aware fallback) and
cancellation of abandoned work, on a real CSCR router (MiniLM) and real in-process experts (tiny
LMs behind the transformers backend, and experts that fail, hang, die and recover)."""

from __future__ import annotations

import asyncio
import json
import re
import time

import pytest
from cscr.serve.completion import (
    DONE,
    CompletionService,
    CompletionSettings,
    info_headers,
    sse_event,
)
from cscr.serve.health import CircuitBoard, CircuitBreaker
from cscr.serve.local import LocalExperts, LocalRouter
from cscr.serve.metrics import Tally
from cscr.serve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    CscrInfo,
    ProtocolError,
    RouteRequest,
)
from serve_helpers import (
    COSTS,
    BrokenExpert,
    FlakyExpert,
    HungExpert,
    MidStreamFailure,
    long_expert,
    reference,
    router_service,
    seconds_until_idle,
    tiny_backends,
)

PROMPT = "What is the capital of France?"


@pytest.fixture(scope="module")
def parts(encoder, tiny_lms):
    return router_service(encoder), tiny_backends(tiny_lms)


def make(parts, extra=None, **settings):
    """A fresh service (fresh tally, fresh failing experts) over the module's router and LMs."""
    router, tiny = parts
    experts = {"broken": BrokenExpert(), "hung": HungExpert(), **tiny, **(extra or {})}
    opts = {"expert_timeout_s": 5.0, "default_max_tokens": 6, **settings}
    service = CompletionService(LocalRouter(router), LocalExperts(experts, {"tiny-a": 32, "tiny-b": 64}),
                                CompletionSettings(**opts), Tally())
    return service, experts


def chat(model="cscr:1000", content=PROMPT, **kw) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": model, "messages": [{"role": "user", "content": content}],
                                                 **kw})


def events(service, req) -> tuple[CscrInfo, list[bytes]]:
    async def go():
        streamed = await service.stream(req)
        return streamed.info, [e async for e in streamed.events]

    return asyncio.run(go())


def parse_sse(raw: list[bytes]) -> list[dict | str]:
    out: list[dict | str] = []
    for event in raw:
        text = event.decode()
        assert text.startswith("data: ") and text.endswith("\n\n"), text  # one event per item
        body = text[len("data: "):-2]
        out.append(body if body == "[DONE]" else json.loads(body))
    return out


def test_the_plan_ranks_by_cost_at_a_high_weight(parts):
    service, _ = make(parts, max_attempts=4)
    plan = asyncio.run(service.plan(chat()))
    assert plan.order == sorted(COSTS, key=COSTS.get) and plan.decision.chosen == "broken"
    assert plan.cost_weight == 1000.0 and plan.routing_ms > 0
    assert plan.generation.max_tokens == 6 and plan.generation.messages == [{"role": "user", "content": PROMPT}]
    direct = asyncio.run(service.plan(chat(model="tiny-b")))
    assert direct.order == ["tiny-b"] and direct.decision is None
    with pytest.raises(ProtocolError, match="'gpt-9' does not exist") as err:
        asyncio.run(service.plan(chat(model="gpt-9")))
    assert err.value.status == 404


def test_unary_falls_back_past_a_failing_expert(parts):
    service, experts = make(parts)
    want = asyncio.run(service.complete(chat(model="tiny-a"))).body
    answer = asyncio.run(service.complete(chat(candidates=["broken", "tiny-a"])))
    assert answer.info.expert == "tiny-a" and answer.info.failed == ["broken"] and answer.info.fallback
    assert answer.body.model == "tiny-a" and answer.body.cscr == answer.info
    assert answer.body.choices[0].message.content == want.choices[0].message.content  # greedy: same answer
    assert 1 <= answer.body.usage.completion_tokens <= 6
    assert experts["broken"].calls == 1 and service.metrics.failures == {"broken": 1}
    assert service.metrics.fallbacks == 1


def test_unary_falls_back_past_a_hung_expert_and_cancels_it(parts):
    service, experts = make(parts)
    answer = asyncio.run(service.complete(chat(candidates=["hung", "tiny-b"])))
    assert answer.info.expert == "tiny-b" and answer.info.failed == ["hung"]
    assert experts["hung"].started == 1 and experts["hung"].cancelled == 1  # the abandoned call stopped


def test_constraints_that_leave_only_unserved_experts_are_the_requests_400(parts):
    """The router's pool has broken and hung, this server serves only the tiny LMs: a request whose
    candidates or max_cost leave only the unserved ones gets a 400 naming the constraint, not a 503."""
    router, tiny = parts
    service = CompletionService(LocalRouter(router), LocalExperts(dict(tiny), {"tiny-a": 32, "tiny-b": 64}),
                                CompletionSettings(expert_timeout_s=5.0, default_max_tokens=2), Tally())
    cheap = (COSTS["hung"] * reference().scale + COSTS["tiny-a"] * reference().scale) / 2  # above hung, below tiny-a
    for kw, param, code in (({"candidates": ["broken", "hung"]}, "candidates", "candidate_not_served"),
                            ({"max_cost": cheap}, "max_cost", "no_expert_within_max_cost")):
        with pytest.raises(ProtocolError) as err:
            asyncio.run(service.plan(chat(**kw)))
        assert (err.value.status, err.value.param, err.value.code) == (400, param, code), err.value
    assert asyncio.run(service.plan(chat())).order[0] in tiny  # unconstrained: routed among the served


def test_every_expert_failing_is_a_502(parts):
    service, experts = make(parts, expert_timeout_s=0.3)
    for stream in (False, True):
        with pytest.raises(ProtocolError, match=r"every expert tried failed or timed out: \['broken', 'hung'\]") as err:
            req = chat(candidates=["broken", "hung"], stream=stream)
            asyncio.run(service.stream(req) if stream else service.complete(req))
        assert err.value.status == 502 and err.value.type == "server_error"
    assert experts["hung"].cancelled == 2


def test_max_attempts_bounds_the_fallback(parts):
    service, _ = make(parts, max_attempts=2, expert_timeout_s=0.3)
    with pytest.raises(ProtocolError, match=r"\['broken', 'hung'\]"):
        asyncio.run(service.complete(chat()))  # tiny-a is third: never tried


def test_stream_falls_back_and_frames_sse(parts):
    service, _ = make(parts)
    whole = asyncio.run(service.complete(chat(model="tiny-a"))).body.choices[0].message.content
    info, raw = events(service, chat(candidates=["broken", "hung", "tiny-a"], stream=True))
    assert info.expert == "tiny-a" and info.failed == ["broken", "hung"]
    items = parse_sse(raw)
    assert items[-1] == "[DONE]" and raw[-1] == DONE
    chunks = items[:-1]
    assert {c["model"] for c in chunks} == {"tiny-a"} and len({c["id"] for c in chunks}) == 1
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    assert chunks[0]["cscr"]["failed"] == ["broken", "hung"]  # the first chunk says what happened
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == whole and text  # the same greedy tokens as the whole answer


def test_completion_stream_framing(parts):
    service, _ = make(parts)
    req = CompletionRequest.model_validate({"model": "tiny-b", "prompt": "Once upon a time", "stream": True})
    info, raw = events(service, req)
    items = parse_sse(raw)
    assert info.routed is False and items[-1] == "[DONE]"
    assert {c["object"] for c in items[:-1]} == {"text_completion"}
    assert "cscr" in items[0] and items[-2]["choices"][0]["finish_reason"] == "stop"
    whole = asyncio.run(service.complete(req.model_copy(update={"stream": False}))).body.choices[0].text
    assert "".join(c["choices"][0]["text"] for c in items[:-1]) == whole


def test_a_failure_mid_stream_ends_with_an_error_event(parts):
    service, _ = make(parts, extra={"flaky": MidStreamFailure()})
    info, raw = events(service, chat(model="flaky", stream=True))
    items = parse_sse(raw)
    assert info.expert == "flaky" and not info.fallback
    assert [c["choices"][0]["delta"].get("content") for c in items[1:3]] == ["a", "b"]
    assert items[-1]["error"]["code"] == "expert_failed" and "connection reset" in items[-1]["error"]["message"]
    assert set(items[-1]["error"]) == {"message", "type", "param", "code"} and "[DONE]" not in items
    assert service.metrics.failures == {"flaky": 1}
    assert service.health.snapshot()["flaky"]["failures"] == 1  # the breaker counts it too


def test_cost_accounting(parts):
    service, _ = make(parts)
    asyncio.run(service.complete(chat(candidates=["broken", "tiny-a"])))  # routed, fallback to tiny-a
    asyncio.run(service.complete(chat(model="cscr:0", candidates=["tiny-b"])))  # routed to the best
    asyncio.run(service.complete(chat(model="tiny-a")))  # direct: not in the cost figures
    tally = service.metrics.as_dict()
    assert tally["routed"] == {"tiny-a": 1, "tiny-b": 1} and tally["direct"] == {"tiny-a": 1}
    assert tally["cost_unit"] == "usd"
    ref = reference()
    scale = ref.scale
    assert tally["estimated_cost_best_expert"] == pytest.approx(2 * ref.best_cost * scale)
    assert tally["estimated_cost_chosen"] == pytest.approx((COSTS["tiny-a"] + COSTS["tiny-b"]) * scale)
    assert tally["estimated_cost_saved"] == pytest.approx((1.0 - COSTS["tiny-a"]) * scale)


@pytest.mark.parametrize("body, code, words", [
    ({"messages": [{"role": "user", "content": "hi"}] * 9}, "too_many_messages", "9 messages; the limit is 8"),
    ({"messages": [{"role": "user", "content": "x" * 101}]}, "prompt_too_long", "101 characters"),
    ({"stop": ["a", "b", "c"]}, "too_many_stops", "3 stop strings"),
    ({"stop": "x" * 11}, "stop_too_long", "11 characters; the limit is 10"),
    ({"messages": [{"role": "user", "content": "  "}]}, "empty_prompt", "empty"),
    ({"messages": []}, "empty_prompt", "messages is empty"),
    ({"max_tokens": 33}, "max_tokens_too_large", "'tiny-a' generates (32 tokens)"),
    ({"max_completion_tokens": 65, "model": "tiny-b"}, "max_tokens_too_large", "max_completion_tokens=65"),
])
def test_limits_are_explicit_400s(parts, body, code, words):
    service, _ = make(parts, max_messages=8, max_prompt_chars=100, max_stop=2, max_stop_chars=10)
    req = ChatCompletionRequest.model_validate({"model": "cscr:1000", "messages": [{"role": "user", "content": "hi"}],
                                                "candidates": ["tiny-a", "tiny-b"], **body})
    with pytest.raises(ProtocolError, match=re.escape(words)) as err:
        asyncio.run(service.complete(req))
    assert err.value.status == 400 and err.value.code == code


def test_max_tokens_within_every_limit_is_passed_as_asked(parts):
    service, _ = make(parts, default_max_tokens=1000)
    assert asyncio.run(service.plan(chat(max_tokens=32, candidates=["tiny-a", "tiny-b"]))).generation.max_tokens == 32
    # no max_tokens: the server default, at most what the experts generate
    assert asyncio.run(service.plan(chat(candidates=["tiny-a", "tiny-b"]))).generation.max_tokens == 32
    assert asyncio.run(service.plan(chat(model="tiny-b"))).generation.max_tokens == 64


def test_route_and_models(parts):
    service, _ = make(parts)
    decision, info = asyncio.run(service.route(RouteRequest(prompt=PROMPT, cost_weight=1000)))
    assert decision.chosen == info.expert == "broken" and info.cost_weight == 1000
    assert [m.id for m in asyncio.run(service.models()).data] == ["cscr", *COSTS]


def test_sse_event_and_headers():
    assert sse_event({"a": 1}) == b'data: {"a": 1}\n\n'
    info = CscrInfo(expert="m", routed=True, cost_weight=0.5, routing_ms=1.23456, fallback=True, failed=["x", "y"])
    assert sse_event(info) == b"data: " + info.model_dump_json(exclude_none=True).encode() + b"\n\n"
    assert info_headers(info) == {"x-cscr-expert": "m", "x-cscr-routing-ms": "1.235", "x-cscr-fallback": "true",
                                  "x-cscr-cost-weight": "0.5", "x-cscr-failed": "x,y"}
    assert "x-cscr-cost-weight" not in info_headers(CscrInfo(expert="m", routed=False))


# ---- health-aware fallback: the circuit breaker ----
def test_the_breaker_opens_cools_down_and_lets_one_trial_through():
    now = [0.0]
    b = CircuitBreaker(failures=2, cooldown_s=10, clock=lambda: now[0])
    assert b.state("a") == "closed" and b.acquire("a") and b.snapshot() == {}
    b.failure("a")
    b.success("a")  # a success resets the count: failures must be in a row
    b.failure("a")
    assert b.state("a") == "closed" and b.available("a")
    b.failure("a")
    assert b.state("a") == "open" and not b.available("a") and not b.acquire("a") and b.retry_after("a") == 10
    now[0] = 9.9
    assert not b.acquire("a")
    now[0] = 10.0
    assert b.state("a") == "half-open" and b.available("a")
    assert b.acquire("a") and not b.acquire("a") and not b.available("a")  # one trial at a time
    b.release("a")  # the trial's client left: another request may try
    assert b.acquire("a")
    b.failure("a")  # the trial failed: another cooldown, from now
    assert b.state("a") == "open" and b.retry_after("a") == 10
    now[0] = 20.0
    assert b.acquire("a")
    b.success("a")
    assert b.state("a") == "closed" and b.acquire("a")
    b.failure("dead", dead=True)  # dead replicas: open at once
    assert b.state("dead") == "open"
    now[0] = 22.5
    assert b.snapshot() == {"dead": {"state": "open", "failures": 1, "opened": 1, "retry_after_s": 7.5},
                            "a": {"state": "closed", "failures": 0, "opened": 2, "retry_after_s": 0.0}}
    b.keep({"a"})  # "dead" left the pool: added again later, it starts closed
    assert list(b.snapshot()) == ["a"] and b.state("dead") == "closed"
    with pytest.raises(ValueError, match="bad breaker settings"):
        CircuitBreaker(failures=0)


class Clock:
    """The breaker's clock, moved by hand (cooldowns pass without sleeping, whatever the load)."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def with_clock(service, failures: int = 3, cooldown_s: float = 10.0) -> Clock:
    clock = Clock()
    service.health = CircuitBreaker(failures, cooldown_s, clock=clock, on_change=service.health.on_change)
    return clock


def timed(coro):
    t0 = time.perf_counter()
    out = asyncio.run(coro)
    return out, time.perf_counter() - t0


def test_a_dead_expert_is_skipped_at_once_and_returns_after_its_cooldown(parts):
    dead = FlakyExpert(parts[1]["tiny-a"], mode="dead")
    service, _ = make(parts, extra={"broken": dead})
    clock = with_clock(service, cooldown_s=10.0)
    req = chat(candidates=["broken", "tiny-b"])
    first = asyncio.run(service.complete(req))
    assert first.info.expert == "tiny-b" and first.info.failed == ["broken"] and dead.calls == 1
    assert service.health.state("broken") == "open"  # one dead-replica error is enough
    assert service.metrics.open_circuits == {"broken"}  # what the Prometheus gauge shows
    second = asyncio.run(service.complete(req))
    assert second.info.expert == "tiny-b" and second.info.failed == [] and dead.calls == 1  # not even called
    clock.now += 9.9
    asyncio.run(service.complete(req))
    assert dead.calls == 1  # still cooling down
    clock.now += 0.1
    dead.mode = "ok"  # its replicas are back: the trial request after the cooldown finds it
    back = asyncio.run(service.complete(req))
    assert back.info.expert == "broken" and dead.calls == 2 and service.health.state("broken") == "closed"
    assert service.metrics.open_circuits == set()


def test_a_hung_expert_costs_the_timeout_only_until_its_circuit_opens(parts):
    service, experts = make(parts, expert_timeout_s=2.0)
    with_clock(service, failures=2)
    req = chat(candidates=["hung", "tiny-b"])
    for n in (1, 2):
        answer, seconds = timed(service.complete(req))
        assert answer.info.failed == ["hung"] and seconds >= 2.0 and experts["hung"].cancelled == n
    assert service.health.state("hung") == "open"
    answer = asyncio.run(service.complete(req))  # skipped without a call (its speed: bench/fallback_latency.py)
    assert answer.info.expert == "tiny-b" and answer.info.failed == []
    assert experts["hung"].started == 2 and experts["hung"].cancelled == 2


def test_an_expert_removed_during_a_failing_call_leaves_no_circuit_behind(parts):
    """Removal forgets an expert's circuit, and a call to it still in flight that then fails does
    not bring it back: re-added under the same name, it starts closed."""
    service, experts = make(parts, expert_timeout_s=0.5)
    with_clock(service, failures=1)
    req = chat(candidates=["hung", "tiny-b"])

    async def remove_during_the_call():
        call = asyncio.create_task(service.complete(req))
        while experts["hung"].started == 0:
            await asyncio.sleep(0.01)
        await service.experts.stop("hung")  # what the admin's removal does (serve.admin)
        service.forget_removed()
        return await call

    answer = asyncio.run(remove_during_the_call())
    assert answer.info.expert == "tiny-b" and answer.info.failed == ["hung"] and experts["hung"].cancelled == 1
    assert service.health.snapshot() == {} and service.health.state("hung") == "closed"
    assert service.metrics.open_circuits == set()


def test_an_open_circuit_of_an_expert_that_leaves_the_pool_is_published_closed(parts):
    service, experts = make(parts, expert_timeout_s=0.5)
    with_clock(service, failures=1)
    answer = asyncio.run(service.complete(chat(candidates=["hung", "tiny-b"])))
    assert answer.info.failed == ["hung"] and service.metrics.open_circuits == {"hung"}
    asyncio.run(service.experts.stop("hung"))
    service.forget_removed()
    assert service.metrics.open_circuits == set() and service.health.snapshot() == {}


def test_a_failing_expert_leaves_rotation_and_returns_when_healthy(parts):
    """Streamed requests; failures in a row open the circuit, a trial after the cooldown decides."""
    flaky = FlakyExpert(parts[1]["tiny-a"], mode="fail")
    service, _ = make(parts, extra={"broken": flaky})
    clock = with_clock(service, failures=2, cooldown_s=0.5)
    req = chat(candidates=["broken", "tiny-b"], stream=True)
    for n, state in ((1, "closed"), (2, "open")):
        info, _ = events(service, req)
        assert info.failed == ["broken"] and flaky.calls == n and service.health.state("broken") == state
        assert service.metrics.open_circuits == ({"broken"} if state == "open" else set())
    info, raw = events(service, req)
    assert info.expert == "tiny-b" and info.failed == [] and flaky.calls == 2 and parse_sse(raw)[-1] == "[DONE]"
    # named directly, with no other expert to use: tried anyway (a last resort, never a refusal)
    with pytest.raises(ProtocolError, match=r"every expert tried failed .*\['broken'\]") as err:
        asyncio.run(service.complete(chat(model="broken")))
    assert err.value.status == 502 and flaky.calls == 3
    clock.now += 0.5
    info, _ = events(service, req)  # the trial: still failing, out for another cooldown
    assert info.failed == ["broken"] and flaky.calls == 4 and service.health.state("broken") == "open"
    assert service.metrics.open_circuits == {"broken"}
    clock.now += 0.5
    flaky.mode = "ok"
    info, _ = events(service, req)
    assert info.expert == "broken" and flaky.calls == 5 and service.health.state("broken") == "closed"
    assert service.metrics.open_circuits == set()
    assert service.health.snapshot()["broken"] == {"state": "closed", "failures": 0, "opened": 2,
                                                   "retry_after_s": 0.0}


def test_the_breaker_takes_openings_and_closings_from_outside():
    now, told = [0.0], []
    b = CircuitBreaker(failures=3, cooldown_s=10, clock=lambda: now[0], on_change=lambda n, o: told.append((n, o)))
    b.trip("a", 4.0)  # another replica opened it 6 s ago: a trial in 4 s here too
    assert b.state("a") == "open" and b.retry_after("a") == 4.0 and told == [("a", True)]
    b.trip("a", 2.0)  # an older opening does not shorten the wait
    assert b.retry_after("a") == 4.0 and told == [("a", True)]
    b.trip("a", 8.0)  # a newer one (a failed trial elsewhere) lengthens it, and is not told twice
    assert b.retry_after("a") == 8.0 and told == [("a", True)]
    now[0] = 8.0
    assert b.acquire("a")  # the trial here is in flight: an opening from outside leaves it alone
    b.trip("a", 10.0)
    assert b.state("a") == "half-open" and not b.acquire("a")
    b.failure("a")  # the trial failed: (re)opened, told again (the board hears of every opening)
    assert b.state("a") == "open" and told[-1] == ("a", True) and len(told) == 2
    b.clear("a")  # another replica's trial succeeded
    assert b.state("a") == "closed" and told[-1] == ("a", False)
    b.clear("never-opened")  # nothing to close: nothing told
    assert len(told) == 3 and b.snapshot()["a"] == {"state": "closed", "failures": 0, "opened": 2,
                                                    "retry_after_s": 0.0}


def test_the_board_long_polls_and_forgets_experts_that_left():
    now = [100.0]
    board = CircuitBoard(clock=lambda: now[0])

    async def go():
        assert await board.wait(-1, timeout_s=1) == {"id": board.id, "seq": 0, "open": {}}  # a new replica: at once
        t0 = time.perf_counter()
        assert (await board.wait(0, timeout_s=0.05))["seq"] == 0 and time.perf_counter() - t0 >= 0.04
        waiter = asyncio.create_task(board.wait(0, timeout_s=5))
        await asyncio.sleep(0.05)
        await board.opened("a", 10.0)
        assert (await asyncio.wait_for(waiter, 1))["open"] == {"a": [1, 10.0]}  # woken at once
        now[0] += 3
        await board.opened("b", 10.0)
        await board.opened("a", 10.0)  # re-opened: a new epoch, the full cooldown
        assert board.view() == {"id": board.id, "seq": 3, "open": {"a": [3, 10.0], "b": [2, 10.0]}}
        now[0] += 12
        assert board.view()["open"]["b"] == [2, 0.0]  # cooled down: kept until a trial succeeds
        await board.closed("a")
        await board.closed("a")  # already closed: no change to report
        await board.keep({"a", "c"})  # "b" left the pool
        assert board.view()["seq"] == 5 and board.view()["open"] == {}
        assert CircuitBoard().id != board.id  # a restarted controller's board is a new one
        with pytest.raises(ValueError, match="cooldown"):
            await board.opened("a", -1.0)

    asyncio.run(go())


def test_replicas_sharing_a_board_call_a_dead_expert_once(parts):
    """Two services (two ingress replicas) over one dead expert and one board (what the pool
    controller keeps): the first replica's failure opens the second's circuit without a call of its
    own; the first's successful trial closes it on both. Nothing a replica learns from the board is
    posted back."""
    dead = FlakyExpert(parts[1]["tiny-a"], mode="dead")
    (a, _), (b, _) = make(parts, extra={"broken": dead}), make(parts, extra={"broken": dead})
    clocks = [with_clock(a, cooldown_s=10.0), with_clock(b, cooldown_s=10.0)]
    board = CircuitBoard(clock=clocks[0])
    posts: list[tuple[str, str, bool]] = []
    a.share = lambda name, is_open: posts.append(("a", name, is_open))
    b.share = lambda name, is_open: posts.append(("b", name, is_open))
    req = chat(candidates=["broken", "tiny-b"])

    async def deliver():  # the controller's side: the posts reach the board, the replicas poll it
        for _, name, is_open in posts:
            await (board.opened(name, 10.0) if is_open else board.closed(name))
        posts.clear()
        view = await board.wait(-1)
        a.apply_board(view)
        b.apply_board(view)

    async def go():
        first = await a.complete(req)
        assert first.info.failed == ["broken"] and dead.calls == 1 and posts == [("a", "broken", True)]
        await deliver()
        assert b.health.state("broken") == "open" and b.metrics.open_circuits == {"broken"} and posts == []
        for service in (a, b):  # neither calls it again inside the cooldown
            answer = await service.complete(req)
            assert answer.info.expert == "tiny-b" and answer.info.failed == [] and dead.calls == 1
        for clock in clocks:
            clock.now += 10.0
        dead.mode = "ok"
        back = await a.complete(req)  # a's trial finds it back
        assert back.info.expert == "broken" and dead.calls == 2 and posts == [("a", "broken", False)]
        await deliver()
        assert b.health.state("broken") == "closed" and b.metrics.open_circuits == set() and posts == []
        answer = await b.complete(req)
        assert answer.info.expert == "broken" and dead.calls == 3
        dead.mode = "dead"
        await b.complete(req)
        await deliver()
        assert a.health.state("broken") == b.health.state("broken") == "open" and dead.calls == 4
        # the controller restarted: its new board knows no circuit; the replicas close nothing and
        # post their open circuits to it again
        a.apply_board(CircuitBoard().view())
        assert a.health.state("broken") == "open" and posts == [("a", "broken", True)]

    asyncio.run(go())


def test_a_prompt_longer_than_the_experts_context_is_a_400_not_a_failure(parts):
    service, _ = make(parts)
    long = "hello " * 1500  # about 1,500 tokens after templating; the tiny LMs have 1,024 positions
    for req in (chat(model="tiny-a", content=long), chat(candidates=["tiny-a", "tiny-b"], content=long)):
        with pytest.raises(ProtocolError, match="context is 1024 tokens") as err:
            asyncio.run(service.complete(req))
        assert err.value.status == 400 and err.value.code == "context_length_exceeded"
    assert service.metrics.failures == {} and service.health.state("tiny-a") == "closed"


# ---- abandoned work stops: the expert is idle within seconds ----
@pytest.fixture(scope="module")
def long(tiny_lms):
    return long_expert(tiny_lms)  # a full answer takes about a minute here


STORY = "Once upon a time"  # tiny-b's greedy answer to it has a space (a streamed piece) every token


def long_service(parts, long, **settings) -> CompletionService:
    experts = LocalExperts({"long": long}, {"long": 1000})
    return CompletionService(LocalRouter(parts[0]), experts, CompletionSettings(**settings), Tally())


def test_a_stream_the_client_stops_reading_stops_the_generation(parts, long):
    service = long_service(parts, long)
    before = long.llm.streamed_tokens

    async def read_a_few_then_leave() -> int:
        streamed = await service.stream(chat(model="long", content=STORY, max_tokens=960, stream=True))
        for _ in range(3):
            await streamed.events.__anext__()
        await streamed.events.aclose()  # what the HTTP server does when the client disconnects
        return long.llm.streamed_tokens - before

    at_leave = asyncio.run(read_a_few_then_leave())
    waited = seconds_until_idle(long, within=10)
    made = long.llm.streamed_tokens - before
    time.sleep(1.0)
    assert long.llm.streamed_tokens - before == made  # nothing more
    assert made - at_leave <= 3 and made < 900  # stopped at once, far from the 960 asked
    print(f"\nclient left mid-stream after {at_leave} tokens: expert idle {waited:.2f} s later, "
          f"{made - at_leave} tokens more")


def test_a_unary_call_the_server_timed_out_stops_the_generation(parts, long):
    # the tiny LM's answer is as long as its context allows: hundreds of tokens, far more than
    # 0.1 s of generation even on an idle machine
    service = long_service(parts, long, expert_timeout_s=0.1)
    before = long.llm.streamed_tokens
    t0 = time.perf_counter()
    with pytest.raises(ProtocolError, match="every expert tried failed or timed out") as err:
        asyncio.run(service.complete(chat(model="long", content=STORY, max_tokens=960)))  # (waits for its threads)
    assert err.value.status == 502
    seconds_until_idle(long, within=5)
    assert time.perf_counter() - t0 < 6.0  # the timeout and a few seconds, not the whole answer
    made = long.llm.streamed_tokens - before
    full = long_service(parts, long, expert_timeout_s=120)
    asyncio.run(full.complete(chat(model="long", content=STORY, max_tokens=960)))
    whole = long.llm.streamed_tokens - before - made
    assert made < whole  # stopped part-way: fewer tokens than the same answer left to finish
    print(f"\ntimed out after 0.1 s: {made} of {whole} tokens generated")
