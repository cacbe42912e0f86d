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

A record also carries the operating-point table of its pool (``operating_points``: the JSON of
``cscr.operating.OperatingTable``; issue 11). A change makes a record without one; the first
Router replica that serves the new version computes it (``cscr.operating_run.calibrate`` on the
run's validation prompts, an added expert's columns estimated from its descriptor) and attaches
it to that same version (``PoolState.attach_table``); every later replica, and every restart,
takes the stored table instead of recomputing it.

``SpendBook`` is the per-API-key spend tally of ``serve.budgets`` shared by every ingress
replica (it lives beside the record in the controller), persisted as ``spend.json``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

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
    probe_outcomes: list[float | None] | None = None  # its answers on the run's probe prompts (cscr/newcomer.py)
    app: str | None = None  # Serve application of its deployment (None: the main application)

    @property
    def name(self) -> str:
        return self.spec.name


class PoolRecord(BaseModel):
    """The live pool: what every Router and Ingress replica serves."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    version: int = Field(ge=1)
    experts: list[PoolEntry]
    # the operating-point table of this pool (cscr.operating.OperatingTable.to_json); None: not yet computed
    operating_points: dict[str, Any] | None = None

    def table_names(self) -> list[str] | None:
        """The experts the attached table covers (None: no table)."""
        if self.operating_points is None:
            return None
        return [str(p["name"]) for p in self.operating_points.get("pool", [])]

    def with_table(self, table: dict[str, Any]) -> PoolRecord:
        """This version with its pool's operating-point table attached."""
        names = [str(p["name"]) for p in table.get("pool", [])]
        if sorted(names) != sorted(self.names()):
            raise PoolStateError(f"the operating-point table covers {names}, pool version {self.version} "
                                 f"has {self.names()}")
        return self.model_copy(update={"operating_points": table})

    def names(self) -> list[str]:
        return [e.name for e in self.experts]

    def entry(self, name: str) -> PoolEntry | None:
        return next((e for e in self.experts if e.name == name), None)

    def with_expert(self, entry: PoolEntry) -> PoolRecord:
        if self.entry(entry.name) is not None:
            raise PoolStateError(f"expert {entry.name!r} is already in the pool")
        return PoolRecord(version=self.version + 1, experts=[*self.experts, entry])  # its table: not yet

    def without_expert(self, name: str) -> PoolRecord:
        if self.entry(name) is None:
            raise PoolStateError(f"expert {name!r} is not in the pool")
        return PoolRecord(version=self.version + 1, experts=[e for e in self.experts if e.name != name])

    def summary(self) -> dict[str, object]:
        """Version and expert names (what the fault tables and logs show)."""
        return {"version": self.version, "experts": sorted(self.names())}

    def same_pool(self, other: PoolRecord) -> bool:
        """The same version and experts (the operating-point table aside)."""
        return self.version == other.version and self.experts == other.experts


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
        if (stored is not None and record.version <= stored.version and record != stored
                and not (record.same_pool(stored) and record.operating_points is not None)):  # a table attached
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
        # a graceful stop (``drain``): every ingress refuses new requests (503, retry) and reports
        # the requests it still serves; the server closes its port once they are done
        self.draining_since: float | None = None
        self.inflight: dict[str, tuple[int, float]] = {}  # ingress replica -> (requests in flight, when said)

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

    async def attach_table(self, version: int, table: dict[str, Any]) -> bool:
        """Attach the operating-point table of pool ``version`` (persisted); False when that version
        is no longer the current one or already has a table for its pool (first writer wins)."""
        if version != self.record.version or self.record.operating_points is not None:  # with_table: it covers the pool
            return False
        record = self.record.with_table(table)
        if self.store is not None:
            self.store.save(record)
        self.record = record
        return True

    async def wait_for_version(self, seen: int, timeout_s: float = 5.0) -> PoolRecord:
        import asyncio
        import contextlib

        if self.record.version == seen:
            async with self._changed:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait_for(lambda: self.record.version != seen),
                                           timeout_s)
        return self.record

    async def ack(self, replica: str, role: str, version: int, inflight: int | None = None) -> None:
        import time

        now = time.monotonic()
        self.acks[replica] = (role, version, now)
        if inflight is not None:
            self.inflight[replica] = (int(inflight), now)
        async with self._changed:
            self._changed.notify_all()

    # ---- graceful stop ----
    @property
    def draining(self) -> bool:
        return self.draining_since is not None

    async def drain(self) -> None:
        """Start a graceful stop: followers learn it at once (``poll``)."""
        import time

        if self.draining_since is None:
            self.draining_since = time.monotonic()
        async with self._changed:
            self._changed.notify_all()

    async def poll(self, seen: int, draining: bool, timeout_s: float = 5.0) -> tuple[PoolRecord, bool]:
        """Long poll of a follower: (the record, whether the server drains) as soon as either
        differs from what it has (``seen``, ``draining``), else after ``timeout_s``."""
        import asyncio
        import contextlib

        def changed() -> bool:
            return self.record.version != seen or self.draining != draining

        if not changed():
            async with self._changed:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait_for(changed), timeout_s)
        return self.record, self.draining

    async def drained(self, timeout_s: float = 1.0) -> dict[str, object]:
        """Waits up to ``timeout_s`` until every live ingress replica has said, since the drain
        began, that it serves no request; {"drained": bool, "inflight": {replica: requests}}."""
        import asyncio
        import contextlib

        def pending() -> dict[str, int]:
            since = self.draining_since if self.draining_since is not None else float("inf")
            out = {}
            for replica, (role, _) in self.live().items():
                if role != "Ingress":
                    continue
                n, when = self.inflight.get(replica, (1, float("-inf")))
                if when < since or n > 0:
                    out[replica] = n if when >= since else -1  # -1: not heard from since the drain began
            return out

        async with self._changed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait_for(lambda: not pending()), timeout_s)
        left = pending()
        return {"drained": self.draining and not left, "inflight": left}

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


