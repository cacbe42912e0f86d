"""Black-box experts behind an OpenAI-compatible HTTP API (OpenAI, vLLM's server, any proxy).

Retries and timeouts are the ``openai`` SDK's own: every call has ``timeout_s``, and the client
retries connection errors, timeouts, 408/409/429 and 5xx with exponential backoff and jitter
(``max_retries``). A stream is retried only until its response starts (the SDK opens it like
any call); closing it closes the HTTP response, which stops the upstream.

Batch (labelling, fingerprints): user texts as one user message each, on a bounded thread pool
(``max_concurrency`` requests in flight); a call that still fails returns a ``Generation`` with
``error`` set (``on_error="skip"``) or raises (``on_error="raise"``). Serving (``agenerate`` /
``astream``): chat messages to ``/chat/completions``, raw completions to ``/completions``;
failures raise ``LLMError``. The upstream formats prompts and checks its own context.
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

from cscr.llm.base import Generation, LLMError, Sampling
from cscr.llm.prompt import Prompt


def key_from_env(api_key_env: str | None, what: str = "the upstream") -> str:
    """The key from ``api_key_env`` (a clear error when that variable is unset); "EMPTY" without one."""
    if not api_key_env:
        return "EMPTY"
    key = os.environ.get(api_key_env, "")
    if not key:
        raise ValueError(f"{what}: environment variable {api_key_env} is not set")
    return key


class OpenAIBackend:
    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        api_key_env: str | None = None,
        timeout_s: float = 60.0,
        max_retries: int = 3,
        max_concurrency: int = 8,
        on_error: str = "skip",
    ) -> None:
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
        if on_error not in ("skip", "raise"):
            raise ValueError(f"on_error must be 'skip' or 'raise', got {on_error!r}")
        self.model = model
        self.base_url = base_url
        self.key = api_key or key_from_env(api_key_env, f"model {model!r} at {base_url}")
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.max_concurrency = max_concurrency
        self.on_error = on_error
        self._client: Any = None
        self._aclient: Any = None
        self._aclient_loop: Any = None

    # ---- batch ----
    @property
    def client(self) -> Any:
        from openai import OpenAI

        if self._client is None:
            self._client = OpenAI(base_url=self.base_url, api_key=self.key, timeout=self.timeout_s,
                                  max_retries=self.max_retries)
        return self._client

    def _one(self, text: str, max_new_tokens: int) -> Generation:
        t0 = time.perf_counter()
        try:
            resp = self.client.chat.completions.create(
                model=self.model, messages=[{"role": "user", "content": str(text)}],
                max_tokens=max_new_tokens, temperature=0.0)
        except Exception as exc:  # the client has retried already
            if self.on_error == "raise":
                raise
            return Generation("", 0, 0, time.perf_counter() - t0, error=f"{type(exc).__name__}: {exc}")
        dt = time.perf_counter() - t0
        choice = resp.choices[0]
        content = choice.message.content or ""
        usage = resp.usage
        gen = Generation(content.strip(), int(getattr(usage, "prompt_tokens", 0) or 0),
                         int(getattr(usage, "completion_tokens", 0) or 0), dt,
                         finish_reason=choice.finish_reason or "stop")
        return gen if content.strip() else replace(gen, error="empty answer")

    def generate(self, texts: Sequence[str], max_new_tokens: int = 64) -> list[Generation]:
        """Greedy (temperature 0) answers in input order."""
        if not texts:
            return []
        self.client  # noqa: B018  (one client, built before the threads share it)
        with ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(texts))) as pool:
            return list(pool.map(lambda t: self._one(t, max_new_tokens), texts))

    def next_token_distributions(self, texts: Sequence[str], steps: int, token_ids: list[int]) -> Any:
        raise NotImplementedError("a black-box API exposes no full next-token distribution: "
                                  "use a perplexity fingerprint for this expert")

    # ---- serving ----
    @property
    def aclient(self) -> Any:
        """The async client of the running event loop (its connections belong to that loop)."""
        import asyncio

        from openai import AsyncOpenAI

        loop = asyncio.get_running_loop()
        if self._aclient is None or self._aclient_loop is not loop:
            self._aclient = AsyncOpenAI(base_url=self.base_url, api_key=self.key, timeout=self.timeout_s,
                                        max_retries=self.max_retries)
            self._aclient_loop = loop
        return self._aclient

    def _call(self, prompt: Prompt, sampling: Sampling, completion: bool, stream: bool) -> Any:
        body: dict[str, Any] = {"model": self.model, "max_tokens": sampling.max_tokens,
                                "temperature": sampling.temperature, "stream": stream}
        if sampling.temperature > 0:
            body["top_p"] = sampling.top_p
        if sampling.stop:
            body["stop"] = list(sampling.stop)
        if completion:
            if not isinstance(prompt, str):
                raise ValueError("a raw completion takes a text prompt")
            return self.aclient.completions.create(prompt=prompt, **body)
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]
        return self.aclient.chat.completions.create(messages=messages, **body)

    def _failed(self, exc: Exception) -> LLMError:
        from openai import APIConnectionError, APIStatusError, APITimeoutError

        attempts = self.max_retries + 1
        if isinstance(exc, APIStatusError):
            return LLMError(f"upstream {self.base_url} answered HTTP {exc.status_code}: {str(exc)[:300]}")
        if isinstance(exc, APIConnectionError | APITimeoutError):
            return LLMError(f"upstream {self.base_url} failed after {attempts} attempt(s): "
                            f"{type(exc).__name__}: {exc}")
        return LLMError(f"upstream {self.base_url}: {type(exc).__name__}: {exc}")

    async def agenerate(self, prompt: Prompt, sampling: Sampling, completion: bool = False) -> Generation:
        from openai import OpenAIError

        t0 = time.perf_counter()
        try:
            resp = await self._call(prompt, sampling, completion, stream=False)
        except OpenAIError as exc:
            raise self._failed(exc) from exc
        choice = resp.choices[0]
        text = (choice.text if completion else choice.message.content) or ""
        usage = resp.usage
        return Generation(text, int(getattr(usage, "prompt_tokens", 0) or 0),
                          int(getattr(usage, "completion_tokens", 0) or 0), time.perf_counter() - t0,
                          finish_reason=choice.finish_reason or "stop")

    async def astream(self, prompt: Prompt, sampling: Sampling, completion: bool = False) -> AsyncIterator[str]:
        """Text pieces; closing the iterator closes the upstream stream."""
        from openai import OpenAIError

        try:
            stream = await self._call(prompt, sampling, completion, stream=True)
        except OpenAIError as exc:
            raise self._failed(exc) from exc
        try:
            async for chunk in stream:
                if not chunk.choices:
                    continue
                choice = chunk.choices[0]
                piece = choice.text if completion else choice.delta.content
                if piece:
                    yield piece
        except OpenAIError as exc:
            raise self._failed(exc) from exc
        finally:
            await stream.close()

    async def aclose(self) -> None:
        if self._aclient is not None:
            await self._aclient.close()
            self._aclient = None
