"""A lexical view of the prompt beside the encoder's (beyond the write-up, labelled so; issue 10).

MiniLM sees meaning, not form: "a desert environment has low" (OpenBookQA) and "Where would you find
a steak house?" (CommonsenseQA) embed alike, and the tasks they come from are answered differently
well by different experts. The lexical view keeps what the encoder drops: character n-grams
(2 to 4, within word boundaries, lower-cased) of the whole prompt, TF-IDF weighted (sublinear term
frequency, L2 rows), projected to ``dims`` dimensions by a truncated SVD and renormalised.

The view is fitted on the run's **train** split only (the texts, no outcomes) by ``cscr prepare``
and stored beside the embeddings (``<run>/embeddings/lexical/``); a router's prompt features are
then ``[Phi(x), w * lex(x)]``, for every router of the run alike (the baselines read the same
features). Training and evaluation read them through ``load_run_embeddings``; serving and ``cscr
route`` through ``for_run`` (in ``Encoder.from_run`` and ``RouterService.from_run``), which
wraps the encoder with the run's view (``WithLexical``): one function, ``LexicalView.transform``,
makes the lexical half everywhere.

An option, off by default (``cscr prepare --lexical-dims 128`` switches it on). By 5-fold
cross-validation on train + val (docs/routing-quality.md) it raises CSCR's AUDC over the trained
experts (+0.003 RouterBench, +0.004 LLMRouter, -0.001 RouteLLM) but lowers it over experts that
join later by their descriptors (RouterBench unseen experts -0.018): the head leans on the form of
the seen experts' tasks, which says nothing about a new expert. Smaller views (32 dims) keep the
unseen figure and lose the in-distribution gain. For a fixed pool, switch it on; for a pool that
grows by fingerprinting, leave it off.

    <run>/embeddings/lexical/
      lexical.json      config, vocabulary (n-grams in column order), the rows it was fitted on
      idf.npy           (V,) float32 inverse document frequencies
      components.npy    (dims, V) float32 SVD projection
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cscr.atomic import atomic_dir

FOLDER = "lexical"


@dataclass(frozen=True)
class LexicalConfig:
    dims: int = 128  # SVD dimensions when the view is on (0: no lexical view; cscr prepare's default)
    ngram_min: int = 2
    ngram_max: int = 4
    max_features: int = 16384  # most frequent n-grams kept
    min_df: int = 2  # an n-gram must occur in at least this many train prompts
    weight: float = 1.0  # the lexical half's norm beside the unit encoder vector

    def __post_init__(self) -> None:
        if self.dims < 0:
            raise ValueError(f"lexical dims must be >= 0, got {self.dims}")
        if not 1 <= self.ngram_min <= self.ngram_max:
            raise ValueError(f"lexical n-gram range must satisfy 1 <= min <= max, got {self.ngram_min}..{self.ngram_max}")
        if self.max_features < 2 or self.min_df < 1:
            raise ValueError("lexical max_features must be >= 2 and min_df >= 1")
        if not (np.isfinite(self.weight) and self.weight > 0):
            raise ValueError(f"lexical weight must be a finite number > 0, got {self.weight}")


def _counter(cfg: LexicalConfig, vocabulary: Sequence[str]) -> Any:
    """The n-gram counter of a view: counts of ``vocabulary``'s n-grams, in its column order."""
    from sklearn.feature_extraction.text import CountVectorizer

    return CountVectorizer(analyzer="char_wb", ngram_range=(cfg.ngram_min, cfg.ngram_max), lowercase=True,
                           vocabulary={g: i for i, g in enumerate(vocabulary)}, dtype=np.float32)


