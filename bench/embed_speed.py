"""Cached-embedding throughput against raw sentence-transformers encoding (issue 2 item 7,
second half). Everything is measured in the same run, on the same prompts:

  raw encode      SentenceTransformer.encode of the prompts (the reference)
  first pass      cscr.encoder.embed_table on an empty cache (encode + shard writes)
  cached          embed_table again: every prompt read from the cache
  run load        load_run_embeddings(run): table ids + cache, aligned (what training does)
  run load, big   the same on a table of --big-prompts ids (RouterBench's full size), whose
                  cache holds random unit vectors: the cache read does not depend on the values

Prompts: RouterBench's (from --data-dir / CSCR_DATA_DIR / ../shared/data) when present, else
generated sentences.

    python bench/embed_speed.py [--prompts 256] [--big-prompts 36497] [--data-dir ../shared/data]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from cscr.config import DataConfig, EncoderConfig  # noqa: E402
from cscr.data.table import Expert, RoutingTable  # noqa: E402
from cscr.encoder import (  # noqa: E402
    EmbeddingCache,
    Encoder,
    default_model_path,
    embed_table,
    load_run_embeddings,
    text_hash,
)
from cscr.runs.paths import RunPaths  # noqa: E402


def _texts(n: int, data_dir: str | None) -> tuple[list[str], str]:
    root = Path(data_dir or os.environ.get("CSCR_DATA_DIR") or Path(__file__).resolve().parents[2] / "shared" / "data")
    if (root / "routerbench").is_dir():
        from cscr.data import load_dataset

        t = load_dataset("routerbench", DataConfig(data_dir=str(root)))
        idx = np.random.default_rng(0).permutation(t.n)[:n]
        return [str(x) for x in t.texts[idx]], f"RouterBench prompts from {root}"
    words = ["route", "cost", "model", "prompt", "answer", "expert", "cheap", "quality", "budget", "curve", "token"]
    rng = np.random.default_rng(0)
    return [" ".join(rng.choice(words, size=int(rng.integers(8, 60)))) for _ in range(n)], "generated sentences"


def _table(ids, texts) -> RoutingTable:
    n = len(ids)
    return RoutingTable(prompt_ids=ids, texts=texts, splits=["train"] * n, categories=[""] * n,
                        experts=[Expert("a")], quality=np.zeros((n, 1)), cost=np.ones((n, 1)))


def _best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--prompts", type=int, default=256)
    p.add_argument("--big-prompts", type=int, default=36497)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--data-dir", default=None)
    args = p.parse_args()
    from sentence_transformers import SentenceTransformer

    texts, origin = _texts(args.prompts, args.data_dir)
    n = len(texts)
    cfg = EncoderConfig()
    raw = SentenceTransformer(default_model_path(), device="cpu")
    raw.max_seq_length = cfg.max_seq_length
    enc = Encoder(cfg)
    raw.encode(texts[:8], batch_size=cfg.batch_size)  # warm up both
    enc.encode(texts[:8])

    t_raw = _best(lambda: raw.encode(texts, batch_size=cfg.batch_size, normalize_embeddings=True), 1)
    with tempfile.TemporaryDirectory() as tmp:
        run = RunPaths.of(Path(tmp) / "run")
        table = _table([f"p{i}" for i in range(n)], texts)
        table.save(run.table)
        t0 = time.perf_counter()
        embed_table(table, enc, run.embeddings, progress=None)
        t_first = time.perf_counter() - t0
        t_cached = _best(lambda: embed_table(table, enc, run.embeddings, progress=None), args.repeats)
        t_load = _best(lambda: load_run_embeddings(run.root), args.repeats)

        big = RunPaths.of(Path(tmp) / "big")
        m = args.big_prompts
        ids = [f"b{i}" for i in range(m)]
        btexts = [texts[i % n] + f" #{i}" for i in range(m)]
        _table(ids, btexts).save(big.table)
        vecs = np.random.default_rng(0).standard_normal((m, enc.dim)).astype(np.float32)
        vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
        cache = EmbeddingCache(big.embeddings, enc.encoder_id)
        cache.write(ids, text_hash(btexts), vecs)
        from cscr.encoder import write_manifest

        write_manifest(big.embeddings, enc.info(), m)
        t_big = _best(lambda: load_run_embeddings(big.root), args.repeats)

    rate_raw = n / t_raw
    rows = [
        ("raw sentence-transformers encode", n, t_raw, rate_raw),
        ("embed_table, empty cache (encode + write)", n, t_first, n / t_first),
        ("embed_table, all cached", n, t_cached, n / t_cached),
        ("load_run_embeddings (run folder)", n, t_load, n / t_load),
        (f"load_run_embeddings, {m} prompts", m, t_big, m / t_big),
    ]
    print(f"prompts: {origin}; encoder {enc.encoder_id} (max_seq_length {cfg.max_seq_length}, "
          f"batch {cfg.batch_size}); {os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.1f}")
    print(f"{'what':<44} {'prompts':>8} {'seconds':>9} {'prompts/s':>12} {'x raw':>10}")
    for name, k, t, r in rows:
        print(f"{name:<44} {k:>8} {t:>9.3f} {r:>12.1f} {r / rate_raw:>10.1f}")


if __name__ == "__main__":
    main()
