"""The backend a ``state.store`` URI names (after ``limits.storage.storage_from_string``).

Its own module, above the backends: ``base`` defines :class:`Store`, the
backends subclass it, and this module picks one, so no backend module and
``base`` import each other. ``redis`` (and the cluster store) is imported only when a
``redis://`` (``redis+cluster://``) URI asks for it.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from inference_guard.guard.config import StateConfig
from inference_guard.guard.errors import ConfigurationError
from inference_guard.guard.stores.base import Store
from inference_guard.guard.stores.memory import MemoryStore

__all__ = ["store_from_uri"]


def store_from_uri(
    config: StateConfig,
    *,
    clock: Callable[[], float] = time.monotonic,
    on_event: Callable[[str, str], None] | None = None,
) -> Store:
    """Build the store named by ``config.store``: ``memory://``, ``redis://`` (``rediss://``,
    ``unix://``) or ``redis+cluster://`` (``rediss+cluster://``)."""
    uri = config.store
    if uri.startswith("memory://"):
        return MemoryStore(
            max_keys=config.max_keys,
            max_flag_keys=config.max_flag_keys,
            clock=clock,
            on_event=on_event,
        )
    if uri.startswith(("redis+cluster://", "rediss+cluster://")):
        from inference_guard.guard.stores.cluster import RedisClusterStore

        return RedisClusterStore(config)
    if uri.startswith(("redis://", "rediss://", "unix://")):
        try:
            from inference_guard.guard.stores.redis import RedisStore
        except ImportError as exc:  # pragma: no cover - redis is a dependency
            raise ConfigurationError(
                "state.store", f"redis support is not available: {exc}"
            ) from exc
        return RedisStore(config)
    raise ConfigurationError("state.store", f"unsupported store URI scheme in {uri!r}")
