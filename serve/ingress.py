"""The OpenAI-compatible ingress: a FastAPI app served by Ray Serve (``serve.ingress``).

Validates and authenticates requests, asks the Router deployment for a decision, calls the
chosen expert through its handle with a timeout and falls back down the ranked list when it
fails (the response says so: ``x-cscr-fallback`` / ``x-cscr-failed`` headers and the ``cscr``
body field), streams SSE, counts metrics, and adds / removes experts live (an expert added at
run time gets its own Serve application). Single replica: it holds the live handle map.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from cscr.serve.deployments import deployment_name, expert_application
from cscr.serve.protocol import (
    ROUTER_MODEL,
    AddExpertRequest,
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
    ErrorResponse,
    ExpertInfo,
    ExpertList,
    ExpertSpec,
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
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field
from ray import serve


class IngressSettings(BaseModel):
    api_key: str | None = None  # bearer key every /v1 request must carry (None: open)
    admin_key: str | None = None  # key for /v1/experts (None: the api_key)
    expert_timeout_s: float = Field(120.0, gt=0)  # one expert call (or the first streamed token)
    max_attempts: int = Field(3, ge=1)  # experts tried per request (the first + fallbacks)
    default_max_tokens: int = Field(128, ge=1)  # when the request names none
    default_lambda: float = 0.0  # cost weight when the request names none
    max_prompt_chars: int = Field(32_000, ge=1)  # longer prompts (all messages) are refused
    expert_num_cpus: float = Field(0.25, ge=0)  # Ray CPUs of experts added at run time



api = FastAPI(title="cscr", description="Cost-aware LLM routing behind an OpenAI-compatible API")


def _error(exc: ProtocolError, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(ErrorResponse.of(exc).model_dump(), status_code=exc.status, headers=headers)


@api.exception_handler(ProtocolError)
async def _protocol_error(_: Request, exc: ProtocolError) -> JSONResponse:
    return _error(exc)


@api.exception_handler(RequestValidationError)
async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {}
    loc = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
    msg = f"{loc}: {first.get('msg', 'invalid request')}" if loc else str(first.get("msg", exc))
    return _error(ProtocolError(msg, param=loc or None, code="invalid_request"))


def _unwrap(exc: BaseException) -> BaseException:
    """The user-facing exception inside a Ray task error (ProtocolError raised in a replica)."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, BaseException) else exc


def _sse(obj: BaseModel | dict[str, Any] | str) -> bytes:
    if isinstance(obj, BaseModel):
        obj = obj.model_dump_json(exclude_none=True)
    elif isinstance(obj, dict):
        obj = json.dumps(obj)
    return f"data: {obj}\n\n".encode()


@serve.deployment(name="Ingress", num_replicas=1, max_ongoing_requests=512,
                  ray_actor_options={"num_cpus": 0.1})
