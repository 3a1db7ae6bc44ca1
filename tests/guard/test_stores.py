"""The state stores: one suite run against every backend, then what is backend-specific.

Backends come from the ``backend`` fixture (``tests/stores_fixture.py``): memory
on a fake clock, and a real Redis when ``GUARD_TEST_REDIS_URL`` is set. Redis
cases use real, short periods; the assertions that need exact timings read
the timing back from the store's own answers instead of assuming it.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import pytest
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from inference_guard.detectors.store import (
    GcraLimit,
    KeyValueStore,
    RateCheck,
    RateLimit,
    RateState,
    RateStore,
    WindowLimit,
)
from inference_guard.guard.config import StateConfig
from inference_guard.guard.errors import StateError
from inference_guard.guard.stores import (
    BreakerState,
    CircuitBreaker,
    MemoryStore,
    ResilientStore,
    store_from_uri,
)
from inference_guard.guard.stores._ratemath import gcra_step, window_step
from inference_guard.guard.stores.redis import RedisStore, load_script
from tests.stores_fixture import (
    REDIS_SKIP,
    REDIS_URL,
    Backend,
    FakeClock,
    delete_prefix,
    redis_prefix,
)

pytestmark = pytest.mark.anyio

#: nothing listens there: connections are refused at once
DEAD_REDIS = "redis://127.0.0.1:1/0"
#: long enough that refill during a test is negligible
HOUR = 3600.0


# ---------------------------------------------------------------- shared suite: key-value


async def test_backends_satisfy_the_protocols(backend: Backend) -> None:
    assert isinstance(backend.store, KeyValueStore)
    assert isinstance(backend.store, RateStore)
    assert backend.store.backend == backend.name


async def test_set_get_delete(backend: Backend) -> None:
    store = backend.store
    assert await store.get("absent") is None
    await store.set("k", b"\x00value")
    assert await store.get("k") == b"\x00value"
    await store.delete("k")
    assert await store.get("k") is None
    await store.delete("k")  # deleting an absent key is fine


async def test_ttl_expiry(backend: Backend) -> None:
    store = backend.store
    await store.set("short", b"1", ttl=0.25)
    await store.set("forever", b"2")
    assert await store.get("short") == b"1"
    await backend.advance(0.3)
    assert await store.get("short") is None
    assert await store.get("forever") == b"2"


async def test_incr_sets_the_ttl_only_when_it_creates_the_key(backend: Backend) -> None:
    store = backend.store
    assert await store.incr("n", 2, ttl=0.4) == 2
    await backend.advance(0.1)
    assert await store.incr("n", 3, ttl=0.4) == 5  # does not push the expiry back
    await backend.advance(0.35)
    assert await store.get("n") is None
    assert await store.incr("n", 1, ttl=0.4) == 1


# ---------------------------------------------------------------- shared suite: GCRA


async def test_gcra_burst_then_steady_rate(backend: Backend) -> None:
    store = backend.store
    # 4 per second (one unit every 0.25 s), 3 at once
    states = [await store.gcra("g", rate=4, period=1.0, burst=3, cost=1) for _ in range(4)]
    assert [s.allowed for s in states] == [True, True, True, False]
    assert [s.remaining for s in states] == [2, 1, 0, 0]
    assert all(s.limit == 3 for s in states)
    refused = states[3]
    assert 0.0 < refused.retry_after <= 0.25 + 1e-6
    assert 0.5 < refused.reset_after <= 0.75 + 1e-6
    if backend.exact:
        assert refused.retry_after == pytest.approx(0.25)
        assert refused.reset_after == pytest.approx(0.75)
    # steady state: one unit per interval, no more (real time for Redis: one round)
    for _ in range(20 if backend.exact else 1):
        await backend.advance(0.25 if backend.exact else 0.3)
        assert (await store.gcra("g", rate=4, period=1.0, burst=3, cost=1)).allowed
        assert not (await store.gcra("g", rate=4, period=1.0, burst=3, cost=1)).allowed


async def test_gcra_refills_to_the_burst_and_no_further(backend: Backend) -> None:
    store = backend.store
    assert (await store.gcra("g", rate=20, period=1.0, burst=2, cost=2)).allowed
    await backend.advance(0.15)  # 3 units' worth of time, but the bucket holds 2
    state = await store.gcra("g", rate=20, period=1.0, burst=2, cost=1)
    assert state.allowed and state.remaining == 1


async def test_gcra_refused_request_consumes_nothing(backend: Backend) -> None:
    store = backend.store
    first = await store.gcra("g", rate=1.0, period=HOUR, burst=5, cost=3)
    assert first.allowed and first.remaining == 2
    second = await store.gcra("g", rate=1.0, period=HOUR, burst=5, cost=3)
    assert not second.allowed and second.remaining == 2
    assert second.retry_after == pytest.approx(HOUR, rel=0.01)  # one unit per hour
    third = await store.gcra("g", rate=1.0, period=HOUR, burst=5, cost=2)
    assert third.allowed and third.remaining == 0


async def test_gcra_cost_above_the_burst_never_fits(backend: Backend) -> None:
    store = backend.store
    state = await store.gcra("g", rate=10, period=1.0, burst=5, cost=6)
    assert not state.allowed and state.remaining == 5
    assert state.retry_after == 0.0  # already as full as it gets
    assert (await store.gcra("g", rate=10, period=1.0, burst=5, cost=5)).allowed


async def test_cost_is_charged_in_units(backend: Backend) -> None:
    store = backend.store
    state = await store.gcra("g", rate=4, period=1.0, burst=40, cost=40)
    assert state.allowed and state.remaining == 0
    assert state.reset_after == pytest.approx(10.0)
    assert not (await store.gcra("g", rate=4, period=1.0, burst=40, cost=1)).allowed


# ---------------------------------------------------------------- shared suite: sliding window


async def test_window_counts_and_refuses(backend: Backend) -> None:
    store = backend.store
    states = [await store.window("w", limit=5, period=HOUR, cost=2) for _ in range(3)]
    assert [s.allowed for s in states] == [True, True, False]
    assert [s.remaining for s in states] == [3, 1, 1]
    assert (await store.window("w", limit=5, period=HOUR, cost=1)).allowed
    assert not (await store.window("w", limit=5, period=HOUR, cost=1)).allowed


async def test_window_weighted_two_window_approximation(backend: Backend) -> None:
    """The previous window counts in proportion to its overlap with the sliding one.

    The store's own ``reset_after`` tells where in the window ``now`` is, so the
    arithmetic is checked exactly on real (Redis) time too.
    """
    store = backend.store
    period, cap = 0.5, 100
    first = await store.window("w", limit=cap, period=period, cost=60)
    assert first.allowed and first.remaining == 40
    frac0 = 2.0 - first.reset_after / period  # where in its window the first request fell
    # sleep into the next window, a quarter of the way in
    await backend.advance((1.0 - frac0) * period + 0.25 * period)
    state = await store.window("w", limit=cap, period=period, cost=1)
    assert state.allowed
    frac = 2.0 - state.reset_after / period
    assert 0.0 < frac < 0.9
    expected = math.floor(cap - 60 * (1.0 - frac) - 1)
    assert abs(state.remaining - expected) <= 1
    if backend.exact:
        assert frac == pytest.approx(0.25)
        assert state.remaining == 54
    # 60 more do not fit until enough of the previous window has slid out
    refused = await store.window("w", limit=cap, period=period, cost=60)
    assert not refused.allowed
    frac = 2.0 - refused.reset_after / period
    expected_retry = (1.0 - (cap - 1 - 60) / 60 - frac) * period
    assert refused.retry_after == pytest.approx(expected_retry, abs=1e-6)
    await backend.advance(refused.retry_after + 0.01)
    assert (await store.window("w", limit=cap, period=period, cost=60)).allowed


async def test_window_frees_up_after_two_periods(backend: Backend) -> None:
    store = backend.store
    assert (await store.window("w", limit=3, period=0.1, cost=3)).allowed
    refused = await store.window("w", limit=3, period=0.1, cost=1)
    assert not refused.allowed and 0.0 < refused.retry_after <= 0.2
    await backend.advance(0.21)
    state = await store.window("w", limit=3, period=0.1, cost=3)
    assert state.allowed and state.remaining == 0


# ---------------------------------------------------------------- shared suite: several limits


async def test_multi_limit_consumes_only_when_every_limit_admits(backend: Backend) -> None:
    store = backend.store
    burst = GcraLimit(rate=1.0, period=HOUR / 10, burst=10)  # refill negligible here
    daily = WindowLimit(limit=3, period=HOUR)
    # one hash tag: on a Redis Cluster the keys of one script must share a slot
    checks: list[RateCheck] = [("{c}burst", burst), ("{c}day", daily)]
    for expected_daily in (2, 1, 0):
        g, w = await store.acquire(checks, cost=1)
        assert g.allowed and w.allowed and w.remaining == expected_daily
    g, w = await store.acquire(checks, cost=1)
    assert g.allowed and not w.allowed  # the daily limit refuses ...
    assert g.remaining == 7  # ... so the burst budget was not touched
    state = await store.gcra("{c}burst", rate=1.0, period=HOUR / 10, burst=10, cost=7)
    assert state.allowed and state.remaining == 0


async def test_acquire_rejects_bad_arguments(backend: Backend) -> None:
    store = backend.store
    limit = WindowLimit(limit=3, period=1.0)
    with pytest.raises(ValueError, match="distinct"):
        await store.acquire([("k", limit), ("k", limit)], cost=1)
    with pytest.raises(ValueError, match="cost"):
        await store.acquire([("k", limit)], cost=-1)
    with pytest.raises(ValueError, match="at least one"):
        await store.acquire([], cost=1)


@pytest.mark.parametrize("algorithm", ["gcra", "sliding_window"])
async def test_concurrent_acquisitions_are_exact(backend: Backend, algorithm: str) -> None:
    """500 concurrent requests against a limit of 100: exactly 100 get through."""
    store = backend.store
    limit: RateLimit = (
        GcraLimit(rate=100, period=HOUR, burst=100)
        if algorithm == "gcra"
        else WindowLimit(limit=100, period=HOUR)
    )
    results = await asyncio.gather(*(store.acquire([("hot", limit)], cost=1) for _ in range(500)))
    assert sum(state.allowed for (state,) in results) == 100
    (after,) = await store.acquire([("hot", limit)], cost=1)
    assert not after.allowed and after.remaining == 0


async def test_rate_state_expires_once_it_no_longer_matters(backend: Backend) -> None:
    store = backend.store
    await store.acquire(
        [("{t}g", GcraLimit(rate=4, period=1.0, burst=2)), ("{t}w", WindowLimit(5, period=0.2))],
        cost=2,
    )
    if isinstance(store, RedisStore):
        for key in ("{t}g", "{t}w"):  # written under the prefix, and never immortal
            assert 0 < await backend.pttl(key) <= 500
    await backend.advance(0.55)
    assert await store.get("{t}g") is None
    assert await store.get("{t}w") is None


# ---------------------------------------------------------------- memory only


async def test_memory_store_stays_bounded_under_a_flood_of_clients() -> None:
    events: list[tuple[str, str]] = []
    store = MemoryStore(max_keys=50, clock=FakeClock(), on_event=lambda k, b: events.append((k, b)))
    limit = GcraLimit(rate=1, period=HOUR, burst=5)
    for i in range(1000):
        (state,) = await store.acquire([(f"client-{i}", limit)], cost=1)
        assert state.allowed
    assert len(store) == 50
    assert store.evictions == 950
    assert events == [("eviction", "memory")] * 950
    # the most recent clients are the ones kept
    (state,) = await store.acquire([("client-999", limit)], cost=1)
    assert state.remaining == 3


async def test_memory_store_sweeps_expired_keys_before_evicting() -> None:
    clock = FakeClock()
    store = MemoryStore(max_keys=10, clock=clock)
    for i in range(10):
        await store.set(f"old-{i}", b"x", ttl=1.0)
    clock.advance(2.0)
    await store.set("new", b"y")
    assert store.evictions == 0
    assert len(store) == 1


def _reference_acquire(
    table: dict[str, Any], checks: list[RateCheck], cost: int, now: float
) -> tuple[RateState, ...]:
    """The acquire rule spelt out with the plain steps: every limit checked at ``cost``;
    all admit: every state stored; else the admitting limits answered again at no cost."""
    steps = []
    for key, limit in checks:
        if isinstance(limit, GcraLimit):
            tat = table.get(key)
            state, tat_new = gcra_step(
                tat if tat is not None and tat > now else None, now, limit, cost
            )
            steps.append(
                (
                    state,
                    tat_new,
                    lambda c, k=key, lim=limit, t=tat: gcra_step(
                        t if t is not None and t > now else None, now, lim, c
                    )[0],
                )
            )
        else:
            stored, expires = table.get(key, (None, 0.0))
            state, window, exp = window_step(stored if expires > now else None, now, limit, cost)
            steps.append(
                (
                    state,
                    (window, exp),
                    lambda c, k=key, lim=limit, s=stored, e=expires: window_step(
                        s if e > now else None, now, lim, c
                    )[0],
                )
            )
    if all(s.allowed for s, _, _ in steps):
        for (key, _), (_, new, _) in zip(checks, steps, strict=True):
            table[key] = new
        return tuple(s for s, _, _ in steps)
    return tuple(again(0) if s.allowed else s for s, _, again in steps)


@pytest.mark.parametrize("seed", range(6))
async def test_memory_acquire_answers_as_the_plain_rule_does(seed: int) -> None:
    """Random multi-limit traffic (both algorithms, costs that fit, nearly fit and never
    fit, refusals by any limit): the memory store answers every state, refused or not,
    exactly as the rule computed step by step (its refusals take a one-pass shortcut)."""
    rng = random.Random(seed)
    clock = FakeClock()
    store = MemoryStore(clock=clock)
    table: dict[str, Any] = {}
    limits: list[RateLimit] = [
        GcraLimit(rate=rng.choice([2.0, 5.0, 40.0]), period=1.0, burst=rng.choice([3, 8, 20])),
        WindowLimit(limit=rng.choice([10, 25, 60]), period=rng.choice([1.0, 5.0])),
        GcraLimit(rate=1.0, period=rng.choice([0.5, 3.0]), burst=rng.choice([4, 12])),
        WindowLimit(limit=rng.choice([7, 30]), period=2.0),
    ]
    refused = 0
    for step in range(400):
        chosen = rng.sample(range(len(limits)), rng.randint(2, len(limits)))
        checks: list[RateCheck] = [(f"{{c}}k{i}", limits[i]) for i in chosen]
        cost = rng.choice([0, 1, 1, 1, 2, 3, 7, 25])
        expected = _reference_acquire(table, checks, cost, clock())
        got = await store.acquire(checks, cost=cost)
        assert got == expected, (seed, step, checks, cost)
        refused += not all(s.allowed for s in got)
        clock.advance(rng.choice([0.0, 0.01, 0.05, 0.2, 0.7]))
    assert 40 < refused < 360  # both outcomes, many times over


async def test_memory_store_refuses_to_mix_counters_and_rate_state() -> None:
    store = MemoryStore(clock=FakeClock())
    await store.gcra("g", rate=1, period=1.0, burst=1, cost=1)
    with pytest.raises(StateError):
        await store.incr("g")
    with pytest.raises(StateError):
        await store.get("g")


# ---------------------------------------------------------------- store_from_uri, scripts


def test_store_from_uri_picks_the_backend() -> None:
    assert isinstance(store_from_uri(StateConfig()), MemoryStore)
    redis_store = store_from_uri(StateConfig(store=DEAD_REDIS))
    assert isinstance(redis_store, RedisStore)
    assert redis_store.backend == "redis"


def test_lua_scripts_ship_with_the_package() -> None:
    assert "redis.call('TIME')" in load_script("acquire")
    assert "INCRBY" in load_script("incr")


async def test_redis_errors_are_wrapped_once_into_state_error() -> None:
    store = RedisStore(StateConfig(store=DEAD_REDIS, timeout_s=0.5))
    try:
        with pytest.raises(StateError) as info:
            await store.acquire([("k", WindowLimit(limit=1, period=1.0))], cost=1)
        assert info.value.backend == "redis" and info.value.operation == "acquire"
        assert info.value.__cause__ is not None
        assert not isinstance(info.value.__cause__, StateError)
        assert await store.ping() is False
    finally:
        await store.aclose()


# ---------------------------------------------------------------- circuit breaker


def test_breaker_opens_half_opens_and_closes() -> None:
    clock = FakeClock()
    events: list[str] = []
    breaker = CircuitBreaker(
        backend="redis",
        failures=3,
        reset_s=5.0,
        clock=clock,
        on_event=lambda kind, backend: events.append(kind),
    )
    for _ in range(2):
        assert breaker.allow()
        breaker.failure()
    assert _state(breaker) is BreakerState.CLOSED
    assert breaker.allow()
    breaker.success()  # a success resets the count
    for _ in range(3):
        assert breaker.allow()
        breaker.failure()
    assert _state(breaker) is BreakerState.OPEN
    assert not breaker.allow()
    clock.advance(4.9)
    assert not breaker.allow()
    clock.advance(0.1)
    assert breaker.allow()  # the one trial
    assert _state(breaker) is BreakerState.HALF_OPEN
    assert not breaker.allow()  # only one at a time
    breaker.failure()  # the trial failed: open again, for another reset_s
    assert _state(breaker) is BreakerState.OPEN
    clock.advance(5.0)
    assert breaker.allow()
    breaker.abandon()  # a cancelled trial frees the slot without a verdict
    assert breaker.allow()
    breaker.success()
    assert _state(breaker) is BreakerState.CLOSED
    assert breaker.errors == 6
    assert events == [
        "error",
        "error",
        "error",
        "error",
        "error",
        "open",
        "half_open",
        "error",
        "open",
        "half_open",
        "closed",
    ]


def _state(thing: CircuitBreaker | ResilientStore) -> BreakerState:
    # a call, so that mypy does not narrow the state across awaits
    return thing.state


def _dead_store(
    clock: FakeClock, events: list[tuple[str, str]], failures: int = 3
) -> ResilientStore:
    config = StateConfig(
        store=DEAD_REDIS, timeout_s=0.5, breaker_failures=failures, breaker_reset_s=5.0
    )
    return ResilientStore.from_config(
        store_from_uri(config),
        config,
        clock=clock,
        on_event=lambda kind, backend: events.append((kind, backend)),
    )


async def test_breaker_fails_fast_while_redis_is_down() -> None:
    clock = FakeClock()
    events: list[tuple[str, str]] = []
    store = _dead_store(clock, events)
    try:
        for _ in range(3):
            with pytest.raises(StateError) as info:
                await store.incr("n")
            assert info.value.__cause__ is not None  # the real connection error
        assert _state(store) is BreakerState.OPEN
        assert store.errors == 3
        with pytest.raises(StateError, match="circuit breaker open"):
            await store.acquire([("k", WindowLimit(limit=1, period=1.0))], cost=1)
        assert store.errors == 3 and store.short_circuits == 1
        clock.advance(5.0)
        with pytest.raises(StateError):  # the trial goes to Redis, and fails
            await store.get("k")
        assert store.errors == 4 and _state(store) is BreakerState.OPEN
        assert events == [("error", "redis")] * 3 + [
            ("open", "redis"),
            ("short_circuit", "redis"),
            ("half_open", "redis"),
            ("error", "redis"),
            ("open", "redis"),
        ]
    finally:
        await store.aclose()


async def test_breaker_ignores_caller_errors() -> None:
    events: list[tuple[str, str]] = []
    store = _dead_store(FakeClock(), events, failures=1)
    try:
        with pytest.raises(ValueError):
            await store.acquire([], cost=1)
        assert _state(store) is BreakerState.CLOSED and store.errors == 0 and events == []
    finally:
        await store.aclose()


async def test_memory_fallback_serves_while_redis_is_down() -> None:
    clock = FakeClock()
    events: list[tuple[str, str]] = []
    store = _dead_store(clock, events)
    view = store.with_memory_fallback()
    assert view.with_memory_fallback().fallback is view.fallback  # one shared memory store
    assert isinstance(view.fallback, MemoryStore)
    try:
        limit = GcraLimit(rate=1, period=HOUR, burst=4)
        states = [(await view.acquire([("k", limit)], cost=1))[0] for _ in range(5)]
        assert [s.allowed for s in states] == [True, True, True, True, False]
        assert view.errors == 3  # then the breaker opened: no more trips to Redis
        assert view.fallbacks == 5
        assert _state(store) is BreakerState.OPEN  # the views share one breaker
        with pytest.raises(StateError):  # the view without a fallback still raises
            await store.get("k")
        assert [k for k, _ in events].count("fallback") == 5
        assert ("open", "redis") in events
    finally:
        await store.aclose()


async def test_memory_needs_no_fallback() -> None:
    config = StateConfig()
    store = ResilientStore.from_config(store_from_uri(config), config)
    assert store.with_memory_fallback() is store
    assert store.backend == "memory"
    assert (await store.gcra("k", rate=1, period=1.0, burst=1, cost=1)).allowed


class TcpProxy:
    """A real TCP relay to Redis that can be cut and restored (no mocks)."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self._writers |= {writer, up_writer}
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.close()
        await self._server.wait_closed()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for writer in self._writers:
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        self._writers.clear()
        self._tasks.clear()


