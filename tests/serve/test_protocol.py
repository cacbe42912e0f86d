"""The HTTP protocol layer: model names, validation, OpenAI's error shape (no Ray, no HTTP)."""

from __future__ import annotations

import pickle

import pytest
from cscr.serve.protocol import (
    AddExpertRequest,
    ChatCompletionRequest,
    CompletionRequest,
    ErrorResponse,
    ProtocolError,
    RouteRequest,
    check_bearer,
    parse_model,
)
from pydantic import ValidationError


@pytest.mark.parametrize("model, cw, expect", [
    ("cscr", None, (True, 0.25)),
    ("cscr", 0.7, (True, 0.7)),
    ("cscr:0.3", None, (True, 0.3)),
    ("cscr:0", 0.0, (True, 0.0)),
    ("smollm2", None, (False, 0.25)),
])
def test_parse_model(model, cw, expect):
    assert parse_model(model, 0.25, cw) == expect


@pytest.mark.parametrize("model, cw, msg", [
    ("cscr:abc", None, "bad cost weight 'abc'"),
    ("cscr:-1", None, "finite number >= 0, got -1.0"),
    ("cscr:nan", None, "finite number >= 0"),
    ("cscr:inf", None, "finite number >= 0"),
    ("cscr", -0.1, "finite number >= 0, got -0.1"),
    ("cscr:0.3", 0.5, "sets lambda=0.3 but cost_weight=0.5"),
])
def test_bad_cost_weights_are_refused(model, cw, msg):
    with pytest.raises(ProtocolError, match=msg) as err:
        parse_model(model, 0.0, cw)
    assert err.value.status == 400 and err.value.param in ("cost_weight", "model")


def test_chat_request_extensions_and_routing_text():
    req = ChatCompletionRequest.model_validate({
        "model": "cscr", "stream_options": {"include_usage": True},  # unknown OpenAI field: ignored
        "messages": [{"role": "system", "content": "be brief"},
                     {"role": "user", "content": [{"type": "text", "text": "hello"}, {"type": "text", "text": "you"}]},
                     {"role": "assistant", "content": "hi"}],
        "cost_weight": 0.2, "max_cost": 0.5, "candidates": ["a", "b"], "max_completion_tokens": 7})
    assert req.routing_text() == "hello\nyou"
    assert (req.cost_weight, req.max_cost, req.candidates, req.token_limit()) == (0.2, 0.5, ["a", "b"], 7)
    with pytest.raises(ProtocolError, match="image_url"):
        ChatCompletionRequest.model_validate({"model": "cscr", "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}).routing_text()


def test_request_field_validation():
    with pytest.raises(ValidationError, match="temperature"):
        ChatCompletionRequest.model_validate({"model": "x", "messages": [], "temperature": 3})
    with pytest.raises(ValidationError, match="n"):
        CompletionRequest.model_validate({"model": "x", "prompt": "p", "n": 2})
    with pytest.raises(ProtocolError, match="one prompt"):
        CompletionRequest.model_validate({"model": "x", "prompt": ["a", "b"]}).prompt_text()
    assert RouteRequest(messages=[{"role": "user", "content": "q"}]).routing_text() == "q"


def test_add_expert_request_validates_the_spec():
    ok = AddExpertRequest.model_validate({"expert": {"name": "org/m-1.5b", "model": "smollm2"}, "cost": 0.1,
                                          "descriptor": [1.0, 0.0]})
    assert ok.expert.backend == "transformers"
    for bad in ({"expert": {"name": "bad name!", "model": "x"}, "cost": 0.1},
                {"expert": {"name": "m", "model": "x", "backend": "tgi"}, "cost": 0.1},
                {"expert": {"name": "m", "model": "x"}, "cost": -1},
                {"expert": {"name": "m", "model": "x", "surprise": 1}, "cost": 0.1}):
        with pytest.raises(ValidationError):
            AddExpertRequest.model_validate(bad)


def test_error_shape_and_pickling_keeps_status():
    exc = ProtocolError("nope", status=404, code="model_not_found", param="model")
    body = ErrorResponse.of(exc).model_dump()
    assert body == {"error": {"message": "nope", "type": "invalid_request_error", "param": "model",
                              "code": "model_not_found"}}
    back = pickle.loads(pickle.dumps(exc))  # crosses Ray's process boundary like this
    assert (back.status, back.code, back.param, str(back)) == (404, "model_not_found", "model", "nope")


def test_a_boolean_is_not_a_number():
    base = {"model": "cscr", "messages": [{"role": "user", "content": "hi"}]}
    ok = ChatCompletionRequest.model_validate({**base, "cost_weight": 1, "max_tokens": 3, "stream": True})
    assert (ok.cost_weight, ok.max_tokens, ok.stream) == (1.0, 3, True)
    for field, value in (("cost_weight", True), ("max_cost", False), ("max_tokens", True), ("top_p", True),
                         ("stream", "true"), ("stream", 1), ("n", True)):
        with pytest.raises(ValidationError, match=field):
            ChatCompletionRequest.model_validate({**base, field: value})
    with pytest.raises(ValidationError, match="cost"):
        AddExpertRequest.model_validate({"expert": {"name": "m", "model": "smollm2"}, "cost": True})


def test_bearer_scheme_is_case_insensitive():
    for header in ("Bearer k1", "bearer k1", "BEARER  k1", " Bearer k1 "):
        check_bearer(header, "k1")
    for header in (None, "", "k1", "Basic k1", "Bearer k2", "Bearer", "Bearerk1"):
        with pytest.raises(ProtocolError, match="invalid or missing API key") as err:
            check_bearer(header, "k1")
        assert err.value.status == 401 and err.value.code == "invalid_api_key"