class LexicalView:
    """A fitted view: ``transform(texts) -> (n, dims)`` float32 rows of norm ``weight``."""

    def __init__(self, cfg: LexicalConfig, vocabulary: Sequence[str], idf: np.ndarray, components: np.ndarray,
                 fitted_on: int = 0) -> None:
        self.cfg = cfg
        self.vocabulary = list(vocabulary)
        self.idf = np.asarray(idf, dtype=np.float32)
        self.components = np.asarray(components, dtype=np.float32)
        self.fitted_on = int(fitted_on)
        if self.idf.shape != (len(self.vocabulary),) or self.components.shape[1:] != (len(self.vocabulary),):
            raise ValueError(f"lexical view: vocabulary {len(self.vocabulary)}, idf {self.idf.shape}, "
                             f"components {self.components.shape} do not agree")
        self._counts = _counter(cfg, self.vocabulary)

    @property
    def dims(self) -> int:
        return int(self.components.shape[0])

    @property
    def digest(self) -> str:
        """A short hash of the fitted view (what a cache or a check can key on)."""
        h = hashlib.sha256(json.dumps([asdict(self.cfg), self.vocabulary]).encode())
        h.update(self.idf.tobytes())
        h.update(self.components.tobytes())
        return h.hexdigest()[:12]

    def info(self) -> dict[str, Any]:
        return {"dims": self.dims, "vocabulary": len(self.vocabulary), "fitted_on": self.fitted_on,
                "digest": self.digest, "config": asdict(self.cfg)}

    @staticmethod
    def _tfidf(counts: Any, idf: np.ndarray) -> Any:
        """Sublinear TF (1 + log tf) times IDF, L2 rows (sparse CSR in, sparse CSR out)."""
        x = counts.tocsr().astype(np.float32)
        x.data = 1.0 + np.log(x.data)
        x = x.multiply(idf[None, :]).tocsr()
        norms = np.sqrt(np.asarray(x.multiply(x).sum(axis=1)).ravel())
        inv = np.where(norms > 0, 1.0 / np.maximum(norms, 1e-12), 0.0).astype(np.float32)
        return x.multiply(inv[:, None]).tocsr()

    def transform(self, texts: Sequence[str]) -> np.ndarray:
        texts = [str(t) for t in texts]
        if not texts:
            return np.zeros((0, self.dims), dtype=np.float32)
        z = np.asarray(self._tfidf(self._counts.transform(texts), self.idf) @ self.components.T, dtype=np.float32)
        norms = np.linalg.norm(z, axis=1, keepdims=True)
        return (z / np.maximum(norms, 1e-12) * np.float32(self.cfg.weight)).astype(np.float32)

    @classmethod
    def fit(cls, texts: Sequence[str], cfg: LexicalConfig | None = None) -> LexicalView | None:
        """The view fitted on ``texts`` (a run's train prompts); None when ``cfg.dims`` is 0 or the
        texts are too few or too alike to give at least 2 dimensions."""
        from sklearn.decomposition import TruncatedSVD
        from sklearn.feature_extraction.text import TfidfVectorizer

        cfg = cfg or LexicalConfig()
        texts = [str(t) for t in texts]
        if cfg.dims == 0 or len(texts) < 3:
            return None
        tf = TfidfVectorizer(analyzer="char_wb", ngram_range=(cfg.ngram_min, cfg.ngram_max), lowercase=True,
                             min_df=cfg.min_df, max_features=cfg.max_features, sublinear_tf=True)
        try:
            tf.fit(texts)
        except ValueError:  # no n-gram occurs in min_df texts
            return None
        vocab = sorted(tf.vocabulary_, key=tf.vocabulary_.__getitem__)
        idf = np.asarray(tf.idf_, dtype=np.float32)
        dims = min(cfg.dims, len(vocab) - 1, len(texts) - 1)
        if dims < 2:
            return None
        counts = _counter(cfg, vocab).transform(texts)
        svd = TruncatedSVD(dims, algorithm="randomized", n_iter=7, random_state=0).fit(cls._tfidf(counts, idf))
        return cls(cfg, vocab, idf, svd.components_, fitted_on=len(texts))

    # ---- storage ----
    def save(self, embeddings_dir: str | os.PathLike[str]) -> Path:
        def write(tmp: Path) -> None:
            (tmp / "lexical.json").write_text(json.dumps({
                "config": asdict(self.cfg), "fitted_on": self.fitted_on, "digest": self.digest,
                "vocabulary": self.vocabulary}))
            np.save(tmp / "idf.npy", self.idf)
            np.save(tmp / "components.npy", self.components)

        return atomic_dir(Path(embeddings_dir) / FOLDER, write)

    @classmethod
    def load(cls, embeddings_dir: str | os.PathLike[str]) -> LexicalView | None:
        """The run's view (``<run>/embeddings``), None when it has none; clear error when damaged."""
        folder = Path(embeddings_dir) / FOLDER
        if not folder.exists():
            return None
        try:
            meta = json.loads((folder / "lexical.json").read_text())
            view = cls(LexicalConfig(**meta["config"]), meta["vocabulary"], np.load(folder / "idf.npy"),
                       np.load(folder / "components.npy"), meta.get("fitted_on", 0))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{folder}: the lexical view is damaged ({exc}): re-run `cscr prepare`") from exc
        if meta.get("digest") not in (None, view.digest):
            raise ValueError(f"{folder}: the lexical view does not match its digest: re-run `cscr prepare`")
        return view


