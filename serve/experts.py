"""Expert backends for serving: the ``cscr.llm`` backends behind the protocol's request shape.

``build_backend(spec)`` takes the one expert spec (``cscr.pool.ExpertSpec``) and returns an
``ExpertBackend`` with two async operations on a ``GenerationRequest``:

- ``generate(req) -> GenerationResult``: the whole answer;
- ``stream(req)``: an async iterator of text pieces; closing it stops the generation (transformers:
  a stopping flag checked per token; vLLM: the request is aborted; openai: the stream is closed).

Prompts go through ``cscr.llm.prompt_ids``, the formatter labelling and fingerprints use:
chat messages through the tokenizer's chat template when it has one; without a template a
single user message is sent as its raw text (as when the expert was labelled and
fingerprinted; this server used to send "user: ...\\nassistant:"), and a longer conversation as
its message contents joined by blank lines. Completions are raw text. A prompt that does not
fit the model's context is refused with HTTP 400 (``context_length_exceeded``), never cut; so is
one whose prompt plus the client's ``max_tokens`` does not fit (OpenAI's message: "This model's
maximum context length is N tokens. However, you requested M tokens (P in the messages, K in the
completion)..."). A ``max_tokens`` the client did not name (``max_tokens_is_default``: the
server's default) is shortened to the spec's ``max_new_tokens`` and to the room the context
leaves; one the client named above ``max_new_tokens`` is refused (``max_tokens_too_large``).
Black-box experts are called
through the ``openai`` SDK with its own retries (``max_retries``) and timeouts (``timeout_s``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Protocol

from cscr.serve.protocol import GenerationRequest, GenerationResult, ProtocolError

from cscr.llm import LLMError, PromptTooLong, Sampling, serving_backend
from cscr.pool import ExpertSpec


class ExpertError(RuntimeError):
    """An expert failed to answer (the ingress falls back to the next candidate)."""


class ExpertBackend(Protocol):
    async def generate(self, req: GenerationRequest) -> GenerationResult: ...

    def stream(self, req: GenerationRequest) -> AsyncIterator[str]: ...


def _too_long(exc: PromptTooLong, req: GenerationRequest) -> ProtocolError:
    param = "messages" if req.kind == "chat" else "prompt"
    return ProtocolError(exc.describe(param), status=400, code="context_length_exceeded", param=param)


class Expert:
    """One expert's backend (``cscr.llm``) speaking the protocol's request and result shapes."""

    def __init__(self, spec: ExpertSpec, llm: Any) -> None:
        self.spec = spec
        self.llm = llm

    @property
    def path(self) -> str | None:
        """The resolved model folder of an open-weights expert (None for a black-box one)."""
        return getattr(self.llm, "path", None)

    def _args(self, req: GenerationRequest) -> tuple[Any, Sampling, bool]:
        limit = self.spec.max_new_tokens
        if req.max_tokens > limit and not req.max_tokens_is_default:
            raise ProtocolError(f"max_tokens={req.max_tokens} is above what expert {self.spec.name!r} generates "
                                f"({limit} tokens)", param="max_tokens", code="max_tokens_too_large")
        sampling = Sampling(max_tokens=min(req.max_tokens, limit), temperature=req.temperature, top_p=req.top_p,
                            stop=tuple(req.stop), max_tokens_is_default=req.max_tokens_is_default)
        if req.kind == "completion":
            return req.prompt or "", sampling, True
        return list(req.messages or []), sampling, False

    async def generate(self, req: GenerationRequest) -> GenerationResult:
        prompt, sampling, completion = self._args(req)
        try:
            g = await self.llm.agenerate(prompt, sampling, completion)
        except PromptTooLong as exc:
            raise _too_long(exc, req) from None
        except (LLMError, ValueError) as exc:
            raise ExpertError(str(exc)) from exc
        return GenerationResult(text=g.text, prompt_tokens=g.prompt_tokens, completion_tokens=g.output_tokens,
                                finish_reason=g.finish_reason)

    async def stream(self, req: GenerationRequest) -> AsyncIterator[str]:
        prompt, sampling, completion = self._args(req)
        pieces = self.llm.astream(prompt, sampling, completion)
        try:
            async for piece in pieces:
                yield piece
        except PromptTooLong as exc:
            raise _too_long(exc, req) from None
        except (LLMError, ValueError) as exc:
            raise ExpertError(str(exc)) from exc
        finally:
            await pieces.aclose()  # stop the generation when the consumer went away

    def shutdown(self) -> None:
        if hasattr(self.llm, "shutdown"):
            self.llm.shutdown()

    async def aclose(self) -> None:
        if hasattr(self.llm, "aclose"):
            await self.llm.aclose()


def build_backend(spec: ExpertSpec, torch_threads: int | None = None) -> Expert:
    """The serving backend of one expert (open-weights: transformers or vLLM; black-box: openai)."""
    return Expert(spec, serving_backend(spec, torch_threads))
