"""Hugging Face transformers backend (CPU or GPU).

Batch (labelling, fingerprints): a hand-written, left-padded, batched greedy loop (prefill, then
one token at a time with the KV cache) rather than ``model.generate``: the footprint needs the
raw next-token distribution at each of exactly T steps with EOS ignored, and ``generate`` would
merge the model's own generation config (repetition penalties, EOS stopping) into the run.

Serving (``agenerate`` / ``astream``): ``model.generate`` with the request's sampling, one
request at a time per backend, always on the backend's one generation thread; ``astream`` runs it
there behind a ``TextIteratorStreamer`` and a stopping criterion that checks, at every token, a
flag the consumer sets when it stops reading (a closed stream stops generating). Prompts that do
not fit the model's context, with the ``max_tokens`` the client asked for, are refused
(``PromptTooLong``), never cut or capped (``fit_context``).

Memory (measured by ``bench/expert_memory.py``):

- weights load in the checkpoint's own dtype (``dtype="auto"``, ``resolve_dtype``): what its
  config declares (bf16 / fp16 / fp32), float32 when it declares none or when this CPU has no
  native support for the declared half type (bf16: AVX512-BF16 / AMX; fp16: AVX512-FP16 /
  AMX-FP16; emulated, a half type saves memory but is typically slower than float32). Where it
  is native, bf16 is also faster (the bench: 1.3-1.9x tokens/s on an AVX512-BF16 CPU). A
  checkpoint loaded in its own dtype is memory-mapped (file-backed pages, shared by every
  process serving the same folder); a cast (``dtype="bfloat16"`` on a float32 folder) makes a
  private copy, and its load peaks at the file's pages plus the copy. The packaged GGUF models
  (``cscr.models``) are converted to float32 folders (their weights are quantised blocks, exactly
  dequantised): ``auto`` keeps float32 for them; ``bfloat16`` halves their weights.
- generation runs on one thread per backend: glibc gives each thread that allocates its own
  malloc arena and keeps freed memory in it, so activations of requests run on many threads (the
  default executor of ``asyncio.to_thread``) were held once per thread; on one thread they are
  held once and reused. Memory freed while loading (a first-time GGUF conversion, a dtype cast)
  is handed back to the system after the load (``malloc_trim``).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import threading
import time
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from cscr.llm.base import (
    DEFAULT_MAX_PROMPT_TOKENS,
    SCORER_CONTEXTS,
    Generation,
    LLMError,
    Sampling,
    held_back,
)
from cscr.llm.prompt import Prompt, context_length, cut_at_stop, fit_context, prompt_ids

#: floating-point dtypes a checkpoint may declare and a backend may load
DTYPES = ("float32", "bfloat16", "float16")


def checkpoint_dtype(path: str) -> str | None:
    """The dtype a transformers checkpoint declares (its config's ``dtype``, formerly
    ``torch_dtype``); None when it declares no floating-point one."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    declared = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    name = str(declared).removeprefix("torch.") if declared is not None else None
    return name if name in DTYPES else None


def cpu_supports(dtype: str) -> bool:
    """Whether this CPU computes ``dtype`` natively (oneDNN's own check: bf16 needs AVX512-BF16 or
    AMX, fp16 AVX512-FP16 or AMX-FP16); float32 always."""
    import torch

    if dtype == "float32":
        return True
    check = getattr(torch.ops.mkldnn, f"_is_mkldnn_{'bf16' if dtype == 'bfloat16' else 'fp16'}_supported", None)
    return bool(torch.backends.mkldnn.is_available() and check is not None and check())


def resolve_dtype(dtype: str, path: str, device: str) -> str:
    """The dtype to load ``path`` in: ``dtype`` itself, or for ``"auto"`` the checkpoint's own
    (``checkpoint_dtype``), float32 when it declares none or when ``device`` is a CPU without
    native support for it (see ``cpu_supports``)."""
    if dtype != "auto":
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be 'auto' or one of {DTYPES}, got {dtype!r}")
        return dtype
    own = checkpoint_dtype(path) or "float32"
    return own if device.startswith("cuda") or cpu_supports(own) else "float32"


def release_free_memory() -> None:
    """Hand memory that glibc's malloc keeps after frees back to the system (``malloc_trim``); a
    no-op elsewhere."""
    name = ctypes.util.find_library("c")
    if name and "libc" in name:
        with contextlib.suppress(OSError, AttributeError):  # not glibc
            ctypes.CDLL(name).malloc_trim(0)


