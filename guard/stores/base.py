"""The store base class and the URI factory (after ``limits.storage``)."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable

from guard.config import StateConfig
from guard.errors import ConfigurationError

__all__ = ["QUARANTINE_PREFIX", "QuarantineCount", "Store", "store_from_uri"]

#: the keys of quarantined clients: ``quarantine:<client id>`` (written by the engine)
QUARANTINE_PREFIX = "quarantine:"


class Store(ABC):
    """Async key-value store with TTLs; implements :class:`detectors.store.KeyValueStore`.

    Backends wrap their own failures once into :class:`guard.errors.StateError`.
    """

    backend: str = "abstract"

    @abstractmethod
    async def get(self, key: str) -> bytes | None: ...

    @abstractmethod
    async def set(self, key: str, value: bytes, ttl: float | None = None) -> None: ...

    @abstractmethod
    async def delete(self, key: str) -> None: ...

    @abstractmethod
    async def incr(self, key: str, amount: int = 1, ttl: float | None = None) -> int: ...

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


def store_from_uri(
    config: StateConfig,
    *,
    clock: Callable[[], float] = time.monotonic,
    on_event: Callable[[str, str], None] | None = None,
) -> Store:
    """Build the store named by ``config.store`` (``memory://``, ``redis://``, ``rediss://``)."""
    uri = config.store
    if uri.startswith("memory://"):
        from guard.stores.memory import MemoryStore

        return MemoryStore(
            max_keys=config.max_keys,
            max_flag_keys=config.max_flag_keys,
            clock=clock,
            on_event=on_event,
        )
    if uri.startswith(("redis://", "rediss://", "unix://")):
        try:
            from guard.stores.redis import RedisStore
        except ImportError as exc:  # pragma: no cover - redis is a dependency
            raise ConfigurationError(
                "state.store", f"redis support is not available: {exc}"
            ) from exc
        return RedisStore(config)
    raise ConfigurationError("state.store", f"unsupported store URI scheme in {uri!r}")
