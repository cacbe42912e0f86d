"""The frozen prompt encoder (real all-MiniLM-L6-v2) and the embedding cache."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cscr.config import ConfigError, EncoderConfig
from cscr.data.table import Expert, RoutingTable
from cscr.encoder import (
    LONG_PROMPT_MODES,
    WINDOW_SLACK,
    EmbeddingCache,
    Encoder,
    distinctness,
    distinctness_warning,
    embed_table,
    encoder_id_for,
    get_encoder,
    load_run_embeddings,
    model_digest,
    shared_embedding_dir,
    window_spans,
)
from cscr.runs.paths import RunPaths

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


def test_a_folder_retrained_in_place_gets_another_id(minilm_path, tmp_path):
    """A folder the user names is identified by its weights' bytes, not their sizes: a model fine-tuned
    again at the same path (same tensors, same file size) must not reuse the last one's caches."""
    import shutil

    from safetensors.torch import load_file, save_file

    folder = tmp_path / "mine"
    shutil.copytree(minilm_path, folder)
    cfg = EncoderConfig(model=str(folder))
    first = encoder_id_for(cfg)
    weights = folder / "model.safetensors"
    size = weights.stat().st_size
    state = load_file(weights)
    name = next(k for k in state if k.endswith("LayerNorm.bias"))
    state[name] = state[name] + 0.5
    save_file(state, weights, metadata={"format": "pt"})
    assert weights.stat().st_size == size and encoder_id_for(cfg) != first
    assert model_digest(cfg) != model_digest(EncoderConfig(model=minilm_path))  # ONNX exports too


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


# ---------------------------------------------------------------- long prompts

PREAMBLE = " ".join(f"Example {i}: which planet is closest to the sun? Answer: Mercury." for i in range(40))
LONG = [
    PREAMBLE + " Question: what is the boiling point of water at sea level in Celsius?",
    PREAMBLE + " Question: write a Python function that sorts a list of strings by length.",
    PREAMBLE + " Question: who painted the Mona Lisa?",
]


def test_window_spans_cover_head_tail_and_capped_windows():
    offsets = [(2 * i, 2 * i + 1) for i in range(100)]  # token i = characters [2i, 2i + 1)
    assert window_spans(30, offsets, 40, "tail", 8) is None  # fits one window: embedded whole
    assert window_spans(100, offsets, 40, "head", 8) is None  # head: the model truncates
    step = 40 - WINDOW_SLACK
    assert window_spans(100, offsets, 40, "tail", 8) == [(2 * (100 - step), 199)]  # ends at the last token
    head, tail = window_spans(100, offsets, 40, "head+tail", 8)
    assert head == (0, 2 * step - 1) and tail == (2 * (100 - step), 199)
    wins = window_spans(100, offsets, 40, "windows", 8)
    assert wins[0][0] == 0 and wins[-1][1] == 199 and len(wins) == 4  # 0, 32, 64 and the last, 68
    capped = window_spans(100, offsets, 12, "windows", 3)
    assert len(capped) == 3 and capped[0][0] == 0 and capped[-1][1] == 199
    with pytest.raises(ValueError, match="unknown long-prompt mode"):
        window_spans(100, offsets, 40, "middle", 8)


def test_long_prompts_sharing_a_preamble_collapse_only_under_head(encoder):
    head = get_encoder(EncoderConfig(long_prompt="head"))
    assert (head.token_counts(LONG) > head.window).all() and (head.token_counts(TEXTS) < head.window).all()
    v = head.encode(LONG)
    np.testing.assert_allclose(v[0], v[1], atol=1e-6)  # the question is past the window: one vector
    d = distinctness(LONG, v)
    assert d.n_vectors == 1 and d.largest_group == 3 and d.n_collided == 3
    assert "--long-prompt windows" in distinctness_warning(d, "head")
    short = head.encode(TEXTS)
    for mode in ("tail", "head+tail", "windows"):
        enc = get_encoder(EncoderConfig(long_prompt=mode))
        w = enc.encode(LONG)
        np.testing.assert_allclose(np.linalg.norm(w, axis=1), 1.0, atol=1e-5)
        assert (w @ w.T)[np.triu_indices(3, 1)].max() < 0.99, mode  # the questions are seen
        assert distinctness(LONG, w).n_vectors == 3 and distinctness_warning(distinctness(LONG, w), mode) is None
        np.testing.assert_allclose(enc.encode(TEXTS), short, atol=1e-5)  # short prompts: as before
    # tail = the last window alone; head+tail = the mean of the head and tail windows, renormalised
    tail = get_encoder(EncoderConfig(long_prompt="tail"))
    both = get_encoder(EncoderConfig(long_prompt="head+tail"))
    pieces = both.pieces(LONG[:1])[0]
    assert len(pieces) == 2 and LONG[0].endswith(pieces[1]) and LONG[0].startswith(pieces[0])
    np.testing.assert_allclose(tail.encode(LONG[:1])[0], head.encode([pieces[1]])[0], atol=1e-5)
    mean = head.encode(pieces).mean(axis=0)
    np.testing.assert_allclose(both.encode(LONG[:1])[0], mean / np.linalg.norm(mean), atol=1e-5)


