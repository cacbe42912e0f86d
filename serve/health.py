"""Which experts take requests now: a circuit breaker per expert, with a cooldown.

In the style of LiteLLM's cooldowns. Per expert name:

- **closed** (healthy): every request may call it. ``failures`` failures in a row (errors or
  timeouts), or one ``ExpertUnavailable`` (its replicas are dead, or none took the request
  within the connect timeout), open the circuit;
- **open**: the expert is skipped at once, without a call, for ``cooldown_s`` seconds;
- **half-open**: after the cooldown one request is let through as a trial (the others still
  skip it); a success closes the circuit, a failure opens it for another cooldown.

A client error of the expert (a prompt longer than its context: a 4xx) is an answer, not a
failure. The breaker is a plain object, no Ray and no I/O; ``CompletionService`` owns one.

Several ingress replicas share what their breakers learn through a ``CircuitBoard`` (kept by the
pool controller, as LiteLLM's cooldowns live in a shared cache): a replica whose circuit opens
posts it (``opened``), one whose trial succeeds posts the close (``closed``); every replica long-polls
the board (``wait``) and applies it to its own breaker (``CircuitBreaker.trip`` / ``clear``), so a
dead or failing expert costs one failed call for the whole server instead of one per replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half-open"


class ExpertUnavailable(RuntimeError):
    """An expert that did not take a request: ``dead`` (its replicas are gone: the breaker opens
    at once) or not (no replica took it in time, but some run: an ordinary failure)."""

    def __init__(self, message: str, dead: bool = True) -> None:
        super().__init__(message)
        self.dead = dead

    def __reduce__(self) -> tuple:  # keep ``dead`` across pickling
        return (type(self), (str(self), self.dead))


@dataclass
class _State:
    failures: int = 0  # in a row
    opened_at: float | None = None  # None: closed
    trial: bool = False  # a half-open trial is in flight
    opened: int = 0  # times the circuit opened (reported)


@dataclass
class CircuitBreaker:
    """Per-expert circuits (see the module docstring). ``clock`` is ``time.monotonic``."""

    failures: int = 3  # failures in a row that open the circuit
    cooldown_s: float = 10.0  # how long an open circuit skips the expert
    clock: Callable[[], float] = time.monotonic
    # told (name, True) when a circuit opens and (name, False) when an open one closes or is forgotten
    on_change: Callable[[str, bool], None] = lambda name, is_open: None
    _states: dict[str, _State] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.failures < 1 or self.cooldown_s < 0:
            raise ValueError(f"bad breaker settings: failures={self.failures}, cooldown_s={self.cooldown_s}")

    def _get(self, name: str) -> _State:
        return self._states.setdefault(name, _State())

    def state(self, name: str) -> str:
        s = self._states.get(name)
        if s is None or s.opened_at is None:
            return CLOSED
        if s.trial or self.clock() - s.opened_at >= self.cooldown_s:
            return HALF_OPEN
        return OPEN

    def available(self, name: str) -> bool:
        """Whether a request may plan to call it (closed, or its cooldown is over). No side effect."""
        s = self._states.get(name)
        return s is None or s.opened_at is None or (not s.trial and self.clock() - s.opened_at >= self.cooldown_s)

    def acquire(self, name: str) -> bool:
        """Whether this request may call it now; after the cooldown the first caller gets the
        half-open trial (and must report ``success``, ``failure`` or ``release``)."""
        s = self._get(name)
        if s.opened_at is None:
            return True
        if s.trial or self.clock() - s.opened_at < self.cooldown_s:
            return False
        s.trial = True
        return True

    def success(self, name: str) -> None:
        s = self._get(name)
        was_open = s.opened_at is not None
        s.failures, s.opened_at, s.trial = 0, None, False
        if was_open:
            self.on_change(name, False)

    def failure(self, name: str, dead: bool = False) -> None:
        """One failed call; ``dead`` (the replicas are gone) opens the circuit at once. Every
        (re)opening, a failed trial's included, is told to ``on_change``."""
        s = self._get(name)
        s.failures += 1
        if dead or s.trial or s.failures >= self.failures:
            reopens = s.opened_at is None or s.trial
            if reopens:
                s.opened += 1
            s.opened_at, s.trial = self.clock(), False
            if reopens:
                self.on_change(name, True)

    def trip(self, name: str, retry_after_s: float) -> None:
        """Open the circuit from outside (another replica's breaker opened it: ``CircuitBoard``),
        so that a trial waits ``retry_after_s`` more seconds; an open circuit that waits longer, or
        a trial in flight, is left as it is."""
        s = self._get(name)
        at = self.clock() - max(0.0, self.cooldown_s - max(0.0, retry_after_s))
        was_closed = s.opened_at is None
        if was_closed or (not s.trial and s.opened_at is not None and at > s.opened_at):
            s.opened_at = at
        if was_closed:
            s.opened += 1
            self.on_change(name, True)

    def open_names(self) -> list[str]:
        """The experts whose circuit is open or half-open."""
        return sorted(n for n, s in self._states.items() if s.opened_at is not None)

    def clear(self, name: str) -> None:
        """Close an open circuit from outside (another replica's trial succeeded)."""
        s = self._states.get(name)
        if s is not None and s.opened_at is not None:
            self.success(name)

    def release(self, name: str) -> None:
        """A call that ended without a verdict (the client left): a trial may be taken again."""
        s = self._states.get(name)
        if s is not None:
            s.trial = False

    def keep(self, names: Collection[str]) -> None:
        """Forget the experts not in ``names`` (they left the pool: one added again later under
        the same name starts closed)."""
        for name in [n for n in self._states if n not in names]:
            if self._states.pop(name).opened_at is not None:
                self.on_change(name, False)

    def retry_after(self, name: str) -> float:
        """Seconds until an open circuit allows a trial (0 when it does now)."""
        s = self._states.get(name)
        if s is None or s.opened_at is None:
            return 0.0
        return max(0.0, self.cooldown_s - (self.clock() - s.opened_at))

    def snapshot(self) -> dict[str, dict[str, object]]:
        """Every expert that ever failed: its state, failures in a row, how often it opened and the
        seconds until an open circuit lets a trial through."""
        return {n: {"state": self.state(n), "failures": s.failures, "opened": s.opened,
                    "retry_after_s": round(self.retry_after(n), 3)}
                for n, s in sorted(self._states.items()) if s.failures or s.opened}