@pytest.mark.redis
@REDIS_SKIP
async def test_breaker_recovers_when_redis_comes_back() -> None:
    assert REDIS_URL is not None
    parts = urlsplit(REDIS_URL)
    if parts.scheme != "redis":
        pytest.skip("the relay speaks plain TCP: needs a redis:// URL")
    proxy = TcpProxy(parts.hostname or "127.0.0.1", parts.port or 6379)
    await proxy.start()
    auth = parts.netloc.rpartition("@")[0]
    url = f"redis://{auth + '@' if auth else ''}127.0.0.1:{proxy.port}{parts.path}"
    prefix = redis_prefix()
    config = StateConfig(
        store=url, key_prefix=prefix, timeout_s=1.0, breaker_failures=2, breaker_reset_s=5.0
    )
    clock = FakeClock()
    events: list[str] = []
    store = ResilientStore.from_config(
        store_from_uri(config), config, clock=clock, on_event=lambda kind, _: events.append(kind)
    )
    try:
        await store.set("k", b"v")
        assert await store.get("k") == b"v"
        await proxy.stop()  # Redis "goes away"
        for _ in range(2):
            with pytest.raises(StateError):
                await store.get("k")
        assert _state(store) is BreakerState.OPEN
        with pytest.raises(StateError, match="circuit breaker open"):
            await store.get("k")
        await proxy.start()  # ... and comes back on the same address
        clock.advance(5.0)
        assert await store.get("k") == b"v"  # the trial succeeds
        assert _state(store) is BreakerState.CLOSED
        assert events == ["error", "error", "open", "short_circuit", "half_open", "closed"]
    finally:
        await store.aclose()
        await proxy.stop()
        await delete_prefix(REDIS_URL, prefix)


