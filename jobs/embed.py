"""Prompt embeddings on Ray Data, for tables too large for one process.

The prompts not yet in the run's cache are fanned out over an actor pool: each actor
(``EmbedBatch``) loads the frozen encoder once in ``__init__`` and encodes a batch in
``__call__``. The driver writes each returned block to the same cache ``cscr.encoder`` uses
(shards keyed by prompt id + text hash under ``embeddings/<encoder_id>/``), so
``load_run_embeddings`` reads the result either way.

    python jobs/embed.py --run runs/routerbench [--workers 2] [--cpus-per-worker 0.5]
    ray job submit --working-dir . -- python jobs/embed.py --run runs/routerbench
    python jobs/embed.py --smoke-test

On a 2-core machine the actors need fractional CPUs (0.5) or Ray Data stalls; on a cluster give
each actor one or more CPUs (or ``--gpus-per-worker 1``).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from cscr.config import EncoderConfig, asdict, from_dict
from cscr.data.table import RoutingTable
from cscr.encoder import EmbeddingCache, Encoder, encoder_id_for, text_hash, write_manifest
from cscr.run import RunPaths


class EmbedBatch:
    """Ray Data UDF: ``{"prompt_id", "text", "text_hash"} -> {"prompt_id", "text_hash", "embedding"}``."""

    def __init__(self, encoder: dict[str, Any] | None = None, threads: int | None = None) -> None:
        if threads:
            import torch

            torch.set_num_threads(threads)
        self.encoder = Encoder(from_dict(EncoderConfig, encoder or {}))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        vecs = self.encoder.encode([str(t) for t in batch["text"]])
        return {"prompt_id": np.asarray(batch["prompt_id"]), "text_hash": np.asarray(batch["text_hash"]),
                "embedding": vecs}


def embed_table_ray(
    table: RoutingTable,
    cache_dir: str | os.PathLike[str],
    encoder_cfg: EncoderConfig | None = None,
    workers: int = 2,
    cpus_per_worker: float = 0.5,
    gpus_per_worker: float = 0.0,
    batch_size: int | None = None,
    threads: int | None = 1,
    progress: bool = True,
) -> np.ndarray:
    """Like ``cscr.encoder.embed_table`` but on the current Ray cluster (``ray.init`` first)."""
    import pandas as pd
    import ray

    encoder_cfg = encoder_cfg or EncoderConfig()
    cache = EmbeddingCache(cache_dir, encoder_id_for(encoder_cfg))
    hashes = text_hash(table.texts)
    _, missing = cache.lookup(table.prompt_ids, hashes=hashes)
    todo = np.flatnonzero(missing)
    log = (lambda m: print(m, file=sys.stderr, flush=True)) if progress else (lambda m: None)
    log(f"embed (ray): {table.n - len(todo)} of {table.n} prompts cached, {len(todo)} to encode "
        f"on {workers} actors x {cpus_per_worker} CPU ({cache.encoder_id})")
    dim = None
    if len(todo):
        todo = todo[np.argsort([-len(str(t)) for t in table.texts[todo]], kind="stable")]  # similar lengths per batch
        df = pd.DataFrame({"prompt_id": [str(x) for x in table.prompt_ids[todo]],
                           "text": [str(x) for x in table.texts[todo]], "text_hash": hashes[todo]})
        bs = batch_size or encoder_cfg.batch_size
        n_blocks = max(1, min(-(-len(todo) // bs), 4 * workers))  # enough blocks to keep every actor busy
        ds = ray.data.from_pandas(df).repartition(n_blocks)
        ds = ds.map_batches(
            EmbedBatch,
            fn_constructor_kwargs={"encoder": asdict(encoder_cfg), "threads": threads},
            batch_size=bs,
            batch_format="numpy",
            concurrency=workers,
            num_cpus=cpus_per_worker,
            num_gpus=gpus_per_worker or None,
        )
        t0, done = time.perf_counter(), 0
        for out in ds.iter_batches(batch_size=256, batch_format="numpy"):
            cache.write(out["prompt_id"], out["text_hash"], out["embedding"])
            done += len(out["prompt_id"])
            dim = out["embedding"].shape[1]
            rate = done / max(time.perf_counter() - t0, 1e-9)
            log(f"embed (ray): {done}/{len(todo)} prompts ({rate:.1f}/s, eta {(len(todo) - done) / rate:.0f}s)")
        cache.compact()
    vecs, missing = cache.lookup(table.prompt_ids, hashes=hashes)
    if vecs is None or missing.any():
        raise RuntimeError(f"embed (ray): {int(missing.sum())} prompts came back without a vector")
    info = {"encoder_id": cache.encoder_id, "model": encoder_cfg.model or "sentence-transformers/all-MiniLM-L6-v2",
            "dim": int(dim or vecs.shape[1]), "config": asdict(encoder_cfg)}
    cache.write_info(info)
    write_manifest(cache_dir, info, table.n)
    return vecs


def embed_table_local_ray(table: RoutingTable, cache_dir: str | os.PathLike[str],
                          encoder_cfg: EncoderConfig | None = None, workers: int = 2, **kw: Any) -> np.ndarray:
    """``embed_table_ray`` on an embedded local cluster (started and shut down here unless Ray
    is already initialised). Used by ``cscr prepare --ray``."""
    import ray

    started = not ray.is_initialized()
    if started:
        _init_ray(None, None)
    try:
        return embed_table_ray(table, cache_dir, encoder_cfg, workers=workers, **kw)
    finally:
        if started:
            ray.shutdown()


def _init_ray(address: str | None, num_cpus: int | None) -> None:
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if ray.is_initialized():
        return
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address)  # an existing cluster (ray job submit sets RAY_ADDRESS)
    else:
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count() or 2, include_dashboard=False,
                 log_to_driver=False)


def _smoke_table() -> RoutingTable:
    from cscr.data.table import Expert

    n = 24
    rng = np.random.default_rng(0)
    return RoutingTable(
        prompt_ids=np.array([f"p{i}" for i in range(n)]),
        texts=np.array([f"question {i}: what is {i} plus {2 * i}?" for i in range(n)]),
        splits=np.array(["train"] * (n - 4) + ["test"] * 4),
        categories=np.array(["math"] * n),
        experts=[Expert("a"), Expert("b")],
        quality=rng.integers(0, 2, (n, 2)).astype(float),
        cost=np.ones((n, 2)),
        source="smoke",
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", help="run folder with a routing table (cscr prepare --no-embed)")
    p.add_argument("--encoder", default=None, help="sentence-transformers path or Hub id (default: packaged MiniLM)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-seq-length", type=int, default=256)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--cpus-per-worker", type=float, default=0.5)
    p.add_argument("--gpus-per-worker", type=float, default=0.0)
    p.add_argument("--threads", type=int, default=1, help="torch threads per actor")
    p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or a new local cluster)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of a new local cluster (default 2)")
    p.add_argument("--smoke-test", action="store_true", help="tiny table in a temp folder, seconds")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cfg = EncoderConfig(model=args.encoder, batch_size=args.batch_size, max_seq_length=args.max_seq_length)
    _init_ray(args.address, args.num_cpus)
    t0 = time.perf_counter()
    if args.smoke_test:
        table = _smoke_table()
        with tempfile.TemporaryDirectory() as tmp:
            vecs = embed_table_ray(table, Path(tmp) / "embeddings", cfg, workers=min(args.workers, 2),
                                   cpus_per_worker=args.cpus_per_worker, threads=args.threads)
        norms = np.linalg.norm(vecs, axis=1)
        assert vecs.shape[0] == table.n and np.allclose(norms, 1, atol=1e-4), "smoke test: bad vectors"
        print(f"smoke test ok: {vecs.shape[0]} prompts x {vecs.shape[1]} dims in {time.perf_counter() - t0:.1f}s")
        return 0
    if not args.run:
        p.error("--run is required (or --smoke-test)")
    paths = RunPaths.of(args.run)
    table = RoutingTable.load(paths.require_table())
    vecs = embed_table_ray(table, paths.embeddings, cfg, workers=args.workers, cpus_per_worker=args.cpus_per_worker,
                           gpus_per_worker=args.gpus_per_worker, threads=args.threads)
    print(f"embedded {vecs.shape[0]} prompts x {vecs.shape[1]} dims into {paths.embeddings} "
          f"in {time.perf_counter() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
