"""Per-API-key spend budgets (issue 11): the operator declares keys, each with a budget in the
run's cost unit (USD or parameters), in a YAML or JSON file (``cscr serve --keys FILE``):

    keys:
      - {key: sk-team-a-..., name: team-a, budget: 5.0}     # 5 USD of estimated expert cost
      - {key: sk-batch-...,  name: batch,  budget: 0.25}

(a bare list of entries works too; ``rpm: N`` on an entry also limits the key to N requests in
any 60 seconds: the request past it gets a 429, ``rate_limit_exceeded`` with ``Retry-After``,
as OpenAI's rate limits answer). A declared key is accepted as an API key; each answered
request adds its estimated cost (the answering expert's c_m times the run's scale: what the
``x-cscr-*`` accounting and ``/metrics`` count) to the key's tally; once the tally reaches the
budget, requests with that key get a 429 in OpenAI's error shape (type ``insufficient_quota``).
A request is admitted while the tally is below the budget, so concurrent requests can overshoot
it by at most their own costs.

Where the tally lives: ``SpendLedger`` is the (async) interface (``spent`` / ``charge``).
``BookLedger`` keeps it in a ``serve.state.SpendBook`` of this process (in-process serving and
tests; with a folder it persists ``spend.json``). ``cscr serve`` shares one tally among all its
ingress replicas: the PoolController holds the ``SpendBook`` in the state folder and each
replica's ``KeyBudgets`` talks to it through ``serve.deployments.ControllerLedger``, so a key's
budget holds across replicas and restarts. The request windows of ``rpm`` live beside the tally
(``RequestWindows``; in the controller for every replica, in memory only: a restart starts them
afresh). No Ray, no HTTP here.
"""

from __future__ import annotations

import hmac
import json
import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from cscr.serve.protocol import ProtocolError
from cscr.serve.state import SpendBook


@dataclass(frozen=True)
class KeyBudget:
    """One declared API key and its spend budget (run's cost unit)."""

    key: str
    name: str
    budget: float
    rpm: int | None = None  # requests in any 60 s (None: no limit)

    def __post_init__(self) -> None:
        if not self.key or not self.key.strip():
            raise ValueError(f"key {self.name!r}: the key is empty")
        if not self.name:
            raise ValueError("every key needs a name (it labels its spend)")
        if isinstance(self.budget, bool) or not math.isfinite(self.budget) or self.budget < 0:
            raise ValueError(f"key {self.name!r}: budget must be a finite number >= 0, got {self.budget!r}")
        if self.rpm is not None and (isinstance(self.rpm, bool) or not isinstance(self.rpm, int)
                                     or not 1 <= self.rpm <= MAX_RPM):
            raise ValueError(f"key {self.name!r}: rpm must be a whole number of requests from 1 to {MAX_RPM}, "
                             f"got {self.rpm!r}")

    def public(self) -> dict[str, Any]:
        return {"name": self.name, "budget": self.budget, **({"rpm": self.rpm} if self.rpm is not None else {})}


MAX_RPM = 1_000_000  # a window keeps one timestamp per request in it
WINDOW_S = 60.0


