"""The Redis Cluster store: its URL, its keys and slots, and a master that dies and comes back.

The shared store suites (``tests/guard/test_stores.py``, ``tests/detectors/test_rate.py``)
already run on the ``redis-cluster`` backend; this file holds what only a
cluster has. The cluster cases use real ``redis-server`` processes
(``tests/redis_cluster.py``): the session's three-master cluster, or one of the
test's own where a node is stopped.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from redis.crc import key_slot

from inference_guard.detectors.base import Query
from inference_guard.detectors.rate import RateLimitDetector
from inference_guard.detectors.store import GcraLimit, WindowLimit
from inference_guard.guard.config import StateConfig
from inference_guard.guard.errors import ConfigurationError, StateError
from inference_guard.guard.stores import BreakerState, ResilientStore, store_from_uri
from inference_guard.guard.stores.cluster import RedisClusterStore, parse_cluster_url
from tests.redis_cluster import LocalCluster
from tests.stores_fixture import (
    FakeClock,
    delete_prefix,
    redis_prefix,
    start_local_cluster,
)

pytestmark = pytest.mark.anyio

HOUR = 3600.0
SECRET = "pa55-w0rd-not-to-be-shown"


# ---------------------------------------------------------------- the URL (no server needed)


def test_the_url_lists_the_startup_nodes() -> None:
    nodes, options = parse_cluster_url("redis+cluster://10.0.0.1:7000,10.0.0.2,[::1]:7002")
    assert nodes == [("10.0.0.1", 7000), ("10.0.0.2", 6379), ("::1", 7002)]
    assert options == {}
    nodes, options = parse_cluster_url(f"rediss+cluster://guard:{SECRET}@a:7000,b:7001/0")
    assert nodes == [("a", 7000), ("b", 7001)]
    assert options == {"username": "guard", "password": SECRET, "ssl": True}
    _, options = parse_cluster_url("rediss+cluster://a:7000?ssl_cert_reqs=none")
    assert options == {"ssl_cert_reqs": "none", "ssl": True}


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        (f"redis+cluster://u:{SECRET}@", "no node"),
        (f"redis+cluster://u:{SECRET}@a:7000,:7001", "no host"),
        (f"redis+cluster://u:{SECRET}@a:70000", "port"),
        (f"redis+cluster://u:{SECRET}@a:7000/1", "database 0 only"),
        (f"redis+cluster://u:{SECRET}@[::1:7000", "IPv6"),
    ],
)
def test_a_bad_url_is_a_configuration_error_that_hides_the_password(url: str, problem: str) -> None:
    with pytest.raises(ConfigurationError) as err:
        RedisClusterStore(StateConfig(store=url))
    assert err.value.key == "state.store" and problem in str(err.value)
    assert SECRET not in str(err.value)


def test_an_unknown_url_option_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match=r"state\.store.*no_such_option"):
        RedisClusterStore(StateConfig(store="redis+cluster://a:7000?no_such_option=1"))


def test_store_from_uri_builds_a_cluster_store_without_connecting() -> None:
    for scheme in ("redis+cluster", "rediss+cluster"):
        store = store_from_uri(StateConfig(store=f"{scheme}://127.0.0.1:1,127.0.0.1:2"))
        assert isinstance(store, RedisClusterStore) and store.backend == "redis-cluster"


def test_a_brace_in_the_key_prefix_is_refused() -> None:
    """The prefix comes before the rate keys' own ``{...}`` tag and would replace it."""
    for prefix in ("{guard}:", "guard{", "guard}"):
        with pytest.raises(ConfigurationError) as err:
            RedisClusterStore(StateConfig(store="redis+cluster://a:7000", key_prefix=prefix))
        assert err.value.key == "state.key_prefix"


async def test_a_cluster_that_cannot_be_reached_is_a_state_error() -> None:
    store = RedisClusterStore(StateConfig(store="redis+cluster://127.0.0.1:1", timeout_s=0.5))
    try:
        started = time.monotonic()
        with pytest.raises(StateError) as err:
            await store.get("k")
        assert time.monotonic() - started < 0.5 + 0.25
        assert err.value.backend == "redis-cluster" and err.value.operation == "get"
        assert not await store.ping()
    finally:
        await store.aclose()


# ---------------------------------------------------------------- keys and slots


