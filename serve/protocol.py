"""The HTTP protocol: OpenAI's chat / completions / models shapes plus cscr's extensions.

Pure pydantic (no Ray, no FastAPI). Requests accept unknown OpenAI fields (the official client
sends some we do not use) and ignore them; cscr's own extensions are:

- ``cost_weight`` (lambda >= 0): the per-request cost knob of SPEC.md section 5;
- ``budget``: the expected mean cost per request, in the run's cost unit (USD or parameters):
  the server routes at the best-quality operating point within it (``cscr.operating``);
- ``quality_target``: an expected quality, absolute (``0.7``) or relative to the best single
  expert (``"0.95x"``): the server routes at the cheapest operating point meeting it;
- ``max_cost``: a hard cap per request: only experts whose cost (``c_m`` times the run's scale,
  in the run's unit, as ``cscr route --max-cost``) is at most this value;
- ``candidates``: route among these expert names only;
- ``category``: the prompt's category (task), when the caller knows it: a router with a category
  prior blends that category's row of its per-category quality table instead of the category it
  reads from the prompt (``cscr evaluate --routers cscr+category`` scores this); an unknown category,
  or a router without a prior, is a 400.

``cost_weight`` excludes ``budget`` / ``quality_target``; an unreachable or conflicting request
is a 400 whose message says what is reachable.

The model name selects the mode: ``"cscr"`` (the router chooses, lambda from ``cost_weight`` or
the server default), ``"cscr:<lambda>"`` (RouteLLM style, e.g. ``cscr:0.3``), or an expert's own
name (that expert, no routing).
"""

from __future__ import annotations

import hmac
import math
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from cscr.pool import ExpertSpec  # the one expert spec type (the admin API's body)

ROUTER_MODEL = "cscr"


def _not_bool(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError("a boolean is not a number")
    return value


# strict-ish types: JSON numbers only (``true`` is not 1), strings are not booleans
Number = Annotated[float, BeforeValidator(_not_bool)]
Count = Annotated[int, BeforeValidator(_not_bool)]
Flag = Annotated[bool, Field(strict=True)]


def _quality_target(value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, int | float | str) or (isinstance(value, str) and len(value) > 32):
        raise ValueError("must be a number (absolute quality) or a string such as '0.95x' (relative to the best expert)")
    return value


# a JSON number or a string such as "0.95x" (checked against the operating-point table)
QualityTarget = Annotated[float | str, BeforeValidator(_quality_target)]


class ProtocolError(ValueError):
    """A request that cannot be served as sent; ``status`` and ``code`` go into the HTTP error."""

    def __init__(self, message: str, status: int = 400, code: str = "invalid_request",
                 param: str | None = None, type_: str = "invalid_request_error",
                 reachable: dict[str, Any] | None = None, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code
        self.param = param
        self.type = type_
        self.reachable = reachable  # an unreachable operating point: what is (cscr.operating)
        self.retry_after_s = retry_after_s  # when to ask again (a rate limit): the Retry-After header

    def __reduce__(self) -> tuple:  # keep status and code across Ray's pickling
        return (type(self), (self.message, self.status, self.code, self.param, self.type, self.reachable,
                             self.retry_after_s))


def check_bearer(authorization: str | None, key: str, what: str = "API key",
                 code: str = "invalid_api_key") -> None:
    """Refuse (401) an ``Authorization`` header that is not ``Bearer <key>``; the scheme is
    case-insensitive (RFC 6750), the key compared in constant time."""
    scheme, _, given = (authorization or "").strip().partition(" ")
    ok = scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), key.encode())
    if not ok:
        raise ProtocolError(f"invalid or missing {what} (send 'Authorization: Bearer <key>')",
                            status=401, code=code)


# ---- errors (OpenAI's shape) ----
class ErrorDetail(BaseModel):
    model_config = ConfigDict(extra="allow")  # "reachable" on an unreachable operating point

    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail

    @staticmethod
    def of(exc: ProtocolError) -> ErrorResponse:
        extra = {"reachable": exc.reachable} if getattr(exc, "reachable", None) else {}
        return ErrorResponse(error=ErrorDetail(message=exc.message, type=exc.type, param=exc.param,
                                               code=exc.code, **extra))