# ---------------------------------------------------------------- redis only: automatic pipelining


@contextlib.asynccontextmanager
async def _redis_store(
    url: str | None = None, *, timeout_s: float = 2.0, **kwargs: int
) -> AsyncIterator[RedisStore]:
    """A Redis store under a fresh prefix, closed and cleaned up afterwards."""
    assert REDIS_URL is not None
    prefix = redis_prefix()
    store = RedisStore(
        StateConfig(store=url or REDIS_URL, key_prefix=prefix, timeout_s=timeout_s), **kwargs
    )
    try:
        yield store
    finally:
        await store.aclose()
        await delete_prefix(REDIS_URL, prefix)


def _proxied(proxy: TcpProxy) -> str:
    """``REDIS_URL`` through ``proxy`` (credentials and database kept)."""
    assert REDIS_URL is not None
    parts = urlsplit(REDIS_URL)
    if parts.scheme != "redis":
        pytest.skip("the relay speaks plain TCP: needs a redis:// URL")
    auth = parts.netloc.rpartition("@")[0]
    return f"redis://{auth + '@' if auth else ''}127.0.0.1:{proxy.port}{parts.path}"


class SilentServer:
    """Accepts connections and never answers: Redis hung, or a black hole."""

    def __init__(self) -> None:
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def __aenter__(self) -> str:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return f"redis://127.0.0.1:{self.port}/0"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        with contextlib.suppress(OSError):
            while await reader.read(65536):
                pass

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.close()
        await self._server.wait_closed()


