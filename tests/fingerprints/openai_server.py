"""A small real OpenAI-compatible server (FastAPI + uvicorn on 127.0.0.1) that answers chat
completions and completions, whole or streamed (SSE), with a real causal LM through the
transformers backend. Model names select behaviours the client must cope with: "<any>" answers;
"slow" waits ``slow_s`` first; "flaky" answers 503 to its first ``flaky_failures`` requests. It
counts requests in flight, and streams the client closed before their end."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from cscr.llm.hf import HFBackend


class ServerState:
    def __init__(self, model_path: str, slow_s: float = 2.0, flaky_failures: int = 2, delay_s: float = 0.0):
        self.backend = HFBackend(model_path, batch_size=1)
        self.lock = threading.Lock()
        self.slow_s, self.flaky_left, self.delay_s = slow_s, flaky_failures, delay_s
        self.in_flight = self.max_in_flight = self.requests = 0
        self.streams_closed_early = 0
        self.stream_piece_s = 0.05  # pause between streamed pieces


def _sse(state: ServerState, request: Request, body: dict[str, Any], text: str, chat: bool) -> StreamingResponse:
    """The answer as SSE chunks of two characters; counts streams the client closed early."""
    words = [text[i:i + 2] for i in range(0, len(text), 2)]

    async def events():
        sent = 0
        try:
            for w in words:
                if await request.is_disconnected():
                    return
                choice = {"index": 0, "delta": {"content": w}} if chat else {"index": 0, "text": w}
                obj = "chat.completion.chunk" if chat else "text_completion"
                yield "data: " + json.dumps({"id": "c-1", "object": obj, "created": 0, "model": body["model"],
                                             "choices": [choice]}) + "\n\n"
                sent += 1
                await asyncio.sleep(state.stream_piece_s)
            yield "data: [DONE]\n\n"
        finally:
            if sent < len(words):
                with state.lock:
                    state.streams_closed_early += 1

    return StreamingResponse(events(), media_type="text/event-stream")


def build_app(state: ServerState) -> FastAPI:
    app = FastAPI()

    @app.post("/v1/chat/completions")
    def chat(body: dict[str, Any], request: Request):
        with state.lock:
            state.requests += 1
            state.in_flight += 1
            state.max_in_flight = max(state.max_in_flight, state.in_flight)
            fail = body["model"] == "flaky" and state.flaky_left > 0
            if fail:
                state.flaky_left -= 1
        try:
            if fail:
                return JSONResponse({"error": {"message": "overloaded", "type": "server_error"}}, status_code=503)
            time.sleep(state.slow_s if body["model"] == "slow" else state.delay_s)
            text = body["messages"][-1]["content"]
            with state.lock:
                g = state.backend.generate([text], int(body.get("max_tokens") or 16))[0]
            if body.get("stream"):
                return _sse(state, request, body, g.text or ".", chat=True)
            return {"id": "cmpl-1", "object": "chat.completion", "created": int(time.time()), "model": body["model"],
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": g.text or "."}}],
                    "usage": {"prompt_tokens": g.prompt_tokens, "completion_tokens": g.output_tokens,
                              "total_tokens": g.prompt_tokens + g.output_tokens}}
        finally:
            with state.lock:
                state.in_flight -= 1

    @app.post("/v1/completions")
    def completions(body: dict[str, Any], request: Request):
        with state.lock:
            state.requests += 1
            ids = state.backend.tokenizer.encode(body["prompt"])
            g = state.backend.generate([body["prompt"]], int(body.get("max_tokens") or 16))[0]
        if body.get("stream"):
            return _sse(state, request, body, g.text or ".", chat=False)
        return {"id": "cmpl-1", "object": "text_completion", "created": int(time.time()), "model": body["model"],
                "choices": [{"index": 0, "finish_reason": "stop", "text": g.text or "."}],
                "usage": {"prompt_tokens": len(ids), "completion_tokens": g.output_tokens,
                          "total_tokens": len(ids) + g.output_tokens}}

    return app


class LocalServer:
    def __init__(self, state: ServerState):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.state = state
        self.server = uvicorn.Server(uvicorn.Config(build_app(state), host="127.0.0.1", port=self.port,
                                                   log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def __enter__(self) -> LocalServer:
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline:
                raise RuntimeError("local OpenAI-compatible server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
