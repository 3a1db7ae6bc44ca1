"""The memory store's flag table: quarantine and standings outlive a flood of fresh client ids."""

from __future__ import annotations

import asyncio
from typing import Any

from prometheus_client import CollectorRegistry

import inference_guard.guard.pipeline as pipeline
from inference_guard.detectors.base import Query
from inference_guard.detectors.shared_standing import STANDING_PREFIX, SharedStanding
from inference_guard.guard.config import GuardConfig
from inference_guard.guard.stores import MemoryStore
from inference_guard.guard.stores.memory import FLAG_PREFIXES
from inference_guard.middleware.asgi import GuardMiddleware
from tests.conftest import sample
from tests.middleware.test_fuzz import JSON_CT, V1, Echo, request


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_the_flag_prefixes_are_the_guards_own() -> None:
    assert pipeline._QUARANTINE_PREFIX in FLAG_PREFIXES
    store = MemoryStore()
    asyncio.run(SharedStanding(store, "prada:p", 60).flag("inference", "c1", -2.0))
    assert list(store._flags) == [f"{STANDING_PREFIX}prada:p:inference:c1"]
    assert not store._data


def test_flags_survive_a_flood_that_evicts_every_rate_key() -> None:
    events: list[str] = []
    store = MemoryStore(max_keys=10, max_flag_keys=3, on_event=lambda k, b: events.append(k))

    async def main() -> None:
        await store.set("quarantine:bad", b"1", ttl=60)
        await SharedStanding(store, "boundary:b", 60).flag("inference", "worse", -1.5)
        for i in range(1000):
            await store.incr(f"rate:{{r:c:{i}", ttl=60)
        assert await store.get("quarantine:bad") == b"1"
        assert await SharedStanding(store, "boundary:b", 60).score("inference", "worse") == -1.5

    asyncio.run(main())
    assert store.evictions == 1000 - 10 and events.count("eviction") == 990
    assert store.flag_overflows == 0 and len(store) == 10 + 2


def test_a_full_flag_table_overflows_new_flags_and_keeps_the_live_ones() -> None:
    clock = Clock()
    events: list[str] = []
    store = MemoryStore(
        max_keys=5, max_flag_keys=2, clock=clock, on_event=lambda k, b: events.append(k)
    )

    async def main() -> None:
        await store.set("quarantine:a", b"1", ttl=10)
        await store.set("quarantine:b", b"1", ttl=100)
        # full of live flags: the third is kept where it can be evicted, and counted
        await store.set("quarantine:c", b"1", ttl=100)
        assert store.flag_overflows == 1 and events == ["flag_overflow"]
        assert await store.get("quarantine:c") == b"1"
        for i in range(10):
            await store.set(f"rate:{i}", b"0", ttl=100)
        assert await store.get("quarantine:c") is None  # evicted with the rate keys
        assert await store.get("quarantine:a") == b"1"
        assert await store.get("quarantine:b") == b"1"
        # once a flag expires its slot is free again
        clock.t += 11
        await store.set("quarantine:d", b"1", ttl=100)
        assert store.flag_overflows == 1
        assert set(store._flags) == {"quarantine:b", "quarantine:d"}
        await store.delete("quarantine:d")
        assert await store.get("quarantine:d") is None

    asyncio.run(main())


class CountingStore(MemoryStore):
    """A memory store that counts the reads of standing keys."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.standing_reads = 0

    async def get(self, key: str) -> bytes | None:
        self.standing_reads += key.startswith(STANDING_PREFIX)
        return await super().get(key)


def test_no_flag_held_skips_the_standing_lookup_and_any_flag_restores_it() -> None:
    store = CountingStore(max_keys=3, max_flag_keys=1)
    standing = SharedStanding(store, "prada:p", 60)
    assert not store.may_hold_flag(STANDING_PREFIX)
    assert store.may_hold_flag("rate:")  # not a flag's prefix: cannot tell

    async def main() -> None:
        # nothing flagged anywhere: the local score stands, the store is not read
        assert await standing.resolve("inference", "c1", 0.9, 0.5) == 0.9
        assert await standing.resolve("inference", "c1", None, 0.5) is None
        assert store.standing_reads == 0
        # another detector's quarantine is a flag too: standings are read again
        await store.set("quarantine:x", b"1", ttl=60)
        assert store.may_hold_flag(STANDING_PREFIX)
        assert await standing.resolve("inference", "c1", 0.9, 0.5) == 0.9
        assert store.standing_reads == 1
        await store.delete("quarantine:x")
        # a standing that overflowed into the main table is found whatever the flag table
        await store.set("quarantine:y", b"1", ttl=60)
        await standing.flag("inference", "c2", 0.1)  # the table is full: overflows
        assert store.flag_overflows == 1
        await store.delete("quarantine:y")
        assert not store._flags and store.may_hold_flag(STANDING_PREFIX)
        assert await standing.resolve("inference", "c2", 0.9, 0.5) == 0.1

    asyncio.run(main())


def test_refreshed_flags_keep_the_expiry_heap_bounded() -> None:
    store = MemoryStore(max_flag_keys=4)

    async def main() -> None:
        standing = SharedStanding(store, "prada:p", 60)
        for i in range(10_000):
            await standing.flag("inference", "c", -float(i % 7 + 1))

    asyncio.run(main())
    assert len(store._flags) == 1 and len(store._flag_expiry) <= 2 + 64


def test_max_flag_keys_is_configured() -> None:
    assert GuardConfig.load(None).state.max_flag_keys == 100_000
    cfg = GuardConfig.load({"state": {"max_keys": 50, "max_flag_keys": 7}})
    assert cfg.state.max_flag_keys == 7


def test_quarantine_outlives_a_flood_of_100_000_fresh_ids() -> None:
    """Quarantined over HTTP, then 100 000 fresh clients through the engine, then refused."""
    clock = Clock()
    registry = CollectorRegistry()
    config: dict[str, Any] = {
        "audit": {"enabled": False},
        "state": {"store": "memory://", "max_keys": 100},
        "policies": [
            {
                "name": "inference",
                "routes": [V1],
                "quarantine_s": 3600,
                "detectors": [
                    {
                        "type": "rate",
                        "action": "block",
                        "params": {"limits": [{"rate": 2, "per": "1h", "burst": 2}]},
                    }
                ],
            }
        ],
    }
    mw = GuardMiddleware(Echo(), config=config, registry=registry, clock=clock)
    body = b'{"instances": [[1, 2]]}'
    bad = [JSON_CT, (b"x-api-key", b"the-quarantined-key")]
    assert [request(mw, V1, body, headers=bad).status for _ in range(3)] == [200, 200, 403]
    assert sample(registry, "guard_quarantines_total", policy="inference") == 1
    guard = mw.guard
    policy = guard.policies[0]

    async def flood() -> None:
        for i in range(100_000):
            query = Query(client=f"fresh-{i}", policy="inference", rows=None, now=clock())
            decision = await guard.decide(policy, query)
            assert decision.action.value == "allow"

    asyncio.run(flood())
    store = guard.store
    assert isinstance(store, MemoryStore)
    assert store.evictions >= 100_000 - 100  # every fresh id's rate key came and went
    assert sample(registry, "guard_store_evictions_total", backend="memory") == store.evictions
    assert store.flag_overflows == 0
    res = request(mw, V1, body, headers=bad)
    assert res.status == 403
    assert sample(registry, "guard_requests_total", policy="inference", decision="block") == 2
