"""Resident memory of one expert replica (issue 13, item 9), per packaged model and dtype.

Each (model, dtype) runs in a fresh subprocess that does what an expert replica does (the
serving backend, ``cscr.llm.serving_backend``, one torch thread, answers through ``agenerate``)
and prints its memory after each stage (``/proc/self/status``: VmRSS, split into anonymous and
file-backed pages, and the peak VmHWM), in MiB:

1. ``imported``: after ``import torch, transformers`` (the interpreter and its libraries);
2. ``converted`` (``--fresh`` only): after the first-time GGUF conversion, in a temporary cache
   (a replica on a machine where the model was never converted);
3. ``loaded``: the weights in the dtype asked for (``auto``: the checkpoint's own);
4. ``answered``: one greedy chat answer of ``--tokens`` tokens (its tokens/s is printed);
5. ``long``: a completion of ``--long-prompt`` prompt tokens (the prefill's activations);
6. ``concurrent``: ``--concurrent`` requests sent at once (prompts of 128 to ``--long-prompt``
   tokens), as a replica gets them;
7. ``trimmed``: after ``malloc_trim(0)``: what glibc still kept of freed memory, handed back.

File-backed pages are weights memory-mapped from the folder (shared by every process serving
it; clean page cache the kernel may reclaim), anonymous ones are private. The greedy answers under
each dtype are compared with float32's (tokens that agree before the first difference), so a
cheaper dtype that changes answers is seen, not assumed away. ``--convert`` also measures the
one-off GGUF conversion alone (``cscr.models.convert_gguf`` into a temporary folder).

    python bench/expert_memory.py                                  # the three packaged models
    python bench/expert_memory.py --models qwen2.5-coder-0.5b --dtypes float32 bfloat16 --fresh
    python bench/expert_memory.py --models /path/to/a/bf16/folder --dtypes auto float32

Figures are printed, never asserted; the machine's load average is printed with them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

MODELS = ("smollm2", "gemma3-270m", "qwen2.5-coder-0.5b")
QUESTION = "Write a Python function that returns the n-th Fibonacci number."
MiB = 1 << 20


def memory() -> dict[str, float]:
    """This process's resident memory in MiB: rss (anon + file + shmem), anon, file, peak (VmHWM)."""
    keys = {"VmRSS": "rss", "RssAnon": "anon", "RssFile": "file", "VmHWM": "peak"}
    out: dict[str, float] = {}
    with open("/proc/self/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in keys:
                out[keys[name]] = int(value.split()[0]) / 1024  # kB -> MiB
    return out


def _text(tokenizer: Any, tokens: int, seed: int = 0) -> str:
    """A completion prompt of about ``tokens`` tokens."""
    words = " ".join(f"item{seed}x{i}" for i in range(tokens))
    return str(tokenizer.decode(tokenizer.encode(words, add_special_tokens=False)[:tokens]))


def child(model: str, dtype: str, tokens: int, long_prompt: int, concurrent: int,
          fresh: bool = False) -> dict[str, Any]:
    """One replica's life, measured (runs in a fresh process). ``fresh``: on a machine where the
    model was never converted (a temporary model cache): the replica converts it first."""
    import ctypes

    import numpy as np
    import torch
    import transformers  # noqa: F401  # part of the baseline

    from cscr.llm import Sampling, serving_backend
    from cscr.models import resolve_model
    from cscr.pool import ExpertSpec, Source

    libc = ctypes.CDLL("libc.so.6")
    rec: dict[str, Any] = {"model": model, "dtype_asked": dtype, "imported": memory()}
    if fresh:
        tmp = tempfile.mkdtemp(prefix="cscr-fresh-cache-")
        os.environ["CSCR_MODEL_CACHE"] = tmp
        t0 = time.perf_counter()
        resolve_model(model)
        rec["convert_s"] = time.perf_counter() - t0
        rec["converted"] = memory()
    spec = ExpertSpec(name=model, kind="open-weights", source=Source(model=model), max_new_tokens=max(tokens, 4),
                      engine_kwargs={"dtype": dtype})
    t0 = time.perf_counter()
    llm = serving_backend(spec, torch_threads=1)
    rec["load_s"] = time.perf_counter() - t0
    rec["dtype"] = str(llm.model.dtype).removeprefix("torch.")
    rec["weights_mib"] = sum(p.numel() * p.element_size() for p in llm.model.parameters()) / MiB
    rec["loaded"] = memory()
    greedy = Sampling(max_tokens=tokens)
    t0 = time.perf_counter()
    g = asyncio.run(llm.agenerate([{"role": "user", "content": QUESTION}], greedy))
    rec["tokens_per_s"] = g.output_tokens / (time.perf_counter() - t0)
    rec["answer_ids"] = llm.tokenizer.encode(g.text, add_special_tokens=False)
    rec["answer"] = g.text[:80]
    rec["answered"] = memory()
    if long_prompt:
        t0 = time.perf_counter()
        g = asyncio.run(llm.agenerate(_text(llm.tokenizer, long_prompt), greedy, completion=True))
        rec["long_s"] = time.perf_counter() - t0
        rec["long_prompt_tokens"] = g.prompt_tokens
        rec["long"] = memory()
    if concurrent:
        async def together() -> None:  # as a replica gets them: all at once, generated one at a time
            sizes = np.linspace(128, max(long_prompt, 256), concurrent).astype(int)
            await asyncio.gather(*(llm.agenerate(_text(llm.tokenizer, int(n), seed=i), Sampling(max_tokens=4),
                                                 completion=True) for i, n in enumerate(sizes)))

        t0 = time.perf_counter()
        asyncio.run(together())
        rec["concurrent_s"] = time.perf_counter() - t0
        rec["concurrent"] = memory()
    libc.malloc_trim(0)
    rec["trimmed"] = memory()
    if fresh:
        import shutil

        shutil.rmtree(os.environ["CSCR_MODEL_CACHE"], ignore_errors=True)
    rec["torch_threads"] = torch.get_num_threads()
    return rec


def conversion(model: str) -> dict[str, Any]:
    """The one-off GGUF -> HF conversion of a packaged model, into a temporary folder (fresh process)."""
    from cscr.models import convert_gguf, packaged_gguf

    rec: dict[str, Any] = {"model": model, "start": memory()}
    with tempfile.TemporaryDirectory(prefix="cscr-convert-") as tmp:
        t0 = time.perf_counter()
        convert_gguf(packaged_gguf(model), Path(tmp) / model)
        rec["seconds"] = time.perf_counter() - t0
        rec["folder_mib"] = sum(p.stat().st_size for p in (Path(tmp) / model).iterdir()) / MiB
    rec["end"] = memory()
    return rec


def run_child(args: list[str], env: dict[str, str]) -> dict[str, Any]:
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env, check=False)
    lines = [x for x in out.stdout.splitlines() if x.startswith("{")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"child {args} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return dict(json.loads(lines[-1]))


def agree(a: list[int], b: list[int]) -> int:
    """Tokens two greedy answers share before they first differ."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def stages(rec: dict[str, Any]) -> list[str]:
    return [s for s in ("imported", "converted", "loaded", "answered", "long", "concurrent", "trimmed") if s in rec]


def report(rows: list[dict[str, Any]]) -> str:
    cols = stages(rows[0])
    head = (f"| {'model':<18} | {'dtype':<8} | weights | " + " | ".join(f"{c:>10}" for c in cols)
            + " | peak | anon / file at the end | load s | tok/s | greedy agrees with fp32 |")
    lines = [head, "|" + "|".join("-" * len(c) for c in head.split("|")[1:-1]) + "|"]
    ref = {r["model"]: r["answer_ids"] for r in rows if r["dtype"] == "float32"}
    for r in rows:
        base = ref.get(r["model"])
        agreement = "(reference)" if r["dtype"] == "float32" else "-" if base is None else \
            f"{agree(base, r['answer_ids'])} of {min(len(base), len(r['answer_ids']))} tokens"
        end = r["trimmed"]
        lines.append(
            f"| {r['model']:<18} | {r['dtype']:<8} | {r['weights_mib']:>7.0f} | "
            + " | ".join(f"{r[c]['rss']:>10.0f}" for c in cols)
            + f" | {end['peak']:>4.0f} | {end['anon']:>10.0f} / {end['file']:<9.0f} "
            f"| {r['load_s']:>6.1f} | {r['tokens_per_s']:>5.1f} | {agreement:>23} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--dtypes", nargs="+", default=["auto", "bfloat16"],
                   help="auto (the backend's default: the checkpoint's own) | float32 | bfloat16 | float16")
    p.add_argument("--tokens", type=int, default=32, help="generated tokens of the chat answer")
    p.add_argument("--long-prompt", type=int, default=1024, help="prompt tokens of the long completion (0: none)")
    p.add_argument("--concurrent", type=int, default=6,
                   help="requests sent at once (prompts of 128 to --long-prompt tokens; 0: none)")
    p.add_argument("--fresh", action="store_true",
                   help="each replica converts its model first (a machine where it was never converted)")
    p.add_argument("--convert", action="store_true", help="also measure the one-off GGUF conversion alone")
    p.add_argument("--arena-max", type=int, default=None, help="run the children with MALLOC_ARENA_MAX")
    p.add_argument("--child", nargs=2, metavar=("MODEL", "DTYPE"), help=argparse.SUPPRESS)
    p.add_argument("--child-convert", metavar="MODEL", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        print(json.dumps(child(a.child[0], a.child[1], a.tokens, a.long_prompt, a.concurrent, a.fresh)))
        return 0
    if a.child_convert:
        print(json.dumps(conversion(a.child_convert)))
        return 0
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    if a.arena_max:
        env["MALLOC_ARENA_MAX"] = str(a.arena_max)
    load0, t0 = os.getloadavg()[0], time.perf_counter()
    rows = []
    for model in a.models:
        if not a.fresh:  # convert once, outside the measured replicas
            run_child(["--child", model, "float32", "--tokens", "1", "--long-prompt", "0", "--concurrent", "0"], env)
        for dtype in a.dtypes:
            rec = run_child(["--child", model, dtype, "--tokens", str(a.tokens), "--long-prompt", str(a.long_prompt),
                             "--concurrent", str(a.concurrent), *(["--fresh"] if a.fresh else [])], env)
            rows.append(rec)
            print(f"[memory] {model} {dtype} -> {rec['dtype']}: {rec['trimmed']['rss']:.0f} MiB resident, peak "
                  f"{rec['trimmed']['peak']:.0f} MiB; answer {rec['answer']!r}", file=sys.stderr, flush=True)
    print(f"resident memory of one expert replica, MiB (RSS after each stage; one torch thread; a {a.tokens}-token "
          f"answer, a {a.long_prompt}-token prompt, {a.concurrent} requests at once"
          + (f"; MALLOC_ARENA_MAX={a.arena_max}" if a.arena_max else "") + ")")
    print(report(rows))
    if a.convert:
        print("\none-off GGUF conversion (cscr.models.convert_gguf, fresh process), MiB")
        print(f"| {'model':<18} | start | peak | end | folder | s |")
        for model in a.models:
            c = run_child(["--child-convert", model], env)
            print(f"| {model:<18} | {c['start']['rss']:>5.0f} | {c['end']['peak']:>4.0f} | {c['end']['rss']:>3.0f} "
                  f"| {c['folder_mib']:>6.0f} | {c['seconds']:.0f} |")
    print(f"{time.perf_counter() - t0:.0f} s; load average {load0:.1f} at the start, {os.getloadavg()[0]:.1f} at the "
          f"end, on {os.cpu_count()} cores")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