class RequestWindows:
    """Requests admitted per key name in the last ``WINDOW_S`` seconds (a sliding log: exact, at
    most ``rpm`` timestamps a key)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._log: dict[str, deque[float]] = {}

    def take(self, name: str, rpm: int) -> float:
        """Admit one request of ``name`` (0.0) unless ``rpm`` were admitted in the window: then the
        seconds until the oldest of them leaves it (nothing recorded)."""
        now = self.clock()
        log = self._log.setdefault(name, deque())
        while log and now - log[0] >= WINDOW_S:
            log.popleft()
        if len(log) >= rpm:
            return max(1e-3, WINDOW_S - (now - log[len(log) - rpm]))
        log.append(now)
        return 0.0


class SpendLedger(Protocol):
    """Where spend is tallied and request windows kept, by key name."""

    async def spent(self, name: str) -> float: ...

    async def charge(self, name: str, amount: float) -> float: ...  # returns the new tally

    async def take(self, name: str, rpm: int) -> float: ...  # RequestWindows.take


class BookLedger:
    """The tally in a ``SpendBook`` of this process, and its request windows (one event loop: no
    lock needed)."""

    def __init__(self, book: SpendBook | None = None, windows: RequestWindows | None = None) -> None:
        self.book = book if book is not None else SpendBook()
        self.windows = windows if windows is not None else RequestWindows()

    async def spent(self, name: str) -> float:
        return self.book.get(name)

    async def charge(self, name: str, amount: float) -> float:
        return self.book.charge(name, amount)

    async def take(self, name: str, rpm: int) -> float:
        return self.windows.take(name, rpm)


class KeyBudgets:
    """The declared keys, their budgets and a ledger: identify a key, admit or refuse, charge."""

    def __init__(self, keys: Iterable[KeyBudget], unit: str = "usd", ledger: SpendLedger | None = None) -> None:
        self.keys = list(keys)
        names = [k.name for k in self.keys]
        dup = sorted({n for n in names if names.count(n) > 1})
        secrets = [k.key for k in self.keys]
        if dup or len(set(secrets)) != len(secrets):
            raise ValueError(f"every key and every key name must be unique (repeated names: {dup})")
        self.unit = unit
        self.ledger: SpendLedger = ledger if ledger is not None else BookLedger()

    @staticmethod
    def from_entries(entries: Iterable[Mapping[str, Any]], unit: str = "usd",
                     ledger: SpendLedger | None = None) -> KeyBudgets:
        out = []
        for i, e in enumerate(entries):
            if (not isinstance(e, Mapping) or set(e) - {"key", "name", "budget", "rpm"}
                    or not {"key", "name", "budget"} <= set(e)):
                raise ValueError(f"key entry {i}: expected {{key, name, budget}} and optionally rpm, got {e!r:.120}")
            budget = e["budget"]
            if isinstance(budget, bool) or not isinstance(budget, int | float):
                raise ValueError(f"key {e['name']!r}: budget must be a number, got {budget!r}")
            out.append(KeyBudget(str(e["key"]), str(e["name"]), float(budget), e.get("rpm")))
        return KeyBudgets(out, unit, ledger)

    @staticmethod
    def load_entries(path: str | Path) -> list[dict[str, Any]]:
        """The entries of a keys file (YAML or JSON: ``{keys: [...]}`` or a bare list), checked."""
        import yaml

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"keys file not found: {path}")
        text = path.read_text()
        obj = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        if isinstance(obj, Mapping):
            obj = obj.get("keys")
        if not isinstance(obj, list) or not obj:
            raise ValueError(f"{path}: expected a list of {{key, name, budget}} entries (or keys: [...])")
        KeyBudgets.from_entries(obj)  # one clear error now, not at the first request
        return [dict(e) for e in obj]

    # ---- per request ----
    def identify(self, authorization: str | None) -> KeyBudget | None:
        """The declared key an ``Authorization: Bearer <key>`` header carries (None: none of them);
        every key is compared in constant time."""
        scheme, _, given = (authorization or "").strip().partition(" ")
        if scheme.lower() != "bearer":
            return None
        raw = given.strip().encode()
        found = None
        for k in self.keys:
            if hmac.compare_digest(raw, k.key.encode()):
                found = k
        return found

    async def remaining(self, key: KeyBudget) -> float:
        return key.budget - await self.ledger.spent(key.name)

    async def admit(self, key: KeyBudget) -> None:
        """Refuse (429) a key past its request rate (the request is not counted), or whose tally
        has reached its budget."""
        if key.rpm is not None:
            wait = await self.ledger.take(key.name, key.rpm)
            if wait > 0:
                raise ProtocolError(f"key {key.name!r} is limited to {key.rpm} requests a minute: retry in "
                                    f"{wait:.1f} s", status=429, code="rate_limit_exceeded", type_="requests",
                                    retry_after_s=wait)
        spent = await self.ledger.spent(key.name)
        if spent >= key.budget:
            raise ProtocolError(f"the spend budget of key {key.name!r} is exhausted: {spent:.6g} of "
                                f"{key.budget:.6g} {self.unit} spent; ask the operator to raise it",
                                status=429, code="budget_exhausted", type_="insufficient_quota")

    async def charge(self, key: KeyBudget, amount: float) -> float:
        if not math.isfinite(amount) or amount < 0:
            raise ValueError(f"a charge must be a finite number >= 0, got {amount}")
        return await self.ledger.charge(key.name, amount)

    async def usage(self) -> list[dict[str, Any]]:
        return [{**k.public(), "spent": await self.ledger.spent(k.name), "unit": self.unit} for k in self.keys]
