"""The store base class (after ``limits.storage.base``); :mod:`guard.stores.uri` picks a backend."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

__all__ = ["QUARANTINE_PREFIX", "EvictionPolicy", "QuarantineCount", "Store"]

#: the keys of quarantined clients: ``quarantine:<client id>`` (written by the engine)
QUARANTINE_PREFIX = "quarantine:"


class Store(ABC):
    """Async key-value store with TTLs; implements :class:`detectors.store.KeyValueStore`.

    Backends wrap their own failures once into :class:`guard.errors.StateError`.
    """

    backend: str = "abstract"

    @abstractmethod
    async def get(self, key: str) -> bytes | None: ...

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """The values at ``keys``, in order (``None`` where absent): one round trip where
        the backend can (Redis ``MGET``); this default reads them one by one."""
        return [await self.get(key) for key in keys]

    @abstractmethod
    async def set(self, key: str, value: bytes, ttl: float | None = None) -> None: ...

    @abstractmethod
    async def delete(self, key: str) -> None: ...

    @abstractmethod
    async def incr(self, key: str, amount: int = 1, ttl: float | None = None) -> int: ...

    #: whether :meth:`exchange` carries evidence to other processes (a shared backend)
    shares_evidence: bool = False

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
        """Append to an evidence log and read the others' entries
        (:class:`detectors.store.EvidenceStore`).

        A store that does not share keeps nothing and reads nothing: the
        detectors only call this when :attr:`shares_evidence` is true.
        """
        return cursor, []

    async def ping(self) -> bool:
        """Whether the backend answers. Memory always does."""
        return True

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""


class QuarantineCount(ABC):
    """Optional capability: how many clients are in quarantine right now.

    Read when the metrics are scraped (``guard_quarantined_clients``), so it is
    synchronous and safe to call from a thread other than the event loop's (the
    exposition is rendered off the loop). It must stay cheap however many
    clients the store holds. Raises :class:`~guard.errors.StateError` when the
    backend cannot answer.
    """

    @abstractmethod
    def quarantined_now(self) -> int: ...


class EvictionPolicy(ABC):
    """Optional capability: whether the backend may evict keys under memory pressure.

    Read once, synchronously, when the guard starts (a shared store that
    evicts could drop a quarantine before its TTL and let the client back in).
    """

    @abstractmethod
    def eviction_policy(self) -> str | None:
        """The backend's policy (Redis ``maxmemory-policy``), or ``None`` when unreadable."""

    @staticmethod
    def evicts(policy: str) -> bool:
        """Whether ``policy`` may evict a key: every Redis policy but ``noeviction``.

        ``allkeys-*`` evicts any key; ``volatile-*`` evicts keys with a TTL, and
        every quarantine and rate key the guard writes has one.
        """
        return policy != "noeviction"
