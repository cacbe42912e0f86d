"""The durable, versioned pool record (serve.state): atomic saves that never go back in time,
compare-and-set commits, the long poll replicas follow and the convergence report."""

from __future__ import annotations

import asyncio
import json

import pytest
from cscr.serve.state import (
    PoolEntry,
    PoolRecord,
    PoolState,
    PoolStateError,
    PoolStore,
    VersionConflict,
)

from cscr.pool import ExpertSpec


def entry(name: str, cost: float = 0.5, descriptor: list[float] | None = None, app: str | None = None) -> PoolEntry:
    return PoolEntry(spec=ExpertSpec(name=name, model="smollm2"), cost=cost, descriptor=descriptor, app=app)


def record() -> PoolRecord:
    return PoolRecord(version=1, experts=[entry("a", 0.2), entry("b", 1.0)])


def test_the_store_saves_atomically_and_refuses_older_versions(tmp_path):
    store = PoolStore(tmp_path / "state")
    assert store.load() is None
    v1 = record()
    store.save(v1)
    v2 = v1.with_expert(entry("c", 0.1, [1.0, 0.0], app="cscr-expert-c-1"))
    store.save(v2)
    assert store.load() == v2 and store.load().names() == ["a", "b", "c"]
    assert sorted(p.name for p in (tmp_path / "state" / "history").iterdir()) == ["v000001.json", "v000002.json"]
    assert not [p for p in (tmp_path / "state").iterdir() if p.name.endswith(".tmp")]  # no leftovers
    with pytest.raises(PoolStateError, match="version 1 is not newer than the stored version 2"):
        store.save(v1)
    store.save(v2)  # the same record again is harmless (a controller restarting)
    (tmp_path / "state" / "pool.json").write_text("{not json")
    with pytest.raises(PoolStateError, match="not a readable pool record"):
        store.load()


def test_record_changes_make_the_next_version():
    v1 = record()
    v2 = v1.without_expert("a")
    assert (v2.version, v2.names()) == (2, ["b"])
    with pytest.raises(PoolStateError, match="already in the pool"):
        v1.with_expert(entry("a"))
    with pytest.raises(PoolStateError, match="not in the pool"):
        v1.without_expert("zzz")
    assert json.loads(v2.model_dump_json())["experts"][0]["spec"]["name"] == "b"
    # an added expert's probe outcomes travel with the record (every replica calibrates it alike)
    v3 = v2.with_expert(PoolEntry(spec=ExpertSpec(name="c", model="smollm2"), cost=0.1, descriptor=[1.0, 0.0],
                                  probe_outcomes=[1.0, None, 0.5]))
    assert PoolRecord.model_validate_json(v3.model_dump_json()).experts[-1].probe_outcomes == [1.0, None, 0.5]


def test_commit_is_compare_and_set_and_durable(tmp_path):
    async def scenario() -> None:
        store = PoolStore(tmp_path)
        state = PoolState(record(), store)
        assert store.load() == record()  # version 1 written on first start
        v2 = await state.commit(1, record().with_expert(entry("c", 0.3, [0.0, 1.0])))
        with pytest.raises(VersionConflict, match="changed meanwhile"):
            await state.commit(1, record().without_expert("a"))  # made from a stale version
        with pytest.raises(PoolStateError, match="must make version 3"):
            await state.commit(2, PoolRecord(version=7, experts=v2.experts))
        assert store.load() == v2
        restarted = PoolState(record(), store)  # a restart restores the latest version, not the initial one
        assert (await restarted.get()) == v2

    asyncio.run(scenario())


def test_followers_long_poll_and_admin_calls_see_who_converged():
    async def scenario() -> None:
        state = PoolState(record(), stale_s=0.5)
        # nothing changed: the poll returns the same version after its timeout
        assert (await state.wait_for_version(1, timeout_s=0.05)).version == 1
        waiter = asyncio.create_task(state.wait_for_version(1, timeout_s=5))
        await asyncio.sleep(0.05)
        assert not waiter.done()
        await state.ack("Router#1", "Router", 1)
        await state.ack("Ingress#1", "Ingress", 1)
        await state.commit(1, record().without_expert("b"))
        assert (await asyncio.wait_for(waiter, 1)).version == 2  # woken by the commit, not the timeout
        await state.ack("Router#1", "Router", 2)
        report = await state.converged(2, timeout_s=0.1)
        assert report == {"serving": ["Router#1"], "lagging": ["Ingress#1"]}
        late = asyncio.create_task(state.converged(2, timeout_s=5))
        await state.ack("Ingress#1", "Ingress", 2)
        assert await asyncio.wait_for(late, 1) == {"serving": ["Ingress#1", "Router#1"], "lagging": []}
        await asyncio.sleep(0.6)  # replicas that stopped polling (killed) no longer count
        await state.ack("Router#2", "Router", 2)
        assert await state.replicas() == {"Router#2": {"role": "Router", "version": 2}}

    asyncio.run(scenario())


