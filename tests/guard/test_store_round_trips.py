"""How many commands a request costs the shared store: reads batched, rate checks leased.

``get_many`` runs on every backend; the per-request counts read the Redis
store's own count of commands sent (``AutoPipeline.commands``), on a real Redis.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from redis.crc import key_slot

from inference_guard.detectors.anomaly_rate import AnomalyRateDetector, AnomalyRateTracker
from inference_guard.detectors.base import Query
from inference_guard.guard.config import GuardConfig
from inference_guard.guard.engine import Pass, Refusal, Request
from inference_guard.guard.pipeline import Guard
from inference_guard.guard.stores.redis import RedisStore
from tests.stores_fixture import Backend

pytestmark = pytest.mark.anyio

V2 = "/v2/models/m/infer"
BODY = json.dumps(
    {"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1.0, 1.0]}]}
).encode()


async def test_get_many_reads_every_key_in_order(backend: Backend) -> None:
    store = backend.store
    # on a cluster these land in different slots: one GET per node, at once
    keys = ["quarantine:a", "quarantine:b", "absent", "quarantine:{x}"]
    assert len({key_slot((backend.prefix + k).encode()) for k in keys}) > 1
    await store.set("quarantine:a", b"1", 60)
    await store.set("quarantine:{x}", b"2", 60)
    assert await store.get_many(keys) == [b"1", None, None, b"2"]
    assert await store.get_many(["absent"]) == [None]


class Body:
    async def read(self, declared: bytes | None) -> bytes:
        return BODY


def _guard(backend: Backend, tmp_path: Path) -> Guard:
    data = {
        "audit": {"path": str(tmp_path / "audit.jsonl")},
        "policies": [
            {
                "name": "inference",
                "routes": [V2],
                "quarantine_s": 600,
                "quarantine_address": "ip",
                "detectors": [
                    {
                        "type": "rate",
                        "action": "throttle",
                        "params": {"limits": [{"rate": 1000, "per": "1h", "burst": 1000}]},
                    }
                ],
            }
        ],
    }
    return Guard(
        GuardConfig.from_dict(data),
        registry=CollectorRegistry(),
        clock=time.monotonic,
        store=backend.store,
        identity_secret=b"round-trip-test",
    )


@pytest.mark.parametrize("backend", ["redis"], indirect=True)
async def test_a_request_costs_one_command_when_its_budget_has_room(
    backend: Backend, tmp_path: Path
) -> None:
    """Quarantine (client and address, one MGET) plus the rate check (leased): one command."""
    store = backend.store
    assert isinstance(store, RedisStore)
    guard = _guard(backend, tmp_path)
    policy = guard.match("POST", V2)
    assert policy is not None
    headers = [(b"content-type", b"application/json"), (b"x-api-key", b"k1")]

    async def one() -> int:
        before = store._pipeline.commands
        verdict = await guard.admit(
            Request(policy, "POST", V2, headers, ("10.1.2.3", 5000), "rid", Body())
        )
        assert isinstance(verdict, Pass)
        return store._pipeline.commands - before

    # the first: MGET and the rate script, which takes a lease of 10 (1 % of 1000)
    assert await one() == 2
    # the next ten spend the lease: only the quarantine read goes to Redis
    assert [await one() for _ in range(10)] == [1] * 10
    assert await one() == 2  # a new lease
    # the address layer's flag is read in the same MGET: a fresh key there is refused
    address = guard.identifier.identify({}, "10.1.2.3").ip
    assert address and await guard.quarantine(policy, "someone", ip=address)
    fresh = [(b"content-type", b"application/json"), (b"x-api-key", b"k2")]
    before = store._pipeline.commands
    verdict = await guard.admit(
        Request(policy, "POST", V2, fresh, ("10.1.2.3", 5000), "rid", Body())
    )
    assert isinstance(verdict, Refusal) and verdict.status == 403
    assert store._pipeline.commands - before == 1


async def test_the_anomaly_share_reads_every_tracker_at_once(backend: Backend) -> None:
    """Three row detectors' counters, both windows: one command on Redis (MGET), the same
    rates on every backend as reading each tracker alone."""
    store = backend.store
    now = [6000.0 - 15.0]  # the previous window, three quarters of it still in view
    trackers = [
        AnomalyRateTracker(store, namespace=name, window_s=60, clock=lambda: now[0])
        for name in ("envelope", "mahalanobis", "knn")
    ]
    for i, tracker in enumerate(trackers):
        await tracker.record("client", anomalous=4 * i, total=20)
    now[0] = 6000.0 + 15.0
    for i, tracker in enumerate(trackers):
        await tracker.record("client", anomalous=i, total=10)
    detector = AnomalyRateDetector("share", trackers, max_rate=0.2, min_rows=5)
    # (one Redis pipelines; a cluster reads each slot's keys on its own node, at once)
    one = store if type(store) is RedisStore else None
    before = one._pipeline.commands if one is not None else 0
    result = await detector.inspect(Query("client", "p", None))
    if one is not None:
        assert one._pipeline.commands - before == 1
    # knn: 2 + 8 x 0.75 = 8 of 10 + 20 x 0.75 = 25 rows
    assert result.anomalous and result.score == pytest.approx(-8 / 25)
    assert [await t.rate("client") for t in trackers] == [(0, 25), (round(1 + 3.0), 25), (8, 25)]


async def test_memory_counts_come_back_as_they_are_kept() -> None:
    from inference_guard.detectors.store import GcraLimit
    from inference_guard.guard.errors import StateError
    from inference_guard.guard.stores.memory import MemoryStore

    store = MemoryStore()
    await store.incr("n", 5, ttl=60)
    await store.set("b", b"7", ttl=60)
    assert store.get_counts(["n", "absent", "b"]) == [5, None, b"7"]
    assert await store.get_many(["n", "absent", "b"]) == [b"5", None, b"7"]
    await store.acquire([("r", GcraLimit(rate=1, period=1.0, burst=2))], cost=1)
    with pytest.raises(StateError):
        store.get_counts(["r"])
