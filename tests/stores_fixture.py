"""Store backends for the shared suites: every test runs once per backend.

``memory`` runs on a fake clock that tests advance; ``redis`` runs against the
real server at ``GUARD_TEST_REDIS_URL`` (e.g. ``redis://127.0.0.1:6379/15``),
on real time (Redis ``TIME``), with a unique key prefix per test that is
deleted afterwards. Without the variable the Redis cases skip, saying why; with
it set and Redis unreachable they fail.

``redis-cluster`` runs against a real three-master Redis Cluster that the
session fixture :func:`redis_cluster` starts on free local ports (and stops at
the end), also with a unique prefix per test. Without ``redis-server`` and
``redis-cli`` on ``PATH`` those cases skip and say why, except under CI
(``CI`` set, as ``.ci/run`` and CI services do), where they fail; a cluster
that does not start fails them everywhere.

Imported by ``tests/guard/conftest.py`` and ``tests/detectors/conftest.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster

from inference_guard.guard.config import StateConfig
from inference_guard.guard.stores.cluster import RedisClusterStore, parse_cluster_url
from inference_guard.guard.stores.memory import MemoryStore
from inference_guard.guard.stores.redis import RedisStore
from tests.redis_cluster import ClusterStartError, LocalCluster, missing_binaries

__all__ = [
    "BACKENDS",
    "REDIS_SKIP",
    "REDIS_URL",
    "SHARED_BACKENDS",
    "Backend",
    "FakeClock",
    "anyio_backend",
    "backend",
    "redis_cluster",
    "redis_prefix",
    "server_client",
    "start_local_cluster",
]

#: the Redis server for the ``redis`` cases; ``None`` skips them
REDIS_URL = os.environ.get("GUARD_TEST_REDIS_URL") or None
REDIS_SKIP = pytest.mark.skipif(
    REDIS_URL is None,
    reason="set GUARD_TEST_REDIS_URL (e.g. redis://127.0.0.1:6379/15) to run the Redis backend",
)


class FakeClock:
    """A clock that only moves when told to."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class Backend:
    """One store under test and how to let time pass for it."""

    name: str
    store: MemoryStore | RedisStore
    #: the fake clock of the memory store; ``None`` for Redis (server time)
    clock: FakeClock | None
    #: the key prefix the store writes under (Redis only)
    prefix: str = ""
    #: the store's URL (Redis only)
    url: str = ""

    @property
    def exact(self) -> bool:
        """Time is controlled, so timings can be asserted exactly."""
        return self.clock is not None

    async def advance(self, seconds: float) -> None:
        """Let ``seconds`` pass: move the fake clock, or really wait for Redis."""
        if self.clock is not None:
            self.clock.advance(seconds)
        else:
            await asyncio.sleep(seconds)

    async def keys(self) -> list[str]:
        """Every key the store holds, without the prefix: what the backend really wrote."""
        if isinstance(self.store, MemoryStore):
            return list(self.store._data)
        async with server_client(self.url) as client:
            raw = [key async for key in client.scan_iter(match=self.prefix + "*")]
        return [key.decode()[len(self.prefix) :] for key in raw]

    async def pttl(self, key: str) -> int:
        """Milliseconds ``key`` (without the prefix) has left on a Redis backend."""
        async with server_client(self.url) as client:
            return int(await client.pttl(self.prefix + key))


BACKENDS = [
    pytest.param("memory", id="memory"),
    pytest.param("redis", id="redis", marks=[pytest.mark.redis, REDIS_SKIP]),
    pytest.param("redis-cluster", id="redis-cluster", marks=[pytest.mark.redis]),
]

#: the backends state is shared on (every process sees the same), for what a memory store never does
SHARED_BACKENDS = [p for p in BACKENDS if p.id != "memory"]


def _ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def start_local_cluster(directory: Path, **options: int) -> LocalCluster:
    """A started :class:`LocalCluster`; skips the test without Redis installed, except under CI."""
    missing = missing_binaries()
    if missing:
        reason = (
            f"{' and '.join(missing)} not on PATH: the redis-cluster cases start a local "
            "Redis Cluster (install Redis to run them)"
        )
        if _ci():
            pytest.fail(f"CI is set, so this is an error: {reason}")
        pytest.skip(reason)
    cluster = LocalCluster(directory, **options)
    try:
        return cluster.start()
    except ClusterStartError as exc:
        pytest.fail(f"could not start a local Redis Cluster: {exc}")


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """A local three-master Redis Cluster for the whole session (stopped at the end)."""
    cluster = start_local_cluster(tmp_path_factory.mktemp("redis-cluster"))
    try:
        yield cluster
    finally:
        cluster.close()


@contextlib.asynccontextmanager
async def server_client(url: str) -> AsyncIterator[Redis | RedisCluster]:
    """A plain redis-py client of a ``redis://`` server or a ``redis+cluster://`` cluster."""
    client: Redis | RedisCluster
    if url.startswith("redis+cluster://"):
        nodes, options = parse_cluster_url(url)
        client = RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in nodes], **options)
    else:
        client = Redis.from_url(url)
    try:
        yield client
    finally:
        await client.aclose()


def redis_prefix() -> str:
    """A key prefix no other test (or test run) uses."""
    return f"guardtest:{uuid.uuid4().hex}:"


async def delete_prefix(url: str, prefix: str) -> None:
    """Delete every key under ``prefix`` (on every master of a cluster)."""
    async with server_client(url) as client:
        keys = [key async for key in client.scan_iter(match=prefix + "*", count=1000)]
        for key in keys:  # one by one: a cluster refuses a DEL across slots
            await client.delete(key)


@pytest.fixture
def anyio_backend() -> str:
    """Async tests run on asyncio (redis.asyncio needs it)."""
    return "asyncio"


@pytest.fixture(params=BACKENDS)
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    """Each backend in turn: a fresh memory store, or Redis (Cluster) under a fresh prefix."""
    if request.param == "memory":
        clock = FakeClock()
        yield Backend("memory", MemoryStore(max_keys=10_000, clock=clock), clock)
        return
    if request.param == "redis-cluster":
        url = request.getfixturevalue("redis_cluster").url
        prefix = redis_prefix()
        cluster_store = RedisClusterStore(StateConfig(store=url, key_prefix=prefix, timeout_s=2.0))
        if not await cluster_store.ping():
            await cluster_store.aclose()
            pytest.fail("the local Redis Cluster does not answer")
        try:
            yield Backend("redis-cluster", cluster_store, None, prefix, url)
        finally:
            await cluster_store.aclose()
            await delete_prefix(url, prefix)
        return
    assert REDIS_URL is not None
    prefix = redis_prefix()
    store = RedisStore(StateConfig(store=REDIS_URL, key_prefix=prefix, timeout_s=2.0))
    if not await store.ping():
        await store.aclose()
        pytest.fail(f"GUARD_TEST_REDIS_URL={REDIS_URL!r} is set but Redis does not answer")
    try:
        yield Backend("redis", store, None, prefix, REDIS_URL)
    finally:
        await store.aclose()
        await delete_prefix(REDIS_URL, prefix)