def remove(embeddings_dir: str | os.PathLike[str]) -> None:
    """Remove a run's lexical view (``cscr prepare --lexical-dims 0``)."""
    import shutil

    folder = Path(embeddings_dir) / FOLDER
    if folder.exists():
        shutil.rmtree(folder)


def features(base: np.ndarray, texts: Sequence[str], view: LexicalView | None) -> np.ndarray:
    """A router's prompt features: ``[base, view(texts)]``, or ``base`` when there is no view."""
    base = np.asarray(base, dtype=np.float32)
    if view is None:
        return base
    return np.hstack([base, view.transform(texts)]).astype(np.float32)


def refit_features(base: np.ndarray, texts: Sequence[str], view: LexicalView | None,
                   fit_rows: np.ndarray) -> np.ndarray:
    """The encoder's vectors ``base`` (n, d) with a lexical half refitted, in ``view``'s
    configuration, on the texts of ``fit_rows`` only: for an experiment that trains on fewer rows
    than the run's train split (held-out groups must not shape the view, not even by their texts).
    ``base`` unchanged when the run has no view."""
    if view is None:
        return np.asarray(base, dtype=np.float32)
    texts = [str(t) for t in texts]
    return features(base, texts, LexicalView.fit([texts[i] for i in fit_rows], view.cfg))


class WithLexical:
    """An encoder whose ``encode`` appends a run's lexical view (``Encoder.from_run``); every
    other attribute is the wrapped encoder's (its id is the run's encoder id)."""

    def __init__(self, encoder: Any, view: LexicalView) -> None:
        self.encoder = encoder
        self.view = view

    def __getattr__(self, name: str) -> Any:
        return getattr(self.encoder, name)

    @property
    def dim(self) -> int:
        return int(self.encoder.dim) + self.view.dims

    def encode(self, texts: Sequence[str], show_progress: bool = False) -> np.ndarray:
        texts = [str(t) for t in texts]
        return features(self.encoder.encode(texts, show_progress=show_progress), texts, self.view)

    def info(self) -> dict[str, Any]:
        return {**self.encoder.info(), "lexical": self.view.info()}


def for_run(encoder: Any, run_dir: str | os.PathLike[str]) -> Any:
    """``encoder`` with the run's lexical view appended (unchanged when the run has none, or when
    ``encoder`` already appends that view); clear error when it appends another view."""
    from cscr.runs.paths import RunPaths

    view = LexicalView.load(RunPaths.of(run_dir).embeddings)
    have = encoder.view if isinstance(encoder, WithLexical) else None
    if have is not None:
        if view is None or have.digest != view.digest:
            raise ValueError(f"the encoder appends lexical view {have.digest}, the run {run_dir} "
                             f"{'has none' if view is None else 'was made with ' + view.digest}")
        return encoder
    return encoder if view is None else WithLexical(encoder, view)


def fit_for_table(table: Any, embeddings_dir: str | os.PathLike[str], cfg: LexicalConfig | None = None,
                  rows: np.ndarray | None = None) -> LexicalView | None:
    """Fit the view on the table's train prompts (or ``rows``) and store it in ``embeddings_dir``
    (removing any old one when no view results)."""
    rows = table.split_index("train") if rows is None else rows
    view = LexicalView.fit(table.texts[rows], cfg)
    if view is None:
        remove(embeddings_dir)
    else:
        view.save(embeddings_dir)
    return view
