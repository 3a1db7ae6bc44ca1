"""Local rate leases (:mod:`guard.stores.lease`) on every backend, shared ones for real.

The lease script runs against a real Redis and a real Redis Cluster; "several
processes" are several stores, each with its own connections, sharing one key
prefix, which is what Redis sees of several workers. The leasing store's own
clock is a :class:`FakeClock` (leases expire on it); Redis keeps its own time,
and the limits here refill so slowly (one unit an hour) that a test's real
duration never adds a unit.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from typing import Any

import pytest

from inference_guard.detectors.base import Query
from inference_guard.detectors.rate import RateLimitDetector
from inference_guard.detectors.store import GcraLimit, RateLimit, RateStore, WindowLimit
from inference_guard.guard.config import DetectorSpec, StateConfig
from inference_guard.guard.decisions import Action
from inference_guard.guard.engine import encode_headers
from inference_guard.guard.errors import ConfigurationError
from inference_guard.guard.registry import BuildContext, build_detector
from inference_guard.guard.stores import MemoryStore
from inference_guard.guard.stores.lease import LeasedRateStore, lease_units
from inference_guard.guard.stores.rate import RateLimitStore
from inference_guard.guard.stores.redis import RedisStore
from tests.stores_fixture import SHARED_BACKENDS, Backend, FakeClock

pytestmark = pytest.mark.anyio

HOUR = 3600.0
#: 1000 at once, one more an hour: nothing refills during a test
SLOW = GcraLimit(rate=1.0, period=HOUR, burst=1000)


#: a per-process store grants no lease (nothing to share): these run on Redis and the cluster only
shared = pytest.mark.parametrize("backend", SHARED_BACKENDS, indirect=True)


async def _twin(backend: Backend) -> RedisStore:
    """Another store on the same server and prefix: another process, as Redis sees it."""
    return type(backend.store)(  # type: ignore[return-value]
        StateConfig(store=backend.url, key_prefix=backend.prefix, timeout_s=2.0)
    )


@pytest.fixture
async def twin(backend: Backend) -> AsyncIterator[RedisStore]:
    store = await _twin(backend)
    try:
        yield store
    finally:
        await store.aclose()


def _store(backend: Backend) -> RateLimitStore:
    store = backend.store
    assert isinstance(store, RateLimitStore)
    return store


# ---------------------------------------------------------------- the script's lease


async def test_a_lease_is_taken_from_the_shared_budget(backend: Backend) -> None:
    store = _store(backend)
    (state,), granted = await store.acquire_lease([("k", SLOW)], cost=1, lease=10)
    assert state.allowed and state.remaining == 999  # the cost alone: the lease is the caller's
    if backend.name == "memory":
        assert granted == 0  # local already: nothing to lease
        return
    assert granted == 10
    (after,) = await store.acquire([("k", SLOW)], cost=1)
    assert after.remaining == 1000 - 1 - 10 - 1


@shared
async def test_no_lease_below_half_of_a_limit_and_none_with_a_refusal(backend: Backend) -> None:
    store = _store(backend)
    small = GcraLimit(rate=1.0, period=HOUR, burst=100)
    # 100 - 40 - 10 = 50 left: exactly half, granted
    _, granted = await store.acquire_lease([("k", small)], cost=40, lease=10)
    assert granted == 10
    # 50 - 1 - 10 = 39 < 50: the request passes, exactly, without a lease
    (state,), granted = await store.acquire_lease([("k", small)], cost=1, lease=10)
    assert state.allowed and state.remaining == 49 and granted == 0
    (state,), granted = await store.acquire_lease([("k", small)], cost=50, lease=10)
    assert not state.allowed and granted == 0
    (state,) = await store.acquire([("k", small)], cost=0)
    assert state.remaining == 49  # the refused request took nothing, lease included


@shared
async def test_a_multi_limit_lease_needs_room_in_every_limit(backend: Backend) -> None:
    store = _store(backend)
    roomy = GcraLimit(rate=1.0, period=HOUR, burst=1000)
    tight = WindowLimit(limit=20, period=HOUR)
    checks: list[tuple[str, RateLimit]] = [("{c}:0g", roomy), ("{c}:1w", tight)]
    states, granted = await store.acquire_lease(checks, cost=1, lease=10)
    assert all(s.allowed for s in states) and granted == 0  # 20 - 11 < 10
    states, granted = await store.acquire_lease(checks, cost=1, lease=5)
    assert granted == 5  # 20 - 1 - 1 - 5 = 13 >= 10, 1000 - 7 >= 500
    assert [s.remaining for s in await store.acquire(checks, cost=0)] == [993, 13]


# ---------------------------------------------------------------- LeasedRateStore


def _leased(store: RateLimitStore, clock: FakeClock, *, lease: float = 0.01) -> LeasedRateStore:
    return LeasedRateStore(store, lease=lease, lease_s=1.0, clock=clock)


@shared
async def test_round_trips_drop_while_the_budget_has_room(
    backend: Backend, twin: RedisStore
) -> None:
    clock = FakeClock()
    leased = _leased(_store(backend), clock)
    assert isinstance(leased, RateStore)
    before = backend.store._pipeline.commands if backend.name == "redis" else None
    states = [await leased.acquire([("k", SLOW)], cost=1) for _ in range(200)]
    assert all(s.allowed for (s,) in states)
    # a lease of 10 (1 % of 1000) with each check: 200 requests, 200 / 11 round trips
    assert leased.remote == math.ceil(200 / 11) and leased.local == 200 - leased.remote
    if before is not None:  # what really went to Redis: one script per remote check
        assert backend.store._pipeline.commands - before == leased.remote
    # the headers' estimate falls with every request answered locally
    assert [s.remaining for (s,) in states[:3]] == [999, 998, 997]
    (shared,) = await twin.acquire([("k", SLOW)], cost=0)
    assert shared.remaining == 1000 - 11 * leased.remote  # every leased unit came from Redis


@shared
async def test_enforcement_is_exact_near_the_limit(backend: Backend, twin: RedisStore) -> None:
    """Two processes with leases and one without share a budget: exactly the budget passes."""
    clock = FakeClock()
    one = _leased(_store(backend), clock)
    two = _leased(twin, clock)
    plain = await _twin(backend)
    try:
        admitted = 0
        exact_phase: list[int] = []
        for i in range(1300):
            store: RateLimitStore = (one, two, plain)[i % 3]
            remote = one.remote + two.remote
            (state,) = await store.acquire([("k", SLOW)], cost=1)
            admitted += state.allowed
            (now,) = await plain.acquire([("k", SLOW)], cost=0)
            if state.allowed and now.remaining < SLOW.burst // 2 and store is not plain:
                # below half: a leased store still answers from what it holds, then
                # every request is a round trip, and no new lease is granted
                exact_phase.append(one.remote + two.remote - remote)
        assert admitted == SLOW.burst
        # at most one lease per process was being spent when the budget fell below half
        assert exact_phase and exact_phase.count(0) <= 2 * lease_units([SLOW], 0.01)
    finally:
        await plain.aclose()


@shared
async def test_overshoot_stays_within_a_lease_per_process(
    backend: Backend, twin: RedisStore
) -> None:
    """Leases spent after the budget is gone admit at most one lease per process more."""
    clock = FakeClock()
    one = _leased(_store(backend), clock, lease=0.05)
    two = _leased(twin, clock, lease=0.05)
    plain = await _twin(backend)
    limit = GcraLimit(rate=1.0, period=HOUR, burst=200)
    units = lease_units([limit], 0.05)
    try:
        # each process takes a lease while the bucket is full...
        for store in (one, two):
            (state,) = await store.acquire([("k", limit)], cost=1)
            assert state.allowed
        # ...then a process without leases drains what Redis has left
        drained = 0
        while (await plain.acquire([("k", limit)], cost=1))[0].allowed:
            drained += 1
        assert drained == 200 - 2 * (1 + units)
        # the leases are still spendable, and nothing more
        spent = 0
        for _ in range(3 * units):
            for store in (one, two):
                spent += (await store.acquire([("k", limit)], cost=1))[0].allowed
        assert spent == 2 * units
        # the whole budget was admitted once: the "overshoot" is in time, never in count
        assert 2 + drained + spent == limit.burst
    finally:
        await plain.aclose()


@shared
async def test_a_lease_expires_and_a_refusal_is_repeated_locally(
    backend: Backend, twin: RedisStore
) -> None:
    clock = FakeClock()
    leased = _leased(_store(backend), clock)
    await leased.acquire([("k", SLOW)], cost=1)
    clock.advance(1.01)  # past lease_s: the next check goes to Redis again
    await leased.acquire([("k", SLOW)], cost=1)
    assert leased.remote == 2
    # a client over its limit: refused once by Redis, then here until lease_s passes
    tiny = GcraLimit(rate=1.0, period=HOUR, burst=3)
    assert (await leased.acquire([("t", tiny)], cost=3))[0].allowed
    remote = leased.remote
    refused = [await leased.acquire([("t", tiny)], cost=2) for _ in range(5)]
    assert not any(s.allowed for (s,) in refused) and leased.remote == remote + 1
    assert all(s.retry_after > 0 for (s,) in refused)
    # a smaller cost may fit: asked of Redis (where 1 does not fit either)
    assert not (await leased.acquire([("t", tiny)], cost=1))[0].allowed
    assert leased.remote == remote + 2
    # someone else's check is unaffected, and Redis agrees it was refused
    (state,) = await twin.acquire([("t", tiny)], cost=2)
    assert not state.allowed
    clock.advance(1.01)
    await leased.acquire([("t", tiny)], cost=2)
    assert leased.remote == remote + 3


@shared
async def test_concurrent_checks_take_one_lease_at_a_time(backend: Backend) -> None:
    clock = FakeClock()
    leased = _leased(_store(backend), clock)
    results = await asyncio.gather(*(leased.acquire([("k", SLOW)], cost=1) for _ in range(50)))
    assert all(s.allowed for (s,) in results)
    (state,) = await _store(backend).acquire([("k", SLOW)], cost=0)
    # one of the 50 took a lease of 10, the 49 others were checked exactly
    assert state.remaining == 1000 - 50 - 10


@shared
async def test_the_table_is_bounded(backend: Backend) -> None:
    leased = LeasedRateStore(_store(backend), max_entries=3, clock=FakeClock())
    for i in range(6):
        await leased.acquire([(f"k{i}", SLOW)], cost=1)
    assert len(leased) == 3


@shared
async def test_a_lease_lasts_a_tenth_of_a_short_window_at_most(backend: Backend) -> None:
    clock = FakeClock()
    leased = _leased(_store(backend), clock, lease=0.1)
    fast = GcraLimit(rate=1000.0, period=1.0, burst=100)  # empties in 0.1 s
    await leased.acquire([("k", fast)], cost=1)
    await leased.acquire([("k", fast)], cost=1)
    assert leased.remote == 1
    clock.advance(0.011)
    await leased.acquire([("k", fast)], cost=1)
    assert leased.remote == 2


# ---------------------------------------------------------------- the detector's params


def _spec(params: dict[str, object]) -> DetectorSpec:
    return DetectorSpec(type="rate", name="rate", action=Action.THROTTLE, params=params, key="d")


LIMITS = [{"rate": 1, "per": "1h", "burst": 1000}]


@shared
async def test_the_detector_spends_a_lease(backend: Backend) -> None:
    det = build_detector(_spec({"limits": LIMITS}), BuildContext(store=backend.store))
    assert isinstance(det, RateLimitDetector) and isinstance(det.store, LeasedRateStore)
    results = [await det.inspect(Query("client", "p", None, n_rows=1)) for _ in range(30)]
    assert not any(r.anomalous for r in results)
    assert det.store.remote == 3  # 30 requests: one script per 11
    assert dict(results[1].headers)["RateLimit"] == '"rate";r=998;t=7200'


def test_memory_is_never_leased() -> None:
    det = build_detector(_spec({"limits": LIMITS}), BuildContext(store=MemoryStore()))
    assert isinstance(det, RateLimitDetector) and isinstance(det.store, MemoryStore)


@pytest.mark.parametrize(
    ("params", "key"),
    [
        ({"lease": 0.5}, "d.params.lease"),
        ({"lease": "x"}, "d.params.lease"),
        ({"lease": True}, "d.params.lease"),
        ({"lease_s": "forever"}, "d.params.lease_s"),
        ({"lease_s": "2m"}, "d.params.lease_s"),
        ({"lease_s": False}, "d.params.lease_s"),  # not 0, though False == 0
        ({"lease_s": True}, "d.params.lease_s"),
        ({"headers": "no"}, "d.params.headers"),  # a string is not a boolean
        ({"headers": 0}, "d.params.headers"),
    ],
)
def test_bad_lease_params_are_named(params: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        build_detector(_spec({"limits": LIMITS, **params}), BuildContext(store=MemoryStore()))
    assert info.value.key == key


@shared
async def test_a_renewed_lease_is_dropped_last_when_the_table_is_full(backend: Backend) -> None:
    clock = FakeClock()
    leased = LeasedRateStore(_store(backend), lease=0.01, lease_s=1.0, max_entries=2, clock=clock)
    await leased.acquire([("k0", SLOW)], cost=1)  # a lease of 10
    await leased.acquire([("k1", SLOW)], cost=1)
    for _ in range(11):  # k0 spends its lease, then renews it
        await leased.acquire([("k0", SLOW)], cost=1)
    remote = leased.remote
    await leased.acquire([("k2", SLOW)], cost=1)  # the table is full: k1 goes, not k0
    await leased.acquire([("k0", SLOW)], cost=1)
    assert leased.remote == remote + 1  # k0 still spends locally
    await leased.acquire([("k1", SLOW)], cost=1)
    assert leased.remote == remote + 2


@shared
async def test_what_remained_of_a_lease_is_not_carried_into_the_next(backend: Backend) -> None:
    clock = FakeClock()
    leased = _leased(_store(backend), clock)  # leases of 10
    await leased.acquire([("k", SLOW)], cost=4)  # remote: 4 and a lease of 10
    await leased.acquire([("k", SLOW)], cost=4)  # 6 left
    await leased.acquire([("k", SLOW)], cost=4)  # 2 left: less than a request
    remote = leased.remote
    await leased.acquire([("k", SLOW)], cost=4)  # remote again: a new lease of 10, the 2 lost
    assert leased.remote == remote + 1
    await leased.acquire([("k", SLOW)], cost=4)
    await leased.acquire([("k", SLOW)], cost=4)  # 2 left
    assert leased.remote == remote + 1
    await leased.acquire([("k", SLOW)], cost=4)  # carried, 12 would have served this one
    assert leased.remote == remote + 2
    (state,) = await _store(backend).acquire([("k", SLOW)], cost=0)
    assert state.remaining == 1000 - 3 * 4 - 3 * 10  # three remote checks, each taking a lease


class _HeldExact:
    """The store, with its exact (lease-free) checks held until released."""

    def __init__(self, inner: RateLimitStore) -> None:
        self.inner = inner
        self.release = asyncio.Event()

    async def acquire(self, checks: Any, *, cost: int) -> Any:
        await self.release.wait()
        return await self.inner.acquire(checks, cost=cost)

    async def acquire_lease(self, checks: Any, *, cost: int, lease: int) -> Any:
        return await self.inner.acquire_lease(checks, cost=cost, lease=lease)


@shared
async def test_a_refusal_in_flight_does_not_drop_a_lease_granted_meanwhile(
    backend: Backend,
) -> None:
    """Two checks of one key at once: the first takes a lease, the second goes exact
    and comes back refused (others spent the budget meanwhile). The leased units
    were taken from the budget: they stay this process's to spend."""
    held = _HeldExact(_store(backend))
    leased = LeasedRateStore(held, lease=0.01, lease_s=1.0, clock=FakeClock())  # type: ignore[arg-type]
    with_lease = asyncio.create_task(leased.acquire([("k", SLOW)], cost=1))
    exact = asyncio.create_task(leased.acquire([("k", SLOW)], cost=1))
    (first,) = await with_lease
    assert first.allowed and leased._table["k"].left == 10
    # the rest of the budget goes elsewhere: 1000 - 1 - 10 left
    (drained,) = await _store(backend).acquire([("k", SLOW)], cost=989)
    assert drained.allowed and drained.remaining == 0
    held.release.set()
    (second,) = await exact
    assert not second.allowed
    spent = [await leased.acquire([("k", SLOW)], cost=1) for _ in range(11)]
    assert [s.allowed for (s,) in spent] == [True] * 10 + [False]


