"""Prompt embeddings on Ray Data, for tables too large for one process.

The prompts not yet in the run's cache are fanned out over an actor pool: each actor
(``EmbedBatch``) loads the frozen encoder once in ``__init__`` and encodes a batch in
``__call__``. The driver writes each returned block to the same cache ``cscr.encoder`` uses
(shards keyed by prompt id + text hash under ``embeddings/<encoder_id>/``), so
``load_run_embeddings`` reads the result either way.

    python jobs/embed.py --run runs/routerbench [--workers 2] [--cpus-per-worker 0.5]
    ray job submit --working-dir . -- python jobs/embed.py --run runs/routerbench
    python jobs/embed.py --smoke-test

In Python: ``run(EmbedJob(run=..., encoder=EncoderConfig(...)))``; the options (shared with
``cscr prepare --ray``) and the config live in cscr.jobs.data_options.

On a 2-core machine the actors need fractional CPUs (0.5) or Ray Data stalls; on a cluster give
each actor one or more CPUs (or ``--gpus-per-worker 1``).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from cscr.jobs.cluster import connect, disconnect
from cscr.jobs.data_options import (
    EmbedJob,
    add_embed_options,
    data_job_main,
    data_job_parser,
    embed_config,
)

from cscr.config import EncoderConfig, asdict, from_dict
from cscr.data.table import RoutingTable
from cscr.encoder import EmbeddingCache, Encoder, encoder_id_for, text_hash, write_manifest
from cscr.errors import InputError
from cscr.runs.paths import RunPaths


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
        # enough blocks to keep every actor busy, and no more actors than blocks
        n_blocks = min(len(todo), max(workers, -(-len(todo) // bs)), 4 * workers)
        ds = ray.data.from_pandas(df).repartition(n_blocks)
        ds = ds.map_batches(
            EmbedBatch,
            fn_constructor_kwargs={"encoder": asdict(encoder_cfg), "threads": threads},
            batch_size=min(bs, -(-len(todo) // n_blocks)),  # one batch per block at least
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=max(1, min(workers, n_blocks))),
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


@dataclass(frozen=True)
class EmbedResult:
    vectors: np.ndarray  # (prompts, dim), the table's row order
    cache: Path  # the run's embeddings folder
    seconds: float


def run(job: EmbedJob, table: RoutingTable | None = None) -> EmbedResult:
    """The job: embed ``table`` (default: the run's table) into the run's cache on Ray, joining
    or starting a cluster (cscr.jobs.cluster) and leaving Ray as it was."""
    if job.smoke_test:
        return smoke_test(job)
    if not job.run:
        raise InputError("EmbedJob.run is required")
    paths = RunPaths.of(job.run)
    if table is None:
        table = RoutingTable.load(paths.require_table())
    t0 = time.perf_counter()
    started = connect(job.address, job.num_cpus)
    try:
        vecs = embed_table_ray(table, paths.embeddings, job.encoder, workers=job.workers,
                               cpus_per_worker=job.cpus_per_worker, gpus_per_worker=job.gpus_per_worker,
                               threads=job.threads)
    finally:
        disconnect(started)
    return EmbedResult(vectors=vecs, cache=paths.embeddings, seconds=time.perf_counter() - t0)


def smoke_test(job: EmbedJob) -> EmbedResult:
    """A 24-prompt table in a temp folder (removed after); checks the vectors are unit length."""
    table = _smoke_table()
    with tempfile.TemporaryDirectory(prefix="cscr-embed-smoke-") as tmp:
        res = run(replace(job, smoke_test=False, run=tmp, workers=min(job.workers, 2)), table)
    norms = np.linalg.norm(res.vectors, axis=1)
    if res.vectors.shape[0] != table.n or not np.allclose(norms, 1, atol=1e-4):
        raise RuntimeError(f"smoke test: bad vectors {res.vectors.shape}")
    print(f"smoke test ok: {res.vectors.shape[0]} prompts x {res.vectors.shape[1]} dims in {res.seconds:.1f}s",
          file=sys.stderr)
    return res


def describe(res: EmbedResult) -> str:
    return (f"embedded {res.vectors.shape[0]} prompts x {res.vectors.shape[1]} dims into {res.cache} "
            f"in {res.seconds:.1f}s")


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


def build_parser() -> argparse.ArgumentParser:
    return data_job_parser(add_embed_options, __doc__)


def main(argv: list[str] | None = None) -> int:
    """``python jobs/embed.py``: the options of ``cscr prepare``'s embedding step with --ray."""
    return data_job_main("embed", build_parser(), embed_config, run, describe, argv)


if __name__ == "__main__":
    sys.exit(main())
