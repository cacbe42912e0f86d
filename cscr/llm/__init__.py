"""One model stack for labelling, fingerprints and serving.

- ``prompt``: the one prompt formatter (``prompt_ids``): user texts, chat conversations and raw
  completions to token ids, with the documented cut for batch use and ``PromptTooLong`` for
  serving (read its docstring for what a template-less model sees).
- backends, each with batch generation (``generate``; ``next_token_distributions`` and, for
  transformers, ``answer_nll`` for fingerprints) and async single-request generation with
  streaming (``agenerate`` / ``astream``, an abandoned stream stops generating):
  ``hf.HFBackend`` (transformers), ``vllm_engine.VLLMBackend`` / ``AsyncVLLMBackend`` (vLLM's
  offline and async engines) and ``openai_api.OpenAIBackend`` (an OpenAI-compatible API through
  the ``openai`` SDK, its own retries and timeouts).

``make_backend`` builds a batch backend by name; ``serving_backend`` builds the backend that
serves one pool expert (``cscr.pool.ExpertSpec``, the one expert spec type).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cscr.llm.base import (
    BACKENDS,
    DEFAULT_MAX_PROMPT_TOKENS,
    SCORER_CONTEXTS,
    Generation,
    LLMError,
    Sampling,
    StreamingBackend,
)
from cscr.llm.prompt import PromptTooLong, cut_at_stop, fit_context, prompt_ids

if TYPE_CHECKING:
    from cscr.pool import ExpertSpec

__all__ = ["BACKENDS", "DEFAULT_MAX_PROMPT_TOKENS", "SCORER_CONTEXTS", "Generation", "LLMError", "PromptTooLong",
           "Sampling", "StreamingBackend", "cut_at_stop", "fit_context", "make_backend", "prompt_ids",
           "serving_backend"]


def make_backend(backend: str, model: str, **kwargs: Any) -> Any:
    """A batch backend by name: ``transformers`` / ``vllm`` on a model source (packaged name,
    folder, GGUF file, Hub id), or ``openai`` on an API's model name (``base_url=`` and the
    other ``OpenAIBackend`` arguments in ``kwargs``)."""
    if backend == "transformers":
        from cscr.llm.hf import HFBackend

        return HFBackend(model, **kwargs)
    if backend == "vllm":
        from cscr.llm.vllm_engine import VLLMBackend

        return VLLMBackend(model, **kwargs)
    if backend == "openai":
        from cscr.llm.openai_api import OpenAIBackend

        return OpenAIBackend(model=model, **kwargs)
    raise ValueError(f"unknown backend {backend!r}; expected one of {(*BACKENDS, 'openai')}")


def serving_backend(spec: ExpertSpec, torch_threads: int | None = None) -> Any:
    """The streaming backend of one live pool expert (open-weights or black-box).

    ``spec.engine_kwargs`` reach the open-weights backend: ``dtype`` (``auto``, the default: the
    checkpoint's own dtype, see ``cscr.llm.hf.resolve_dtype``; or ``float32`` / ``bfloat16`` /
    ``float16``) for both; ``device`` and ``num_threads`` for transformers; vLLM engine
    arguments for vLLM."""
    extra = dict(spec.engine_kwargs)
    if spec.kind == "black-box":
        from cscr.llm.openai_api import OpenAIBackend

        return OpenAIBackend(str(spec.source.base_url), str(spec.source.model), api_key_env=spec.source.api_key_env,
                             timeout_s=spec.timeout_s, max_retries=spec.max_retries,
                             max_concurrency=spec.max_concurrency, on_error="raise")
    if spec.kind != "open-weights":
        raise ValueError(f"expert {spec.name!r} is {spec.kind}: it cannot answer live prompts")
    if spec.backend == "vllm":
        from cscr.llm.vllm_engine import AsyncVLLMBackend

        return AsyncVLLMBackend(str(spec.source.model),
                                **{k: v for k, v in extra.items() if k not in ("num_threads", "device")})
    from cscr.llm.hf import HFBackend

    threads = torch_threads or int(extra.get("num_threads", 0) or 0) or None
    return HFBackend(str(spec.source.model), device=extra.get("device") or "auto",
                     dtype=str(extra.get("dtype") or "auto"), num_threads=threads)