# ---------------------------------------------------------------- answers at once


@shared
async def test_only_a_lease_answers_at_once(backend: Backend, twin: RedisStore) -> None:
    """acquire_now spends the lease as acquire does; a miss, a refusal or an expired
    lease is None, having spent nothing."""
    clock = FakeClock()
    leased = _leased(_store(backend), clock)
    assert leased.answers_now and not _store(backend).answers_now
    assert _store(backend).acquire_now([("k", SLOW)], cost=1) is None  # Redis: a round trip
    assert leased.acquire_now([("k", SLOW)], cost=1) is None  # no lease yet
    assert leased.remote == leased.local == 0
    (first,) = await leased.acquire([("k", SLOW)], cost=1)  # leases 10 more
    assert first.remaining == 999
    now = [leased.acquire_now([("k", SLOW)], cost=1) for _ in range(10)]
    assert [s[0].remaining for s in now if s is not None] == list(range(998, 988, -1))
    assert leased.local == 10 and leased.acquire_now([("k", SLOW)], cost=1) is None  # spent
    assert leased.acquire_now([("k", SLOW)], cost=0) is None  # a cost of 0 is the store's
    (shared_state,) = await twin.acquire([("k", SLOW)], cost=0)
    assert shared_state.remaining == 1000 - 11  # all came from the leased units
    await leased.acquire([("k", SLOW)], cost=1)
    clock.advance(1.01)
    assert leased.acquire_now([("k", SLOW)], cost=1) is None  # expired
    other = GcraLimit(rate=1.0, period=HOUR, burst=2000)
    assert leased.acquire_now([("k", other)], cost=1) is None  # other limits: another check
    tiny = GcraLimit(rate=1.0, period=HOUR, burst=1)
    await leased.acquire([("t", tiny)], cost=1)
    assert not (await leased.acquire([("t", tiny)], cost=1))[0].allowed  # refusal held
    local = leased.local
    assert leased.acquire_now([("t", tiny)], cost=1) is None and leased.local == local


