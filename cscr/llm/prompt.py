"""The one prompt formatter: a user text, a chat conversation or a raw completion -> token ids.

Labelling, fingerprinting, perplexity scoring with context and serving all call
``prompt_ids``, so an expert sees the same input whether it is labelled, fingerprinted or served:

- **a user text** (``str``; labelling and fingerprint probes, a served chat whose only message is
  from the user): when the tokenizer has a chat template, the text as one user turn with the
  generation prompt; when it has none, the raw text with the tokenizer's special tokens (e.g. a
  BOS). This is exactly what the stored descriptors and routing tables were made with.
- **a conversation** (a list of ``{"role", "content"}``; served chat requests): through the chat
  template when there is one. Without a template the message contents are joined by a blank
  line ("\\n\\n"), in order, with no role names, and encoded like a user text; a conversation
  holding one user message is therefore its raw text, as at labelling time.
- **a raw completion** (``completion=True``; served ``/v1/completions``): the text as is with the
  tokenizer's special tokens, never templated (OpenAI's completions semantics).

Long prompts: ``max_prompt_tokens`` keeps the *last* that many tokens of a user text before
templating (labelling and fingerprinting: their documented cut). Serving never cuts and never
caps silently: a backend calls ``fit_context``, and a prompt that leaves no room to generate, or
a prompt plus the ``max_tokens`` the client asked for that is longer than the context, is
refused with ``PromptTooLong`` (the server answers HTTP 400, ``context_length_exceeded``). Only a
server-side default ``max_tokens`` (the client named none) is shortened to the room left.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

Message = Mapping[str, str]
Prompt = str | Sequence[Message]


class PromptTooLong(ValueError):
    """The request does not fit the model's context window: the formatted prompt leaves no room to
    generate (``max_tokens`` None), or the prompt plus the ``max_tokens`` the client asked for is
    longer than the context."""

    def __init__(self, prompt_tokens: int, context: int, max_tokens: int | None = None) -> None:
        self.prompt_tokens = prompt_tokens
        self.context = context
        self.max_tokens = max_tokens
        super().__init__(self.describe())

    def describe(self, prompt: str = "prompt") -> str:
        """The message; ``prompt`` names the prompt as the client sent it ("messages" for a chat)."""
        if self.max_tokens is None:
            return (f"the {prompt} has {self.prompt_tokens} tokens; the model's context is {self.context} tokens "
                    f"(prompt and answer together): shorten the {prompt}")
        return (f"This model's maximum context length is {self.context} tokens. However, you requested "
                f"{self.prompt_tokens + self.max_tokens} tokens ({self.prompt_tokens} in the {prompt}, "
                f"{self.max_tokens} in the completion). Please reduce the length of the {prompt} or of the "
                f"completion (at most {self.context - self.prompt_tokens} completion tokens fit).")


def _text_ids(tokenizer: Any, text: str) -> list[int]:
    if getattr(tokenizer, "chat_template", None):
        templated = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False)
        return list(tokenizer.encode(templated, add_special_tokens=False))
    return list(tokenizer.encode(text, add_special_tokens=True))


def prompt_ids(tokenizer: Any, prompt: Prompt, *, completion: bool = False,
               max_prompt_tokens: int | None = None) -> list[int]:
    """The token ids fed to a model for ``prompt`` (see the module docstring)."""
    if isinstance(prompt, str):
        text = prompt
        if max_prompt_tokens is not None:
            if max_prompt_tokens < 1:
                raise ValueError(f"max_prompt_tokens must be >= 1, got {max_prompt_tokens}")
            raw = tokenizer.encode(text, add_special_tokens=False)
            if len(raw) > max_prompt_tokens:
                text = tokenizer.decode(raw[-max_prompt_tokens:], skip_special_tokens=False)
        ids = list(tokenizer.encode(text, add_special_tokens=True)) if completion else _text_ids(tokenizer, text)
    else:
        if completion or max_prompt_tokens is not None:
            raise ValueError("a conversation is neither a raw completion nor cut: pass a text")
        messages = [{"role": str(m["role"]), "content": str(m.get("content") or "")} for m in prompt]
        if not messages:
            raise ValueError("empty conversation")
        if getattr(tokenizer, "chat_template", None):
            templated = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            ids = list(tokenizer.encode(templated, add_special_tokens=False))
        else:
            ids = _text_ids(tokenizer, "\n\n".join(m["content"] for m in messages))
    if not ids:
        raise ValueError("empty prompt after tokenization")
    return ids


def fit_context(prompt_tokens: int, max_new_tokens: int, context: int | None, shorten: bool = False) -> int:
    """How many tokens may be generated after a prompt of ``prompt_tokens`` tokens.

    ``max_new_tokens`` is what the client asked for: when the prompt and it do not fit
    ``context`` the request is refused (``PromptTooLong``), never silently capped. ``shorten``: it
    is a default the server chose because the client named no limit; it is shortened to the room
    the prompt leaves (the client asked for no particular length, and an answer that hits the
    shortened limit still says ``finish_reason="length"``). A prompt that leaves no room at all is
    refused either way. ``context`` None: no limit.
    """
    if context is None:
        return max_new_tokens
    if prompt_tokens >= context:
        raise PromptTooLong(prompt_tokens, context)
    if prompt_tokens + max_new_tokens > context and not shorten:
        raise PromptTooLong(prompt_tokens, context, max_new_tokens)
    return min(max_new_tokens, context - prompt_tokens)


def context_length(model_config: Any, tokenizer: Any = None) -> int | None:
    """The context window of a transformers model (None when neither config nor tokenizer says)."""
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        n = getattr(model_config, key, None)
        if isinstance(n, int) and n > 0:
            return n
    n = getattr(tokenizer, "model_max_length", None)
    return int(n) if isinstance(n, int) and 0 < n < 10**8 else None  # tokenizers without one say 1e30


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """Text up to the first stop string (excluded), and whether one was found."""
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)
