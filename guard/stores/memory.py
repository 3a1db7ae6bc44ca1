"""``memory://``: a bounded, per-process store with TTLs and LRU eviction.

An attacker controls how many client ids we see, so the store holds at most
``max_keys`` keys; past that the least recently used key is evicted (and
counted in :attr:`evictions`). Expired keys are dropped when touched and swept
in small steps on writes, so memory stays bounded without a background task.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

from guard.stores.base import Store

__all__ = ["MemoryStore"]

_NEVER = float("inf")


class MemoryStore(Store):
    """Per-process store. Not shared across workers: use Redis for that."""

    backend = "memory"

    def __init__(self, *, max_keys: int = 100_000, clock: Callable[[], float] = time.monotonic):
        if max_keys < 1:
            raise ValueError("max_keys must be >= 1")
        self.max_keys = max_keys
        self._clock = clock
        # key -> (expires_at, value); order is recency of use (last = most recent)
        self._data: OrderedDict[str, tuple[float, bytes | int]] = OrderedDict()
        #: keys evicted because the store was full (exported as a metric)
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._data)

    def _live(self, key: str, now: float) -> tuple[float, bytes | int] | None:
        item = self._data.get(key)
        if item is None:
            return None
        if item[0] <= now:
            del self._data[key]
            return None
        self._data.move_to_end(key)
        return item

    def _put(self, key: str, expires: float, value: bytes | int) -> None:
        data = self._data
        data[key] = (expires, value)
        data.move_to_end(key)
        if len(data) > self.max_keys:
            self._sweep()
            while len(data) > self.max_keys:
                data.popitem(last=False)
                self.evictions += 1

    def _sweep(self, budget: int = 64) -> None:
        # drop expired keys among the least recently used, a bounded amount of work
        now = self._clock()
        data = self._data
        for key in list(data.keys())[:budget]:
            if data[key][0] <= now:
                del data[key]

    @staticmethod
    def _expiry(now: float, ttl: float | None) -> float:
        return _NEVER if ttl is None else now + ttl

    async def get(self, key: str) -> bytes | None:
        item = self._live(key, self._clock())
        if item is None:
            return None
        value = item[1]
        return str(value).encode() if isinstance(value, int) else value

    async def set(self, key: str, value: bytes, ttl: float | None = None) -> None:
        now = self._clock()
        self._put(key, self._expiry(now, ttl), value)

    async def delete(self, key: str) -> None:
        self._data.pop(key, None)

    async def incr(self, key: str, amount: int = 1, ttl: float | None = None) -> int:
        now = self._clock()
        item = self._live(key, now)
        if item is None:
            new = amount
            self._put(key, self._expiry(now, ttl), new)
            return new
        old = item[1]
        new = (int(old) if isinstance(old, bytes) else old) + amount
        self._data[key] = (item[0], new)
        return new