@pytest.mark.redis
@REDIS_SKIP
@pytest.mark.parametrize("algorithm", ["gcra", "sliding_window"])
@pytest.mark.parametrize("lanes", [1, 4])
async def test_concurrent_acquisitions_are_batched_and_exact(algorithm: str, lanes: int) -> None:
    """500 acquisitions in one loop turn leave in full batches; exactly 100 of 100 admitted."""
    limit: RateLimit = (
        GcraLimit(rate=100, period=HOUR, burst=100)
        if algorithm == "gcra"
        else WindowLimit(limit=100, period=HOUR)
    )
    async with _redis_store(max_connections=lanes) as store:
        results = await asyncio.gather(
            *(store.acquire([("hot", limit)], cost=1) for _ in range(500))
        )
        assert sum(state.allowed for (state,) in results) == 100
        pipeline = store._pipeline
        assert pipeline.commands == 500
        assert pipeline.batches == 4  # 128 + 128 + 128 + 116, never one round trip each
        assert pipeline.largest_batch == 128
        (after,) = await store.acquire([("hot", limit)], cost=1)
        assert not after.allowed and after.remaining == 0


@pytest.mark.redis
@REDIS_SKIP
async def test_a_failing_command_fails_only_its_own_caller() -> None:
    async with _redis_store() as store:
        await store.window("w", limit=10, period=HOUR, cost=1)  # a hash
        await store.set("text", b"not a number")
        good = WindowLimit(limit=10, period=HOUR)
        batches = store._pipeline.batches
        results = await asyncio.gather(
            store.gcra("w", rate=1, period=HOUR, burst=5, cost=1),  # GET on a hash: WRONGTYPE
            *(store.acquire([(f"k{i}", good)], cost=1) for i in range(10)),
            store.incr("text"),  # INCRBY on text
            store.get("text"),
            return_exceptions=True,
        )
        assert store._pipeline.batches == batches + 1  # all in one round trip
        wrong_type, *admitted, not_a_number, text = results
        assert isinstance(wrong_type, StateError) and wrong_type.operation == "acquire"
        assert isinstance(wrong_type.__cause__, ResponseError)
        assert isinstance(not_a_number, StateError) and not_a_number.operation == "incr"
        assert isinstance(not_a_number.__cause__, ResponseError)
        for r in admitted:
            assert isinstance(r, tuple) and isinstance(r[0], RateState)
            assert r[0].allowed and r[0].remaining == 9
        assert text == b"not a number"
        # the connection stays in step: later answers go to the right callers
        state, value = await asyncio.gather(
            store.window("w", limit=10, period=HOUR, cost=1), store.get("text")
        )
        assert state.allowed and state.remaining == 8 and value == b"not a number"


