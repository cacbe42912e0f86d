"""The vLLM and transformers backends give the same footprint for the same model (SmolLM2)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cscr.fingerprints.basis import TokenBasis
from cscr.fingerprints.logit import footprint_from_probs
from cscr.llm.hf import HFBackend

pytestmark = [pytest.mark.vllm, pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed")]


def test_vllm_and_transformers_footprints_agree_on_smollm2(smollm2, probe_texts, tmp_path):
    from cscr.tasks import builtin_tasks

    texts = probe_texts[:6]
    basis = TokenBasis.from_texts([t.prompt for t in builtin_tasks(300)], 144)  # > 128 ids: two vLLM requests
    spec = {"model": str(smollm2), "texts": texts, "basis": list(basis.strings), "steps": 10,
            "max_prompt_tokens": 256, "out": str(tmp_path / "vllm.npy")}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("vllm_footprint.py")), str(tmp_path / "spec.json")],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    p_vllm = np.load(tmp_path / "vllm.npy")
    hf = HFBackend(str(smollm2), max_prompt_tokens=256)
    p_hf = hf.next_token_distributions(texts, 10, basis.token_ids(hf.tokenizer))
    assert p_vllm.shape == p_hf.shape == (6, 10, 144)
    np.testing.assert_allclose(p_vllm, p_hf, atol=1e-4)
    f_vllm, f_hf = footprint_from_probs(p_vllm), footprint_from_probs(p_hf)
    np.testing.assert_allclose(f_vllm, f_hf, atol=1e-5)
    # the same greedy answers too
    assert json.loads((tmp_path / "vllm.npy.json").read_text()) == [g.text for g in hf.generate(texts[:2], 12)]