async def test_memory_answers_at_once_what_acquire_would() -> None:
    clock = FakeClock()
    now, later = MemoryStore(clock=clock), MemoryStore(clock=clock)
    limits = [("a", GcraLimit(rate=1.0, period=60.0, burst=5)), ("b", WindowLimit(7, 3600.0))]
    for cost in (2, 2, 1, 2, 1, 3):
        at_once = now.acquire_now(limits, cost=cost)
        awaited = await later.acquire(limits, cost=cost)
        if all(s.allowed for s in awaited):
            assert at_once == awaited
        else:  # refused: None, and nothing consumed (the next checks agree)
            assert at_once is None
        clock.advance(7.0)
    assert now.acquire_now([("a", GcraLimit(rate=1.0, period=60.0, burst=5))], cost=9) is None


@pytest.mark.parametrize("cost", ["rows", "constant", "values"])
async def test_the_detector_admits_at_once_as_inspect_would(cost: str) -> None:
    clock = FakeClock()
    params: dict[str, object] = {
        "cost": cost,
        "limits": [
            {"name": "fast", "rate": 1, "per": "1m", "burst": 6},
            {"name": "slow", "limit": 20, "per": "1h", "algorithm": "sliding_window"},
        ],
    }
    if cost == "constant":
        params["cost_constant"] = 2
    dets = [
        build_detector(_spec(params), BuildContext(store=MemoryStore(clock=clock), clock=clock))
        for _ in range(2)
    ]
    at_once, awaited = dets
    assert isinstance(at_once, RateLimitDetector) and isinstance(awaited, RateLimitDetector)
    assert at_once.answers_now is (cost in ("rows", "constant"))
    answered = refused = 0
    for n_rows in (1, 3, 2, 2, 1, 4):
        now = at_once.admit_now("client", "p", "ip", "net", n_rows)
        expected = await awaited.inspect(Query("client", "p", None, n_rows=n_rows))
        if now is None:  # not at once: inspect decides, and nothing was spent
            assert await at_once.inspect(Query("client", "p", None, n_rows=n_rows)) == expected
        else:  # inspect's score (its threshold is 0) and fields, as sent on the wire
            answered += 1
            assert not expected.anomalous and expected.threshold == 0.0
            assert now == (expected.score, encode_headers(expected.headers))
        refused += expected.anomalous
        clock.advance(5.0)
    # both ways taken: some admitted at once, some refused by inspect
    assert refused >= 2 and answered == (3 if at_once.answers_now else 0)


@pytest.mark.parametrize("limits", [LIMITS, [*LIMITS, {"limit": 5, "per": "1h"}]])
async def test_without_headers_no_result_carries_rate_fields(limits: list[object]) -> None:
    clock = FakeClock()
    store = MemoryStore(clock=clock)
    det = build_detector(
        _spec({"limits": limits, "headers": False}), BuildContext(store=store, clock=clock)
    )
    assert isinstance(det, RateLimitDetector) and not det.headers
    results = [await det.inspect(Query("client", "p", None, n_rows=2)) for _ in range(3)]
    assert [r.anomalous for r in results] == [False, False, len(limits) == 2]
    assert all(r.headers == () for r in results)
    # another client's first row: 999 of 1000 left (and 4 of 5 with the second limit)
    assert det.admit_now("other", "p", "", "", 1) == (0.8 if len(limits) == 2 else 0.999, ())
    if len(limits) == 2:
        assert results[2].retry_after is not None and results[2].retry_after > 0