@pytest.mark.redis
@REDIS_SKIP
async def test_a_lost_connection_fails_every_waiting_caller_then_reconnects() -> None:
    assert REDIS_URL is not None
    parts = urlsplit(REDIS_URL)
    proxy = TcpProxy(parts.hostname or "127.0.0.1", parts.port or 6379)
    await proxy.start()
    try:
        async with _redis_store(_proxied(proxy), timeout_s=1.0) as store:
            await store.set("k", b"v")  # connected
            await proxy.stop()  # the connection drops under the store's feet
            batches = store._pipeline.batches
            limit = WindowLimit(limit=100, period=HOUR)
            results = await asyncio.gather(
                *(store.acquire([(f"k{i}", limit)], cost=1) for i in range(50)),
                store.get("k"),
                return_exceptions=True,
            )
            assert store._pipeline.batches == batches + 1
            assert all(isinstance(r, StateError) for r in results)
            errors = [r for r in results if isinstance(r, StateError)]
            assert all(e.__cause__ is not None for e in errors)
            assert {e.operation for e in errors} == {"acquire", "get"}
            assert len({id(e.__cause__) for e in errors}) == len(errors)  # one cause each
            await proxy.start()
            assert await store.get("k") == b"v"  # a fresh connection
    finally:
        await proxy.stop()


