"""The dtype a transformers backend loads weights in (cscr.llm.hf.resolve_dtype): the checkpoint's
own by default, float32 where none is declared or this CPU has no native support for it, any
dtype when asked; on real tiny GPT-2 folders saved in float32, bfloat16 and float16, and the
packaged SmolLM2 conversion."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from cscr.llm import Sampling, serving_backend
from cscr.llm.hf import HFBackend, checkpoint_dtype, cpu_supports, resolve_dtype
from cscr.models import resolve_model, tiny_random_lm
from cscr.pool import ExpertSpec


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """The same tiny GPT-2 (SmolLM2's tokenizer) saved in each dtype."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("dtypes")
    fp32 = tiny_random_lm(root / "float32", seed=4, tokenizer="smollm2")
    out = {"float32": fp32}
    for name in ("bfloat16", "float16"):
        model = AutoModelForCausalLM.from_pretrained(fp32, dtype=getattr(torch, name))
        model.save_pretrained(root / name)
        AutoTokenizer.from_pretrained(fp32).save_pretrained(root / name)
        out[name] = root / name
    return out


def test_auto_is_the_declared_dtype_where_this_cpu_computes_it(folders):
    for declared, folder in folders.items():
        assert checkpoint_dtype(str(folder)) == declared
        want = declared if cpu_supports(declared) else "float32"
        assert resolve_dtype("auto", str(folder), "cpu") == want
        assert resolve_dtype("auto", str(folder), "cuda") == declared  # GPUs compute every half type
        assert resolve_dtype("float32", str(folder), "cpu") == "float32"  # asked: as asked
    assert cpu_supports("float32")
    with pytest.raises(ValueError, match="dtype must be 'auto' or one of"):
        resolve_dtype("float8", str(folders["float32"]), "cpu")


def test_the_packaged_conversion_declares_float32():
    """The packaged GGUF models are converted to float32 folders (their quantised weights exactly
    dequantised), so the default keeps them in float32; bfloat16 is an explicit choice."""
    assert checkpoint_dtype(resolve_model("smollm2")) == "float32"


def test_backends_load_and_answer_in_the_resolved_dtype(folders):
    import torch

    bf16 = HFBackend(str(folders["bfloat16"]), num_threads=1)
    assert bf16.dtype == resolve_dtype("auto", str(folders["bfloat16"]), "cpu")
    assert bf16.model.dtype == getattr(torch, bf16.dtype)
    assert HFBackend(str(folders["bfloat16"]), dtype="float32").model.dtype == torch.float32
    # a pool expert picks its dtype through engine_kwargs; the default is the checkpoint's own
    spec = ExpertSpec(name="x", model=str(folders["float32"]), engine_kwargs={"dtype": "bfloat16"})
    served = serving_backend(spec, torch_threads=1)
    assert served.model.dtype == torch.bfloat16
    assert serving_backend(ExpertSpec(name="y", model=str(folders["float32"]))).model.dtype == torch.float32
    g = asyncio.run(served.agenerate("Once upon a time", Sampling(max_tokens=5), completion=True))
    assert g.prompt_tokens > 0 and 0 < g.output_tokens <= 5


def test_requests_sent_together_get_the_answers_they_get_alone(folders):
    """Serving generates on one thread per backend (one malloc arena): requests sent together
    queue there and get the greedy answers they get alone."""
    llm = HFBackend(str(folders["float32"]), num_threads=1)
    prompts = ["Once upon a time", "The capital of France is", "1, 2, 3,"]
    alone = [asyncio.run(llm.agenerate(p, Sampling(max_tokens=6), completion=True)).text for p in prompts]

    async def together() -> list[str]:
        gens = await asyncio.gather(*(llm.agenerate(p, Sampling(max_tokens=6), completion=True) for p in prompts))
        return [g.text for g in gens]

    assert asyncio.run(together()) == alone
