"""A bounded, per-process map from client to detector state.

An attacker chooses how many client ids we see (API keys are cheap), so every
per-client structure lives in a :class:`ClientMap`: at most ``max_clients``
entries, the least recently used evicted first and counted in
:attr:`ClientMap.evictions` (a metric ops can watch). Memory is then
``max_clients`` times the detector's documented per-client figure, whatever
the traffic.

The map is per process: detectors keep here what is too large or too
latency-critical for a store round trip per row, and publish only a summary
(a client's standing) to the shared :class:`~detectors.store.KeyValueStore`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

__all__ = ["ClientMap"]

V = TypeVar("V")


class ClientMap(Generic[V]):
    """``client -> state`` with a cap on clients and least-recently-used eviction.

    Parameters
    ----------
    max_clients : int
        Most clients tracked at once (>= 1).
    factory : callable
        Builds the state of a client seen for the first time.

    Examples
    --------
    >>> m = ClientMap(2, list)
    >>> m.get_or_create("a").append(1)
    >>> _ = m.get_or_create("b"), m.get_or_create("c")
    >>> "a" in m, len(m), m.evictions
    (False, 2, 1)
    """

    def __init__(self, max_clients: int, factory: Callable[[], V]) -> None:
        if isinstance(max_clients, bool) or not isinstance(max_clients, int) or max_clients < 1:
            raise ValueError(f"max_clients must be an integer >= 1, got {max_clients!r}")
        self.max_clients = max_clients
        self._factory = factory
        # order is recency of use: last = most recently used
        self._data: OrderedDict[str, V] = OrderedDict()
        #: clients evicted because the map was full
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, client: object) -> bool:
        return client in self._data

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def peek(self, client: str) -> V | None:
        """The client's state without touching its recency, or ``None``."""
        return self._data.get(client)

    def get(self, client: str) -> V | None:
        """The client's state (now most recently used), or ``None``."""
        state = self._data.get(client)
        if state is not None:
            self._data.move_to_end(client)
        return state

    def get_or_create(self, client: str) -> V:
        """The client's state, created (evicting the least recently used) if new."""
        data = self._data
        state = data.get(client)
        if state is not None:
            data.move_to_end(client)
            return state
        state = self._factory()
        data[client] = state
        if len(data) > self.max_clients:
            data.popitem(last=False)
            self.evictions += 1
        return state

    def pop(self, client: str) -> V | None:
        """Forget ``client``; its state, or ``None``."""
        return self._data.pop(client, None)
