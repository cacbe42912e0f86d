"""Fingerprinting speed, in one run (figures are printed, never asserted):

1. per expert of a pool (transformers backend, this process): model load seconds, footprint
   seconds, generated tokens/s and processed (prompt + generated) tokens/s;
2. vLLM against transformers on the same model (SmolLM2 by default): the same footprint, its
   seconds and tokens/s, the ratio, and the largest difference between the two vectors;
3. Ray Data scaling: the logit job (jobs/fingerprint.py) for one expert on a fresh local Ray
   cluster with 1 and then 2 actors, seconds and the ratio.

    python bench/fingerprint_speed.py                       # local-small pool, 32 probes, T=10
    python bench/fingerprint_speed.py --probes 16 --skip-vllm --out bench-fp.json

On a GPU machine pass ``--device cuda`` (transformers) and vLLM uses the GPU by itself.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np


def _footprint_run(backend: Any, texts: list[str], basis: Any, steps: int) -> tuple[np.ndarray, float, int]:
    from cscr.fingerprints.logit import footprint_from_probs

    ids = basis.token_ids(backend.tokenizer)
    n_prompt = sum(len(x) for x in backend.encode(texts))
    t0 = time.perf_counter()
    probs = backend.next_token_distributions(texts, steps, ids)
    return footprint_from_probs(probs), time.perf_counter() - t0, n_prompt


def bench_experts(pool: Any, texts: list[str], basis: Any, steps: int, device: str, batch: int) -> list[dict]:
    from cscr.llm.hf import HFBackend

    rows = []
    for e in pool.of_kind("open-weights"):
        t0 = time.perf_counter()
        backend = HFBackend(e.source.model, device=device, batch_size=batch)
        load = time.perf_counter() - t0
        _, secs, n_prompt = _footprint_run(backend, texts, basis, steps)
        gen = len(texts) * steps
        rows.append({"expert": e.name, "vocab": len(backend.tokenizer), "load_s": load, "footprint_s": secs,
                     "gen_tok_s": gen / secs, "all_tok_s": (gen + n_prompt) / secs})
        print(f"  {e.name:22s} vocab {rows[-1]['vocab']:>7d}  load {load:6.1f}s  footprint {secs:6.1f}s  "
              f"{rows[-1]['gen_tok_s']:7.1f} gen tok/s  {rows[-1]['all_tok_s']:8.1f} tok/s (prompt+gen)", flush=True)
        del backend
    return rows


def bench_vllm_vs_hf(model: str, texts: list[str], basis: Any, steps: int, device: str, batch: int) -> dict:
    from cscr.llm.hf import HFBackend
    from cscr.llm.vllm_engine import VLLMBackend

    hf = HFBackend(model, device=device, batch_size=batch)
    f_hf, s_hf, n_prompt = _footprint_run(hf, texts, basis, steps)
    del hf
    t0 = time.perf_counter()
    vl = VLLMBackend(model, max_model_len=1024)
    load = time.perf_counter() - t0
    _footprint_run(vl, texts[:2], basis, 1)  # warm-up
    f_vl, s_vl, _ = _footprint_run(vl, texts, basis, steps)
    gen = len(texts) * steps
    out = {"model": model, "hf_s": s_hf, "vllm_s": s_vl, "vllm_load_s": load, "hf_gen_tok_s": gen / s_hf,
           "vllm_gen_tok_s": gen / s_vl, "vllm_over_hf_speed": s_hf / s_vl,
           "max_abs_diff": float(np.abs(f_hf - f_vl).max()), "prompt_tokens": n_prompt}
    print(f"  transformers {s_hf:6.1f}s ({out['hf_gen_tok_s']:.1f} gen tok/s)   vLLM {s_vl:6.1f}s "
          f"({out['vllm_gen_tok_s']:.1f} gen tok/s, engine start {load:.0f}s)   vLLM speed = "
          f"{out['vllm_over_hf_speed']:.2f}x transformers   max |diff| {out['max_abs_diff']:.2e}", flush=True)
    return out


def bench_ray_workers(model: str, n_probes: int, steps: int, basis_size: int, batch: int) -> dict:
    from cscr.jobs.cluster import connect, disconnect
    from cscr.jobs.data_options import FingerprintJob
    from cscr.jobs.fingerprint import run_fingerprint

    from cscr.config import FingerprintConfig
    from cscr.pool import pool_from_dict

    pool = pool_from_dict({"experts": [{"name": "m", "kind": "open-weights", "source": {"model": model},
                                        "cost": {"n_params": 1}}]})
    secs = {}
    for w in (1, 2):
        with tempfile.TemporaryDirectory() as tmp:
            started = connect(None, 2)
            try:
                job = FingerprintJob(fingerprint=FingerprintConfig(n_probes=n_probes, steps=steps, basis_size=basis_size),
                                     workers=w, batch_size=batch, cpus_per_worker=0.5)
                t0 = time.perf_counter()
                run_fingerprint(pool, Path(tmp) / "run", job)
                secs[w] = time.perf_counter() - t0
            finally:
                disconnect(started)
        print(f"  {w} Ray worker(s): {secs[w]:6.1f}s (actor start and model load included)", flush=True)
    out = {"model": model, "workers_1_s": secs[1], "workers_2_s": secs[2], "speedup_2_over_1": secs[1] / secs[2]}
    print(f"  2 workers = {out['speedup_2_over_1']:.2f}x 1 worker", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pool", default="examples/pools/local-small.yaml")
    p.add_argument("--model", default="smollm2", help="model for the vLLM and Ray comparisons")
    p.add_argument("--probes", type=int, default=32)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--basis-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--skip-vllm", action="store_true")
    p.add_argument("--skip-ray", action="store_true")
    p.add_argument("--out", default=None, help="write the figures as JSON here")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from cscr.fingerprints.basis import TokenBasis
    from cscr.pool import load_pool
    from cscr.tasks import builtin_tasks

    texts = [t.prompt for t in builtin_tasks(args.probes, seed=7)]
    basis = TokenBasis.from_texts(texts, args.basis_size)
    print(f"fingerprint speed: {args.probes} probes x T={args.steps} steps, K={basis.size}, batch {args.batch_size}, "
          f"device {args.device}, {os.cpu_count()} CPUs", flush=True)
    res: dict[str, Any] = {"config": vars(args)}
    print("1. per expert (transformers, in process)")
    res["experts"] = bench_experts(load_pool(args.pool), texts, basis, args.steps, args.device, args.batch_size)
    if not args.skip_vllm:
        print(f"2. vLLM against transformers on {args.model}")
        try:
            res["vllm_vs_hf"] = bench_vllm_vs_hf(args.model, texts, basis, args.steps, args.device, args.batch_size)
        except Exception as exc:  # report what blocks vLLM here rather than hide the other figures
            res["vllm_vs_hf"] = {"error": f"{type(exc).__name__}: {exc}"}
            print(f"  vLLM failed: {res['vllm_vs_hf']['error']}", flush=True)
    if not args.skip_ray:
        print(f"3. Ray Data scaling on {args.model} (jobs/fingerprint.py, fresh local cluster of 2 CPUs)")
        res["ray"] = bench_ray_workers(args.model, args.probes, args.steps, basis.size, args.batch_size)
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
