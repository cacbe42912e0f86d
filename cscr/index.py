"""The expert index (SPEC.md section 5): a FAISS inner-product index over unit expert descriptors.

Experts are addressed by name; positions follow the order in which they were added (``names``).
Adding, removing or replacing an expert is an index update, nothing is retrained. The index is
exact (``IndexFlatIP``) and rebuilt from the descriptor matrix on every change: pools are tens to
thousands of experts, so a rebuild costs O(M D') and keeps positions dense for every backend.
On a machine with faiss-gpu and CUDA the search runs on a ``GpuIndexFlatIP`` (``use_gpu=None``
picks it automatically; ``use_gpu=True`` without a GPU is an error).

On disk (a folder): ``index.faiss`` (the CPU index) and ``manifest.json`` naming the pool (expert
names in index order), the dimension, the descriptor kind and a pool checksum. ``load`` refuses an
index built for another pool or dimension.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from cscr.atomic import atomic_dir


class ExpertIndexError(ValueError):
    """Bad use of the expert index (unknown or duplicate expert, wrong dimension, mismatched pool)."""


def gpu_available() -> bool:
    """True when this faiss build has GPU support and sees a CUDA device."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def pool_checksum(names: Sequence[str], dim: int) -> str:
    return hashlib.sha256(("\x1f".join(names) + f"\x1e{dim}").encode()).hexdigest()[:16]


def _unit_rows(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x / np.maximum(norms, 1e-12))