@serve.ingress(api)
class Ingress:
    def __init__(self, router: Any, experts: dict[str, Any], specs: dict[str, dict[str, Any]],
                 settings: dict[str, Any]) -> None:
        from cscr.serve.metrics import ServeMetrics

        self.router = router
        self.experts: dict[str, Any] = dict(experts)  # name -> DeploymentHandle
        self.specs = {n: ExpertSpec(**s) for n, s in specs.items()}
        self.dynamic: dict[str, str] = {}  # expert added at run time -> its Serve application
        self.settings = IngressSettings(**settings)
        self._reference: CostReference | None = None
        self._admin_lock = asyncio.Lock()
        self.metrics = ServeMetrics(unit="normalised")

    # ---- helpers ----
    def _auth(self, request: Request, admin: bool = False) -> None:
        key = (self.settings.admin_key or self.settings.api_key) if admin else self.settings.api_key
        if key is None:
            return
        header = request.headers.get("authorization", "")
        if not hmac.compare_digest(header.encode(), f"Bearer {key}".encode()):
            raise ProtocolError("invalid or missing API key (send 'Authorization: Bearer <key>')",
                                status=401, code="invalid_api_key")

    async def _call(self, remote: Any) -> Any:
        try:
            return await remote
        except Exception as exc:  # a ProtocolError raised in the router replica
            raise _unwrap(exc) from None

    async def _ref(self) -> CostReference:
        if self._reference is None:
            self._reference = await self._call(self.router.reference.remote())
            self.metrics.unit = self._reference.unit
        return self._reference

    async def _plan(self, req: ChatCompletionRequest | CompletionRequest,
                    text: str) -> tuple[list[str], RouteDecision | None, float, float]:
        """(experts to try in order, the decision, lambda, ms spent routing)."""
        routed, lam = parse_model(req.model, self.settings.default_lambda, req.cost_weight)
        if not text or not text.strip():
            raise ProtocolError("the prompt is empty", param="messages" if isinstance(
                req, ChatCompletionRequest) else "prompt", code="empty_prompt")
        if not routed:
            if req.model not in self.experts:
                raise ProtocolError(f"the model {req.model!r} does not exist; use 'cscr', 'cscr:<lambda>' "
                                    f"or one of {sorted(self.experts)}", status=404,
                                    code="model_not_found", param="model")
            return [req.model], None, lam, 0.0
        t0 = time.perf_counter()
        decision: RouteDecision = await self._call(
            self.router.route.remote(text, lam, req.max_cost, req.candidates))
        ms = (time.perf_counter() - t0) * 1e3
        order = [r.name for r in decision.ranked if r.name in self.experts]
        return order[: self.settings.max_attempts], decision, lam, ms

    def _size_check(self, total_chars: int, param: str) -> None:
        if total_chars > self.settings.max_prompt_chars:
            raise ProtocolError(f"the prompt has {total_chars} characters; the limit is "
                                f"{self.settings.max_prompt_chars}", param=param, code="prompt_too_long")

    def _gen_request(self, req: ChatCompletionRequest | CompletionRequest) -> GenerationRequest:
        common = {"max_tokens": req.token_limit() or self.settings.default_max_tokens,
                  "temperature": req.temperature or 0.0, "top_p": req.top_p or 1.0,
                  "stop": req.stop_list()}
        if isinstance(req, ChatCompletionRequest):
            msgs = [{"role": m.role, "content": m.text()} for m in req.messages]
            return GenerationRequest(kind="chat", messages=msgs, **common)
        return GenerationRequest(kind="completion", prompt=req.prompt_text(), **common)

    async def _generate(self, order: list[str], greq: GenerationRequest) -> tuple[str, GenerationResult, list[str]]:
        failed: list[str] = []
        for name in order:
            handle = self.experts.get(name)
            if handle is None:
                continue
            resp = handle.generate.remote(greq)
            try:
                return name, await asyncio.wait_for(resp, self.settings.expert_timeout_s), failed
            except Exception:
                resp.cancel()
                failed.append(name)
                self.metrics.failure(name)
        raise ProtocolError(f"every expert tried failed or timed out: {failed}", status=502,
                            code="experts_failed", type_="server_error")

    async def _open_stream(self, order: list[str], greq: GenerationRequest) -> tuple[str, str | None, Any, list[str]]:
        failed: list[str] = []
        for name in order:
            handle = self.experts.get(name)
            if handle is None:
                continue
            gen = handle.options(stream=True).stream.remote(greq)
            try:
                first = await asyncio.wait_for(gen.__anext__(), self.settings.expert_timeout_s)
                return name, first, gen, failed
            except StopAsyncIteration:
                return name, None, None, failed
            except Exception:
                gen.cancel()
                failed.append(name)
                self.metrics.failure(name)
        raise ProtocolError(f"every expert tried failed or timed out: {failed}", status=502,
                            code="experts_failed", type_="server_error")

    def _headers(self, info: CscrInfo) -> dict[str, str]:
        h = {"x-cscr-expert": info.expert, "x-cscr-routing-ms": f"{info.routing_ms:.3f}",
             "x-cscr-fallback": "true" if info.fallback else "false"}
        if info.cost_weight is not None:
            h["x-cscr-cost-weight"] = repr(float(info.cost_weight))
        if info.failed:
            h["x-cscr-failed"] = ",".join(info.failed)
        return h

    async def _account(self, info: CscrInfo, decision: RouteDecision | None) -> None:
        if decision is None:
            self.metrics.answered(info.expert, False, info.fallback, 0.0, 0.0, 0.0)
            return
        ref = await self._ref()
        cost = {r.name: r.cost for r in decision.ranked}.get(info.expert, ref.best_cost)
        self.metrics.answered(info.expert, True, info.fallback, ref.best_cost * ref.scale,
                              cost * ref.scale, info.routing_ms)

    async def _serve(self, req: ChatCompletionRequest | CompletionRequest) -> Any:
        chat = isinstance(req, ChatCompletionRequest)
        if chat:
            total = sum(len(m.text()) for m in req.messages)  # type: ignore[union-attr,misc]
            self._size_check(total, "messages")
        text = req.routing_text()
        if not chat:
            self._size_check(len(text), "prompt")
        greq = self._gen_request(req)
        order, decision, lam, ms = await self._plan(req, text)
        routed = decision is not None
        if req.stream:
            name, first, gen, failed = await self._open_stream(order, greq)
            info = CscrInfo(expert=name, routed=routed, cost_weight=lam if routed else None,
                            routing_ms=ms, fallback=bool(failed), failed=failed)
            await self._account(info, decision)
            return StreamingResponse(self._sse_stream(chat, info, first, gen), media_type="text/event-stream",
                                     headers=self._headers(info))
        name, result, failed = await self._generate(order, greq)
        info = CscrInfo(expert=name, routed=routed, cost_weight=lam if routed else None, routing_ms=ms,
                        fallback=bool(failed), failed=failed)
        await self._account(info, decision)
        usage = Usage(prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens,
                      total_tokens=result.prompt_tokens + result.completion_tokens)
        if chat:
            body: BaseModel = ChatCompletionResponse(
                model=name, usage=usage, cscr=info,
                choices=[ChatChoice(message=ChatChoiceMessage(content=result.text),
                                    finish_reason=result.finish_reason)])
        else:
            body = CompletionResponse(model=name, usage=usage, cscr=info,
                                      choices=[CompletionChoice(text=result.text,
                                                                finish_reason=result.finish_reason)])
        return JSONResponse(body.model_dump(), headers=self._headers(info))

    async def _sse_stream(self, chat: bool, info: CscrInfo, first: str | None, gen: Any) -> AsyncIterator[bytes]:
        cid = ("chatcmpl-" if chat else "cmpl-") + f"{time.time_ns():x}"

        def chunk(text: str | None, finish: str | None = None, role: str | None = None,
                  with_info: bool = False) -> bytes:
            extra = info if with_info else None
            if chat:
                return _sse(ChatCompletionChunk(id=cid, model=info.expert, cscr=extra, choices=[
                    ChatChunkChoice(delta=ChatDelta(role=role, content=text), finish_reason=finish)]))
            return _sse(CompletionChunk(id=cid, model=info.expert, cscr=extra, choices=[
                CompletionChoice(text=text or "", finish_reason=finish)]))

        finished = gen is None
        try:
            if chat:
                yield chunk(None, role="assistant", with_info=True)
            if first:
                yield chunk(first, with_info=not chat)
            while not finished:
                try:
                    piece = await asyncio.wait_for(gen.__anext__(), self.settings.expert_timeout_s)
                except StopAsyncIteration:
                    finished = True
                    break
                except Exception as exc:  # mid-stream: too late to fall back
                    self.metrics.failure(info.expert)
                    yield _sse({"error": {"message": f"expert {info.expert!r} failed mid-stream: {exc!r}",
                                          "type": "server_error", "code": "expert_failed", "param": None}})
                    return
                if piece:
                    yield chunk(piece)
            yield chunk(None, finish="stop")
            yield b"data: [DONE]\n\n"
        finally:
            if not finished:  # the client went away or the expert failed: stop generating
                gen.cancel()

    # ---- endpoints ----
    @api.get("/healthz")
    async def healthz(self) -> dict[str, Any]:
        experts = await self._call(self.router.experts.remote())
        ref = await self._ref()
        return {"status": "ok", "experts": experts, "best_expert": ref.best_expert,
                "metrics": self.metrics.tally.as_dict(ref.unit)}

    @api.get("/v1/models")
    async def models(self, request: Request) -> ModelList:
        self._auth(request)
        experts = await self._call(self.router.experts.remote())
        cards = [ModelCard(id=ROUTER_MODEL)] + [ModelCard(id=n, cost=c) for n, c in experts.items()
                                                 if n in self.experts]
        return ModelList(data=cards)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, body: ChatCompletionRequest, request: Request) -> Any:
        self._auth(request)
        return await self._serve(body)

    @api.post("/v1/completions")
    async def completions(self, body: CompletionRequest, request: Request) -> Any:
        self._auth(request)
        return await self._serve(body)

    @api.post("/v1/route")
    async def route(self, body: RouteRequest, request: Request) -> JSONResponse:
        self._auth(request)
        text = body.routing_text()
        self._size_check(len(text), "prompt")
        routed, lam = parse_model(body.model, self.settings.default_lambda, body.cost_weight)
        if not routed:
            raise ProtocolError(f"/v1/route needs model 'cscr' or 'cscr:<lambda>', got {body.model!r}",
                                param="model")
        t0 = time.perf_counter()
        decision: RouteDecision = await self._call(
            self.router.route.remote(text, lam, body.max_cost, body.candidates))
        ms = (time.perf_counter() - t0) * 1e3
        info = CscrInfo(expert=decision.chosen, routed=True, cost_weight=lam, routing_ms=ms)
        return JSONResponse(decision.model_dump(), headers=self._headers(info))

    @api.get("/v1/experts")
    async def list_experts(self, request: Request) -> ExpertList:
        self._auth(request, admin=True)
        experts = await self._call(self.router.experts.remote())
        return ExpertList(data=[ExpertInfo(name=n, cost=c, backend=getattr(self.specs.get(n), "backend", None),
                                           routable=n in self.experts) for n, c in experts.items()])

    @api.post("/v1/experts", status_code=201)
    async def add_expert(self, body: AddExpertRequest, request: Request) -> ExpertInfo:
        self._auth(request, admin=True)
        spec = body.expert
        async with self._admin_lock:
            pool = await self._call(self.router.experts.remote())
            if spec.name in pool or spec.name in self.experts or spec.name == ROUTER_MODEL:
                raise ProtocolError(f"expert {spec.name!r} already exists", status=409,
                                    code="expert_exists", param="expert.name")
            if body.descriptor is None and not body.fingerprint:
                raise ProtocolError("give a descriptor, or fingerprint=true to compute one",
                                    param="descriptor")
            if body.descriptor is not None and body.fingerprint:
                raise ProtocolError("give a descriptor or fingerprint=true, not both", param="fingerprint")
            await self._call(self.router.check_descriptor.remote(body.descriptor))
            plan = await self._call(self.router.fingerprint_plan.remote()) if body.fingerprint else None
            if plan is not None and spec.backend == "openai":
                raise ProtocolError(f"expert {spec.name!r} is black-box (no logits): send its descriptor",
                                    param="fingerprint", code="unsupported")
            if spec.num_cpus == ExpertSpec.model_fields["num_cpus"].default:
                spec = spec.model_copy(update={"num_cpus": self.settings.expert_num_cpus})
            app_name = f"cscr-expert-{deployment_name(spec.name)}"
            handle = await self._deploy(app_name, spec)
            try:
                descriptor = body.descriptor
                if plan is not None:
                    descriptor = await self._call(handle.fingerprint.remote(plan))
                await self._call(self.router.add_expert.remote(spec.name, body.cost, descriptor))
            except BaseException:
                await asyncio.to_thread(serve.delete, app_name)
                raise
            self.experts[spec.name] = handle
            self.specs[spec.name] = spec
            self.dynamic[spec.name] = app_name
        return ExpertInfo(name=spec.name, cost=body.cost, backend=spec.backend)

    async def _deploy(self, app_name: str, spec: ExpertSpec) -> Any:
        def run() -> Any:
            serve.run(expert_application(spec), name=app_name, route_prefix=None)
            return serve.get_app_handle(app_name)

        try:
            return await asyncio.to_thread(run)
        except Exception as exc:
            await asyncio.to_thread(serve.delete, app_name)
            raise ProtocolError(f"could not start expert {spec.name!r}: {exc}", status=400,
                                code="expert_start_failed", param="expert") from None

    @api.delete("/v1/experts/{name:path}")
    async def remove_expert(self, name: str, request: Request) -> dict[str, Any]:
        self._auth(request, admin=True)
        async with self._admin_lock:
            remaining = await self._call(self.router.remove_expert.remote(name))
            self.experts.pop(name, None)
            self.specs.pop(name, None)
            app_name = self.dynamic.pop(name, None)
        if app_name is not None:  # its own application: tear it down in the background
            asyncio.get_running_loop().run_in_executor(None, serve.delete, app_name)
        return {"deleted": name, "experts": remaining}