def test_encoder_id_records_the_long_prompt_mode(encoder):
    ids = {m: encoder_id_for(EncoderConfig(long_prompt=m)) for m in LONG_PROMPT_MODES}
    assert len(set(ids.values())) == len(LONG_PROMPT_MODES)
    assert ids["head"].count("-") == 4  # all-MiniLM-L6-v2-<hash>: the id runs embedded before modes existed
    assert ids["head+tail"].startswith("all-MiniLM-L6-v2-headtail-") and ids["windows"].startswith("all-MiniLM-L6-v2-win8-")
    assert encoder_id_for(EncoderConfig(long_prompt="windows", max_windows=4)) != ids["windows"]
    assert encoder_id_for(EncoderConfig(long_prompt="tail", max_windows=4)) == ids["tail"]  # unused: same id
    assert get_encoder(EncoderConfig(long_prompt="tail")).info()["long_prompt"] == "tail"
    with pytest.raises(ConfigError, match="long_prompt must be one of"):
        EncoderConfig(long_prompt="middle")


def test_run_records_the_mode_and_from_run_rebuilds_the_same_encoder(tmp_path):
    run = RunPaths.of(tmp_path / "run")
    table = _table(TEXTS + LONG)
    table.save(run.table)
    with pytest.raises(FileNotFoundError, match="has no prompt embeddings"):
        Encoder.from_run(run.root)
    tail = get_encoder(EncoderConfig(long_prompt="tail"))
    emb = embed_table(table, tail, run.embeddings, progress=None)
    manifest = json.loads((run.embeddings / "manifest.json").read_text())
    assert manifest["long_prompt"] == "tail" and manifest["encoder_id"] == tail.encoder_id
    served = Encoder.from_run(run.root, batch_size=8)
    assert served.encoder_id == tail.encoder_id and served.cfg.long_prompt == "tail" and served.cfg.batch_size == 8
    np.testing.assert_allclose(served.encode(list(table.texts)), emb, atol=1e-5)  # serving embeds as training did
    np.testing.assert_array_equal(load_run_embeddings(run.root), emb)


def test_a_second_run_on_the_same_prompts_encodes_nothing(encoder, tmp_path, monkeypatch):
    monkeypatch.setenv("CSCR_CACHE_DIR", str(tmp_path / "user"))
    assert shared_embedding_dir() == tmp_path / "user" / "embeddings"
    enc = Counting(encoder)
    texts = TEXTS + LONG
    first = embed_table(_table(texts), enc, tmp_path / "run1" / "embeddings", progress=None)
    assert enc.encoded == len(texts)
    lines: list[str] = []
    # another run, other prompt ids, the same texts: every vector comes from the user cache
    second = embed_table(_table(texts, ids=[f"q{i}" for i in range(len(texts))]), enc,
                         tmp_path / "run2" / "embeddings", progress=lines.append)
    assert enc.encoded == len(texts)
    np.testing.assert_array_equal(second, first)
    assert any(f"{len(texts)} from the shared cache" in m and "0 to encode" in m for m in lines)
    assert EmbeddingCache(tmp_path / "run2" / "embeddings", encoder.encoder_id).shards()  # the run's own copy
    # keyed by encoder id: another long-prompt mode shares nothing
    other = Counting(get_encoder(EncoderConfig(long_prompt="tail")))
    embed_table(_table(texts), other, tmp_path / "run3" / "embeddings", progress=None)
    assert other.encoded == len(texts)
    # a folder of its own, or none
    embed_table(_table(texts), enc, tmp_path / "run4" / "embeddings", progress=None, shared=False)
    assert enc.encoded == 2 * len(texts)
    embed_table(_table(texts[:2]), enc, tmp_path / "run5" / "embeddings", progress=None, shared=tmp_path / "mine")
    assert enc.encoded == 2 * len(texts) + 2
    assert EmbeddingCache(tmp_path / "mine", encoder.encoder_id).shards()
