"""State stores: ``memory://`` (per process, bounded); ``redis://``, ``redis+cluster://`` (shared).

``guard.stores.redis.RedisStore`` and ``guard.stores.cluster.RedisClusterStore``
are imported lazily by :func:`store_from_uri`.
"""

from __future__ import annotations

from inference_guard.guard.stores.base import Store
from inference_guard.guard.stores.lease import LeasedRateStore
from inference_guard.guard.stores.memory import MemoryStore
from inference_guard.guard.stores.rate import RateLimitStore
from inference_guard.guard.stores.resilient import BreakerState, CircuitBreaker, ResilientStore
from inference_guard.guard.stores.uri import store_from_uri

__all__ = [
    "BreakerState",
    "CircuitBreaker",
    "LeasedRateStore",
    "MemoryStore",
    "RateLimitStore",
    "ResilientStore",
    "Store",
    "store_from_uri",
]
