"""``redis://`` / ``rediss://`` / ``unix://``: state shared by every worker and replica.

Built on ``redis.asyncio`` with a bounded, blocking connection pool: nothing
here blocks the event loop. Every key is prefixed with ``StateConfig.key_prefix``.
Updates that must be atomic are Lua scripts shipped in ``guard/stores/lua/``,
registered once (``register_script``: ``EVALSHA``, reloaded if Redis forgot it).

Rate limits are timed by the Redis server's ``TIME`` inside the script, so every
worker and replica agrees on time whatever their own clocks say; the injected
clock is not used here.

Each operation has ``StateConfig.timeout_s`` seconds in total (pool wait,
connect, round trip); past that, or on any Redis or socket error, it raises
:class:`~guard.errors.StateError` from the cause. The client does not retry:
the circuit breaker (:mod:`guard.stores.resilient`) decides what happens next.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable, Sequence
from importlib import resources
from typing import Any, TypeVar

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from detectors.store import GcraLimit, RateCheck, RateState
from guard.config import StateConfig
from guard.errors import ConfigurationError, StateError
from guard.stores._ratemath import check_acquire
from guard.stores.base import Store
from guard.stores.rate import RateLimitStore

__all__ = ["RedisStore", "load_script"]

T = TypeVar("T")


def load_script(name: str) -> str:
    """The text of the Lua script ``guard/stores/lua/<name>.lua`` shipped in the package."""
    return resources.files("guard.stores").joinpath("lua", f"{name}.lua").read_text("utf-8")


def _ms(seconds: float) -> int:
    return max(1, math.ceil(seconds * 1000))


class RedisStore(Store, RateLimitStore):
    """A store in Redis; one instance (one connection pool) per process.

    ``max_connections`` bounds the pool; a request that finds every connection
    busy waits for one within the operation's time budget.
    """

    backend = "redis"

    def __init__(self, config: StateConfig, *, max_connections: int = 64) -> None:
        if max_connections < 1:
            raise ValueError("max_connections must be >= 1")
        self.prefix = config.key_prefix
        self.timeout = config.timeout_s
        try:
            pool = BlockingConnectionPool.from_url(
                config.store,
                max_connections=max_connections,
                timeout=config.timeout_s,
                socket_timeout=config.timeout_s,
                socket_connect_timeout=config.timeout_s,
                retry=Retry(NoBackoff(), 0),
            )
        except ValueError as exc:
            # never echo the URL: it may carry a password
            raise ConfigurationError("state.store", f"not a usable Redis URL: {exc}") from None
        self._client = Redis.from_pool(pool)
        self._acquire = self._client.register_script(load_script("acquire"))
        self._incr = self._client.register_script(load_script("incr"))

    async def _run(self, operation: str, call: Callable[[], Awaitable[T]]) -> T:
        try:
            async with asyncio.timeout(self.timeout):
                return await call()
        except (RedisError, OSError, TimeoutError) as exc:
            # redis-py messages name host and port at most, never credentials or keys
            if isinstance(exc, TimeoutError):
                detail = "timed out"
            else:
                detail = f"{type(exc).__name__}: {exc}"
            raise StateError(self.backend, operation, detail) from exc

    async def get(self, key: str) -> bytes | None:
        value: Any = await self._run("get", lambda: self._client.get(self.prefix + key))
        return None if value is None else bytes(value)

    async def set(self, key: str, value: bytes, ttl: float | None = None) -> None:
        px = None if ttl is None else _ms(ttl)
        await self._run("set", lambda: self._client.set(self.prefix + key, value, px=px))

    async def delete(self, key: str) -> None:
        await self._run("delete", lambda: self._client.delete(self.prefix + key))

    async def incr(self, key: str, amount: int = 1, ttl: float | None = None) -> int:
        px = 0 if ttl is None else _ms(ttl)
        value: Any = await self._run(
            "incr", lambda: self._incr(keys=[self.prefix + key], args=[amount, px])
        )
        return int(value)

    async def acquire(self, checks: Sequence[RateCheck], *, cost: int) -> tuple[RateState, ...]:
        """Check every limit in one Lua script; consume ``cost`` only if all admit."""
        check_acquire(checks, cost)
        keys: list[str] = []
        args: list[str | int] = [cost]
        for key, limit in checks:
            keys.append(self.prefix + key)
            if isinstance(limit, GcraLimit):
                args += ["g", repr(limit.interval), limit.burst]
            else:
                args += ["w", repr(limit.period), limit.limit]
        raw: Any = await self._run("acquire", lambda: self._acquire(keys=keys, args=args))
        try:
            return tuple(
                RateState(
                    bool(int(raw[i])),
                    int(raw[i + 1]),
                    float(raw[i + 2]),
                    float(raw[i + 3]),
                    int(raw[i + 4]),
                )
                for i in range(0, 5 * len(checks), 5)
            )
        except (TypeError, ValueError, IndexError) as exc:
            raise StateError(self.backend, "acquire", "unexpected script reply") from exc

    async def ping(self) -> bool:
        """Whether Redis answers ``PING`` within the time budget."""
        try:
            return bool(await self._run("ping", self._client.ping))
        except StateError:
            return False

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._client.aclose()