def _eos_ids(tokenizer: Any, model: Any) -> set[int]:
    ids: set[int] = set()
    for src in (getattr(model, "generation_config", None), getattr(model, "config", None), tokenizer):
        eos = getattr(src, "eos_token_id", None)
        if eos is None:
            continue
        ids.update([eos] if isinstance(eos, int) else list(eos))
    return ids


class HFBackend:
    """A causal LM loaded with transformers."""

    def __init__(
        self,
        model: str,
        device: str = "auto",
        dtype: str = "auto",
        batch_size: int = 8,
        max_prompt_tokens: int = DEFAULT_MAX_PROMPT_TOKENS,
        num_threads: int | None = None,
    ) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from cscr.models import resolve_model

        if num_threads:
            torch.set_num_threads(num_threads)
        self.source = model
        self.path = resolve_model(model)
        self.device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        self.batch_size = batch_size
        self.max_prompt_tokens = max_prompt_tokens
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        self.dtype = resolve_dtype(dtype, self.path, self.device)
        lm: Any = AutoModelForCausalLM.from_pretrained(self.path, dtype=getattr(torch, self.dtype))
        self.model = lm.to(self.device).eval()
        release_free_memory()  # what a first-time conversion or a dtype cast freed
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else 0
        self.pad_id = int(pad)
        self.eos_ids = _eos_ids(self.tokenizer, self.model)
        self.context = context_length(self.model.config, self.tokenizer)
        self._lock = threading.Lock()  # serving: one generate at a time
        # serving: every generation on this one thread (one malloc arena; see the module docstring)
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cscr-generate")
        self.streamed_tokens = 0  # tokens generated by astream calls (a stream closed early stops adding)

    @property
    def vocab_size(self) -> int:
        return int(self.model.get_output_embeddings().weight.shape[0])

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of user texts, cut to their last ``max_prompt_tokens`` tokens (batch use)."""
        return [prompt_ids(self.tokenizer, str(t), max_prompt_tokens=self.max_prompt_tokens) for t in texts]

    # ---- batch: the greedy loop ----
    def _greedy(self, ids: list[list[int]], steps: int, stop_on_eos: bool, keep: list[int] | None):
        """Left-padded batched greedy decoding.

        Returns (generated (B, steps) int array, kept probabilities (B, steps, K) or None, lengths (B,)).
        """
        import torch

        B = len(ids)
        L = max(len(x) for x in ids)
        input_ids = torch.full((B, L), self.pad_id, dtype=torch.long)
        mask = torch.zeros((B, L), dtype=torch.long)
        for i, x in enumerate(ids):
            input_ids[i, L - len(x):] = torch.tensor(x, dtype=torch.long)
            mask[i, L - len(x):] = 1
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        keep_t = torch.tensor(keep, dtype=torch.long, device=self.device) if keep is not None else None
        out_tokens = torch.full((B, steps), self.pad_id, dtype=torch.long)
        probs = np.zeros((B, steps, len(keep)), dtype=np.float64) if keep is not None else None
        lengths = np.full(B, steps, dtype=np.int64)
        done = torch.zeros(B, dtype=torch.bool)
        past = None
        step_ids, step_pos = input_ids, pos
        with torch.inference_mode():
            for t in range(steps):
                out = self.model(input_ids=step_ids, attention_mask=mask, position_ids=step_pos,
                                 past_key_values=past, use_cache=True)
                logits = out.logits[:, -1, :].float()  # (B, V)
                past = out.past_key_values
                if keep_t is not None:
                    p = torch.softmax(logits, dim=-1)  # full-vocabulary distribution
                    probs[:, t, :] = p[:, keep_t].double().cpu().numpy()  # type: ignore[index]
                nxt = logits.argmax(dim=-1)  # (B,)
                out_tokens[:, t] = nxt.cpu()
                if stop_on_eos:
                    is_eos = torch.tensor([int(v) in self.eos_ids for v in nxt.cpu()], dtype=torch.bool)
                    newly = is_eos & ~done
                    lengths[newly.numpy()] = t
                    done |= is_eos
                    if bool(done.all()):
                        break
                step_ids = nxt[:, None]
                step_pos = step_pos[:, -1:] + 1
                mask = torch.cat([mask, torch.ones((B, 1), dtype=mask.dtype, device=self.device)], dim=1)
        return out_tokens.numpy(), probs, lengths

    def _batches(self, n: int):
        for s in range(0, n, self.batch_size):
            yield slice(s, min(s + self.batch_size, n))

    def next_token_distributions(self, texts: Sequence[str], steps: int, token_ids: list[int]) -> np.ndarray:
        """(B, T, K): p(token_ids[k] | prompt, greedy prefix of t tokens), full-vocab softmax."""
        ids = self.encode(texts)
        out = np.zeros((len(ids), steps, len(token_ids)), dtype=np.float64)
        for sl in self._batches(len(ids)):
            _, probs, _ = self._greedy(ids[sl], steps, stop_on_eos=False, keep=token_ids)
            out[sl] = probs
        return out

    def generate(self, texts: Sequence[str], max_new_tokens: int = 64) -> list[Generation]:
        """Greedy answers, stopping at EOS; latency is the batch's wall time over its size."""
        ids = self.encode(texts)
        res: list[Generation] = []
        for sl in self._batches(len(ids)):
            t0 = time.perf_counter()
            toks, _, lengths = self._greedy(ids[sl], max_new_tokens, stop_on_eos=True, keep=None)
            dt = (time.perf_counter() - t0) / max(len(toks), 1)
            for row, n_out, prompt in zip(toks, lengths, ids[sl], strict=True):
                text = str(self.tokenizer.decode(row[:n_out].tolist(), skip_special_tokens=True))
                res.append(Generation(text.strip(), len(prompt), int(n_out), dt,
                                      finish_reason="length" if n_out == max_new_tokens else "stop"))
        return res

    def answer_nll(self, prompts: Sequence[str], answers: Sequence[str | None], max_answer_tokens: int = 128,
                   context: str = "none") -> np.ndarray:
        """(B,) mean token negative log-likelihood of each answer (NaN: no answer).

        ``context="none"`` (SPEC.md section 2: ``p(y_j | y_<j)``): the answer alone, after one start
        token (the tokenizer's BOS, else its EOS). ``context="prompt"``: given the prompt formatted
        as for generation (``prompt_ids``, cut like ``encode``). The answer is tokenized without
        special tokens and cut to ``max_answer_tokens``.
        """
        if context not in SCORER_CONTEXTS:
            raise ValueError(f"scorer context must be one of {SCORER_CONTEXTS}, got {context!r}")
        start = self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else self.tokenizer.eos_token_id
        if context == "none" and start is None:
            raise ValueError(f"{self.source}: the tokenizer has neither a BOS nor an EOS token to start an answer")
        import torch

        nll = np.full(len(prompts), np.nan, dtype=np.float64)
        items = []
        for i, (p, a) in enumerate(zip(prompts, answers, strict=True)):
            if a is None or not str(a).strip():
                continue
            ans = self.tokenizer.encode(str(a), add_special_tokens=False)[:max_answer_tokens]
            if ans:
                ctx = [start] if context == "none" else self.encode([p])[0]
                items.append((i, ctx, ans))
        for s in range(0, len(items), self.batch_size):
            chunk = items[s:s + self.batch_size]
            L = max(len(c) + len(a) for _, c, a in chunk)
            A = max(len(a) for _, _, a in chunk)
            # left-padded: every answer ends at the last position, so only the last A + 1
            # positions need the (vocabulary-wide) output projection
            input_ids = torch.full((len(chunk), L), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), L), dtype=torch.long)
            for r, (_, c, a) in enumerate(chunk):
                seq = c + a
                input_ids[r, L - len(seq):] = torch.tensor(seq)
                mask[r, L - len(seq):] = 1
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            with torch.inference_mode():
                logits = self.model(input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device),
                                    position_ids=pos.to(self.device), logits_to_keep=A + 1).logits  # (b, A+1, V)
            for r, (i, _, a) in enumerate(chunk):
                pred = logits[r, A - len(a): A].float()  # (|a|, V): the positions predicting the answer
                logp = torch.log_softmax(pred, dim=-1)
                tgt = torch.tensor(a, device=logp.device)
                nll[i] = float(-logp.gather(1, tgt[:, None]).mean())
        return nll

    # ---- serving ----
    def _request(self, prompt: Prompt, sampling: Sampling, completion: bool) -> tuple[Any, dict[str, Any]]:
        import torch

        ids = prompt_ids(self.tokenizer, prompt, completion=completion)
        n_new = fit_context(len(ids), sampling.max_tokens, self.context, shorten=sampling.max_tokens_is_default)
        kw: dict[str, Any] = {"max_new_tokens": n_new, "pad_token_id": self.pad_id}
        if sampling.temperature > 0:
            kw.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p)
        else:
            kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if sampling.stop:
            kw.update(stop_strings=list(sampling.stop), tokenizer=self.tokenizer)
        return torch.tensor([ids], dtype=torch.long, device=self.device), kw

    def _stop_when(self, cancelled: threading.Event) -> Any:
        """Stopping criteria checked at every generated token: stop once ``cancelled`` is set (the
        caller went away or timed out); also counts tokens in ``streamed_tokens``."""
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        backend = self

        class _Cancelled(StoppingCriteria):
            def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
                backend.streamed_tokens += 1
                return torch.full((input_ids.shape[0],), cancelled.is_set(), dtype=torch.bool)

        return StoppingCriteriaList([_Cancelled()])

    def _generate_one(self, input_ids: Any, kw: dict[str, Any], stop: Sequence[str],
                      cancelled: threading.Event | None = None) -> Generation:
        import torch

        n_prompt = int(input_ids.shape[1])
        if cancelled is not None:
            kw["stopping_criteria"] = self._stop_when(cancelled)
        t0 = time.perf_counter()
        with self._lock, torch.inference_mode():
            if cancelled is not None and cancelled.is_set():  # abandoned while waiting for the lock
                raise LLMError("generation cancelled before it started")
            out = self.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **kw)
        new = out[0, n_prompt:].tolist()
        text, stopped = cut_at_stop(str(self.tokenizer.decode(new, skip_special_tokens=True)), stop)
        ended = bool(new) and new[-1] in self.eos_ids
        finish = "stop" if stopped or ended or len(new) < kw["max_new_tokens"] else "length"
        # tokens generated, a final EOS included (as vLLM counts them)
        return Generation(text, n_prompt, len(new), time.perf_counter() - t0, finish_reason=finish)

    async def agenerate(self, prompt: Prompt, sampling: Sampling, completion: bool = False) -> Generation:
        """One answer; a cancelled await (client gone, server timeout) stops the generation at the
        next token. The prompt is checked at once (a refusal does not wait for the generation
        thread)."""
        input_ids, kw = await asyncio.to_thread(self._request, prompt, sampling, completion)
        cancelled = threading.Event()
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._worker, self._generate_one, input_ids, kw, sampling.stop,
                                              cancelled)
        finally:
            cancelled.set()  # a no-op once the answer is complete

    async def astream(self, prompt: Prompt, sampling: Sampling, completion: bool = False) -> AsyncIterator[str]:
        """Text pieces as they are generated; closing the iterator stops the generation."""
        import torch
        from transformers import TextIteratorStreamer

        input_ids, kw = self._request(prompt, sampling, completion)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        cancelled = threading.Event()
        stopping = self._stop_when(cancelled)  # checked at every token: the consumer went away

        errors: list[BaseException] = []

        def work() -> None:
            if cancelled.is_set():  # abandoned while waiting for the generation thread
                streamer.end()
                return
            try:
                with self._lock, torch.inference_mode():
                    self.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                        streamer=streamer, stopping_criteria=stopping,
                                        **kw)
            except BaseException as exc:  # surfaced to the consumer below
                errors.append(exc)
                streamer.end()

        self._worker.submit(work)
        hold = held_back(sampling.stop)  # text that could still become a stop string waits
        done, full, sent = object(), "", 0
        it = iter(streamer)
        try:
            while True:
                piece = await asyncio.to_thread(next, it, done)
                if piece is done:
                    break
                full += piece  # type: ignore[operator]
                text, stopped = cut_at_stop(full, sampling.stop)
                safe = len(text) if stopped else max(len(full) - hold, sent)
                if safe > sent:
                    yield full[sent:safe]
                    sent = safe
                if stopped:
                    return
            if errors:
                raise LLMError(f"generation failed: {errors[0]!r}")
            if len(full) > sent:
                yield full[sent:]
        finally:
            cancelled.set()
