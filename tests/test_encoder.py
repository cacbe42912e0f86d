"""The frozen prompt encoder (real all-MiniLM-L6-v2) and the embedding cache."""

from __future__ import annotations

import numpy as np
import pytest

from cscr.config import EncoderConfig
from cscr.data.table import Expert, RoutingTable
from cscr.encoder import (
    EmbeddingCache,
    Encoder,
    embed_table,
    encoder_id_for,
    load_run_embeddings,
)
from cscr.run import RunPaths

TEXTS = [
    "What is the capital of France?",
    "Which city is the capital of France?",
    "Write a Python function that reverses a list.",
    "Solve for x: 3x + 5 = 20.",
    "Who wrote the novel Pride and Prejudice?",
    "Translate 'good morning' into Spanish.",
]


def _table(texts, ids=None):
    n = len(texts)
    return RoutingTable(
        prompt_ids=ids or [f"p{i}" for i in range(n)],
        texts=texts,
        splits=["train"] * (n - 1) + ["test"],
        categories=[""] * n,
        experts=[Expert("a"), Expert("b")],
        quality=np.zeros((n, 2)),
        cost=np.ones((n, 2)),
    )


class Counting:
    """The real encoder, counting the prompts it is asked to encode."""

    def __init__(self, enc: Encoder) -> None:
        self.enc, self.encoded = enc, 0
        self.encoder_id, self.dim, self.info, self.cfg = enc.encoder_id, enc.dim, enc.info, enc.cfg

    def encode(self, texts, show_progress=False):
        self.encoded += len(texts)
        return self.enc.encode(texts)


def test_encode_unit_float32_and_semantic(encoder):
    v = encoder.encode(TEXTS)
    assert v.shape == (len(TEXTS), 384) and v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    sims = v @ v.T
    assert sims[0, 1] > 0.8  # paraphrases
    assert sims[0, 1] > sims[0, 2] + 0.3 and sims[0, 1] > sims[0, 3] + 0.3
    np.testing.assert_allclose(encoder.encode(TEXTS[:2]), v[:2], atol=1e-5)  # batch-independent
    assert encoder.encode([]).shape == (0, 384)


def test_encoder_id_names_the_model_and_hashes_its_config(encoder):
    assert encoder.encoder_id.startswith("all-MiniLM-L6-v2-")
    assert encoder.encoder_id == encoder_id_for(EncoderConfig())  # without loading the model
    assert encoder_id_for(EncoderConfig(batch_size=8)) == encoder.encoder_id  # batch size: same vectors
    assert encoder_id_for(EncoderConfig(max_seq_length=128)) != encoder.encoder_id
    assert encoder.info()["dim"] == 384


def test_any_sentence_transformers_path(encoder, minilm_path):
    other = Encoder(EncoderConfig(model=minilm_path))
    assert other.encoder_id != encoder.encoder_id and other.encoder_id.startswith("model-")
    np.testing.assert_allclose(other.encode(TEXTS[:3]), encoder.encode(TEXTS[:3]), atol=1e-5)


def test_cache_computes_only_missing_prompts(encoder, tmp_path):
    enc = Counting(encoder)
    lines = []
    cache_dir = tmp_path / "embeddings"
    first = embed_table(_table(TEXTS), enc, cache_dir, chunk_size=4, progress=lines.append)
    assert enc.encoded == len(TEXTS)
    assert any("6 to encode" in m for m in lines) and any("prompts encoded" in m for m in lines)
    np.testing.assert_allclose(first, encoder.encode(TEXTS), atol=1e-5)

    again = embed_table(_table(TEXTS), enc, cache_dir, progress=None)
    assert enc.encoded == len(TEXTS)  # nothing recomputed
    np.testing.assert_array_equal(again, first)

    more = TEXTS + ["How many legs does a spider have?", "Name a prime number above 50."]
    grown = embed_table(_table(more), enc, cache_dir, progress=None)
    assert enc.encoded == len(TEXTS) + 2  # only the two new prompts
    np.testing.assert_array_equal(grown[: len(TEXTS)], first)

    changed = list(more)
    changed[0] = "What is the capital of Italy?"  # same prompt id, new text: recomputed
    out = embed_table(_table(changed), enc, cache_dir, progress=None)
    assert enc.encoded == len(TEXTS) + 3
    assert not np.allclose(out[0], first[0])

    shards = EmbeddingCache(cache_dir, encoder.encoder_id).shards()
    assert len(shards) == 1  # compacted
    assert not list(cache_dir.rglob("*.tmp"))  # atomic writes leave no temporaries


def test_cache_is_keyed_by_encoder_id(encoder, tmp_path):
    cache_dir = tmp_path / "emb"
    embed_table(_table(TEXTS), encoder, cache_dir, progress=None)
    vecs, missing = EmbeddingCache(cache_dir, "some-other-encoder-123").lookup([f"p{i}" for i in range(6)], TEXTS)
    assert vecs is None and missing.all()


def test_load_run_embeddings_aligned_with_the_table(encoder, tmp_path):
    run = RunPaths.of(tmp_path / "run")
    table = _table(TEXTS, ids=[f"id{i}" for i in (5, 3, 1, 0, 4, 2)])
    table.save(run.table)
    with pytest.raises(FileNotFoundError, match="has no prompt embeddings: run `cscr prepare"):
        load_run_embeddings(run.root)
    emb = embed_table(table, encoder, run.embeddings, progress=None)
    loaded = load_run_embeddings(run.root)
    np.testing.assert_array_equal(loaded, emb)
    np.testing.assert_allclose(loaded[2], encoder.encode([TEXTS[2]])[0], atol=1e-5)

    _table(TEXTS + ["A brand new prompt."]).save(run.table)  # the table changed after embedding
    with pytest.raises(FileNotFoundError, match="have no embedding for encoder"):
        load_run_embeddings(run.root)


def test_load_run_embeddings_without_a_table(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no routing table"):
        load_run_embeddings(tmp_path / "empty")