async def test_a_refused_connection_fails_every_waiting_caller() -> None:
    store = RedisStore(StateConfig(store=DEAD_REDIS, timeout_s=0.5))
    try:
        limit = WindowLimit(limit=1, period=1.0)
        results = await asyncio.gather(
            *(store.acquire([(f"k{i}", limit)], cost=1) for i in range(20)),
            return_exceptions=True,
        )
        assert all(isinstance(r, StateError) and r.__cause__ is not None for r in results)
        assert store._pipeline.batches == 1
    finally:
        await store.aclose()


async def test_a_silent_server_times_out_every_caller_within_the_budget() -> None:
    """Queued commands count their wait: 200 commands, 1 connection, 16 a batch, one budget."""
    async with SilentServer() as url:
        store = RedisStore(StateConfig(store=url, timeout_s=0.2), max_connections=1, max_batch=16)
        try:
            loop = asyncio.get_running_loop()
            started = loop.time()
            limit = WindowLimit(limit=1, period=1.0)
            results = await asyncio.gather(
                *(store.acquire([(f"k{i}", limit)], cost=1) for i in range(200)),
                return_exceptions=True,
            )
            elapsed = loop.time() - started
            assert all(isinstance(r, StateError) and "timed out" in str(r) for r in results)
            assert 0.19 <= elapsed < 0.6
            assert store._pipeline.batches == 1  # the rest timed out in the queue, unsent
        finally:
            await store.aclose()


