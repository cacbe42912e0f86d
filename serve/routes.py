"""The HTTP edge: FastAPI routes that map OpenAI's endpoints onto a ``CompletionService``.

    POST /v1/chat/completions   POST /v1/completions   POST /v1/route   GET /v1/models
    + the admin endpoints and /healthz of ``serve.admin``

Everything about HTTP happens here and nowhere else: the API key (``Authorization: Bearer``,
scheme matched case-insensitively), request bodies (at most ``max_body_bytes``, UTF-8, JSON
nested at most ``max_json_depth`` deep, no lone surrogates: 400 otherwise), every error in
OpenAI's shape ``{"error": {"message", "type", "param", "code"}}`` (404, 405 and 500
included), and ``/docs``, ``/redoc``, ``/openapi.json`` only when ``enable_docs`` is set.
``build_api`` makes one app; Serve runs it per ingress replica (``serve.deployments``), tests
run it in-process.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Coroutine
from typing import Any

from cscr.serve.admin import AdminService, admin_routes
from cscr.serve.budgets import KeyBudget, KeyBudgets
from cscr.serve.completion import CompletionService, info_headers
from cscr.serve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    ErrorResponse,
    ModelList,
    ProtocolError,
    RouteRequest,
    check_bearer,
)
from fastapi import Depends, FastAPI, HTTPException
from fastapi import Request as FastAPIRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from cscr.routers.base import RouterError

log = logging.getLogger("cscr.serve")

_STATUS_CODES = {400: "invalid_request", 401: "invalid_api_key", 403: "forbidden", 404: "not_found",
                 405: "method_not_allowed", 413: "body_too_large", 415: "unsupported_media_type"}


class EdgeSettings(BaseModel):
    """What the HTTP edge enforces (frozen; crosses Ray as a dict)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    api_key: str | None = None  # bearer key every /v1 request must carry (None: open)
    admin_key: str | None = None  # key of the admin endpoints (None: admin API disabled)
    key_budgets: list[dict[str, Any]] | None = None  # API keys with spend budgets (serve.budgets)
    enable_docs: bool = False  # serve /docs, /redoc and /openapi.json
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1)  # larger request bodies: 413
    max_json_depth: int = Field(32, ge=2)  # deeper JSON nesting: 400


class BodyError(HTTPException):
    """A body refused before validation (FastAPI passes HTTPExceptions through its body parser)."""

    def __init__(self, status: int, message: str, code: str) -> None:
        super().__init__(status_code=status, detail=message)
        self.code = code


