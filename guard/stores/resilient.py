"""A circuit breaker around a store, with an optional in-memory fallback.

A dead Redis must not add its timeout to every request. :class:`ResilientStore`
wraps a backend; after ``breaker_failures`` consecutive failures the breaker
*opens* and every call fails fast with :class:`~guard.errors.StateError` for
``breaker_reset_s`` seconds; then one trial call goes through (*half-open*):
success closes the breaker, failure opens it again. Recovery is automatic.

A wrapper may carry a fallback store (``fallback: memory`` on a rate detector):
calls that fail, or arrive while the breaker is open, are served by it instead
of raising. Per-process memory state is a weaker guarantee than shared state
(each worker enforces its own copy of the limit) but far better than none.
Without a fallback the ``StateError`` propagates and the policy's failure mode
(fail open or fail closed) decides.

Every event is counted on the breaker (:attr:`CircuitBreaker.errors`,
``fallbacks``, ``short_circuits``) and reported to ``on_event(kind, backend)``
when given. ``kind`` is one of :data:`EVENTS`. The callback runs inline on the
request path and must not raise.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from enum import StrEnum
from typing import TypeVar

from inference_guard.detectors.store import RateCheck, RateState
from inference_guard.guard.config import StateConfig
from inference_guard.guard.errors import StateError
from inference_guard.guard.stores.base import QuarantineCount, Store
from inference_guard.guard.stores.memory import MemoryStore
from inference_guard.guard.stores.rate import RateLimitStore

__all__ = ["EVENTS", "BreakerState", "CircuitBreaker", "EventCallback", "ResilientStore"]

T = TypeVar("T")

#: ``on_event(kind, backend)``: a metrics hook
EventCallback = Callable[[str, str], None]

#: the event kinds: a backend call failed; a call was served by the fallback;
#: a call failed fast because the breaker was open; the breaker changed state;
#: a bounded memory store evicted a key; a flag found the memory store's flag table full
EVENTS = frozenset(
    {
        "error",
        "fallback",
        "short_circuit",
        "open",
        "half_open",
        "closed",
        "eviction",
        "flag_overflow",
    }
)


class BreakerState(StrEnum):
    """The circuit breaker's state."""

    CLOSED = "closed"  #: calls go to the backend
    OPEN = "open"  #: calls fail fast (or go to the fallback)
    HALF_OPEN = "half_open"  #: one trial call goes to the backend


class CircuitBreaker:
    """Consecutive-failure circuit breaker for one backend, with its counters.

    Shared by every :class:`ResilientStore` view of the same backend, so that
    the views of several detectors open and close together.
    """

    def __init__(
        self,
        *,
        backend: str,
        failures: int = 5,
        reset_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        on_event: EventCallback | None = None,
    ) -> None:
        if failures < 1:
            raise ValueError("failures must be >= 1")
        if reset_s < 0:
            raise ValueError("reset_s must be >= 0")
        self.backend = backend
        self.failures = failures
        self.reset_s = reset_s
        self.on_event = on_event
        self._clock = clock
        #: the current state
        self.state = BreakerState.CLOSED
        #: failures since the last success
        self.consecutive = 0
        #: backend calls that failed
        self.errors = 0
        #: calls served by a fallback store
        self.fallbacks = 0
        #: calls refused at once because the breaker was open (no fallback)
        self.short_circuits = 0
        self._opened_at = 0.0
        self._trial = False

    def emit(self, kind: str) -> None:
        """Count ``kind`` (where counted) and report it to ``on_event``."""
        if kind == "fallback":
            self.fallbacks += 1
        elif kind == "short_circuit":
            self.short_circuits += 1
        if self.on_event is not None:
            self.on_event(kind, self.backend)

    def _move(self, state: BreakerState) -> None:
        if state is not self.state:
            self.state = state
            self.emit(str(state))

    def allow(self) -> bool:
        """May a call go to the backend now? In half-open, only one trial at a time."""
        if self.state is BreakerState.CLOSED:
            return True
        if self.state is BreakerState.OPEN:
            if self._clock() - self._opened_at < self.reset_s:
                return False
            self._move(BreakerState.HALF_OPEN)
        if self._trial:
            return False
        self._trial = True
        return True

    def success(self) -> None:
        """A backend call succeeded."""
        self.consecutive = 0
        self._trial = False
        if self.state is BreakerState.HALF_OPEN:
            self._move(BreakerState.CLOSED)

    def failure(self) -> None:
        """A backend call failed with a :class:`StateError`."""
        self.errors += 1
        self.consecutive += 1
        self.emit("error")
        if self.state is BreakerState.HALF_OPEN or (
            self.state is BreakerState.CLOSED and self.consecutive >= self.failures
        ):
            # calls that started before the breaker opened do not push the reset back
            self._opened_at = self._clock()
            self._trial = False
            self._move(BreakerState.OPEN)

    def abandon(self) -> None:
        """A call ended without a verdict (cancelled, or a caller's bug): free the trial."""
        self._trial = False