class ExpertIndex:
    """Named expert descriptors in a FAISS IndexFlatIP; ``search(q, k) -> (scores, positions)``."""

    def __init__(self, dim: int, use_gpu: bool | None = None, kind: str = "") -> None:
        if int(dim) < 1:
            raise ExpertIndexError(f"index dimension must be >= 1, got {dim}")
        if use_gpu and not gpu_available():
            raise ExpertIndexError("use_gpu=True but faiss has no GPU support or no CUDA device is visible "
                                   "(install the `gpu` extra: faiss-gpu)")
        self.dim = int(dim)
        self.kind = kind  # descriptor kind, recorded in the manifest
        self.use_gpu = gpu_available() if use_gpu is None else bool(use_gpu)
        self.names: list[str] = []
        self._vecs = np.zeros((0, self.dim), dtype=np.float32)  # (M, D') unit rows
        self._gpu_res: Any = None
        self._index: faiss.Index = self._build()

    @staticmethod
    def from_descriptors(descriptors: Mapping[str, np.ndarray], use_gpu: bool | None = None,
                         kind: str = "") -> ExpertIndex:
        if not descriptors:
            raise ExpertIndexError("no expert descriptors to index")
        dim = int(np.asarray(next(iter(descriptors.values()))).size)
        index = ExpertIndex(dim, use_gpu=use_gpu, kind=kind)
        index.add_many(descriptors)
        return index

    # ---- the faiss index ----
    def _build(self) -> faiss.Index:
        cpu = faiss.IndexFlatIP(self.dim)
        if len(self._vecs):
            cpu.add(self._vecs)
        if not self.use_gpu:
            return cpu
        if self._gpu_res is None:
            self._gpu_res = faiss.StandardGpuResources()
        return faiss.index_cpu_to_gpu(self._gpu_res, 0, cpu)

    def _check_vec(self, name: str, vec: np.ndarray) -> np.ndarray:
        v = np.asarray(vec, dtype=np.float32).reshape(-1)
        if v.size != self.dim:
            raise ExpertIndexError(f"descriptor of {name!r} has dimension {v.size}, the index {self.dim}")
        if not np.isfinite(v).all():
            raise ExpertIndexError(f"descriptor of {name!r} has NaN or infinite values")
        return v

    # ---- pool updates ----
    def __len__(self) -> int:
        return len(self.names)

    def __contains__(self, name: object) -> bool:
        return name in self.names

    def add(self, name: str, descriptor: np.ndarray) -> None:
        self.add_many({name: descriptor})

    def add_many(self, descriptors: Mapping[str, np.ndarray]) -> None:
        dup = sorted(set(descriptors) & set(self.names))
        if dup:
            raise ExpertIndexError(f"expert(s) {dup} already in the index: use replace()")
        if not descriptors:
            return
        new = np.stack([self._check_vec(n, v) for n, v in descriptors.items()])  # (m, D')
        self._vecs = np.concatenate([self._vecs, _unit_rows(new)])
        self.names = self.names + list(descriptors)
        self._index = self._build()

    def remove(self, name: str) -> None:
        pos = self.position(name)
        self._vecs = np.delete(self._vecs, pos, axis=0)
        self.names = self.names[:pos] + self.names[pos + 1:]
        self._index = self._build()

    def replace(self, name: str, descriptor: np.ndarray) -> None:
        pos = self.position(name)
        self._vecs[pos] = _unit_rows(self._check_vec(name, descriptor)[None, :])[0]
        self._index = self._build()

    def position(self, name: str) -> int:
        if name not in self.names:
            raise ExpertIndexError(f"unknown expert {name!r}; the index holds {self.names}")
        return self.names.index(name)

    def vectors(self) -> np.ndarray:
        """(M, D') unit descriptors in index order (a copy)."""
        return self._vecs.copy()

    # ---- search ----
    def search(self, q: np.ndarray, k: int, candidates: Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(scores (n, k) float32, positions (n, k) int64) of the k experts with the highest
        ``q . d_m``, best first; only among ``candidates`` when given. Positions are -1 (score
        -inf) where fewer than k experts are available."""
        q = np.ascontiguousarray(np.asarray(q, dtype=np.float32))
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ExpertIndexError(f"queries must be (n, {self.dim}), got {q.shape}")
        if not self.names:
            raise ExpertIndexError("the expert index is empty")
        if int(k) < 1:
            raise ExpertIndexError(f"k must be >= 1, got {k}")
        if candidates is None:
            allowed = None
            k_eff = min(int(k), len(self.names))
        else:
            unknown = sorted(set(candidates) - set(self.names))
            if unknown:
                raise ExpertIndexError(f"unknown candidate expert(s) {unknown}; the index holds {self.names}")
            allowed = np.array(sorted({self.names.index(c) for c in candidates}), dtype=np.int64)
            if allowed.size == 0:
                raise ExpertIndexError("empty candidate list")
            k_eff = min(int(k), allowed.size)
        n = q.shape[0]
        if allowed is None:
            scores, pos = self._index.search(q, k_eff)
        elif not self.use_gpu:
            params = faiss.SearchParameters(sel=faiss.IDSelectorBatch(allowed))  # type: ignore[call-arg]
            scores, pos = self._index.search(q, k_eff, params=params)
        else:  # the GPU flat index takes no ID selector: search the whole (small) pool and filter
            scores_all, pos_all = self._index.search(q, len(self.names))
            keep = np.isin(pos_all, allowed)
            order = np.argsort(~keep, axis=1, kind="stable")[:, :k_eff]
            scores, pos = np.take_along_axis(scores_all, order, 1), np.take_along_axis(pos_all, order, 1)
        out_s = np.full((n, int(k)), -np.inf, dtype=np.float32)
        out_p = np.full((n, int(k)), -1, dtype=np.int64)
        out_s[:, :k_eff], out_p[:, :k_eff] = scores, pos
        return out_s, out_p

    def search_names(self, q: np.ndarray, k: int, candidates: Sequence[str] | None = None
                     ) -> tuple[np.ndarray, list[list[str]]]:
        """(scores (n, k), expert names per query, best first; fewer where the pool is smaller)."""
        scores, pos = self.search(q, k, candidates)
        return scores, [[self.names[p] for p in row if p >= 0] for row in pos]

    # ---- persistence ----
    def manifest(self) -> dict:
        return {"pool": list(self.names), "dimension": self.dim, "kind": self.kind, "metric": "inner_product",
                "checksum": pool_checksum(self.names, self.dim), "faiss": faiss.__version__,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}

    def save(self, folder: str | os.PathLike[str]) -> Path:
        """Write ``index.faiss`` + ``manifest.json`` into ``folder`` atomically (folder swap)."""
        def write(tmp: Path) -> None:
            cpu = faiss.IndexFlatIP(self.dim)
            if len(self._vecs):
                cpu.add(self._vecs)
            faiss.write_index(cpu, str(tmp / "index.faiss"))
            (tmp / "manifest.json").write_text(json.dumps(self.manifest(), indent=2))

        return atomic_dir(folder, write)

    @staticmethod
    def load(folder: str | os.PathLike[str], pool: Sequence[str] | None = None, dim: int | None = None,
             use_gpu: bool | None = None) -> ExpertIndex:
        """Load a saved index; refuse it when ``pool`` (names, in any order) or ``dim`` differ."""
        folder = Path(folder)
        mpath, ipath = folder / "manifest.json", folder / "index.faiss"
        if not mpath.exists() or not ipath.exists():
            raise ExpertIndexError(f"{folder} is not an expert index (needs manifest.json and index.faiss)")
        man = json.loads(mpath.read_text())
        names, d = list(man["pool"]), int(man["dimension"])
        if dim is not None and int(dim) != d:
            raise ExpertIndexError(f"index at {folder} was built for dimension {d}, expected {dim} "
                                   "(descriptors of another kind or basis?): rebuild it")
        if pool is not None and sorted(pool) != sorted(names):
            extra, missing = sorted(set(names) - set(pool)), sorted(set(pool) - set(names))
            raise ExpertIndexError(f"index at {folder} was built for another pool: it has {extra or 'no'} extra and "
                                   f"lacks {missing or 'no'} expert(s) compared with the expected pool; rebuild it")
        cpu = faiss.read_index(str(ipath))
        if cpu.d != d or cpu.ntotal != len(names) or man.get("checksum") != pool_checksum(names, d):
            raise ExpertIndexError(f"index at {folder} does not match its manifest (d={cpu.d}, n={cpu.ntotal}, "
                                   f"manifest: {len(names)} experts, dimension {d})")
        index = ExpertIndex(d, use_gpu=use_gpu, kind=man.get("kind", ""))
        vecs = cpu.reconstruct_n(0, cpu.ntotal) if cpu.ntotal else np.zeros((0, d), dtype=np.float32)
        index.add_many(dict(zip(names, vecs, strict=True)))
        return index
