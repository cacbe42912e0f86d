"""Perplexity fingerprints (SPEC.md section 2), for any expert whose answers can be read.

    l_h(x) = - 1/|y| * sum_j log p_scorer(y_j | y_<j)
    d_ppl(h) = normalize(standardize([l_h(x_i)]_i))

Answers come from (a) a routing table's recorded responses, (b) live greedy generation by an
open-weights expert (any backend), or (c) an OpenAI-compatible endpoint. One fixed scorer LM
scores every expert's answers: the packaged SmolLM2 by default (offline), or any causal LM by
path or Hub id (GPT-2 in the write-up). The answer is scored on its own, as the spec writes it
(``context="none"``); ``context="prompt"`` (beyond the spec, labelled as such) scores it given the
prompt formatted as the scorer's own generation prompt (``cscr.llm.prompt_ids``): slower (the prompt
goes through the scorer too) and a different descriptor, so the context is part of the basis id.

Missing answers (no recorded response, a failed API call) are NaN: standardisation uses the
mean and deviation of the answers that exist, and a missing probe then sits at 0 (the mean).
The coordinates are the probes in order: the basis id hashes the probe ids and the scorer, so
descriptors from different probe sets or scorers are never mixed.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

import numpy as np

from cscr.fingerprints.logit import l2_normalize
from cscr.llm import SCORER_CONTEXTS, make_backend

DEFAULT_SCORER = "smollm2"
MAX_MISSING_FRACTION = 0.5  # refuse a fingerprint with more probes missing than this


def perplexity_basis_id(probe_ids: Sequence[str], scorer: str, context: str = "none") -> str:
    key = [list(map(str, probe_ids)), scorer, context]
    digest = hashlib.sha256(json.dumps(key).encode()).hexdigest()
    return f"ppl{len(probe_ids)}-{digest[:16]}"


def perplexity_descriptor(nll: np.ndarray, expert: str = "expert") -> np.ndarray:
    """(N,) per-probe mean NLL (NaN = missing) -> the unit (N,) descriptor."""
    nll = np.asarray(nll, dtype=np.float64)
    if nll.ndim != 1 or nll.size < 2:
        raise ValueError(f"expected (N,) NLLs with N >= 2, got shape {nll.shape}")
    ok = np.isfinite(nll)
    if ok.mean() < 1 - MAX_MISSING_FRACTION:
        raise ValueError(f"{expert}: {int((~ok).sum())} of {nll.size} probes have no scored answer "
                         f"(more than {MAX_MISSING_FRACTION:.0%}): cannot fingerprint")
    mu, sd = nll[ok].mean(), nll[ok].std()
    if sd == 0:
        raise ValueError(f"{expert}: every probe has the same NLL; the standardised descriptor is 0")
    z = np.where(ok, (nll - mu) / sd, 0.0)
    return l2_normalize(z, f"perplexity descriptor of {expert}")


class Scorer:
    """The fixed scorer LM (transformers backend)."""

    def __init__(self, model: str | None = None, max_answer_tokens: int = 128,
                 max_prompt_tokens: int = 256, batch_size: int = 8, context: str = "none",
                 **backend_kwargs: Any) -> None:
        if context not in SCORER_CONTEXTS:
            raise ValueError(f"scorer context must be one of {SCORER_CONTEXTS}, got {context!r}")
        self.model = model or DEFAULT_SCORER
        self.max_answer_tokens = max_answer_tokens
        self.context = context
        self.backend = make_backend("transformers", self.model, max_prompt_tokens=max_prompt_tokens,
                                    batch_size=batch_size, **backend_kwargs)

    def nll(self, prompts: Sequence[str], answers: Sequence[str | None]) -> np.ndarray:
        return self.backend.answer_nll(prompts, answers, self.max_answer_tokens, self.context)


def perplexity_fingerprint(scorer: Scorer, probes: Sequence[str], answers: Sequence[str | None],
                           expert: str = "expert") -> np.ndarray:
    """The descriptor of one expert's answers on the probes (no Ray)."""
    return perplexity_descriptor(scorer.nll(probes, answers), expert)


def _answers(batch: dict[str, np.ndarray]) -> list[str | None]:
    out: list[str | None] = []
    for a in batch["answer"]:
        out.append(None if a is None or (isinstance(a, float) and np.isnan(a)) or not str(a).strip() else str(a))
    return out


class ScoreUDF:
    """Ray Data UDF: batch {"probe_idx", "expert", "text", "answer", ...} -> {"probe_idx", "expert", "nll"}."""

    def __init__(self, scorer: str | None = None, max_answer_tokens: int = 128,
                 max_prompt_tokens: int = 256, batch_size: int = 8, context: str = "none") -> None:
        self.scorer = Scorer(scorer, max_answer_tokens, max_prompt_tokens, batch_size, context)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        texts = [str(t) for t in batch["text"]]
        out: dict[str, np.ndarray] = {k: np.asarray(batch[k]) for k in ("probe_idx", "expert") if k in batch}
        out["nll"] = self.scorer.nll(texts, _answers(batch))
        return out


class GenerateUDF:
    """Ray Data UDF: batch {"probe_id", "text"} -> the same plus "expert", "answer", token counts.

    ``backend``: transformers | vllm (open weights, ``model`` a model source) or openai
    (black-box: ``model`` the API's model name, ``api`` the OpenAIBackend keyword arguments).
    """

    def __init__(self, expert: str, model: str, backend: str = "transformers", max_new_tokens: int = 64,
                 backend_kwargs: dict[str, Any] | None = None, out_columns: list[str] | None = None) -> None:
        self.expert = expert
        self.out_columns = out_columns  # keep only these columns (None: all)
        self.max_new_tokens = max_new_tokens
        self.backend = make_backend(backend, model, **(backend_kwargs or {}))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        texts = [str(t) for t in batch["text"]]
        gens = self.backend.generate(texts, self.max_new_tokens)
        out = {k: np.asarray(v) for k, v in batch.items()}
        out["expert"] = np.array([self.expert] * len(texts), dtype=object)
        out["answer"] = np.array([None if g.error else g.text for g in gens], dtype=object)
        out["prompt_tokens"] = np.array([g.prompt_tokens for g in gens], dtype=np.int64)
        out["output_tokens"] = np.array([g.output_tokens for g in gens], dtype=np.int64)
        out["latency_s"] = np.array([g.latency_s for g in gens], dtype=np.float64)
        out["error"] = np.array([g.error or "" for g in gens], dtype=object)
        return out if self.out_columns is None else {k: out[k] for k in self.out_columns}