# ---- cscr extensions shared by every generation request ----
class RoutingFields(BaseModel):
    model_config = ConfigDict(extra="ignore")

    cost_weight: Number | None = Field(None, description="lambda >= 0: the cost knob")
    budget: Number | None = Field(None, description="expected mean cost per request (run's unit)")
    quality_target: QualityTarget | None = Field(
        None, description="expected quality: absolute (0.7) or relative to the best expert ('0.95x')")
    max_cost: Number | None = Field(None, description="hard cap: only experts costing <= this (run's unit)")
    candidates: list[str] | None = Field(None, description="route among these experts only")
    category: str | None = Field(None, min_length=1, max_length=200,
                                 description="the prompt's category (task), when the caller knows it")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer", "tool"] = "user"
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        """The message text; content parts of type "text" are joined, other parts refused."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        out = []
        for part in self.content:
            if part.get("type") != "text":
                raise ProtocolError(f"content part of type {part.get('type')!r} is not supported; "
                                    "only text parts", param="messages")
            out.append(str(part.get("text", "")))
        return "\n".join(out)


class GenerationParams(RoutingFields):
    model: str
    max_tokens: Count | None = Field(None, ge=1)
    temperature: Number | None = Field(None, ge=0.0, le=2.0)
    top_p: Number | None = Field(None, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    stream: Flag = False
    n: Count = Field(1, ge=1, le=1)
    user: str | None = None

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class ChatCompletionRequest(GenerationParams):
    messages: list[ChatMessage]
    max_completion_tokens: Count | None = Field(None, ge=1)

    def routing_text(self) -> str:
        """What the router embeds: the last user message (the query being answered)."""
        for m in reversed(self.messages):
            if m.role == "user":
                return m.text()
        return ""

    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(GenerationParams):
    prompt: str | list[str]

    def prompt_text(self) -> str:
        if isinstance(self.prompt, list):
            if len(self.prompt) != 1:
                raise ProtocolError("only one prompt per request is supported", param="prompt")
            return self.prompt[0]
        return self.prompt

    def routing_text(self) -> str:
        return self.prompt_text()

    def token_limit(self) -> int | None:
        return self.max_tokens


def parse_model(model: str, default_lambda: float, cost_weight: float | None) -> tuple[bool, float]:
    """(route?, lambda) from a model name; ``cscr:<lambda>`` sets lambda in the name."""
    if model == ROUTER_MODEL:
        lam = default_lambda if cost_weight is None else cost_weight
    elif model.startswith(ROUTER_MODEL + ":"):
        raw = model[len(ROUTER_MODEL) + 1:]
        try:
            lam = float(raw)
        except ValueError:
            raise ProtocolError(f"bad cost weight {raw!r} in model name {model!r}; use cscr:<lambda>, "
                                "e.g. cscr:0.3", param="model", code="invalid_cost_weight") from None
        if cost_weight is not None and cost_weight != lam:
            raise ProtocolError(f"model {model!r} sets lambda={lam} but cost_weight={cost_weight}",
                                param="cost_weight", code="invalid_cost_weight")
    else:
        return False, default_lambda
    check_lambda(lam)
    return True, lam


def check_lambda(lam: float) -> None:
    if not math.isfinite(lam) or lam < 0:
        raise ProtocolError(f"cost_weight (lambda) must be a finite number >= 0, got {lam}",
                            param="cost_weight", code="invalid_cost_weight")


# ---- route decision ----
class RouteRequest(RoutingFields):
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    model: str = ROUTER_MODEL

    def routing_text(self) -> str:
        if self.prompt is not None:
            return self.prompt
        if self.messages:
            return ChatCompletionRequest(model=self.model, messages=self.messages).routing_text()
        return ""


class RankedExpert(BaseModel):
    name: str
    score: float | None  # similarity - lambda * cost (what the router maximises); None: outside top-k
    similarity: float | None  # the router's utility before the cost penalty
    cost: float  # normalised expert cost c_m


class RouteDecision(BaseModel):
    chosen: str
    cost_weight: float
    ranked: list[RankedExpert]  # best first; the fallback order
    routing_ms: float = 0.0
    pool_version: int | None = None  # version of the live pool the decision was made on
    category: str | None = None  # the category the caller gave (None: read from the prompt, if at all)
    # the operating point of cost_weight (cscr.operating; None: the run has no table)
    expected_cost: float | None = None  # expected mean cost per request, cost_unit
    expected_quality: float | None = None  # expected mean quality
    cost_unit: str | None = None


# ---- admin ----
class AddExpertRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    expert: ExpertSpec
    cost: Number = Field(..., ge=0.0, description="normalised cost c_m (1 = the pool's most expensive)")
    descriptor: list[Number] | None = None  # unit or not; normalised by the server
    fingerprint: Flag = False  # compute the descriptor on the fly (logit footprint on the run's probes)
    # its answers' quality on the run's probe prompts, in their order (null: not answered): the router
    # calibrates the expert on them (cscr/newcomer.py); the router checks the length
    probe_outcomes: list[Number | None] | None = Field(None, max_length=100_000)


class ExpertInfo(BaseModel):
    name: str
    cost: float
    backend: str | None = None
    routable: bool = True


class ExpertList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ExpertInfo]


# ---- responses ----
def _id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class CscrInfo(BaseModel):
    """cscr's extension field on every response: what the router did."""

    expert: str
    routed: bool
    cost_weight: float | None = None
    routing_ms: float = 0.0
    fallback: bool = False
    failed: list[str] = Field(default_factory=list)  # experts tried first that failed or timed out
    pool_version: int | None = None  # version of the live pool the request was routed under
    category: str | None = None  # the category the caller gave
    expected_cost: float | None = None  # the operating point's expected mean cost per request
    expected_quality: float | None = None  # and its expected mean quality
    cost_unit: str | None = None
    cost: float | None = None  # this answer's estimated cost (c_m x the run's scale), cost_unit


class ChatChoiceMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatChoiceMessage
    finish_reason: str | None = "stop"


class ChatCompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: _id("chatcmpl"))
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage = Field(default_factory=Usage)
    cscr: CscrInfo | None = None


class ChatDelta(BaseModel):
    role: str | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChunkChoice]
    cscr: CscrInfo | None = None


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: str | None = "stop"


class CompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: _id("cmpl"))
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage = Field(default_factory=Usage)
    cscr: CscrInfo | None = None


class CompletionChunk(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    cscr: CscrInfo | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "cscr"
    cost: float | None = None  # normalised expert cost; None for the router itself


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ---- what an expert backend receives and returns (ingress <-> expert deployments) ----
class GenerationRequest(BaseModel):
    """One generation, independent of the HTTP shape it came in."""

    kind: Literal["chat", "completion"]
    messages: list[dict[str, str]] | None = None  # chat: [{"role", "content"}]
    prompt: str | None = None  # completion
    max_tokens: int = 64
    # True: the client named no max_tokens and this is the server's default, which an expert
    # shortens to the room its context leaves; False: the client's own limit, refused (400,
    # context_length_exceeded / max_tokens_too_large) when it does not fit, never capped
    max_tokens_is_default: bool = False
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] = Field(default_factory=list)


class GenerationResult(BaseModel):
    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = "stop"
