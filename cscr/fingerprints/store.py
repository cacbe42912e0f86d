"""The descriptor store: one Parquet file holding every expert descriptor of a run, of every kind.

Columns: ``expert`` (str), ``kind`` (logit | perplexity | probe-outcome | ...), ``vector``
(list<float32>), ``dimension`` (int), ``basis_id`` (what the coordinates mean: a token basis, a
probe set), ``source`` (where the vector came from, free text), ``created`` (UTC ISO time), and
the fingerprint settings as structured, nullable fields (``FingerprintSettings``: ``steps`` T,
``basis_size`` K, ``n_probes`` N, ``scorer``, ``scorer_context``, ``max_prompt_tokens``): what a
new expert's fingerprint must repeat to land in the same coordinates. One row per (expert,
kind): writing again replaces it.

Stores written before the settings had columns kept them as prose in ``source`` ("logit T=10
K=256 <model>", "perplexity scorer=<lm> N=192 <kind>"): reading such a file parses the prose
once into the fields (what it does not say stays None, e.g. N of old logit rows), and the next
write stores the columns.

Every write is a read-modify-write of the whole file under an advisory lock, renamed into place
atomically (pools are tens to thousands of experts: the file stays small). Descriptors of one
kind must share a dimension and a basis (coordinates from different bases do not compare); a
pool read across kinds must share a dimension (SPEC.md section 2: logit and perplexity
descriptors may be mixed only with N = K). Both are refused with a clear error.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cscr.atomic import atomic_write

SCHEMA = pa.schema([
    ("expert", pa.string()),
    ("kind", pa.string()),
    ("vector", pa.list_(pa.float32())),
    ("dimension", pa.int32()),
    ("basis_id", pa.string()),
    ("source", pa.string()),
    ("created", pa.string()),
    ("steps", pa.int32()),
    ("basis_size", pa.int32()),
    ("n_probes", pa.int32()),
    ("scorer", pa.string()),
    ("scorer_context", pa.string()),
    ("max_prompt_tokens", pa.int32()),
])
_REQUIRED = ("expert", "kind", "vector", "dimension", "basis_id", "source", "created")


@dataclass(frozen=True)
class FingerprintSettings:
    """How one kind of descriptor was computed (None: not applicable, or not recorded)."""

    steps: int | None = None  # T: greedy steps per probe (logit)
    basis_size: int | None = None  # K: token-basis size (logit)
    n_probes: int | None = None  # N: probe prompts (the first N of the run's probe split)
    scorer: str | None = None  # the scorer LM (perplexity)
    scorer_context: str | None = None  # none | prompt: what the scorer conditions answers on (perplexity)
    max_prompt_tokens: int | None = None  # the cut of each probe: its last tokens kept

    def to_row(self) -> dict[str, object]:
        return asdict(self)

    @staticmethod
    def of_row(row: Mapping[str, object]) -> FingerprintSettings:
        return FingerprintSettings(**{f.name: row.get(f.name) for f in fields(FingerprintSettings)})  # type: ignore[arg-type]

    def conflicts(self, other: FingerprintSettings) -> dict[str, tuple[object, object]]:
        """Settings both record with different values."""
        a, b = asdict(self), asdict(other)
        return {k: (a[k], b[k]) for k in a if a[k] is not None and b[k] is not None and a[k] != b[k]}


def settings_from_prose(kind: str, source: str) -> FingerprintSettings:
    """The settings an old store wrote as prose in ``source`` (backward compatibility)."""
    def num(key: str) -> int | None:
        m = re.search(rf"\b{key}=(\d+)", source)
        return int(m.group(1)) if m else None

    if kind == "logit" and source.startswith("logit "):
        return FingerprintSettings(steps=num("T"), basis_size=num("K"), n_probes=num("N"))
    if kind == "perplexity" and source.startswith("perplexity "):
        m = re.search(r"\bscorer=(\S+)", source)
        return FingerprintSettings(n_probes=num("N"), scorer=m.group(1) if m else None)
    return FingerprintSettings()


class DescriptorError(ValueError):
    """A descriptor write or read that would mix incompatible vectors, or asks for missing ones."""


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _vector(name: str, vector: np.ndarray | Sequence[float]) -> np.ndarray:
    v = np.asarray(vector, dtype=np.float32).reshape(-1)
    if v.size == 0:
        raise DescriptorError(f"descriptor of {name!r} is empty")
    if not np.isfinite(v).all():
        raise DescriptorError(f"descriptor of {name!r} has NaN or infinite values")
    return v


class DescriptorStore:
    """``DescriptorStore(RunPaths.of(run).descriptors)``: read and write expert descriptors."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    # ---- low level ----
    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(f".{self.path.name}.lock"), "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _rows(self) -> list[dict]:
        if not self.path.exists():
            return []
        table = pq.read_table(self.path)
        missing = sorted(set(_REQUIRED) - set(table.column_names))
        if missing:
            raise DescriptorError(f"{self.path} is not a descriptor store: missing column(s) {missing}")
        rows = table.to_pylist()
        if "steps" not in table.column_names:  # written before the settings had columns
            for r in rows:
                r.update(settings_from_prose(r["kind"], r["source"] or "").to_row())
        return rows

    def _save(self, rows: list[dict]) -> None:
        table = pa.Table.from_pylist(rows, schema=SCHEMA)
        atomic_write(self.path, lambda p: pq.write_table(table, p))

    # ---- writing ----
    def write(self, name: str, kind: str, vector: np.ndarray | Sequence[float], basis_id: str = "",
              source: str = "", settings: FingerprintSettings | None = None) -> None:
        """Write (or replace) one expert's descriptor of ``kind``."""
        self.write_many({name: vector}, kind, basis_id=basis_id, source=source, settings=settings)

    def write_many(self, vectors: Mapping[str, np.ndarray | Sequence[float]], kind: str, basis_id: str = "",
                   source: str = "", settings: FingerprintSettings | None = None) -> None:
        """Write (or replace) several experts' descriptors of one ``kind`` in one atomic update.

        Descriptors of one kind must share the dimension, the basis and the settings both rows
        record; anything else is refused (remove the old ones first)."""
        settings = settings or FingerprintSettings()
        if not kind:
            raise DescriptorError("descriptor kind must be a non-empty string")
        if not vectors:
            return
        new = {name: _vector(name, v) for name, v in vectors.items()}
        dims = {v.size for v in new.values()}
        if len(dims) > 1:
            raise DescriptorError(f"{kind} descriptors of different dimensions in one write: "
                                  f"{ {n: v.size for n, v in new.items()} }")
        dim = dims.pop()
        with self._locked():
            rows = [r for r in self._rows() if not (r["kind"] == kind and r["expert"] in new)]
            others = [r for r in rows if r["kind"] == kind]
            if others and others[0]["dimension"] != dim:
                raise DescriptorError(
                    f"{kind} descriptors in {self.path} have dimension {others[0]['dimension']} "
                    f"(e.g. {others[0]['expert']!r}), the new ones {dim}: mixing dimensions in one kind is "
                    f"refused; remove the old ones first (DescriptorStore.remove(kind={kind!r}))")
            if others and others[0]["basis_id"] != basis_id:
                raise DescriptorError(
                    f"{kind} descriptors in {self.path} use basis {others[0]['basis_id']!r}, the new ones "
                    f"{basis_id!r}: coordinates of different bases do not compare; remove the old ones first")
            clash = FingerprintSettings.of_row(others[0]).conflicts(settings) if others else {}
            if clash:
                raise DescriptorError(
                    f"{kind} descriptors in {self.path} were computed with other settings than the new ones "
                    f"(stored vs new: {clash}): they do not compare; remove the old ones first")
            created = _now()
            rows += [{"expert": n, "kind": kind, "vector": v.tolist(), "dimension": int(v.size),
                      "basis_id": basis_id, "source": source, "created": created, **settings.to_row()}
                     for n, v in new.items()]
            self._save(rows)

    def remove(self, name: str | None = None, kind: str | None = None) -> int:
        """Remove descriptors of expert ``name`` and/or ``kind`` (at least one); returns how many."""
        if name is None and kind is None:
            raise DescriptorError("remove needs an expert name, a kind, or both")
        with self._locked():
            rows = self._rows()
            keep = [r for r in rows if not ((name is None or r["expert"] == name)
                                            and (kind is None or r["kind"] == kind))]
            if len(keep) != len(rows):
                self._save(keep)
            return len(rows) - len(keep)

    # ---- reading ----
    def kinds(self) -> list[str]:
        return sorted({r["kind"] for r in self._rows()})

    def experts(self, kind: str | None = None) -> list[str]:
        return sorted({r["expert"] for r in self._rows() if kind is None or r["kind"] == kind})

    def info(self, kind: str) -> dict[str, object]:
        """Dimension, basis id, source, settings (``FingerprintSettings``) and experts of one kind
        (DescriptorError if absent)."""
        rows = [r for r in self._rows() if r["kind"] == kind]
        if not rows:
            raise DescriptorError(f"no {kind!r} descriptors in {self.path}; kinds present: {self.kinds()}")
        return {"kind": kind, "dimension": rows[0]["dimension"], "basis_id": rows[0]["basis_id"],
                "source": rows[0]["source"], "settings": self.settings(kind, rows),
                "experts": sorted(r["expert"] for r in rows)}

    def settings(self, kind: str, rows: list[dict] | None = None) -> FingerprintSettings:
        """The fingerprint settings of one kind: each field from the rows that record it."""
        rows = [r for r in (self._rows() if rows is None else rows) if r["kind"] == kind]
        if not rows:
            raise DescriptorError(f"no {kind!r} descriptors in {self.path}; kinds present: {self.kinds()}")
        merged: dict[str, object] = {}
        for r in rows:
            for k, v in FingerprintSettings.of_row(r).to_row().items():
                if v is not None:
                    merged.setdefault(k, v)
        return FingerprintSettings(**merged)  # type: ignore[arg-type]

    def read(self, kind: str | Sequence[str] | None = None,
             experts: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """{expert: vector (D,) float32} of one kind, in ``experts`` order when given.

        ``kind``: one kind; a list of kinds in priority order (a mixed pool: each expert gets the
        first kind it has); None when the store holds exactly one kind. With ``experts`` every
        named expert must have a descriptor. The vectors returned must share one dimension.
        """
        rows = self._rows()
        present = sorted({r["kind"] for r in rows})
        if kind is None:
            if len(present) > 1:
                raise DescriptorError(f"{self.path} holds several descriptor kinds {present}: name one")
            kinds = present
        else:
            kinds = [kind] if isinstance(kind, str) else list(kind)
        by_key = {(r["expert"], r["kind"]): r for r in rows}
        names = experts if experts is not None else sorted({r["expert"] for r in rows if r["kind"] in kinds})
        out: dict[str, np.ndarray] = {}
        chosen: dict[str, dict] = {}
        missing = []
        for n in names:
            hit = next((by_key[(n, k)] for k in kinds if (n, k) in by_key), None)
            if hit is None:
                missing.append(n)
                continue
            chosen[n] = hit
            out[n] = np.asarray(hit["vector"], dtype=np.float32)
        if missing:
            raise DescriptorError(f"no {'/'.join(kinds) or 'descriptor'} descriptor for expert(s) {missing} in "
                                  f"{self.path} (kinds present: {present})")
        dims = {n: r["dimension"] for n, r in chosen.items()}
        if len(set(dims.values())) > 1:
            detail = ", ".join(f"{n}: {chosen[n]['kind']} ({d})" for n, d in dims.items())
            raise DescriptorError(f"refusing to mix descriptors of different dimensions in one pool: {detail}")
        return out
