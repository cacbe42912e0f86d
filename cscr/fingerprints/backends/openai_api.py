"""Black-box experts behind an OpenAI-compatible HTTP API (OpenAI, vLLM's server, any proxy).

Calls run on a bounded thread pool (``max_concurrency`` requests in flight), each with a
timeout; the official client retries timeouts, connection errors, 429 and 5xx with exponential
backoff (``max_retries``). A call that still fails returns a ``Generation`` with ``error`` set
(``on_error="skip"``) or raises (``on_error="raise"``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

from cscr.fingerprints.backends import Generation


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
        from openai import OpenAI

        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
        if on_error not in ("skip", "raise"):
            raise ValueError(f"on_error must be 'skip' or 'raise', got {on_error!r}")
        key = api_key or (os.environ.get(api_key_env) if api_key_env else None) or "EMPTY"
        self.model = model
        self.base_url = base_url
        self.max_concurrency = max_concurrency
        self.on_error = on_error
        self.client = OpenAI(base_url=base_url, api_key=key, timeout=timeout_s, max_retries=max_retries)

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
        content = resp.choices[0].message.content or ""
        usage = resp.usage
        gen = Generation(content.strip(), int(getattr(usage, "prompt_tokens", 0) or 0),
                         int(getattr(usage, "completion_tokens", 0) or 0), dt)
        return gen if content.strip() else replace(gen, error="empty answer")

    def generate(self, texts: Sequence[str], max_new_tokens: int = 64) -> list[Generation]:
        """Greedy (temperature 0) answers in input order."""
        if not texts:
            return []
        with ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(texts))) as pool:
            return list(pool.map(lambda t: self._one(t, max_new_tokens), texts))

    def next_token_distributions(self, texts: Sequence[str], steps: int, token_ids: list[int]):
        raise NotImplementedError("a black-box API exposes no full next-token distribution: "
                                  "use a perplexity fingerprint for this expert")
