"""Inference backends for fingerprints and labelling.

Every backend exposes the same three operations on plain strings:

- ``next_token_distributions(texts, steps, token_ids) -> (B, T, K)``: run greedily for T steps
  and return, at each step, the probability of each of the K given token ids taken from the
  softmax over the whole vocabulary (logit footprints);
- ``generate(texts, max_new_tokens) -> list[Generation]``: greedy answers with token counts and
  measured latency (labelling, live perplexity fingerprints);
- open-weights backends also expose ``tokenizer``.

Prompt formatting is one decision shared by every backend (``prompt_token_ids``): the user
text is cut to its last ``max_prompt_tokens`` tokens, then wrapped in the tokenizer's chat
template as one user turn with the generation prompt when the tokenizer has a template, and
used as is (with the tokenizer's special tokens) when it has none. The vLLM backend is given
these exact token ids, so both backends see identical inputs.

Greedy footprint steps ignore end-of-sequence: each probe contributes exactly T steps, the
next token always being the argmax of the raw logits (both backends do the same).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

BACKENDS = ("transformers", "vllm")
#: what a perplexity scorer conditions an answer on: nothing (SPEC.md section 2) or the prompt
SCORER_CONTEXTS = ("none", "prompt")


@dataclass(frozen=True)
class Generation:
    text: str  # the decoded answer (special tokens skipped)
    prompt_tokens: int  # tokens in the formatted prompt
    output_tokens: int  # tokens generated (EOS excluded)
    latency_s: float  # wall time of the call that produced it, divided by the batch size
    error: str | None = None  # why there is no answer (a failed API call), None when there is one


class Backend(Protocol):
    def next_token_distributions(self, texts: list[str], steps: int, token_ids: list[int]) -> Any: ...

    def generate(self, texts: list[str], max_new_tokens: int) -> list[Generation]: ...


def prompt_token_ids(tokenizer: Any, text: str, max_prompt_tokens: int = 512) -> list[int]:
    """The token ids every backend feeds for one user text (see the module docstring)."""
    text = str(text)
    raw = tokenizer.encode(text, add_special_tokens=False)
    if len(raw) > max_prompt_tokens:
        text = tokenizer.decode(raw[-max_prompt_tokens:], skip_special_tokens=False)
    if getattr(tokenizer, "chat_template", None):
        templated = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False)
        return list(tokenizer.encode(templated, add_special_tokens=False))
    ids = list(tokenizer.encode(text, add_special_tokens=True))
    if not ids:
        raise ValueError("empty prompt after tokenization")
    return ids


def make_backend(backend: str, model: str, **kwargs: Any) -> Any:
    """Build a backend by name for a model source (packaged name, folder, GGUF file, Hub id)."""
    if backend == "transformers":
        from cscr.fingerprints.backends.hf import HFBackend

        return HFBackend(model, **kwargs)
    if backend == "vllm":
        from cscr.fingerprints.backends.vllm_backend import VLLMBackend

        return VLLMBackend(model, **kwargs)
    raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
