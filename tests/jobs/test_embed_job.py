"""jobs/embed.py: the Ray Data UDF on a hand-built batch, and the job on a real local cluster."""

from __future__ import annotations

import numpy as np
import pytest
from cscr.jobs.data_options import EmbedJob
from cscr.jobs.embed import EmbedBatch
from cscr.jobs.embed import run as embed_job

from cscr.config import EncoderConfig
from cscr.data.table import Expert, RoutingTable
from cscr.encoder import embed_table, load_run_embeddings, text_hash
from cscr.runs.paths import RunPaths

TEXTS = [f"Prompt {i}: {w}" for i, w in enumerate(
    ["what is two plus two?", "name the largest ocean", "write a haiku about rain", "define entropy",
     "who painted the Mona Lisa?", "sort a list in Python", "what is photosynthesis?", "convert 5 km to miles",
     "explain recursion", "capital of Japan?", "is 97 prime?", "summarise the water cycle"])]


def _table():
    n = len(TEXTS)
    return RoutingTable(
        prompt_ids=[f"p{i}" for i in range(n)], texts=TEXTS[:n], splits=["train"] * (n - 2) + ["test"] * 2,
        categories=[""] * n, experts=[Expert("a"), Expert("b")], quality=np.zeros((n, 2)), cost=np.ones((n, 2)),
    )


def test_udf_on_a_hand_built_batch(encoder):
    udf = EmbedBatch(encoder={}, threads=None)
    batch = {"prompt_id": np.array(["a", "b", "c"]), "text": np.array(TEXTS[:3]), "text_hash": text_hash(TEXTS[:3])}
    out = udf(batch)
    assert set(out) == {"prompt_id", "text_hash", "embedding"}
    assert out["embedding"].shape == (3, 384) and out["embedding"].dtype == np.float32
    assert list(out["prompt_id"]) == ["a", "b", "c"]
    np.testing.assert_allclose(out["embedding"], encoder.encode(TEXTS[:3]), atol=1e-5)


@pytest.mark.slow
def test_ray_job_matches_the_plain_encoder(ray_start_2_cpus, encoder, tmp_path):
    run = RunPaths.of(tmp_path / "run")
    table = _table()
    table.save(run.table)
    # a third of the prompts are already cached: the job computes only the rest
    embed_table(table.subset(np.arange(4)), encoder, run.embeddings, progress=None)
    res = embed_job(EmbedJob(run=str(run.root), encoder=EncoderConfig(batch_size=4), workers=2, cpus_per_worker=0.5))
    vecs = res.vectors
    assert res.cache == run.embeddings
    plain = encoder.encode(TEXTS)
    assert vecs.shape == (len(TEXTS), 384)
    np.testing.assert_allclose(vecs, plain, atol=1e-5)
    np.testing.assert_allclose(load_run_embeddings(run.root), plain, atol=1e-5)  # same cache format
