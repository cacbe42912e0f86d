"""What every backend takes and returns (no model code here)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from cscr.llm.prompt import Prompt

#: open-weights backends (a black-box expert uses the OpenAI-compatible client)
BACKENDS = ("transformers", "vllm")
#: what a perplexity scorer conditions an answer on: nothing (SPEC.md section 2) or the prompt
SCORER_CONTEXTS = ("none", "prompt")
#: the default cut of a user text in batch generation (labelling): its last 512 tokens
DEFAULT_MAX_PROMPT_TOKENS = 512


class LLMError(RuntimeError):
    """A model or an upstream API failed to answer (after the client's own retries)."""


@dataclass(frozen=True)
class Generation:
    text: str  # the decoded answer (special tokens skipped; stop strings cut)
    prompt_tokens: int  # tokens in the formatted prompt
    output_tokens: int  # tokens generated (EOS excluded)
    latency_s: float = 0.0  # batch: the call's wall time divided by the batch size
    error: str | None = None  # why there is no answer (a failed API call), None when there is one
    finish_reason: str = "stop"  # stop (EOS or a stop string) | length (the token limit)


@dataclass(frozen=True)
class Sampling:
    """How one streamed or single request is decoded."""

    max_tokens: int = 64  # generated tokens at most
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0  # nucleus sampling (temperature > 0 only)
    stop: tuple[str, ...] = ()  # the answer ends before the first of these strings
    # max_tokens is the server's default (the client named none): shortened to the room the prompt
    # leaves in the context; False (the client's own limit): a prompt plus max_tokens longer than
    # the context is refused (PromptTooLong), never capped
    max_tokens_is_default: bool = False

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"bad sampling: temperature {self.temperature}, top_p {self.top_p}")


class BatchBackend(Protocol):
    """Labelling and fingerprints: greedy, on batches of user texts."""

    def generate(self, texts: Sequence[str], max_new_tokens: int = 64) -> list[Generation]: ...


class StreamingBackend(Protocol):
    """Serving: one request at a time, asynchronous; an abandoned ``astream`` stops generating."""

    async def agenerate(self, prompt: Prompt, sampling: Sampling, completion: bool = False) -> Generation: ...

    def astream(self, prompt: Prompt, sampling: Sampling, completion: bool = False) -> AsyncIterator[str]: ...


def held_back(stop: Sequence[str]) -> int:
    """Characters of a stream to hold back so that a stop string split across pieces is cut."""
    return max((len(s) for s in stop), default=1) - 1