@dataclass
class CircuitBoard:
    """The open circuits every ingress replica shares (see the module docstring); plain asyncio,
    kept by the pool controller. ``seq`` grows with every change; ``wait(seen)`` answers at once
    when it differs from ``seen``, else at the next change or after ``timeout_s``. Each opening
    gets a new ``epoch``, so a replica tells a re-opened circuit from the one it already applied."""

    clock: Callable[[], float] = time.monotonic
    seq: int = 0
    # this board's identity: a restarted controller's board is a new one, which knows no circuit
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    _open: dict[str, tuple[int, float, float]] = field(default_factory=dict)  # name -> (epoch, opened_at, cooldown_s)
    _epoch: int = 0
    _changed: asyncio.Condition | None = None

    async def _bump(self) -> None:
        self.seq += 1
        if self._changed is not None:
            async with self._changed:
                self._changed.notify_all()

    async def opened(self, name: str, cooldown_s: float) -> None:
        if not cooldown_s >= 0:
            raise ValueError(f"a cooldown must be a number >= 0, got {cooldown_s}")
        self._epoch += 1
        self._open[name] = (self._epoch, self.clock(), float(cooldown_s))
        await self._bump()

    async def closed(self, name: str) -> None:
        if self._open.pop(name, None) is not None:
            await self._bump()

    async def keep(self, names: Collection[str]) -> None:
        """Forget the experts not in ``names`` (they left the pool)."""
        gone = [n for n in self._open if n not in names]
        for name in gone:
            del self._open[name]
        if gone:
            await self._bump()

    def view(self) -> dict[str, Any]:
        """{"id": board, "seq": n, "open": {name: [epoch, seconds until a trial]}}: what a replica
        applies (``CompletionService.apply_board``)."""
        now = self.clock()
        return {"id": self.id, "seq": self.seq, "open": {n: [e, round(max(0.0, cool - (now - at)), 3)]
                                          for n, (e, at, cool) in sorted(self._open.items())}}

    async def wait(self, seen: int, timeout_s: float = 5.0) -> dict[str, Any]:
        if self._changed is None:
            self._changed = asyncio.Condition()
        if self.seq == seen:
            async with self._changed:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait_for(lambda: self.seq != seen), timeout_s)
        return self.view()
