"""Continuous batching of encoder calls (serve/batching.py): a lone call runs at once, calls that
arrive during a forward share the next one, errors and cancellations stay within their batch."""

from __future__ import annotations

import asyncio

import pytest
from cscr.serve.batching import EncoderBatcher


class Recorder:
    """A batch function that takes ``delay`` seconds per forward and records each batch."""

    def __init__(self, delay: float = 0.05, fail_on: str | None = None) -> None:
        self.delay = delay
        self.fail_on = fail_on
        self.batches: list[list[str]] = []

    async def __call__(self, items: list[str]) -> list[str]:
        self.batches.append(list(items))
        await asyncio.sleep(self.delay)
        if self.fail_on is not None and self.fail_on in items:
            raise RuntimeError(f"encoder failed on {self.fail_on}")
        return [s.upper() for s in items]


def test_a_lone_call_runs_at_once_and_calls_during_a_forward_share_the_next():
    async def go():
        fn = Recorder(delay=0.05)
        b = EncoderBatcher(fn, max_batch_size=32)
        first = asyncio.create_task(b.submit("a"))
        await asyncio.sleep(0.01)  # the first forward is running
        rest = [asyncio.create_task(b.submit(f"x{i}")) for i in range(10)]
        out = await asyncio.gather(first, *rest)
        return fn, b, out

    fn, b, out = asyncio.run(go())
    assert out == ["A"] + [f"X{i}" for i in range(10)]
    assert fn.batches == [["a"], [f"x{i}" for i in range(10)]]
    assert b.stats == {"batches": 2, "prompts": 11, "largest": 10}


def test_the_batch_size_is_capped_and_order_kept():
    async def go():
        fn = Recorder(delay=0.01)
        b = EncoderBatcher(fn, max_batch_size=4)
        return fn, await asyncio.gather(*(b.submit(str(i)) for i in range(10)))

    fn, out = asyncio.run(go())
    assert out == [str(i) for i in range(10)]
    assert [len(x) for x in fn.batches] == [4, 4, 2]
    assert [i for batch in fn.batches for i in batch] == [str(i) for i in range(10)]


def test_an_encoder_error_fails_only_its_batch():
    async def go():
        fn = Recorder(delay=0.02, fail_on="bad")
        b = EncoderBatcher(fn, max_batch_size=2)
        results = await asyncio.gather(*(b.submit(s) for s in ["bad", "b", "c", "d"]), return_exceptions=True)
        after = await b.submit("e")  # the batcher keeps working
        return results, after

    results, after = asyncio.run(go())
    assert isinstance(results[0], RuntimeError) and isinstance(results[1], RuntimeError)
    assert results[2:] == ["C", "D"] and after == "E"


def test_a_cancelled_caller_is_dropped_and_the_others_answered():
    async def go():
        fn = Recorder(delay=0.05)
        b = EncoderBatcher(fn, max_batch_size=8)
        first = asyncio.create_task(b.submit("a"))
        await asyncio.sleep(0.01)
        gone = asyncio.create_task(b.submit("gone"))
        kept = asyncio.create_task(b.submit("kept"))
        await asyncio.sleep(0)
        gone.cancel()
        return fn, await first, await kept, gone

    fn, a, kept, gone = asyncio.run(go())
    assert (a, kept) == ("A", "KEPT") and gone.cancelled()
    assert fn.batches == [["a"], ["kept"]]


def test_a_fixed_wait_gathers_calls_that_arrive_within_it():
    async def go(wait):
        fn = Recorder(delay=0.0)
        b = EncoderBatcher(fn, max_batch_size=8, wait_s=wait)

        async def late(i):
            await asyncio.sleep(0.02 * i)
            return await b.submit(str(i))

        await asyncio.gather(*(late(i) for i in range(3)))
        return fn.batches

    assert asyncio.run(go(0.2)) == [["0", "1", "2"]]
    assert asyncio.run(go(0.0)) == [["0"], ["1"], ["2"]]
    with pytest.raises(ValueError, match="wait_s"):
        EncoderBatcher(Recorder(), wait_s=-1)
    with pytest.raises(ValueError, match="max_batch_size"):
        EncoderBatcher(Recorder(), max_batch_size=0)
