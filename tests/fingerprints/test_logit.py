from __future__ import annotations

import numpy as np
import pytest
import torch

from cscr.fingerprints.basis import TokenBasis
from cscr.fingerprints.logit import (
    LogitFootprintUDF,
    footprint_from_probs,
    footprint_from_rows,
    logit_footprint,
)
from cscr.llm import prompt_ids
from cscr.llm.hf import HFBackend


def _brute_force(backend: HFBackend, text: str, steps: int, ids: list[int]) -> np.ndarray:
    """(T, K) by re-running the whole sequence at every step: no cache, no padding, no batching."""
    seq = prompt_ids(backend.tokenizer, text, max_prompt_tokens=backend.max_prompt_tokens)
    out = []
    with torch.inference_mode():
        for _ in range(steps):
            logits = backend.model(torch.tensor([seq])).logits[0, -1].double()
            p = torch.softmax(logits, -1)
            out.append(p[ids].numpy())
            seq.append(int(logits.argmax()))
    return np.stack(out)


@pytest.mark.parametrize("which", ["tiny_lm", "tiny_lm_b"])
def test_batched_left_padded_greedy_matches_brute_force(which, request, probe_texts):
    backend = HFBackend(str(request.getfixturevalue(which)), batch_size=5)
    basis = TokenBasis.from_texts(probe_texts, 16)
    ids = basis.token_ids(backend.tokenizer)
    texts = probe_texts[:7]  # prompts of different lengths: left padding inside each batch
    got = backend.next_token_distributions(texts, 4, ids)
    assert got.shape == (7, 4, 16)
    want = np.stack([_brute_force(backend, t, 4, ids) for t in texts])
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_footprint_is_the_normalised_mean_over_probes_and_steps():
    rng = np.random.default_rng(0)
    probs = rng.random((5, 3, 4))
    f = footprint_from_probs(probs)
    m = probs.mean(axis=(0, 1))
    np.testing.assert_allclose(f, m / np.linalg.norm(m))
    np.testing.assert_allclose(footprint_from_rows(probs.mean(axis=1)), f)
    with pytest.raises(ValueError, match="zero"):
        footprint_from_probs(np.zeros((2, 2, 2)))


def test_udf_on_a_hand_built_batch_matches_the_plain_function(tiny_lm, probe_texts):
    basis = TokenBasis.from_texts(probe_texts, 16)
    udf = LogitFootprintUDF("tiny", str(tiny_lm), list(basis.strings), steps=3, backend_kwargs={"batch_size": 4})
    batch = {"probe_idx": np.arange(6), "probe_id": np.array([f"p{i}" for i in range(6)]),
             "text": np.array(probe_texts[:6], dtype=object)}
    out = udf(batch)
    assert set(out) == {"probe_idx", "probe_id", "expert", "step_mean"}
    assert out["step_mean"].shape == (6, 16) and list(out["expert"]) == ["tiny"] * 6
    direct = logit_footprint(udf.backend, probe_texts[:6], basis, steps=3)
    np.testing.assert_allclose(footprint_from_rows(out["step_mean"]), direct, atol=1e-10)


def test_footprints_of_different_models_differ_and_repeat_exactly(tiny_lm, tiny_lm_b, probe_texts):
    basis = TokenBasis.from_texts(probe_texts, 16)
    a1 = logit_footprint(HFBackend(str(tiny_lm)), probe_texts, basis, 2)
    a2 = logit_footprint(HFBackend(str(tiny_lm), batch_size=3), probe_texts, basis, 2)
    b = logit_footprint(HFBackend(str(tiny_lm_b)), probe_texts, basis, 2)
    np.testing.assert_allclose(a1, a2, atol=1e-6)
    assert abs(np.linalg.norm(a1) - 1) < 1e-9
    assert np.abs(a1 - b).max() > 10 * np.abs(a1 - a2).max() + 1e-4


@pytest.mark.slow
def test_real_models_with_different_tokenizers_share_the_basis_and_differ(smollm2, probe_texts):
    from cscr.models import local_model

    basis = TokenBasis.from_texts(probe_texts, 32)
    smol = HFBackend(str(smollm2))
    gemma = HFBackend(str(local_model("gemma3-270m")))
    assert len(smol.tokenizer) == 49152 and len(gemma.tokenizer) == 262144
    fs = logit_footprint(smol, probe_texts[:6], basis, 3)
    fg = logit_footprint(gemma, probe_texts[:6], basis, 3)
    assert fs.shape == fg.shape == (32,)
    assert float(fs @ fg) < 0.95  # different models: clearly different footprints