@pytest.fixture
async def cluster_store(redis_cluster: LocalCluster) -> AsyncIterator[RedisClusterStore]:
    prefix = redis_prefix()
    store = RedisClusterStore(
        StateConfig(store=redis_cluster.url, key_prefix=prefix, timeout_s=2.0)
    )
    try:
        yield store
    finally:
        await store.aclose()
        await delete_prefix(redis_cluster.url, prefix)


@pytest.mark.redis
async def test_keys_of_one_acquire_must_share_a_slot(cluster_store: RedisClusterStore) -> None:
    limit = WindowLimit(limit=5, period=HOUR)
    with pytest.raises(ValueError, match="hash tag"):
        await cluster_store.acquire([("a:0w", limit), ("b:1w", limit)], cost=1)
    states = await cluster_store.acquire([("{a}:0w", limit), ("{a}:1w", limit)], cost=1)
    assert [s.remaining for s in states] == [4, 4]


@pytest.mark.redis
async def test_rate_keys_keep_a_client_on_one_slot_and_spread_clients_over_every_master(
    redis_cluster: LocalCluster, cluster_store: RedisClusterStore
) -> None:
    detector = RateLimitDetector(
        "rate",
        store=cluster_store,
        limits=[GcraLimit(rate=10, period=HOUR, burst=20), WindowLimit(limit=1000, period=HOUR)],
        key="client_policy",
    )
    clients = [f"{i:016x}" for i in range(300)]
    for client in clients:
        result = await detector.inspect(Query(client=client, policy="api", rows=None))
        assert not result.anomalous
    prefix = cluster_store.prefix
    per_master: dict[int, int] = {}
    for port in redis_cluster.ports:
        keys = list(redis_cluster.client(port).scan_iter(match=prefix + "*", count=1000))
        per_master[port] = len(keys)
        for key in keys:  # each key lives on the master of its slot
            assert redis_cluster.master_of(key_slot(key)) == port
    assert sum(per_master.values()) == 2 * len(clients)
    assert all(count > 100 for count in per_master.values()), per_master
    for client in clients[:20]:
        base = f"{prefix}rate:{{rate:cp:api:{client}}}"
        assert key_slot(f"{base}:0g".encode()) == key_slot(f"{base}:1w".encode())


@pytest.mark.redis
async def test_scripts_are_loaded_again_on_a_node_that_forgot_them(
    redis_cluster: LocalCluster, cluster_store: RedisClusterStore
) -> None:
    limit = WindowLimit(limit=10, period=HOUR)
    (state,) = await cluster_store.acquire([("{k}:0w", limit)], cost=1)
    assert state.remaining == 9
    assert await cluster_store.incr("n", 2) == 2
    for port in redis_cluster.ports:
        redis_cluster.client(port).script_flush()
    (state,) = await cluster_store.acquire([("{k}:0w", limit)], cost=1)
    assert state.remaining == 8
    assert await cluster_store.incr("n", 2) == 4


@pytest.mark.redis
def test_one_store_serves_successive_event_loops(redis_cluster: LocalCluster) -> None:
    prefix = redis_prefix()
    store = RedisClusterStore(
        StateConfig(store=redis_cluster.url, key_prefix=prefix, timeout_s=2.0)
    )
    limit = WindowLimit(limit=10, period=HOUR)

    async def use() -> int:
        try:
            (state,) = await store.acquire([("{k}", limit)], cost=1)
            return state.remaining
        finally:
            await store.aclose()

    try:
        assert [asyncio.run(use()) for _ in range(3)] == [9, 8, 7]
    finally:
        asyncio.run(delete_prefix(redis_cluster.url, prefix))


@pytest.mark.redis
async def test_many_concurrent_calls_on_a_fresh_store_all_succeed(
    cluster_store: RedisClusterStore,
) -> None:
    """More callers than connections, before the slot map is known: they queue, none fails."""
    limit = GcraLimit(rate=1, period=HOUR, burst=5)
    results = await asyncio.gather(
        *(cluster_store.acquire([(f"{{c{i}}}:0g", limit)], cost=1) for i in range(400))
    )
    assert all(state.allowed and state.remaining == 4 for (state,) in results)


# ---------------------------------------------------------------- a master dies and comes back