class ResilientStore(Store, RateLimitStore, QuarantineCount):
    """A store behind a :class:`CircuitBreaker`, optionally with a fallback store.

    Build it with :meth:`from_config`; views with a fallback, sharing the same
    breaker and counters, come from :meth:`with_fallback` and
    :meth:`with_memory_fallback`.
    """

    def __init__(
        self,
        inner: Store,
        *,
        breaker: CircuitBreaker,
        fallback: Store | None = None,
        fallback_max_keys: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        #: the wrapped backend
        self.inner = inner
        #: the breaker (and counters), shared by every view of ``inner``
        self.breaker = breaker
        #: where calls go while the backend is unavailable (``None``: raise)
        self.fallback = fallback
        self.backend = inner.backend
        self._fallback_max_keys = fallback_max_keys
        self._clock = clock
        self._memory = fallback if isinstance(fallback, MemoryStore) else None

    @classmethod
    def from_config(
        cls,
        inner: Store,
        config: StateConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_event: EventCallback | None = None,
    ) -> ResilientStore:
        """Wrap ``inner`` (from :func:`~guard.stores.uri.store_from_uri`) as ``config`` says.

        ``breaker_failures`` and ``breaker_reset_s`` set the breaker, ``max_keys``
        bounds a memory fallback. ``on_event`` also receives a memory store's
        evictions.
        """
        if isinstance(inner, MemoryStore) and inner.on_event is None:
            inner.on_event = on_event
        breaker = CircuitBreaker(
            backend=inner.backend,
            failures=config.breaker_failures,
            reset_s=config.breaker_reset_s,
            clock=clock,
            on_event=on_event,
        )
        return cls(inner, breaker=breaker, fallback_max_keys=config.max_keys, clock=clock)

    # -- views and counters

    def with_fallback(self, fallback: Store) -> ResilientStore:
        """A view of the same backend and breaker that falls back to ``fallback``."""
        view = ResilientStore(
            self.inner,
            breaker=self.breaker,
            fallback=fallback,
            fallback_max_keys=self._fallback_max_keys,
            clock=self._clock,
        )
        view._memory = self._memory
        return view

    def with_memory_fallback(self) -> ResilientStore:
        """A view that falls back to one bounded :class:`MemoryStore` shared by all views.

        A memory backend needs no fallback: the same view comes back.
        """
        if isinstance(self.inner, MemoryStore):
            return self
        if self._memory is None:
            self._memory = MemoryStore(
                max_keys=self._fallback_max_keys, clock=self._clock, on_event=self.breaker.on_event
            )
        return self.with_fallback(self._memory)

    @property
    def state(self) -> BreakerState:
        """The breaker's state."""
        return self.breaker.state

    @property
    def errors(self) -> int:
        """Backend calls that failed."""
        return self.breaker.errors

    @property
    def fallbacks(self) -> int:
        """Calls served by a fallback store."""
        return self.breaker.fallbacks

    @property
    def short_circuits(self) -> int:
        """Calls refused at once because the breaker was open."""
        return self.breaker.short_circuits

    # -- the guarded call

    async def _call(self, operation: str, call: Callable[[Store], Awaitable[T]]) -> T:
        breaker = self.breaker
        if not breaker.allow():
            if self.fallback is not None:
                breaker.emit("fallback")
                return await call(self.fallback)
            breaker.emit("short_circuit")
            raise StateError(self.backend, operation, "circuit breaker open")
        try:
            result = await call(self.inner)
        except StateError:
            breaker.failure()
            if self.fallback is None:
                raise
        except BaseException:
            breaker.abandon()
            raise
        else:
            breaker.success()
            return result
        breaker.emit("fallback")
        return await call(self.fallback)

    async def get(self, key: str) -> bytes | None:
        return await self._call("get", lambda s: s.get(key))

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        return await self._call("get", lambda s: s.get_many(keys))

    async def set(self, key: str, value: bytes, ttl: float | None = None) -> None:
        await self._call("set", lambda s: s.set(key, value, ttl))

    async def delete(self, key: str) -> None:
        await self._call("delete", lambda s: s.delete(key))

    async def incr(self, key: str, amount: int = 1, ttl: float | None = None) -> int:
        return await self._call("incr", lambda s: s.incr(key, amount, ttl))

    async def acquire(self, checks: Sequence[RateCheck], *, cost: int) -> tuple[RateState, ...]:
        """Atomic multi-limit check on the backend (or on the fallback while it is down)."""
        return await self._call("acquire", lambda s: _rate(s).acquire(checks, cost=cost))

    async def acquire_lease(
        self, checks: Sequence[RateCheck], *, cost: int, lease: int
    ) -> tuple[tuple[RateState, ...], int]:
        """:meth:`acquire` with a lease on the backend (none from a memory fallback)."""
        return await self._call(
            "acquire", lambda s: _rate(s).acquire_lease(checks, cost=cost, lease=lease)
        )

    @property
    def shares_evidence(self) -> bool:  # type: ignore[override]
        """Whether the backend carries evidence between processes."""
        return self.inner.shares_evidence

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
        """Exchange evidence through the backend (a fallback store shares nothing)."""
        return await self._call(
            "exchange",
            lambda s: s.exchange(key, entry, cursor, max_entries=max_entries, ttl=ttl, count=count),
        )

    def quarantined_now(self) -> int:
        """The backend's count of quarantined clients.

        Raises :class:`StateError` while the breaker is open, or when the backend
        cannot count. A scrape neither trips nor closes the breaker: its failures are the
        scrape's, not a request's.
        """
        if self.breaker.state is BreakerState.OPEN or not isinstance(self.inner, QuarantineCount):
            raise StateError(self.backend, "quarantined_now", "not available")
        return self.inner.quarantined_now()

    async def ping(self) -> bool:
        """Whether the backend itself answers (bypasses the breaker)."""
        return await self.inner.ping()

    async def aclose(self) -> None:
        """Close the backend (every view shares it; closing twice is harmless)."""
        await self.inner.aclose()


def _rate(store: Store) -> RateLimitStore:
    if not isinstance(store, RateLimitStore):
        raise TypeError(f"the {store.backend} store has no rate-limit support")
    return store
