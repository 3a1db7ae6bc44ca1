"""Store backends for the shared suites: every test runs once per backend.

``memory`` runs on a fake clock that tests advance; ``redis`` runs against the
real server at ``GUARD_TEST_REDIS_URL`` (e.g. ``redis://127.0.0.1:6379/15``),
on real time (Redis ``TIME``), with a unique key prefix per test that is
deleted afterwards. Without the variable the Redis cases skip, saying why; with
it set and Redis unreachable they fail.

Imported by ``tests/guard/conftest.py`` and ``tests/detectors/conftest.py``.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
from redis.asyncio import Redis

from guard.config import StateConfig
from guard.stores.memory import MemoryStore
from guard.stores.redis import RedisStore

__all__ = [
    "BACKENDS",
    "REDIS_SKIP",
    "REDIS_URL",
    "Backend",
    "FakeClock",
    "anyio_backend",
    "backend",
    "redis_prefix",
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


BACKENDS = [
    pytest.param("memory", id="memory"),
    pytest.param("redis", id="redis", marks=[pytest.mark.redis, REDIS_SKIP]),
]


def redis_prefix() -> str:
    """A key prefix no other test (or test run) uses."""
    return f"guardtest:{uuid.uuid4().hex}:"


async def delete_prefix(url: str, prefix: str) -> None:
    """Delete every key under ``prefix``."""
    client = Redis.from_url(url)
    try:
        keys = [key async for key in client.scan_iter(match=prefix + "*", count=1000)]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


@pytest.fixture
def anyio_backend() -> str:
    """Async tests run on asyncio (redis.asyncio needs it)."""
    return "asyncio"


@pytest.fixture(params=BACKENDS)
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    """Each backend in turn: a fresh memory store, or Redis under a fresh prefix."""
    if request.param == "memory":
        clock = FakeClock()
        yield Backend("memory", MemoryStore(max_keys=10_000, clock=clock), clock)
        return
    assert REDIS_URL is not None
    prefix = redis_prefix()
    store = RedisStore(StateConfig(store=REDIS_URL, key_prefix=prefix, timeout_s=2.0))
    if not await store.ping():
        await store.aclose()
        pytest.fail(f"GUARD_TEST_REDIS_URL={REDIS_URL!r} is set but Redis does not answer")
    try:
        yield Backend("redis", store, None, prefix)
    finally:
        await store.aclose()
        await delete_prefix(REDIS_URL, prefix)