async def test_closing_fails_the_calls_in_flight() -> None:
    async with SilentServer() as url:
        store = RedisStore(StateConfig(store=url, timeout_s=5.0))
        limit = WindowLimit(limit=1, period=1.0)
        calls = asyncio.gather(
            *(store.acquire([(f"k{i}", limit)], cost=1) for i in range(5)),
            return_exceptions=True,
        )
        await asyncio.sleep(0.05)  # sent, waiting for an answer that never comes
        started = asyncio.get_running_loop().time()
        await store.aclose()
        results = await calls
        assert asyncio.get_running_loop().time() - started < 1.0
        assert all(isinstance(r, StateError) and "closed" in str(r) for r in results)


@pytest.mark.redis
@REDIS_SKIP
async def test_a_cancelled_caller_is_not_sent() -> None:
    async with _redis_store() as store:
        limit = WindowLimit(limit=100, period=HOUR)
        tasks = [asyncio.create_task(store.acquire([("k", limit)], cost=1)) for _ in range(10)]
        await asyncio.sleep(0)  # every task has queued its command; none has left yet
        tasks[3].cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert isinstance(results[3], asyncio.CancelledError)
        assert store._pipeline.commands == 9
        (after,) = await store.acquire([("k", limit)], cost=1)
        assert after.remaining == 100 - 10  # nine before it, and this one


@pytest.mark.redis
@REDIS_SKIP
async def test_scripts_are_reloaded_after_script_flush() -> None:
    assert REDIS_URL is not None
    async with _redis_store() as store:
        limit = WindowLimit(limit=100, period=HOUR)
        await store.acquire([("k", limit)], cost=1)
        assert await store.incr("n") == 1
        client = Redis.from_url(REDIS_URL)
        try:
            await client.script_flush()  # Redis forgets every script (as after a restart)
            shas = (store._acquire.sha.decode(), store._incr.sha.decode())
            assert await client.script_exists(*shas) == [False, False]
            acquired, counts = await asyncio.gather(  # all in the same loop turn
                asyncio.gather(*(store.acquire([("k", limit)], cost=1) for _ in range(150))),
                asyncio.gather(store.incr("n"), store.incr("n")),
            )
            assert sum(state.allowed for (state,) in acquired) == 99  # still exact
            assert sorted(counts) == [2, 3]
            assert await client.script_exists(*shas) == [True, True]
        finally:
            await client.aclose()


@pytest.mark.redis
@REDIS_SKIP
def test_one_store_serves_successive_event_loops() -> None:
    """A store closed in one loop works again in the next (the guard's tests start many)."""
    assert REDIS_URL is not None
    prefix = redis_prefix()
    store = RedisStore(StateConfig(store=REDIS_URL, key_prefix=prefix, timeout_s=2.0))
    limit = WindowLimit(limit=10, period=HOUR)

    async def use() -> int:
        try:
            (state,) = await store.acquire([("k", limit)], cost=1)
            return state.remaining
        finally:
            await store.aclose()

    try:
        assert [asyncio.run(use()) for _ in range(3)] == [9, 8, 7]
    finally:
        asyncio.run(delete_prefix(REDIS_URL, prefix))


