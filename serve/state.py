"""The live pool as one durable, versioned record (plain code: no Ray, no HTTP).

    record = PoolRecord(version=1, experts=[PoolEntry(spec=..., cost=0.3), ...])
    store = PoolStore(state_dir)
    store.save(record)            # <state_dir>/pool.json, atomically (cscr.atomic)
    store.load()                  # the latest saved version, or None

A ``PoolEntry`` is one served expert: its spec (backend, model, resources), its normalised cost,
its descriptor (None: the trained run's index holds it) and the Serve application that runs it
(None: the main application). Every admin change makes a new record with ``version + 1``;
``PoolStore.save`` refuses a version that is not newer than the stored one, so an older writer
can never overwrite a newer pool. Each saved version is also kept as ``history/v<N>.json``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from cscr.atomic import atomic_write_text
from cscr.pool import ExpertSpec

STATE_FILE = "pool.json"


class PoolStateError(ValueError):
    """A stored pool record that cannot be read, or a write that would go back in time."""


class PoolEntry(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    spec: ExpertSpec
    cost: float = Field(ge=0)  # normalised cost c_m
    descriptor: list[float] | None = None  # None: the run's expert index holds it
    app: str | None = None  # Serve application of its deployment (None: the main application)

    @property
    def name(self) -> str:
        return self.spec.name


class PoolRecord(BaseModel):
    """The live pool: what every Router and Ingress replica serves."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    version: int = Field(ge=1)
    experts: list[PoolEntry]

    def names(self) -> list[str]:
        return [e.name for e in self.experts]

    def entry(self, name: str) -> PoolEntry | None:
        return next((e for e in self.experts if e.name == name), None)

    def with_expert(self, entry: PoolEntry) -> PoolRecord:
        if self.entry(entry.name) is not None:
            raise PoolStateError(f"expert {entry.name!r} is already in the pool")
        return PoolRecord(version=self.version + 1, experts=[*self.experts, entry])

    def without_expert(self, name: str) -> PoolRecord:
        if self.entry(name) is None:
            raise PoolStateError(f"expert {name!r} is not in the pool")
        return PoolRecord(version=self.version + 1, experts=[e for e in self.experts if e.name != name])

    def summary(self) -> dict[str, object]:
        """Version and expert names (what the fault tables and logs show)."""
        return {"version": self.version, "experts": sorted(self.names())}


class PoolStore:
    """The durable copy of the live pool in one folder (the run's ``serve-state/`` or ``--state-dir``)."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)

    @property
    def path(self) -> Path:
        return self.folder / STATE_FILE

    def load(self) -> PoolRecord | None:
        if not self.path.is_file():
            return None
        try:
            return PoolRecord.model_validate(json.loads(self.path.read_text()))
        except (OSError, ValueError) as exc:
            raise PoolStateError(f"{self.path}: not a readable pool record ({exc}); move it away "
                                 "to start from the pool file") from None

    def save(self, record: PoolRecord) -> Path:
        """Write ``record`` atomically; refuse one that is not newer than the stored record."""
        stored = self.load()
        if stored is not None and record.version <= stored.version and record != stored:
            raise PoolStateError(f"pool version {record.version} is not newer than the stored "
                                 f"version {stored.version}")
        text = record.model_dump_json(indent=2)
        atomic_write_text(self.folder / "history" / f"v{record.version:06d}.json", text)
        return atomic_write_text(self.path, text)


class VersionConflict(PoolStateError):
    """A change was made against a version that is no longer the latest (compare-and-set lost)."""


class PoolState:
    """The live record, its durable copy and who serves which version (plain asyncio).

    - ``commit(expected, record)``: compare-and-set (``expected`` must be the current version and
      ``record.version == expected + 1``), then persisted, then announced to the waiters;
    - ``wait_for_version(seen, timeout_s)``: long poll, returns the record as soon as its version
      differs from ``seen`` (or the current one after ``timeout_s``);
    - ``ack(replica, role, version)``: a replica serves ``version`` (each poll is also a heartbeat);
    - ``converged(version, timeout_s)``: waits until every live replica (one that acked within
      ``stale_s``) serves ``version`` or newer; says which did and which did not.
    """

    def __init__(self, initial: PoolRecord, store: PoolStore | None = None, stale_s: float = 12.0) -> None:
        import asyncio

        stored = store.load() if store is not None else None
        self.record = stored if stored is not None else initial
        self.store = store
        if store is not None and stored is None:
            store.save(self.record)
        self.stale_s = stale_s
        self._changed = asyncio.Condition()
        self.acks: dict[str, tuple[str, int, float]] = {}  # replica -> (role, version, monotonic time)

    async def get(self) -> PoolRecord:
        return self.record

    async def commit(self, expected: int, record: PoolRecord) -> PoolRecord:
        if expected != self.record.version:
            raise VersionConflict(f"the pool changed meanwhile (version {self.record.version}, "
                                  f"this change was made against {expected}): retry")
        if record.version != expected + 1:
            raise PoolStateError(f"a change of version {expected} must make version {expected + 1}, "
                                 f"not {record.version}")
        if self.store is not None:
            self.store.save(record)  # durable before anyone serves it
        self.record = record
        async with self._changed:
            self._changed.notify_all()
        return record

    async def wait_for_version(self, seen: int, timeout_s: float = 5.0) -> PoolRecord:
        import asyncio
        import contextlib

        if self.record.version == seen:
            async with self._changed:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait_for(lambda: self.record.version != seen),
                                           timeout_s)
        return self.record

    async def ack(self, replica: str, role: str, version: int) -> None:
        import time

        self.acks[replica] = (role, version, time.monotonic())
        async with self._changed:
            self._changed.notify_all()

    def live(self) -> dict[str, tuple[str, int]]:
        import time

        now = time.monotonic()
        return {r: (role, v) for r, (role, v, t) in self.acks.items() if now - t <= self.stale_s}

    async def replicas(self) -> dict[str, dict[str, object]]:
        return {r: {"role": role, "version": v} for r, (role, v) in sorted(self.live().items())}

    async def converged(self, version: int, timeout_s: float = 30.0) -> dict[str, list[str]]:
        """{"serving": replicas on ``version`` or newer, "lagging": live replicas that are not}."""
        import asyncio
        import contextlib

        def lagging() -> list[str]:
            return sorted(r for r, (_, v) in self.live().items() if v < version)

        async with self._changed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait_for(lambda: not lagging()), timeout_s)
        late = lagging()
        return {"serving": sorted(r for r in self.live() if r not in late), "lagging": late}
