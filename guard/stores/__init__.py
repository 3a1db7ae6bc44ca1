"""State stores: ``memory://`` (per process, bounded); ``redis://``, ``redis+cluster://`` (shared).

``guard.stores.redis.RedisStore`` and ``guard.stores.cluster.RedisClusterStore``
are imported lazily by :func:`store_from_uri`.
"""

from __future__ import annotations

from guard.stores.base import Store
from guard.stores.memory import MemoryStore
from guard.stores.rate import RateLimitStore
from guard.stores.resilient import BreakerState, CircuitBreaker, ResilientStore
from guard.stores.uri import store_from_uri

__all__ = [
    "BreakerState",
    "CircuitBreaker",
    "MemoryStore",
    "RateLimitStore",
    "ResilientStore",
    "Store",
    "store_from_uri",
]
