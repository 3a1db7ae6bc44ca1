"""``redis://`` / ``rediss://`` / ``unix://``: state shared by every worker and replica.

Built on ``redis.asyncio`` connections: nothing here blocks the event loop.
Every key is prefixed with ``StateConfig.key_prefix``. Updates that must be
atomic are Lua scripts shipped in ``guard/stores/lua/``, run by ``EVALSHA``
(and loaded again if Redis forgot them).

Commands are pipelined automatically (:mod:`guard.stores._batch`): everything
the process asks of Redis in one turn of the event loop leaves in one write and
comes back in one round trip, on one of a few connections, and while those are
busy the next commands queue up into the next batch. Each command still runs
on its own in Redis, each Lua script atomically, so batching changes the cost
per request, not the answers. A script error fails only its own caller.

Rate limits are timed by the Redis server's ``TIME`` inside the script, so every
worker and replica agrees on time whatever their own clocks say; the injected
clock is not used here. The same script can also grant a *lease* (units the
caller spends locally, :mod:`guard.stores.lease`) with an admitted check, only
while every limit keeps half its capacity; :meth:`RedisStore.acquire` never
asks for one.

:meth:`RedisStore.get_many` reads several keys with one ``MGET`` (the quarantine
check: a client's flag and its address's, one round trip).

Quarantine keys (``quarantine:<client>``) are also indexed by expiry in one
sorted set (``<key_prefix>quarantine-index``, kept by ``flag.lua`` as they are
set), so that :meth:`RedisStore.quarantined_now` counts the live ones with one
``ZCOUNT`` however many keys Redis holds (a single Redis: a cluster spreads the
keys over slots no one script can write together, and keeps no index). The
count is read when the metrics are scraped, off the event loop, on a
synchronous connection of its own.

Each operation has ``StateConfig.timeout_s`` seconds in total (queueing,
connect, round trip); past that, or on any Redis or socket error, it raises
:class:`~guard.errors.StateError` from the cause. The client does not retry:
the circuit breaker (:mod:`guard.stores.resilient`) decides what happens next.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from importlib import resources
from typing import Any, ClassVar

import redis
from redis.asyncio import ConnectionPool
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from inference_guard.detectors.store import GcraLimit, RateCheck, RateLimit, RateState
from inference_guard.guard.config import StateConfig
from inference_guard.guard.errors import ConfigurationError, StateError
from inference_guard.guard.stores._batch import AutoPipeline, Command, Script
from inference_guard.guard.stores._ratemath import MAX_COST, check_acquire
from inference_guard.guard.stores.base import (
    QUARANTINE_PREFIX,
    EvictionPolicy,
    QuarantineCount,
    Store,
)
from inference_guard.guard.stores.rate import RateLimitStore

__all__ = ["RedisStore", "load_script"]


def load_script(name: str) -> str:
    """The text of the Lua script ``guard/stores/lua/<name>.lua`` shipped in the package."""
    lua = resources.files("inference_guard.guard.stores").joinpath("lua", f"{name}.lua")
    return lua.read_text("utf-8")


def _ms(seconds: float) -> int:
    return max(1, math.ceil(seconds * 1000))


def _limit_args(limit: RateLimit) -> tuple[bytes, str, int]:
    if isinstance(limit, GcraLimit):
        return (b"g", repr(limit.interval), limit.burst)
    return (b"w", repr(limit.period), limit.limit)


#: the sorted set indexing quarantine keys by expiry (under ``StateConfig.key_prefix``)
QUARANTINE_INDEX = "quarantine-index"


class RedisStore(Store, RateLimitStore, QuarantineCount, EvictionPolicy):
    """A store in Redis; one instance (one set of connections) per process and event loop.

    At most ``max_connections`` connections carry batches at once; a batch
    holds at most ``max_batch`` commands. Commands beyond that wait for the
    next batch, within their time budget.
    """

    backend = "redis"
    shares_evidence = True
    #: keep the quarantine index (flag.lua): two keys in one script, so one Redis only
    indexes_quarantines: ClassVar[bool] = True

    def __init__(
        self, config: StateConfig, *, max_connections: int = 4, max_batch: int = 128
    ) -> None:
        if max_connections < 1:
            raise ValueError("max_connections must be >= 1")
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self.prefix = config.key_prefix
        self.timeout = config.timeout_s
        self._url = config.store
        self._index = self.prefix + QUARANTINE_INDEX
        # the scrape-time connection (quarantined_now), made on first use
        self._sync: redis.Redis | None = None
        self._sync_lock = threading.Lock()
        self._acquire = Script(load_script("acquire"))
        self._incr = Script(load_script("incr"))
        self._flag = Script(load_script("flag"))
        self._flag_count = load_script("flag_count")
        self._evidence = Script(load_script("evidence"))
        self._open(config, max_connections=max_connections, max_batch=max_batch)

    def _open(self, config: StateConfig, *, max_connections: int, max_batch: int) -> None:
        """Set up the connections (a store with another transport overrides this and ``_call``)."""
        try:
            # only a factory of connections: the pipeline owns and times them
            factory = ConnectionPool.from_url(
                config.store,
                socket_timeout=None,
                socket_connect_timeout=config.timeout_s,
                retry=Retry(NoBackoff(), 0),
            )
        except ValueError as exc:
            # never echo the URL: it may carry a password
            raise ConfigurationError("state.store", f"not a usable Redis URL: {exc}") from None
        self._pipeline = AutoPipeline(
            factory.make_connection,
            timeout=config.timeout_s,
            lanes=max_connections,
            max_batch=max_batch,
        )

    async def _call(self, operation: str, command: Command, script: Script | None = None) -> Any:
        try:
            return await self._pipeline.submit(command, script)
        except (RedisError, OSError, TimeoutError) as exc:
            # redis-py messages name host and port at most, never credentials or keys
            if isinstance(exc, TimeoutError):
                detail = "timed out"
            else:
                detail = f"{type(exc).__name__}: {exc}"
            raise StateError(self.backend, operation, detail) from exc

    async def get(self, key: str) -> bytes | None:
        value = await self._call("get", (b"GET", self.prefix + key))
        return None if value is None else bytes(value)

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """The values at ``keys`` with one ``MGET``: one round trip."""
        prefix = self.prefix
        values = await self._call("get", (b"MGET", *(prefix + key for key in keys)))
        return [None if value is None else bytes(value) for value in values]

    async def set(self, key: str, value: bytes, ttl: float | None = None) -> None:
        if self.indexes_quarantines and key.startswith(QUARANTINE_PREFIX):
            script = self._flag
            px = 0 if ttl is None else _ms(ttl)
            command: Command = (
                b"EVALSHA",
                script.sha,
                2,
                self.prefix + key,
                self._index,
                value,
                px,
            )
            await self._call("set", command, script)
            return
        command = (b"SET", self.prefix + key, value)
        if ttl is not None:
            command += (b"PX", _ms(ttl))
        await self._call("set", command)

    async def delete(self, key: str) -> None:
        await self._call("delete", (b"DEL", self.prefix + key))
        if self.indexes_quarantines and key.startswith(QUARANTINE_PREFIX):
            await self._call("delete", (b"ZREM", self._index, self.prefix + key))

    def quarantined_now(self) -> int:
        """Live quarantine keys: one ``ZCOUNT`` on the index, on a synchronous connection.

        For the metrics exposition (another thread); blocks for at most
        ``StateConfig.timeout_s`` seconds. A store that keeps no index (a
        cluster) raises :class:`StateError`: the gauge is then absent.
        """
        if not self.indexes_quarantines:
            raise StateError(self.backend, "quarantined_now", "no quarantine index here")
        try:
            with self._sync_lock:
                if self._sync is None:
                    self._sync = redis.Redis.from_url(
                        self._url,
                        socket_timeout=self.timeout,
                        socket_connect_timeout=self.timeout,
                    )
                client = self._sync
            count = client.eval(self._flag_count, 1, self._index)
        except (RedisError, OSError, TimeoutError) as exc:
            detail = "timed out" if isinstance(exc, TimeoutError) else type(exc).__name__
            raise StateError(self.backend, "quarantined_now", detail) from exc
        except ValueError as exc:  # a URL the async pool accepted but this client refuses
            raise StateError(self.backend, "quarantined_now", "bad URL") from exc
        return int(count)

    def eviction_policy(self) -> str | None:
        """The server's ``maxmemory-policy`` (``CONFIG GET``), or ``None`` when unreadable.

        For start-up, on a short-lived synchronous connection: blocks for at
        most ``StateConfig.timeout_s`` seconds. A managed Redis that refuses
        ``CONFIG`` (or a server that does not answer) gives ``None``.
        """
        try:
            client = redis.Redis.from_url(
                self._url, socket_timeout=self.timeout, socket_connect_timeout=self.timeout
            )
            try:
                reply = client.config_get("maxmemory-policy")
            finally:
                client.close()
        except (RedisError, OSError, ValueError):
            return None
        for name, value in dict(reply).items():
            text = value.decode("ascii", "replace") if isinstance(value, bytes) else str(value)
            if (name.decode() if isinstance(name, bytes) else name) == "maxmemory-policy":
                return text
        return None

    async def incr(self, key: str, amount: int = 1, ttl: float | None = None) -> int:
        px = 0 if ttl is None else _ms(ttl)
        script = self._incr
        value = await self._call(
            "incr", (b"EVALSHA", script.sha, 1, self.prefix + key, amount, px), script
        )
        return int(value)

    async def acquire(self, checks: Sequence[RateCheck], *, cost: int) -> tuple[RateState, ...]:
        """Check every limit in one Lua script; consume ``cost`` only if all admit."""
        return (await self.acquire_lease(checks, cost=cost, lease=0))[0]

    async def acquire_lease(
        self, checks: Sequence[RateCheck], *, cost: int, lease: int
    ) -> tuple[tuple[RateState, ...], int]:
        """:meth:`acquire` and, when every limit has room to spare, ``lease`` more units.

        One Lua script, one round trip: the lease is granted only with an
        admitted request and only while every limit keeps at least half its
        capacity after ``cost + lease`` (see ``lua/acquire.lua``).
        """
        check_acquire(checks, cost)
        if type(lease) is not int or not 0 <= lease <= MAX_COST:
            raise ValueError(f"lease must be an integer in [0, {MAX_COST}], got {lease!r}")
        script = self._acquire
        prefix = self.prefix
        n = len(checks)
        if n == 1:
            key, limit = checks[0]
            command: Command = (
                b"EVALSHA",
                script.sha,
                1,
                prefix + key,
                cost,
                lease,
                *_limit_args(limit),
            )
        else:
            keys: list[Any] = [b"EVALSHA", script.sha, n]
            args: list[Any] = [cost, lease]
            for key, limit in checks:
                keys.append(prefix + key)
                args += _limit_args(limit)
            command = (*keys, *args)
        raw = await self._call("acquire", command, script)
        try:
            states = tuple(
                RateState(
                    bool(int(raw[i])),
                    int(raw[i + 1]),
                    float(raw[i + 2]),
                    float(raw[i + 3]),
                    int(raw[i + 4]),
                )
                for i in range(0, 5 * n, 5)
            )
            return states, int(raw[5 * n])
        except (TypeError, ValueError, IndexError) as exc:
            raise StateError(self.backend, "acquire", "unexpected script reply") from exc

    async def exchange(
        self,
        key: str,
        entry: bytes,
        cursor: bytes,
        *,
        max_entries: int,
        ttl: float,
        count: int,
    ) -> tuple[bytes, list[bytes]]:
        """Append to an evidence log and read the others' entries: one script, one key."""
        script = self._evidence
        command: Command = (
            b"EVALSHA",
            script.sha,
            1,
            self.prefix + key,
            entry,
            cursor,
            max_entries,
            _ms(ttl),
            count,
        )
        raw = await self._call("exchange", command, script)
        try:
            return bytes(raw[0]), [bytes(e) for e in raw[1:]]
        except (TypeError, IndexError) as exc:
            raise StateError(self.backend, "exchange", "unexpected script reply") from exc

    async def ping(self) -> bool:
        """Whether Redis answers ``PING`` within the time budget."""
        try:
            reply = await self._call("ping", (b"PING",))
        except StateError:
            return False
        return reply in (b"PONG", "PONG", True)

    async def aclose(self) -> None:
        """Close the connections; calls still waiting fail with :class:`StateError`."""
        await self._pipeline.aclose()
        with self._sync_lock:
            sync, self._sync = self._sync, None
        if sync is not None:
            sync.close()