def _key_on(cluster: LocalCluster, port: int, prefix: str, key: Callable[[int], str]) -> str:
    """The first ``key(i)`` whose slot (under ``prefix``) the master on ``port`` serves."""
    for i in range(100_000):
        if cluster.master_of(key_slot(f"{prefix}{key(i)}".encode())) == port:
            return key(i)
    raise LookupError(port)


@pytest.mark.redis
async def test_a_master_restart_fails_cleanly_and_recovers_without_its_data(
    tmp_path: Path,
) -> None:
    """No replica: the master's slots fail at once, then the whole cluster (CLUSTERDOWN);
    the breaker opens; the master restarts on its port and the store recovers, but the
    counters and flags that lived on it are gone."""
    cluster = start_local_cluster(tmp_path, node_timeout_ms=2000)
    prefix = redis_prefix()
    config = StateConfig(
        store=cluster.url, key_prefix=prefix, timeout_s=0.5, breaker_failures=3,
        breaker_reset_s=5.0,
    )  # fmt: skip
    clock = FakeClock()
    events: list[str] = []
    inner = RedisClusterStore(config)
    store = ResilientStore.from_config(
        inner, config, clock=clock, on_event=lambda kind, backend: events.append(kind)
    )
    victim_port, *survivors = cluster.ports
    victim = _key_on(cluster, victim_port, prefix, lambda i: f"quarantine:{i:016x}")
    survivor = _key_on(cluster, survivors[0], prefix, lambda i: f"quarantine:{i:016x}")
    rate_key = _key_on(cluster, victim_port, prefix, lambda i: f"rate:{{r:c:{i:016x}}}:0w")
    limit = WindowLimit(limit=10, period=HOUR)
    try:
        await store.set(victim, b"1", ttl=HOUR)
        await store.set(survivor, b"1", ttl=HOUR)
        (state,) = await store.acquire([(rate_key, limit)], cost=3)
        assert state.remaining == 7
        assert await store.ping()

        cluster.stop_node(victim_port)
        # its slots fail at once, as a StateError well inside the time budget ...
        started = time.monotonic()
        with pytest.raises(StateError) as err:
            await inner.get(victim)
        assert time.monotonic() - started < config.timeout_s
        assert err.value.backend == "redis-cluster" and "ConnectionError" in str(err.value)
        # ... while the other masters still serve theirs, until the cluster marks it failed
        assert await inner.get(survivor) == b"1"
        assert not await inner.ping()

        # no replica to promote and full coverage required: every node refuses every key
        cluster.wait_state("fail", ports=survivors)
        with pytest.raises(StateError, match=r"ClusterDownError|timed out"):
            await inner.get(survivor)
        for _ in range(config.breaker_failures):
            with pytest.raises(StateError):
                await store.get(survivor)
        assert store.state is BreakerState.OPEN
        started = time.monotonic()
        with pytest.raises(StateError, match="circuit breaker open"):
            await store.get(survivor)
        assert time.monotonic() - started < 0.05  # open: fails fast, Redis is not asked
        assert await store.with_memory_fallback().get(survivor) is None  # served by memory

        # back on the same port with its nodes.conf: the same master of the same slots
        cluster.start_node(victim_port)
        cluster.wait_state("ok")
        clock.advance(config.breaker_reset_s)  # the breaker lets one trial through
        assert await store.get(survivor) == b"1"
        assert store.state is BreakerState.CLOSED
        assert await store.ping()
        # what lived on the restarted master is gone: the flag and the counter
        assert await store.get(victim) is None
        (state,) = await store.acquire([(rate_key, limit)], cost=1)
        assert state.remaining == 9  # counted afresh (and its script loaded again)
        assert events.count("open") == 1 and events[-2:] == ["half_open", "closed"]
        assert "fallback" in events
    finally:
        await inner.aclose()
        cluster.close()


# ---------------------------------------------------------------- without redis-server


@pytest.mark.parametrize(
    ("ci", "outcome"), [("", pytest.skip.Exception), ("true", pytest.fail.Exception)]
)
def test_without_redis_installed_cluster_cases_skip_except_under_ci(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ci: str, outcome: type[BaseException]
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no redis-server, no redis-cli
    monkeypatch.setenv("CI", ci)
    with pytest.raises(outcome, match="redis-server and redis-cli not on PATH"):
        start_local_cluster(tmp_path)
