"""The HTTP edge without Ray: serve.routes + serve.admin over a real CompletionService (CSCR router
on MiniLM, tiny LMs behind the transformers backend, a failing expert), driven through FastAPI's
TestClient. Keys, the admin API, /healthz, /docs, body checks, strict types, limits, and every
error in OpenAI's shape."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cscr.serve.admin import AdminService
from cscr.serve.completion import CompletionService, CompletionSettings
from cscr.serve.local import LocalExperts, LocalRouter
from cscr.serve.metrics import Tally
from cscr.serve.policy import SourcePolicy
from cscr.serve.routes import EdgeSettings, build_api
from fastapi.testclient import TestClient
from serve_helpers import (
    COSTS,
    BrokenExpert,
    HungExpert,
    LiveServer,
    long_expert,
    router_service,
    seconds_until_idle,
    tiny_backends,
)

KEY, ADMIN = "api-key-1", "admin-key-2"
MSG = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def parts(encoder, tiny_lms):
    return router_service(encoder), tiny_backends(tiny_lms)


class BrokenRouter(LocalRouter):
    """A router client whose pool listing crashes (a bug on the server's side)."""

    async def experts(self) -> dict[str, float]:
        raise RuntimeError("boom")


def client(parts, router_cls=LocalRouter, **edge) -> TestClient:
    router, tiny = parts
    local = router_cls(router)
    experts = LocalExperts({"broken": BrokenExpert(), "hung": HungExpert(), **tiny},
                           {"tiny-a": 32, "tiny-b": 64})
    completion = CompletionService(local, experts, CompletionSettings(expert_timeout_s=10, default_max_tokens=4,
                                                                      max_messages=8), Tally())
    # admin adds may load the tiny LMs (their folder is a declared model root)
    policy = SourcePolicy(model_roots=sorted({str(Path(b.path).parent) for b in tiny.values()}))
    admin = AdminService(local, experts, completion, policy=policy)
    settings = EdgeSettings(**{"api_key": KEY, "admin_key": ADMIN, **edge})
    return TestClient(build_api(completion, admin, settings), raise_server_exceptions=False)


def auth(key: str = KEY, scheme: str = "Bearer") -> dict[str, str]:
    return {"Authorization": f"{scheme} {key}"}


def openai_error(r, status: int, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    if code is not None:
        assert body["error"]["code"] == code, body
    return body["error"]


def test_the_api_key_scheme_is_case_insensitive(parts):
    c = client(parts)
    for scheme in ("Bearer", "bearer", "BEARER"):
        assert c.get("/v1/models", headers=auth(scheme=scheme)).status_code == 200
    for headers in ({}, auth("wrong"), auth(scheme="Basic"), {"Authorization": KEY}, auth(ADMIN)):
        openai_error(c.get("/v1/models", headers=headers), 401, "invalid_api_key")
    assert [m["id"] for m in c.get("/v1/models", headers=auth()).json()["data"]] == ["cscr", *COSTS]


def test_admin_endpoints_need_their_own_key(parts):
    c = client(parts)
    for method, path in (("GET", "/v1/experts"), ("POST", "/v1/experts"), ("DELETE", "/v1/experts/tiny-a")):
        openai_error(c.request(method, path, headers=auth()), 401, "invalid_api_key")  # the API key is not enough
        openai_error(c.request(method, path), 401)
    listed = c.get("/v1/experts", headers=auth(ADMIN, "bearer"))
    assert listed.status_code == 200 and [e["name"] for e in listed.json()["data"]] == list(COSTS)


def test_admin_is_disabled_without_an_admin_key(parts):
    c = client(parts, admin_key=None)
    for headers in ({}, auth(), auth(ADMIN)):
        err = openai_error(c.get("/v1/experts", headers=headers), 403, "admin_disabled")
        assert "--admin-key" in err["message"]
    assert c.get("/healthz").json() == {"status": "ok"}


def test_healthz_says_only_ok_without_the_admin_key(parts):
    c = client(parts)
    r = c.get("/healthz")
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    openai_error(c.get("/healthz", headers=auth()), 401)  # the API key does not see the details
    c.post("/v1/chat/completions", headers=auth(), json={"model": "cscr:1000", "messages": MSG,
                                                          "candidates": ["broken", "tiny-a"]})
    details = c.get("/healthz", headers=auth(ADMIN)).json()
    assert details["status"] == "ok" and details["experts"] == COSTS and details["best_expert"] == "tiny-b"
    assert details["metrics"]["routed"] == {"tiny-a": 1} and details["metrics"]["failures"] == {"broken": 1}


def test_docs_are_off_unless_enabled(parts):
    off = client(parts)
    for path in ("/docs", "/redoc", "/openapi.json"):
        openai_error(off.get(path), 404, "not_found")
    on = client(parts, enable_docs=True)
    assert on.get("/docs").status_code == 200 and on.get("/redoc").status_code == 200
    schema = on.get("/openapi.json").json()
    assert "/v1/chat/completions" in schema["paths"] and "/v1/experts" in schema["paths"]
    codes = {code for ops in schema["paths"].values() for op in ops.values() for code in op["responses"]}
    assert "422" not in codes and "400" in codes  # validation errors answer 400


def test_chat_with_fallback_over_http(parts):
    c = client(parts)
    r = c.post("/v1/chat/completions", headers=auth(), json={"model": "cscr:1000", "messages": MSG,
                                                              "candidates": ["broken", "tiny-a"]})
    assert r.status_code == 200, r.text
    assert r.headers["x-cscr-expert"] == "tiny-a" and r.headers["x-cscr-failed"] == "broken"
    assert r.headers["x-cscr-fallback"] == "true" and r.json()["cscr"]["failed"] == ["broken"]
    s = c.post("/v1/chat/completions", headers=auth(), json={"model": "cscr:1000", "messages": MSG, "stream": True,
                                                              "candidates": ["broken", "tiny-a"]})
    assert s.status_code == 200 and s.headers["content-type"].startswith("text/event-stream")
    assert s.headers["x-cscr-failed"] == "broken"
    events = [e for e in s.text.split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    text = "".join(json.loads(e[6:])["choices"][0]["delta"].get("content", "") for e in events[:-1])
    assert text == r.json()["choices"][0]["message"]["content"]
    every = c.post("/v1/chat/completions", headers=auth(), json={"model": "cscr", "messages": MSG,
                                                                  "candidates": ["broken"]})
    assert openai_error(every, 502, "experts_failed")["type"] == "server_error"


@pytest.mark.parametrize("body, headers, status, code", [
    (b'{"model": "cscr", "messages": [{"role": "user", "content": "\\ud800"}]}', {}, 400, "invalid_encoding"),
    (b'{"model": "cscr", "messages": [{"role": "user", "content": "caf\xe9"}]}', {}, 400, "invalid_encoding"),
    (b'{"model": "cscr", "messages": [', {}, 400, "invalid_json"),
    (b'[' * 100_000 + b']' * 100_000, {}, 400, "invalid_json"),
    (b'{"model": "cscr", "messages": ' + b'[' * 40 + b']' * 40 + b'}', {}, 400, "invalid_json"),
    (b'{"model": "cscr", "messages": "' + b'x' * (1 << 20) + b'"}', {}, 413, "body_too_large"),
    (b'{"model": "cscr", "messages": []}', {"content-type": "text/plain"}, 400, "invalid_request"),
])
def test_bad_bodies_are_400s_in_openai_shape(parts, body, headers, status, code):
    c = client(parts, max_body_bytes=1 << 19)
    r = c.post("/v1/chat/completions", content=body, headers={**auth(), "content-type": "application/json",
                                                               **headers})
    openai_error(r, status, code)


@pytest.mark.parametrize("extra, param", [
    ({"cost_weight": True}, "cost_weight"),
    ({"max_cost": False}, "max_cost"),
    ({"max_tokens": True}, "max_tokens"),
    ({"temperature": True}, "temperature"),
    ({"stream": "true"}, "stream"),
    ({"stream": 1}, "stream"),
    ({"messages": [{"role": "user", "content": "hi"}] * 9}, None),
    ({"stop": ["a"] * 5}, "stop"),
    ({"stop": "x" * 65}, "stop"),
    ({"max_tokens": 10**12}, "max_tokens"),
])
def test_strict_types_and_limits(parts, extra, param):
    c = client(parts)
    r = c.post("/v1/chat/completions", headers=auth(), json={"model": "cscr", "messages": MSG, **extra})
    err = openai_error(r, 400)
    if param is not None:
        assert err["param"] == param
    else:
        assert err["code"] == "too_many_messages"


def test_unknown_paths_methods_and_internal_errors(parts):
    c = client(parts)
    err = openai_error(c.get("/v2/nothing", headers=auth()), 404, "not_found")
    assert "/v2/nothing" in err["message"]
    err = openai_error(c.get("/v1/chat/completions", headers=auth()), 405, "method_not_allowed")
    assert "GET" in err["message"]
    broken = client(parts, router_cls=BrokenRouter)
    err = openai_error(broken.get("/v1/models", headers=auth()), 500, "internal_error")
    assert err["type"] == "server_error" and "boom" not in err["message"]  # no internals leak
    openai_error(c.post("/v1/chat/completions", headers=auth(), json={"model": "gpt-9", "messages": MSG}),
                 404, "model_not_found")
    err = openai_error(c.post("/v1/route", headers=auth(), json={"prompt": "hi", "candidates": ["gpt-9"]}), 400)
    assert "gpt-9" in err["message"] and err["param"] == "candidates"
    err = openai_error(c.post("/v1/route", headers=auth(), json={"prompt": "hi", "cost_weight": -1}), 400)
    assert err["param"] == "cost_weight"


def test_live_add_and_remove_through_the_admin_api(parts, tiny_lms):
    c = client(parts)
    admin = auth(ADMIN)
    spec = {"name": "newcomer", "model": str(tiny_lms["a"]), "max_new_tokens": 16}
    dim = parts[0].router.index.dim
    openai_error(c.post("/v1/experts", headers=admin, json={"expert": spec, "cost": 0.0, "descriptor": [1.0, 0.0]}),
                 400, "bad_descriptor")
    openai_error(c.post("/v1/experts", headers=admin, json={"expert": spec, "cost": True, "descriptor": [1.0] * dim}),
                 400)
    err = openai_error(c.post("/v1/experts", headers=admin, json={"expert": spec, "cost": 0.0, "descriptor": [1.0] * dim,
                                                                 "probe_outcomes": [1.0, 0.0]}), 400)
    assert err["param"] == "probe_outcomes" and "no probe outcomes" in err["message"]
    openai_error(c.post("/v1/experts", headers=admin, json={"expert": {**spec, "name": "tiny-a"}, "cost": 0.0,
                                                            "descriptor": [1.0] * dim}), 409, "expert_exists")
    # nothing the operator did not declare: a local path outside the model roots, an upstream URL
    # with a server secret as its key (each refused at once, before anything is loaded or called)
    for bad in ({"name": "etc", "model": "/etc"}, {"name": "env", "model": "/proc/self/environ"},
                {"name": "leak", "model": "m", "base_url": "http://127.0.0.1:9/v1", "api_key_env": "HOME"}):
        err = openai_error(c.post("/v1/experts", headers=admin, json={"expert": bad, "cost": 0.0,
                                                                     "descriptor": [1.0] * dim}),
                           403, "source_not_allowed")
        assert "not" in err["message"] and err["param"] == "expert.source"
    try:
        added = c.post("/v1/experts", headers=admin, json={"expert": spec, "cost": 0.0, "descriptor": [1.0] * dim})
        assert added.status_code == 201, added.text
        r = c.post("/v1/chat/completions", headers=auth(), json={"model": "cscr:1000", "messages": MSG,
                                                                  "candidates": ["newcomer", "tiny-b"]})
        assert r.json()["model"] == "newcomer"  # free: chosen at a high cost weight
        openai_error(c.post("/v1/chat/completions", headers=auth(), json={"model": "newcomer", "messages": MSG,
                                                                           "max_tokens": 17}),
                     400, "max_tokens_too_large")
    finally:
        gone = c.delete("/v1/experts/newcomer", headers=admin)
    assert gone.status_code == 200 and "newcomer" not in gone.json()["experts"]
    openai_error(c.post("/v1/chat/completions", headers=auth(), json={"model": "newcomer", "messages": MSG}),
                 404, "model_not_found")
    openai_error(c.delete("/v1/experts/newcomer", headers=admin), 404, "expert_not_found")


def test_a_client_that_disconnects_mid_stream_stops_the_generation(parts, tiny_lms):
    """Real HTTP (uvicorn on loopback): the client reads a few events and hangs up; the expert (a
    tiny LM asked for 960 tokens, about a minute of work here) is idle within seconds."""
    import time

    import httpx

    long = long_expert(tiny_lms)
    local = LocalRouter(parts[0])
    experts = LocalExperts({"long": long}, {"long": 1000})
    completion = CompletionService(local, experts, CompletionSettings(), Tally())
    server = LiveServer(build_api(completion, AdminService(local, experts, completion), EdgeSettings(api_key=KEY)))
    try:
        before = long.llm.streamed_tokens
        body = {"model": "long", "max_tokens": 960, "stream": True,  # 34 prompt tokens + 960 fit 1,024
                "messages": [{"role": "user", "content": "Once upon a time"}]}
        with httpx.Client(base_url=server.base, headers=auth(), timeout=60) as c, \
                c.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            events = 0
            for line in r.iter_lines():
                events += line.startswith("data: ")
                if events == 3:
                    break  # hang up: the connection closes with the client
        at_leave = long.llm.streamed_tokens - before
        waited = seconds_until_idle(long, within=10)
        made = long.llm.streamed_tokens - before
        time.sleep(1.0)
        assert long.llm.streamed_tokens - before == made < 900  # stopped, far from the 1,000 asked
        print(f"\nclient hung up (HTTP) after {at_leave} tokens: expert idle {waited:.2f} s later, "
              f"{made - at_leave} tokens more")
    finally:
        server.close()
