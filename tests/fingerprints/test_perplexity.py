from __future__ import annotations

import numpy as np
import pytest
import torch

from cscr.data.table import Expert, RoutingTable
from cscr.fingerprints.perplexity import (
    GenerateUDF,
    Scorer,
    ScoreUDF,
    perplexity_basis_id,
    perplexity_descriptor,
    perplexity_fingerprint,
)
from cscr.llm import prompt_ids


def test_descriptor_is_standardised_then_normalised():
    nll = np.array([1.0, 2.0, 3.0, 6.0])
    d = perplexity_descriptor(nll)
    z = (nll - nll.mean()) / nll.std()
    np.testing.assert_allclose(d, z / np.linalg.norm(z))
    # shifting and scaling every NLL (another scorer's scale) leaves the descriptor unchanged
    np.testing.assert_allclose(perplexity_descriptor(3 * nll + 7), d)


def test_missing_answers_sit_at_the_mean_and_too_many_are_refused():
    d = perplexity_descriptor(np.array([1.0, np.nan, 3.0, 2.0]))
    assert d[1] == 0.0 and abs(np.linalg.norm(d) - 1) < 1e-12
    with pytest.raises(ValueError, match="3 of 4 probes have no scored answer"):
        perplexity_descriptor(np.array([1.0, np.nan, np.nan, np.nan]), "x")
    with pytest.raises(ValueError, match="same NLL"):
        perplexity_descriptor(np.array([2.0, 2.0, 2.0]))


def test_basis_id_depends_on_probes_scorer_and_context():
    a = perplexity_basis_id(["p1", "p2"], "smollm2")
    assert a == perplexity_basis_id(["p1", "p2"], "smollm2") and a.startswith("ppl2-")
    assert a != perplexity_basis_id(["p2", "p1"], "smollm2")
    assert a != perplexity_basis_id(["p1", "p2"], "gpt2")
    assert a != perplexity_basis_id(["p1", "p2"], "smollm2", "prompt")


@pytest.mark.parametrize("context", ["none", "prompt"])
def test_answer_nll_matches_a_per_example_brute_force(tiny_lm_b, context):
    scorer = Scorer(str(tiny_lm_b), max_answer_tokens=50, batch_size=3, context=context)
    prompts = ["What is 2 + 2?", "Is 7 a prime number? Answer yes or no.", "Name a colour.", "x"]
    answers = ["4", "yes, it is prime", None, "  "]
    got = scorer.nll(prompts, answers)
    assert np.isnan(got[2]) and np.isnan(got[3])  # no answer: missing, not 0
    if context == "none":  # the answer alone: the prompt makes no difference
        np.testing.assert_array_equal(got[:2], scorer.nll(["other", "prompts"], answers[:2]))
    tok, model = scorer.backend.tokenizer, scorer.backend.model
    for i in (0, 1):
        start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        ctx = [start] if context == "none" else prompt_ids(tok, prompts[i], max_prompt_tokens=256)
        ans = tok.encode(answers[i], add_special_tokens=False)
        with torch.inference_mode():
            logp = torch.log_softmax(model(torch.tensor([ctx + ans])).logits[0].double(), -1)
        want = -np.mean([float(logp[len(ctx) - 1 + j, a]) for j, a in enumerate(ans)])
        assert got[i] == pytest.approx(want, abs=1e-5)


def test_recorded_responses_give_a_fingerprint_and_the_udf_agrees(tiny_lm):
    """(a) answers recorded in a routing table, scored by the fixed scorer."""
    n = 6
    prompts = [f"What is {i} plus {i}?" for i in range(n)]
    good = [str(2 * i) for i in range(n)]
    rambling = [f"well, I think the answer might be {i} or maybe {3 * i} or so" for i in range(n)]
    table = RoutingTable(prompt_ids=[f"p{i}" for i in range(n)], texts=prompts, splits=["probe"] * n,
                         categories=[""] * n, experts=[Expert("good"), Expert("rambling")],
                         quality=np.ones((n, 2)), cost=np.ones((n, 2)),
                         responses=np.array([good, rambling], dtype=object).T)
    scorer = Scorer(str(tiny_lm))
    d_good = perplexity_fingerprint(scorer, list(table.texts), list(table.responses[:, 0]), "good")
    d_ramb = perplexity_fingerprint(scorer, list(table.texts), list(table.responses[:, 1]), "rambling")
    assert d_good.shape == (n,) and abs(np.linalg.norm(d_good) - 1) < 1e-9
    assert not np.allclose(d_good, d_ramb)
    udf = ScoreUDF(str(tiny_lm))
    batch = {"probe_idx": np.arange(n), "probe_id": table.prompt_ids, "text": table.texts,
             "expert": np.array(["good"] * n, dtype=object), "answer": table.responses[:, 0]}
    out = udf(batch)
    np.testing.assert_allclose(perplexity_descriptor(out["nll"]), d_good, atol=1e-9)


def test_live_generation_udf_answers_then_scores(tiny_lm, tiny_lm_b):
    """(b) live greedy generation by an open-weights expert."""
    gen = GenerateUDF("b", str(tiny_lm_b), max_new_tokens=5)
    batch = {"probe_idx": np.arange(3), "text": np.array(["What is 1 + 1?", "Hello", "Is 4 even?"], dtype=object)}
    out = gen(batch)
    assert list(out["expert"]) == ["b"] * 3
    assert all(isinstance(a, str) for a in out["answer"]) and (out["output_tokens"] <= 5).all()
    assert (out["prompt_tokens"] > 0).all() and (out["latency_s"] > 0).all()
    scored = ScoreUDF(str(tiny_lm))(out)
    assert scored["nll"].shape == (3,)