def table_for(names: list[str]) -> dict:
    """The part of an operating-point table's JSON the record looks at (its pool's names)."""
    return {"format": "test", "pool": [{"name": n} for n in names], "reachable": {"min_cost": 0.1}}


def test_a_version_gets_its_pools_table_once_and_keeps_it_across_a_restart(tmp_path):
    store = PoolStore(tmp_path / "state")
    state = PoolState(record(), store)

    async def go():
        assert await state.attach_table(1, table_for(["b", "a"]))  # any order of the same pool
        assert not await state.attach_table(1, table_for(["a", "b"]))  # first writer wins
        assert not await state.attach_table(7, table_for(["a", "b"]))  # not the current version
        with pytest.raises(PoolStateError, match="covers"):  # a table of another pool
            state.record.model_copy(update={"operating_points": None}).with_table(table_for(["a"]))
        v2 = await state.commit(1, state.record.with_expert(entry("c", 0.1, [1.0, 0.0])))
        assert v2.operating_points is None  # a change: the new pool's table is not computed yet
        assert await state.attach_table(2, table_for(["a", "b", "c"]))

    asyncio.run(go())
    again = PoolState(record(), PoolStore(tmp_path / "state"))  # a restart reads the durable record
    assert again.record.version == 2 and again.record.table_names() == ["a", "b", "c"]
    v1 = json.loads((tmp_path / "state" / "history" / "v000001.json").read_text())
    assert [p["name"] for p in v1["operating_points"]["pool"]] == ["b", "a"]
    with pytest.raises(PoolStateError, match="not newer"):  # the same version with other experts
        store.save(PoolRecord(version=2, experts=[entry("a")]))


def test_the_spend_book_persists_and_refuses_bad_charges(tmp_path):
    from cscr.serve.state import SpendBook

    book = SpendBook(tmp_path, flush_s=3600)
    assert book.charge("team", 0.25) == 0.25  # the first charge is written at once
    book.charge("team", 0.5)  # within flush_s: in memory until the next flush
    assert json.loads((tmp_path / "spend.json").read_text())["spent"] == {"team": 0.25}
    book.flush()
    assert SpendBook(tmp_path).get("team") == 0.75 and SpendBook(tmp_path).get("other") == 0.0
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="finite number >= 0"):
            book.charge("team", bad)
    (tmp_path / "spend.json").write_text("{not json")
    with pytest.raises(PoolStateError, match="not a readable spend tally"):
        SpendBook(tmp_path)


def test_a_drain_wakes_the_followers_and_waits_for_the_ingresses_in_flight_requests():
    state = PoolState(record(), None)

    async def go():
        await state.ack("Ingress#1", "Ingress", 1)
        await state.ack("Ingress#2", "Ingress", 1)
        await state.ack("Router#1", "Router", 1)
        assert await state.poll(1, False, timeout_s=0.05) == (state.record, False)  # nothing changed
        waiter = asyncio.create_task(state.poll(1, False, timeout_s=5))
        await asyncio.sleep(0.05)
        await state.drain()
        assert (await asyncio.wait_for(waiter, 1))[1] is True  # woken at once
        # acks from before the drain do not count: both ingresses must say so since
        out = await state.drained(timeout_s=0.05)
        assert out == {"drained": False, "inflight": {"Ingress#1": -1, "Ingress#2": -1}}
        await state.ack("Ingress#1", "Ingress", 1, inflight=0)
        await state.ack("Ingress#2", "Ingress", 1, inflight=3)
        assert (await state.drained(timeout_s=0.05))["inflight"] == {"Ingress#2": 3}
        later = asyncio.create_task(state.drained(timeout_s=5))
        await asyncio.sleep(0.05)
        await state.ack("Ingress#2", "Ingress", 1, inflight=0)
        assert await asyncio.wait_for(later, 1) == {"drained": True, "inflight": {}}  # the router never counts

    asyncio.run(go())
