"""CompletionService: one OpenAI-style request, from checks to answer, as a plain async object.

No Ray and no HTTP here. The service talks to two small interfaces:

- a ``RouterClient``: ``route(text, lam, max_cost, candidates) -> RouteDecision``,
  ``experts() -> {name: normalised cost}``, ``reference() -> CostReference``;
- an ``ExpertClient``: ``names()``, ``limit(name)`` (most tokens the expert generates),
  ``generate(name, req)`` and ``stream(name, req)``.

Serving binds Ray handles to them (``serve.deployments``); ``serve.local`` binds a
``RouterService`` and in-process backends (tests, single-process use). What it does:

1. the plan: request limits (messages, characters, ``stop``, ``max_tokens`` against every
   expert the request may reach: never a silent cap), then the ranked experts to try (routed)
   or the named expert (direct). A request without ``max_tokens`` gets ``default_max_tokens``
   (at most every expert's limit), which each expert shortens to the room its context leaves
   after the prompt: the client asked for no particular length. An explicit ``max_tokens`` is
   never shortened: an expert whose context cannot hold the prompt plus it refuses the request
   (``context_length_exceeded``, OpenAI's message);
2. one fallback loop for unary and streamed calls: an expert that raises or does not answer
   (its first token, when streaming) within ``expert_timeout_s`` is cancelled and the next one
   is tried; the answer says which failed. A circuit breaker per expert (``serve.health``)
   skips, at once and without a call, an expert that failed ``breaker_failures`` times in a
   row or whose replicas are dead (``ExpertUnavailable``), for ``breaker_cooldown_s``; then one
   trial request decides whether it is back (when every expert a request may use is out, they
   are tried anyway: a last resort, never a refusal). With several replicas the breakers share
   their openings and closings (``share``, ``apply_board``: ``serve.health.CircuitBoard``), so a
   failing expert costs its failed calls once for the server, not once per replica. A client
   error of an expert (a prompt, or a prompt plus the requested ``max_tokens``, longer than its
   context) is not a failure (the breaker does not count it): a routed request tries the next
   ranked expert, whose context may be larger (what a client of a router expects: an answer
   from an expert that can take the request), and when every expert tried refused, the first
   refusal is the answer (a 400); a request naming an expert gets that expert's 400;
3. SSE framing of streamed answers (``data: {...}`` events, ``data: [DONE]``; an expert that
   fails mid-stream ends the stream with an error event: too late to fall back);
4. cost accounting: the estimated cost of the expert that answered against the best expert's.

Work the server gives up on is cancelled: a timed-out or abandoned expert call is an
``asyncio`` task cancelled by ``wait_for`` (the expert client passes the cancel on: Ray's
``DeploymentResponse.cancel()``, a closed stream), and a streamed answer the client stopped
reading closes the expert's stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeAlias, TypeVar

from cscr.serve.health import CircuitBreaker, ExpertUnavailable
from cscr.serve.metrics import Tally
from cscr.serve.protocol import (
    ROUTER_MODEL,
    ChatChoice,
    ChatChoiceMessage,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    CompletionChoice,
    CompletionChunk,
    CompletionRequest,
    CompletionResponse,
    CscrInfo,
    GenerationRequest,
    GenerationResult,
    ModelCard,
    ModelList,
    ProtocolError,
    RouteDecision,
    RouteRequest,
    Usage,
    parse_model,
)
from cscr.serve.service import CostReference
from pydantic import BaseModel, ConfigDict, Field

log = logging.getLogger("cscr.serve")
T = TypeVar("T")
Request: TypeAlias = ChatCompletionRequest | CompletionRequest
DONE = b"data: [DONE]\n\n"


class CompletionSettings(BaseModel):
    """Per-request limits and the fallback policy (frozen; crosses Ray as a dict)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    expert_timeout_s: float = Field(120.0, gt=0)  # one expert call (or its first streamed token)
    max_attempts: int = Field(3, ge=1)  # experts tried per request (the first + fallbacks)
    default_max_tokens: int = Field(128, ge=1)  # when the request names none (at most the expert's limit)
    default_lambda: float = Field(0.0, ge=0)  # cost weight when the request names none
    max_prompt_chars: int = Field(32_000, ge=1)  # longer prompts (all messages) are refused
    max_messages: int = Field(256, ge=1)  # chat messages per request
    max_stop: int = Field(4, ge=0)  # stop strings per request (OpenAI's limit)
    max_stop_chars: int = Field(64, ge=1)  # characters per stop string
    breaker_failures: int = Field(3, ge=1)  # failures in a row that take an expert out of rotation
    breaker_cooldown_s: float = Field(10.0, ge=0)  # how long it stays out before a trial request
    connect_timeout_s: float = Field(0.5, gt=0)  # no replica took the call: is one running? (Ray path)