def error_response(status: int, message: str, code: str | None, param: str | None = None,
                   type_: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    kind = type_ or ("server_error" if status >= 500 else "invalid_request_error")
    exc = ProtocolError(message, status=status, code=code or "error", param=param, type_=kind)
    return JSONResponse(ErrorResponse.of(exc).model_dump(), status_code=status, headers=headers)


def check_json(obj: Any, max_depth: int) -> None:
    """Refuse JSON nested deeper than ``max_depth`` or holding a string that is not valid Unicode
    (a lone surrogate such as ``"\\ud800"``); iterative, so any depth is safe to inspect."""
    stack: list[tuple[Any, int]] = [(obj, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict | list):
            if depth > max_depth:
                raise BodyError(400, f"the body is nested more than {max_depth} levels deep", "invalid_json")
            items = list(node.items()) if isinstance(node, dict) else [(None, v) for v in node]
            for key, value in items:
                if key is not None:
                    stack.append((key, depth))
                stack.append((value, depth + 1))
        elif isinstance(node, str):
            try:
                node.encode("utf-8")
            except UnicodeEncodeError:
                raise BodyError(400, "the body holds a string that is not valid Unicode (a lone "
                                "surrogate escape such as \\ud800)", "invalid_encoding") from None


def checked_route(settings: EdgeSettings) -> type[APIRoute]:
    """An APIRoute whose request bodies pass ``check_json`` before validation."""

    class CheckedRequest(FastAPIRequest):
        async def json(self) -> Any:
            if not hasattr(self, "_json"):
                raw = await self.body()
                if len(raw) > settings.max_body_bytes:
                    raise BodyError(413, f"the body has {len(raw)} bytes; the limit is "
                                    f"{settings.max_body_bytes}", "body_too_large")
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError:
                    raise BodyError(400, "the body is not valid UTF-8", "invalid_encoding") from None
                try:
                    obj = json.loads(text)
                except RecursionError:
                    raise BodyError(400, f"the body is nested more than {settings.max_json_depth} "
                                    "levels deep", "invalid_json") from None
                except json.JSONDecodeError as exc:
                    raise BodyError(400, f"the body is not valid JSON: {exc.msg} at position {exc.pos}",
                                    "invalid_json") from None
                check_json(obj, settings.max_json_depth)
                self._json = obj
            return self._json

    class CheckedRoute(APIRoute):
        def get_route_handler(self) -> Callable[[FastAPIRequest], Coroutine[Any, Any, Response]]:
            handler = super().get_route_handler()

            async def checked(request: FastAPIRequest) -> Response:
                return await handler(CheckedRequest(request.scope, request.receive))

            return checked

    return CheckedRoute


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ProtocolError)
    async def _protocol(_: FastAPIRequest, exc: ProtocolError) -> JSONResponse:
        headers = None
        if exc.retry_after_s is not None:  # whole seconds, rounded up (what the openai client waits)
            headers = {"retry-after": str(max(1, math.ceil(exc.retry_after_s)))}
        return JSONResponse(ErrorResponse.of(exc).model_dump(), status_code=exc.status,  # + "reachable"
                            headers=headers)

    @app.exception_handler(RouterError)
    async def _router(_: FastAPIRequest, exc: RouterError) -> JSONResponse:
        param = {"lambda": "cost_weight"}.get(str(exc.param), exc.param)  # the request's name for it
        return error_response(400, str(exc), exc.code or "invalid_request", param)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: FastAPIRequest, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        loc = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        if first.get("type") == "json_invalid":
            return error_response(400, "the body is not valid JSON", "invalid_json")
        msg = f"{loc}: {first.get('msg', 'invalid request')}" if loc else str(first.get("msg", exc))
        return error_response(400, msg, "invalid_request", loc or None)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: FastAPIRequest, exc: StarletteHTTPException) -> JSONResponse:
        code = getattr(exc, "code", None) or _STATUS_CODES.get(exc.status_code, "error")
        message = str(exc.detail)
        if exc.status_code == 404 and message == "Not Found":
            message = f"no such endpoint: {request.method} {request.url.path}"
        elif exc.status_code == 405:
            message = f"method {request.method} is not allowed on {request.url.path}"
        return error_response(exc.status_code, message, code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(request: FastAPIRequest, exc: Exception) -> JSONResponse:
        log.exception("internal error on %s %s", request.method, request.url.path)
        return error_response(500, "internal server error", "internal_error")


def build_api(completion: CompletionService, admin: AdminService, settings: EdgeSettings,
              budgets: KeyBudgets | None = None) -> FastAPI:
    """The FastAPI app of one ingress; ``budgets``: per-key spend budgets (default: a tally in
    this process of ``settings.key_budgets``; ``cscr serve`` passes the tally every ingress
    replica shares, ``serve.deployments.ControllerLedger``)."""
    if budgets is None and settings.key_budgets:
        budgets = KeyBudgets.from_entries(settings.key_budgets)
    admin.budgets = budgets  # the admin health report shows each key's spend
    docs = settings.enable_docs
    app = FastAPI(title="cscr", description="Cost-aware LLM routing behind an OpenAI-compatible API",
                  docs_url="/docs" if docs else None, redoc_url="/redoc" if docs else None,
                  openapi_url="/openapi.json" if docs else None)
    _install_error_handlers(app)
    route_class = checked_route(settings)
    app.router.route_class = route_class

    def require_key(request: FastAPIRequest) -> KeyBudget | None:
        """The declared key with a budget the request carries (None: the plain API key, or open)."""
        if budgets is not None:
            found = budgets.identify(request.headers.get("authorization"))
            if found is not None:
                return found
            if settings.api_key is None:  # declared keys only
                raise ProtocolError("invalid or missing API key (send 'Authorization: Bearer <key>')",
                                    status=401, code="invalid_api_key")
        if settings.api_key is not None:
            check_bearer(request.headers.get("authorization"), settings.api_key)
        return None

    errors: dict[int | str, dict[str, Any]] = {
        400: {"model": ErrorResponse, "description": "bad request"},
        401: {"model": ErrorResponse, "description": "no or wrong API key"},
        404: {"model": ErrorResponse, "description": "unknown model"},
        502: {"model": ErrorResponse, "description": "every expert tried failed"}}
    auth = [Depends(require_key)]

    async def charge(key: KeyBudget | None, info: Any) -> None:
        """Add an answer's estimated cost (c_m x the run's scale) to its key's spend."""
        if key is None or budgets is None:
            return
        ref = await completion.reference()
        budgets.unit = ref.unit
        cost = info.cost
        if cost is None:  # the client named the expert
            cost = (await completion.router.experts()).get(info.expert, ref.best_cost) * ref.scale
        await budgets.charge(key, float(cost))

    async def serve(req: ChatCompletionRequest | CompletionRequest, key: KeyBudget | None) -> Response:
        if key is not None and budgets is not None:
            await budgets.admit(key)
        if req.stream:
            streamed = await completion.stream(req)
            await charge(key, streamed.info)
            return StreamingResponse(streamed.events, media_type="text/event-stream",
                                     headers=info_headers(streamed.info))
        answer = await completion.complete(req)
        await charge(key, answer.info)
        return JSONResponse(answer.body.model_dump(), headers=info_headers(answer.info))

    @app.post("/v1/chat/completions", dependencies=auth, responses=errors)
    async def chat_completions(body: ChatCompletionRequest,
                               key: KeyBudget | None = Depends(require_key)) -> Response:  # noqa: B008
        return await serve(body, key)

    @app.post("/v1/completions", dependencies=auth, responses=errors)
    async def completions(body: CompletionRequest,
                          key: KeyBudget | None = Depends(require_key)) -> Response:  # noqa: B008
        return await serve(body, key)

    @app.post("/v1/route", dependencies=auth, responses=errors)
    async def route(body: RouteRequest) -> Response:
        decision, info = await completion.route(body)
        return JSONResponse(decision.model_dump(), headers=info_headers(info))

    @app.get("/v1/models", dependencies=auth, responses=errors)
    async def models() -> ModelList:
        return await completion.models()

    app.include_router(admin_routes(admin, settings.admin_key, route_class=route_class))
    _document_400_not_422(app)
    return app


def _document_400_not_422(app: FastAPI) -> None:
    """Validation errors answer 400 here: the schema says so instead of FastAPI's default 422."""
    from fastapi.openapi.utils import get_openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes)
            for ops in schema.get("paths", {}).values():
                for op in ops.values():
                    responses = op.get("responses", {})
                    invalid = responses.pop("422", None)
                    if invalid is not None and "400" not in responses:
                        responses["400"] = {"description": "bad request",
                                            "content": {"application/json": {"schema": {
                                                "$ref": "#/components/schemas/ErrorResponse"}}}}
                    for code, response in responses.items():  # every error is in OpenAI's shape
                        if code[0] in "45" and "content" not in response:
                            response["content"] = {"application/json": {"schema": {
                                "$ref": "#/components/schemas/ErrorResponse"}}}
            for path, ops in schema.get("paths", {}).items():
                for op in ops.values():
                    if "{" in path:  # a path naming something (an expert) that may not exist
                        op["responses"].setdefault("404", {"description": "not found", "content": {
                            "application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}})
            health = schema.get("paths", {}).get("/healthz", {}).get("get")
            if health is not None:  # details with the admin key; a wrong one is refused
                health["responses"].setdefault("401", {"description": "wrong admin key", "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}})
            models = schema.setdefault("components", {}).setdefault("schemas", {})
            for unused in ("HTTPValidationError", "ValidationError"):
                models.pop(unused, None)
            models.setdefault("ErrorResponse",
                              ErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}"))
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