SPEND_FILE = "spend.json"


class SpendBook:
    """Spend per API-key name, shared by every ingress replica (``serve.budgets``), in the run's
    cost unit. With a folder, the tally is loaded from ``spend.json`` at start and written back
    atomically by a charge that comes ``flush_s`` or more after the last write, and by ``flush``
    (the controller flushes when the server drains): a graceful restart of ``cscr serve`` keeps
    the whole tally, a crash loses the charges since the last write (delete the file to start the
    keys afresh)."""

    def __init__(self, folder: str | os.PathLike[str] | None = None, flush_s: float = 0.5) -> None:
        self.path = Path(folder) / SPEND_FILE if folder is not None else None
        self.flush_s = flush_s
        self.spent: dict[str, float] = {}
        self._dirty = False
        self._last_flush = float("-inf")  # the first charge is written at once
        if self.path is not None and self.path.is_file():
            try:
                obj = json.loads(self.path.read_text())
                self.spent = {str(k): float(v) for k, v in dict(obj.get("spent", {})).items()}
            except (OSError, ValueError, TypeError, AttributeError) as exc:
                raise PoolStateError(f"{self.path}: not a readable spend tally ({exc}); move it away to "
                                     "start every key at 0") from None

    def get(self, name: str) -> float:
        return self.spent.get(name, 0.0)

    def charge(self, name: str, amount: float) -> float:
        import math
        import time

        if not math.isfinite(amount) or amount < 0:
            raise ValueError(f"a charge must be a finite number >= 0, got {amount}")
        self.spent[name] = self.spent.get(name, 0.0) + float(amount)
        self._dirty = True
        if time.monotonic() - self._last_flush >= self.flush_s:
            self.flush()
        return self.spent[name]

    def flush(self) -> None:
        import time

        if self.path is not None and self._dirty:
            atomic_write_text(self.path, json.dumps({"spent": self.spent}, indent=2))
        self._dirty = False
        self._last_flush = time.monotonic()