@pytest.mark.redis
@REDIS_SKIP
@pytest.mark.parametrize("turns", [1, 2], ids=["queued", "lane-not-started"])
async def test_closing_before_the_batch_leaves_fails_it_and_frees_the_lane(turns: int) -> None:
    """Closed while the commands wait in the queue, or in a lane that has not run yet."""
    async with _redis_store(max_connections=1) as store:
        limit = WindowLimit(limit=10, period=HOUR)
        calls = asyncio.gather(
            *(store.acquire([("k", limit)], cost=1) for _ in range(5)), return_exceptions=True
        )
        for _ in range(turns):
            await asyncio.sleep(0)  # 1: queued; 2: handed to a lane task not yet started
        await store.aclose()
        results = await calls
        assert all(isinstance(r, StateError) and "closed" in str(r) for r in results)
        (state,) = await store.acquire([("k", limit)], cost=1)  # the one lane is free again
        assert state.allowed and state.remaining == 9  # nothing of the closed batch was sent


# ------------------------------------------------------------------ clients in quarantine now


async def test_quarantined_now_counts_live_quarantine_keys(backend: Backend) -> None:
    store = backend.store
    if not getattr(store, "indexes_quarantines", True):
        # a cluster keeps no index: quarantines are plain keys, the count is not known
        await store.set("quarantine:a", b"1", 60.0)
        assert await store.get("quarantine:a") == b"1"
        with pytest.raises(StateError):
            await asyncio.to_thread(store.quarantined_now)
        return
    assert await asyncio.to_thread(store.quarantined_now) == 0
    await store.set("quarantine:a", b"1", 60.0)
    await store.set("quarantine:b", b"1", 0.3)
    await store.set("quarantine:c", b"1", None)
    await store.set("standing:x:y", b"1", 60.0)  # another flag: not a quarantine
    await store.set("quarantinex", b"1", 60.0)  # not under the prefix
    # read off the event loop, as the metrics exposition does
    assert await asyncio.to_thread(store.quarantined_now) == 3
    await store.set("quarantine:a", b"1", 60.0)  # set again: still one client
    assert await asyncio.to_thread(store.quarantined_now) == 3
    await backend.advance(0.4)
    assert await asyncio.to_thread(store.quarantined_now) == 2
    await store.delete("quarantine:c")
    assert await asyncio.to_thread(store.quarantined_now) == 1


async def test_quarantined_now_sees_flags_that_overflowed() -> None:
    clock = FakeClock()
    store = MemoryStore(max_keys=100, max_flag_keys=2, clock=clock)
    for client in "abcd":
        await store.set(f"quarantine:{client}", b"1", 60.0)
    assert store.flag_overflows == 2
    assert store.quarantined_now() == 4
    clock.advance(61.0)
    assert store.quarantined_now() == 0


@pytest.mark.redis
@REDIS_SKIP
async def test_redis_quarantine_index_stays_small_and_under_the_prefix() -> None:
    assert REDIS_URL is not None
    prefix = redis_prefix()
    store = RedisStore(StateConfig(store=REDIS_URL, key_prefix=prefix, timeout_s=2.0))
    client = Redis.from_url(REDIS_URL)
    try:
        for i in range(5):
            await store.set(f"quarantine:{i}", b"1", 0.05)
        await asyncio.sleep(0.1)
        await store.set("quarantine:live", b"1", 60.0)  # setting one sweeps the expired
        members = await client.zrange(prefix + "quarantine-index", 0, -1)
        assert members == [(prefix + "quarantine:live").encode()]
        assert store.quarantined_now() == 1
        assert await client.exists(prefix + "quarantine-index", prefix + "quarantine:live") == 2
    finally:
        await store.aclose()
        await client.aclose()
        await delete_prefix(REDIS_URL, prefix)


async def test_quarantined_now_fails_as_a_state_error() -> None:
    store = RedisStore(StateConfig(store=DEAD_REDIS, timeout_s=0.5))
    try:
        with pytest.raises(StateError):
            await asyncio.to_thread(store.quarantined_now)
    finally:
        await store.aclose()


async def test_resilient_store_counts_until_its_breaker_opens() -> None:
    clock = FakeClock()
    inner = MemoryStore(clock=clock)
    breaker = CircuitBreaker(backend="memory", failures=1, reset_s=5.0, clock=clock)
    store = ResilientStore(inner, breaker=breaker, clock=clock)
    await store.set("quarantine:a", b"1", 60.0)
    assert store.quarantined_now() == 1
    breaker.failure()
    assert breaker.state is BreakerState.OPEN
    with pytest.raises(StateError):
        store.quarantined_now()
