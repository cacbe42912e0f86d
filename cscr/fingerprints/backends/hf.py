"""Hugging Face transformers backend (CPU or GPU, batched, left-padded).

A hand-written greedy loop (prefill, then one token at a time with the KV cache) rather than
``model.generate``: the footprint needs the raw next-token distribution at each of exactly T
steps, with EOS ignored, and ``generate`` would merge the model's own generation config
(repetition penalties, EOS stopping) into the run.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from cscr.fingerprints.backends import SCORER_CONTEXTS, Generation, prompt_token_ids


def _eos_ids(tokenizer: Any, model: Any) -> set[int]:
    ids: set[int] = set()
    for src in (getattr(model, "generation_config", None), getattr(model, "config", None), tokenizer):
        eos = getattr(src, "eos_token_id", None)
        if eos is None:
            continue
        ids.update([eos] if isinstance(eos, int) else list(eos))
    return ids


class HFBackend:
    """A causal LM loaded with transformers; every method works on batches of plain texts."""

    def __init__(
        self,
        model: str,
        device: str = "auto",
        dtype: str = "float32",
        batch_size: int = 8,
        max_prompt_tokens: int = 512,
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
        torch_dtype = getattr(torch, dtype) if dtype != "auto" else "auto"
        lm: Any = AutoModelForCausalLM.from_pretrained(self.path, dtype=torch_dtype)
        self.model = lm.to(self.device).eval()
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else 0
        self.pad_id = int(pad)
        self.eos_ids = _eos_ids(self.tokenizer, self.model)

    @property
    def vocab_size(self) -> int:
        return int(self.model.get_output_embeddings().weight.shape[0])

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        return [prompt_token_ids(self.tokenizer, t, self.max_prompt_tokens) for t in texts]

    # ---- the greedy loop ----
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
                res.append(Generation(text.strip(), len(prompt), int(n_out), dt))
        return res

    def answer_nll(self, prompts: Sequence[str], answers: Sequence[str | None], max_answer_tokens: int = 128,
                   context: str = "none") -> np.ndarray:
        """(B,) mean token negative log-likelihood of each answer (NaN: no answer).

        ``context="none"`` (SPEC.md section 2: ``p(y_j | y_<j)``): the answer alone, after one start
        token (the tokenizer's BOS, else its EOS). ``context="prompt"``: given the prompt formatted
        as for generation (``prompt_token_ids``). The answer is tokenized without special tokens
        and cut to ``max_answer_tokens``.
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
                ctx = [start] if context == "none" else prompt_token_ids(self.tokenizer, p, self.max_prompt_tokens)
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