class RouterClient(Protocol):
    # lam None: the router picks it (budget / quality_target on its operating points, else its default)
    async def route(self, text: str, lam: float | None, max_cost: float | None = None,
                    candidates: list[str] | None = None, budget: float | None = None,
                    quality_target: float | str | None = None, category: str | None = None) -> RouteDecision: ...

    async def experts(self) -> dict[str, float]: ...

    async def reference(self) -> CostReference: ...


class ExpertClient(Protocol):
    def names(self) -> set[str]: ...

    def limit(self, name: str) -> int: ...

    async def generate(self, name: str, req: GenerationRequest) -> GenerationResult: ...

    def stream(self, name: str, req: GenerationRequest) -> AsyncIterator[str]: ...


class Metrics(Protocol):
    unit: str

    def failure(self, expert: str) -> None: ...

    def circuit(self, expert: str, is_open: bool) -> None: ...

    def answered(self, expert: str, routed: bool, fallback: bool, best_cost: float, chosen_cost: float,
                 routing_ms: float) -> None: ...

    def as_dict(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class Plan:
    order: list[str]  # experts to try, in order
    decision: RouteDecision | None  # None: the client named the expert
    cost_weight: float
    routing_ms: float
    generation: GenerationRequest


@dataclass(frozen=True)
class Answer:
    body: BaseModel  # ChatCompletionResponse | CompletionResponse
    info: CscrInfo


@dataclass(frozen=True)
class StreamedAnswer:
    info: CscrInfo
    events: AsyncIterator[bytes]  # SSE bytes, ending with DONE (or an error event)


def sse_event(obj: BaseModel | dict[str, Any]) -> bytes:
    """One server-sent event: ``data: <json>`` and a blank line."""
    text = obj.model_dump_json(exclude_none=True) if isinstance(obj, BaseModel) else json.dumps(obj)
    return f"data: {text}\n\n".encode()


def info_headers(info: CscrInfo) -> dict[str, str]:
    """The ``x-cscr-*`` headers of a response: what the router did."""
    h = {"x-cscr-expert": info.expert, "x-cscr-routing-ms": f"{info.routing_ms:.3f}",
         "x-cscr-fallback": "true" if info.fallback else "false"}
    if info.cost_weight is not None:
        h["x-cscr-cost-weight"] = repr(float(info.cost_weight))
    if info.expected_cost is not None and info.expected_quality is not None:  # the operating point
        h["x-cscr-expected-cost"] = repr(float(info.expected_cost))
        h["x-cscr-expected-quality"] = repr(float(info.expected_quality))
        h["x-cscr-cost-unit"] = str(info.cost_unit)
    if info.failed:
        h["x-cscr-failed"] = ",".join(info.failed)
    if info.pool_version is not None:
        h["x-cscr-pool-version"] = str(info.pool_version)
    return h


async def _close(stream: AsyncIterator[str] | None) -> None:
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        with contextlib.suppress(Exception):  # closing a broken stream: nothing more to learn
            await aclose()


class CompletionService:
    """Plan, fallback, SSE and cost accounting over a router client and an expert client."""

    def __init__(self, router: RouterClient, experts: ExpertClient,
                 settings: CompletionSettings | None = None, metrics: Metrics | None = None) -> None:
        self.router = router
        self.experts = experts
        self.settings = settings or CompletionSettings()
        self.metrics: Metrics = metrics if metrics is not None else Tally()
        self._reference: CostReference | None = None
        self.health = CircuitBreaker(self.settings.breaker_failures, self.settings.breaker_cooldown_s,
                                     on_change=self._circuit_changed)  # each opening and closing, published
        # told (name, True) when this replica's own breaker (re)opens a circuit and (name, False) when
        # it closes one (serve.deployments posts them to the shared CircuitBoard); None: not shared
        self.share: Callable[[str, bool], None] | None = None
        self._board: dict[str, int] = {}  # expert -> epoch of the shared opening applied here
        self._board_id: str | None = None  # the board those epochs come from
        self._applying_board = False

    def _circuit_changed(self, name: str, is_open: bool) -> None:
        self.metrics.circuit(name, is_open)
        if self.share is not None and not self._applying_board:  # the board's own news is not posted back
            self.share(name, is_open)

    def apply_board(self, view: dict[str, Any]) -> None:
        """Apply the shared board (``CircuitBoard.view()``: its open circuits, ``{name: [epoch,
        seconds until a trial]}``): an opening not applied yet opens this replica's circuit too; a
        shared opening that left the board (closed by another replica's successful trial, or its
        expert left the pool) closes it here. A new board (the controller restarted and knows no
        circuit) closes nothing: this replica posts its open circuits to it instead."""
        opened: dict[str, Any] = view["open"]
        if view["id"] != self._board_id:
            if self._board_id is not None and self.share is not None:
                for name in self.health.open_names():
                    self.share(name, True)
            self._board_id, self._board = view["id"], {}
        names = self.experts.names()
        self._applying_board = True
        try:
            for name, (epoch, retry_after_s) in opened.items():
                if name in names and self._board.get(name) != epoch:
                    self.health.trip(name, float(retry_after_s))
            for name in self._board.keys() - opened.keys():
                self.health.clear(name)
        finally:
            self._applying_board = False
        self._board = {name: int(v[0]) for name, v in opened.items() if name in names}

    async def reference(self) -> CostReference:
        if self._reference is None:
            self._reference = await self.router.reference()
            self.metrics.unit = self._reference.unit
        return self._reference

    # ---- the plan ----
    def check_limits(self, req: Request) -> str:
        """Refuse what is too big to serve; returns the routing text (what the router embeds)."""
        s = self.settings
        if isinstance(req, ChatCompletionRequest):
            if not req.messages:
                raise ProtocolError("messages is empty", param="messages", code="empty_prompt")
            if len(req.messages) > s.max_messages:
                raise ProtocolError(f"the request has {len(req.messages)} messages; the limit is "
                                    f"{s.max_messages}", param="messages", code="too_many_messages")
            total, param = sum(len(m.text()) for m in req.messages), "messages"
        else:
            total, param = len(req.prompt_text()), "prompt"
        if total > s.max_prompt_chars:
            raise ProtocolError(f"the prompt has {total} characters; the limit is {s.max_prompt_chars}",
                                param=param, code="prompt_too_long")
        stops = req.stop_list()
        if len(stops) > s.max_stop:
            raise ProtocolError(f"the request has {len(stops)} stop strings; the limit is {s.max_stop}",
                                param="stop", code="too_many_stops")
        long = [x for x in stops if len(x) > s.max_stop_chars]
        if long:
            raise ProtocolError(f"a stop string has {len(long[0])} characters; the limit is "
                                f"{s.max_stop_chars}", param="stop", code="stop_too_long")
        text = req.routing_text()
        if not text.strip():
            raise ProtocolError("the prompt is empty", param=param, code="empty_prompt")
        return text

    @staticmethod
    def _none_served(req: Request, ranked: Any) -> ProtocolError:
        """No expert the router ranked is being served. When the request's own constraints
        (candidates, max_cost) left only such experts, that is the request's to change: a 400
        naming the constraint; otherwise the server is missing its experts: a 503."""
        shown = [r.name for r in ranked][:5]
        if req.candidates:
            return ProtocolError(f"none of the candidates the request allows is being served (ranked: {shown})",
                                 param="candidates", code="candidate_not_served")
        if req.max_cost is not None:
            return ProtocolError(f"no expert being served costs at most max_cost={req.max_cost} (ranked: {shown})",
                                 param="max_cost", code="no_expert_within_max_cost")
        return ProtocolError("no routable expert is being served", status=503, code="no_expert",
                             type_="server_error")

    async def plan(self, req: Request) -> Plan:
        text = self.check_limits(req)
        routed, lam = parse_model(req.model, self.settings.default_lambda, req.cost_weight)
        decision, ms = None, 0.0
        if routed:
            t0 = time.perf_counter()
            asked = None if req.model == ROUTER_MODEL and req.cost_weight is None else lam  # None: the router's pick
            decision = await self.router.route(text, asked, req.max_cost, req.candidates, req.budget,
                                               req.quality_target, req.category)
            lam = decision.cost_weight
            ms = (time.perf_counter() - t0) * 1e3
            names = self.experts.names()
            served = [r.name for r in decision.ranked if r.name in names]
            if not served:
                raise self._none_served(req, decision.ranked)
            order = self._healthy(served)[: self.settings.max_attempts]
        elif req.model in self.experts.names():
            order = self._healthy([req.model])
        else:
            raise ProtocolError(f"the model {req.model!r} does not exist; use 'cscr', 'cscr:<lambda>' or "
                                f"one of {sorted(self.experts.names())}", status=404,
                                code="model_not_found", param="model")
        return Plan(order, decision, lam, ms, self._generation(req, order))

    def _healthy(self, names: list[str]) -> list[str]:
        """The experts whose circuit lets a request through; when none does, all of them (a last
        resort: better a quick failure, or a recovered expert, than refusing every request)."""
        return [n for n in names if self.health.available(n)] or names

    def _generation(self, req: Request, order: list[str]) -> GenerationRequest:
        limits = {n: self.experts.limit(n) for n in order}
        asked = req.token_limit()
        if asked is None:  # the default, shortened by each expert to the room its context leaves
            max_tokens = min([self.settings.default_max_tokens, *limits.values()])
        else:
            over = [n for n, lim in limits.items() if asked > lim]
            if over:
                param = "max_completion_tokens" if getattr(req, "max_completion_tokens", None) else "max_tokens"
                raise ProtocolError(f"{param}={asked} is above what expert {over[0]!r} generates "
                                    f"({limits[over[0]]} tokens); ask for at most "
                                    f"{min(limits.values())}", param=param, code="max_tokens_too_large")
            max_tokens = asked
        common: dict[str, Any] = {"max_tokens": max_tokens, "max_tokens_is_default": asked is None,
                                  "temperature": req.temperature or 0.0,
                                  "top_p": req.top_p or 1.0, "stop": req.stop_list()}
        if isinstance(req, ChatCompletionRequest):
            msgs = [{"role": m.role, "content": m.text()} for m in req.messages]
            return GenerationRequest(kind="chat", messages=msgs, **common)
        return GenerationRequest(kind="completion", prompt=req.prompt_text(), **common)

    # ---- the one fallback loop ----
    async def _first_answer(self, order: list[str],
                            start: Callable[[str], Awaitable[T]]) -> tuple[str, T, list[str]]:
        """Try ``start(name)`` down the order; an expert that raises or exceeds the timeout is
        cancelled, counted as failed (by the metrics and the breaker) and the next one is tried;
        one whose circuit opened meanwhile is skipped without a call."""
        failed: list[str] = []
        refused: list[ProtocolError] = []  # client errors of experts (the prompt does not fit them)
        last_resort = not any(self.health.available(n) for n in order)  # every circuit is open
        for name in order:
            if not last_resort and not self.health.acquire(name):
                failed.append(name)
                continue
            verdict = False
            try:
                result = await asyncio.wait_for(start(name), self.settings.expert_timeout_s)
                verdict = True
                self.health.success(name)
                return name, result, failed
            except ProtocolError as exc:
                verdict = True
                if exc.status >= 500:
                    self._failed(name, exc, failed)
                    continue
                self.health.success(name)  # it answered: the request does not fit it
                refused.append(exc)
                failed.append(name)
            except Exception as exc:
                verdict = True
                self._failed(name, exc, failed)
            finally:
                if not verdict:  # cancelled: the client left or the server gave up
                    self.health.release(name)
        if refused and len(refused) == len(failed):  # none failed: each refused the request
            raise refused[0]
        raise ProtocolError(f"every expert tried failed or timed out: {failed}", status=502,
                            code="experts_failed", type_="server_error")

    def forget_removed(self) -> None:
        """Drop the circuits of experts this service no longer serves (after a pool change): one
        added again later under the same name starts closed. ``_record_failure`` records nothing
        for them."""
        self.health.keep(self.experts.names())

    def _failed(self, name: str, exc: BaseException, failed: list[str]) -> None:
        log.warning("expert %r failed (%s): trying the next one", name,
                    "timed out" if isinstance(exc, TimeoutError) else repr(exc))
        failed.append(name)
        self._record_failure(name, exc)

    def _record_failure(self, name: str, exc: BaseException) -> None:
        """A failed call (before the answer began or mid-stream): counted by the metrics; the
        breaker's circuit moves unless the expert left the pool during the call (forget_removed)."""
        self.metrics.failure(name)
        if name in self.experts.names():
            self.health.failure(name, dead=isinstance(exc, ExpertUnavailable) and exc.dead)

    async def _open_stream(self, name: str, greq: GenerationRequest) -> tuple[AsyncIterator[str] | None, str | None]:
        """(the stream, its first piece); (None, None) for a stream that ended at once."""
        stream = self.experts.stream(name, greq)
        try:
            first = await stream.__anext__()
        except StopAsyncIteration:
            return None, None
        except BaseException:
            await _close(stream)
            raise
        return stream, first

    def _info(self, plan: Plan, name: str, failed: list[str]) -> CscrInfo:
        routed = plan.decision is not None
        d = plan.decision
        return CscrInfo(expert=name, routed=routed, cost_weight=plan.cost_weight if routed else None,
                        routing_ms=plan.routing_ms, fallback=bool(failed), failed=failed,
                        pool_version=d.pool_version if d is not None else None,
                        category=d.category if d is not None else None,
                        expected_cost=d.expected_cost if d is not None else None,
                        expected_quality=d.expected_quality if d is not None else None,
                        cost_unit=d.cost_unit if d is not None else None)

    async def _account(self, info: CscrInfo, decision: RouteDecision | None) -> None:
        """Count the answer; for routed ones, its estimated cost against the best expert's."""
        if decision is None:
            self.metrics.answered(info.expert, False, info.fallback, 0.0, 0.0, 0.0)
            return
        ref = await self.reference()
        cost = {r.name: r.cost for r in decision.ranked}.get(info.expert, ref.best_cost)
        info.cost = cost * ref.scale  # what this answer is charged (per-key budgets: serve.budgets)
        self.metrics.answered(info.expert, True, info.fallback, ref.best_cost * ref.scale,
                              cost * ref.scale, info.routing_ms)

    # ---- requests ----
    async def complete(self, req: Request) -> Answer:
        """A whole answer (``stream`` is ignored: see ``stream``)."""
        plan = await self.plan(req)
        name, result, failed = await self._first_answer(
            plan.order, lambda n: self.experts.generate(n, plan.generation))
        info = self._info(plan, name, failed)
        await self._account(info, plan.decision)
        usage = Usage(prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens,
                      total_tokens=result.prompt_tokens + result.completion_tokens)
        if isinstance(req, ChatCompletionRequest):
            body: BaseModel = ChatCompletionResponse(
                model=name, usage=usage, cscr=info,
                choices=[ChatChoice(message=ChatChoiceMessage(content=result.text),
                                    finish_reason=result.finish_reason)])
        else:
            body = CompletionResponse(model=name, usage=usage, cscr=info, choices=[
                CompletionChoice(text=result.text, finish_reason=result.finish_reason)])
        return Answer(body, info)

    async def stream(self, req: Request) -> StreamedAnswer:
        """A streamed answer: falls back until an expert yields its first piece, then SSE."""
        plan = await self.plan(req)
        name, (stream, first), failed = await self._first_answer(
            plan.order, lambda n: self._open_stream(n, plan.generation))
        info = self._info(plan, name, failed)
        await self._account(info, plan.decision)
        chat = isinstance(req, ChatCompletionRequest)
        return StreamedAnswer(info, self._events(chat, info, first, stream))

    async def _events(self, chat: bool, info: CscrInfo, first: str | None,
                      stream: AsyncIterator[str] | None) -> AsyncIterator[bytes]:
        cid = ("chatcmpl-" if chat else "cmpl-") + f"{time.time_ns():x}"

        def chunk(text: str | None, finish: str | None = None, role: str | None = None,
                  with_info: bool = False) -> bytes:
            extra = info if with_info else None
            if chat:
                return sse_event(ChatCompletionChunk(id=cid, model=info.expert, cscr=extra, choices=[
                    ChatChunkChoice(delta=ChatDelta(role=role, content=text), finish_reason=finish)]))
            return sse_event(CompletionChunk(id=cid, model=info.expert, cscr=extra, choices=[
                CompletionChoice(text=text or "", finish_reason=finish)]))

        finished = stream is None
        try:
            if chat:
                yield chunk(None, role="assistant", with_info=True)
            if first:
                yield chunk(first, with_info=not chat)
            while stream is not None and not finished:
                try:
                    piece = await asyncio.wait_for(stream.__anext__(), self.settings.expert_timeout_s)
                except StopAsyncIteration:
                    finished = True
                    break
                except Exception as exc:  # mid-stream: too late to fall back
                    self._record_failure(info.expert, exc)
                    yield sse_event({"error": {"message": f"expert {info.expert!r} failed mid-stream: {exc!r}",
                                               "type": "server_error", "param": None, "code": "expert_failed"}})
                    return
                if piece:
                    yield chunk(piece)
            yield chunk(None, finish="stop")
            yield DONE
        finally:
            if not finished:  # the client went away or the expert failed: stop generating
                await _close(stream)

    async def route(self, req: RouteRequest) -> tuple[RouteDecision, CscrInfo]:
        """The ranked decision only (POST /v1/route)."""
        text = req.routing_text()
        if len(text) > self.settings.max_prompt_chars:
            raise ProtocolError(f"the prompt has {len(text)} characters; the limit is "
                                f"{self.settings.max_prompt_chars}", param="prompt", code="prompt_too_long")
        if not text.strip():
            raise ProtocolError("the prompt is empty", param="prompt", code="empty_prompt")
        routed, lam = parse_model(req.model, self.settings.default_lambda, req.cost_weight)
        if not routed:
            raise ProtocolError(f"/v1/route needs model 'cscr' or 'cscr:<lambda>', got {req.model!r}",
                                param="model")
        t0 = time.perf_counter()
        asked = None if req.model == ROUTER_MODEL and req.cost_weight is None else lam  # None: the router's pick
        decision = await self.router.route(text, asked, req.max_cost, req.candidates, req.budget, req.quality_target,
                                           req.category)
        ms = (time.perf_counter() - t0) * 1e3
        return decision, CscrInfo(expert=decision.chosen, routed=True, cost_weight=decision.cost_weight,
                                  routing_ms=ms, pool_version=decision.pool_version, category=decision.category,
                                  expected_cost=decision.expected_cost, expected_quality=decision.expected_quality,
                                  cost_unit=decision.cost_unit)

    async def models(self) -> ModelList:
        served = self.experts.names()
        costs = await self.router.experts()
        return ModelList(data=[ModelCard(id=ROUTER_MODEL)] + [ModelCard(id=n, cost=c) for n, c in costs.items()
                                                               if n in served])
