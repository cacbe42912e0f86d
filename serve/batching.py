"""``EncoderBatcher``: concurrent encoder calls batched into one forward, without a fixed wait.

A call that finds the encoder idle starts a forward at once (with whatever else arrived in the same
event-loop turn); calls that arrive while a forward runs queue up and go together, up to
``max_batch_size``, in the next one. So a lone request never waits for company (latency = one
forward), and under load the batch grows to what arrived during the previous forward (throughput
of batched forwards): continuous batching, as LLM servers batch decode steps. ``wait_s > 0`` adds a
fixed wait for more calls before a forward whose batch is not full (the ``@serve.batch`` behaviour;
rarely useful on top of this).

Plain asyncio: it works in a Serve replica or anywhere else with an event loop. A caller cancelled
while queued is dropped from its batch's answers; an encoder error fails every call of that batch
(and only those).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any


class EncoderBatcher:
    """``await batcher.submit(item)`` -> that item's result from ``fn(batch)`` (one result per item)."""

    def __init__(self, fn: Callable[[list[Any]], Awaitable[Sequence[Any]]], max_batch_size: int = 32,
                 wait_s: float = 0.0) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if wait_s < 0:
            raise ValueError(f"wait_s must be >= 0, got {wait_s}")
        self.fn = fn
        self.max_batch_size = int(max_batch_size)
        self.wait_s = float(wait_s)
        self._queue: list[tuple[Any, asyncio.Future[Any]]] = []
        self._running = False
        self.stats = {"batches": 0, "prompts": 0, "largest": 0}

    async def submit(self, item: Any) -> Any:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        self._queue.append((item, fut))
        if not self._running:
            self._running = True
            loop.create_task(self._drain())
        return await fut

    async def _drain(self) -> None:
        try:
            while self._queue:
                if self.wait_s > 0 and len(self._queue) < self.max_batch_size:
                    await asyncio.sleep(self.wait_s)
                batch = [(i, f) for i, f in self._queue[:self.max_batch_size] if not f.done()]
                del self._queue[:self.max_batch_size]
                if not batch:
                    continue
                self.stats["batches"] += 1
                self.stats["prompts"] += len(batch)
                self.stats["largest"] = max(self.stats["largest"], len(batch))
                try:
                    out = await self.fn([i for i, _ in batch])
                    if len(out) != len(batch):
                        raise RuntimeError(f"the batch function gave {len(out)} results for {len(batch)} items")
                except Exception as exc:  # every call of this batch fails with the encoder's error
                    for _, f in batch:
                        if not f.done():
                            f.set_exception(exc)
                    continue
                for (_, f), result in zip(batch, out, strict=True):
                    if not f.done():  # a caller cancelled meanwhile: nobody to answer
                        f.set_result(result)
        finally:
            self._running = False
