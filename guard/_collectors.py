"""The guard's collectors that are not plain counters or histograms (private).

Each is asked for its samples when the registry is collected (a scrape):
:class:`BuildInfo` (``guard_build_info``), :class:`QuarantinedClients`
(``guard_quarantined_clients``, counted by the state store),
:class:`StoreEvictionPolicy` (``guard_store_eviction_policy``) and, in
multiprocess mode, :class:`WithLocal`, which serves every worker's samples from
``PROMETHEUS_MULTIPROC_DIR`` and adds the scraping worker's own families that no
worker writes there (see :mod:`guard.metrics`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from inference_guard.guard.errors import StateError

__all__ = [
    "QUARANTINE_CACHE_S",
    "BuildInfo",
    "QuarantinedClients",
    "StoreEvictionPolicy",
    "WithLocal",
]

log = logging.getLogger("guard")

#: seconds a count of quarantined clients is reused between scrapes
QUARANTINE_CACHE_S = 1.0


class BuildInfo(Collector):
    """``guard_build_info{version, config_sha} 1``: what runs, with which config."""

    def __init__(self) -> None:
        self._labels: tuple[str, str] | None = None

    def set(self, version: str, sha: str) -> None:
        self._labels = (version, sha)

    def collect(self) -> Iterable[Metric]:
        family = GaugeMetricFamily(
            "guard_build_info",
            "The guard's version and the SHA-256 (12 hex digits) of its loaded config; always 1.",
            labels=("version", "config_sha"),
        )
        if self._labels is not None:
            family.add_metric(self._labels, 1.0)
        return [family]


class StoreEvictionPolicy(Collector):
    """``guard_store_eviction_policy{backend, policy}``: the shared store's, read at start-up.

    1 when the policy lets the store evict the guard's keys (quarantines and
    standings included), 0 when it cannot (Redis ``noeviction``); absent for
    the memory store, or when it could not be read.
    """

    def __init__(self) -> None:
        self._sample: tuple[str, str, bool] | None = None

    def set(self, backend: str, policy: str, evicts: bool) -> None:
        self._sample = (backend, policy, evicts)

    def collect(self) -> Iterable[Metric]:
        family = GaugeMetricFamily(
            "guard_store_eviction_policy",
            "The shared store's eviction policy (Redis maxmemory-policy, read at start-up): "
            "1 when it may evict the guard's keys, quarantines included; 0 when it cannot.",
            labels=("backend", "policy"),
        )
        if self._sample is not None:
            backend, policy, evicts = self._sample
            family.add_metric((backend, policy), 1.0 if evicts else 0.0)
        return [family]


class QuarantinedClients(Collector):
    """``guard_quarantined_clients{policy}``, counted by the store when scraped.

    The count is reused for :data:`QUARANTINE_CACHE_S` seconds, so a burst of
    scrapes costs the store one count. When the store cannot count (Redis
    down, breaker open) the series is absent for that scrape rather than
    wrong; GuardStoreDown covers the store itself.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._store: Any = None
        self._policies: tuple[str, ...] = ()
        self._clock = clock
        self._cached: tuple[float, int] | None = None
        self._lock = threading.Lock()

    def watch(self, store: Any, policies: Sequence[str]) -> None:
        with self._lock:
            self._store, self._policies, self._cached = store, tuple(policies), None

    def _count(self) -> int | None:
        with self._lock:
            store, cached = self._store, self._cached
            if store is None:
                return None
            now = self._clock()
            if cached is not None and now - cached[0] < QUARANTINE_CACHE_S:
                return cached[1]
            try:
                count = int(store.quarantined_now())
            except StateError as exc:
                log.debug("quarantined clients not counted: %s", exc)
                return None
            self._cached = (now, count)
            return count

    def collect(self) -> Iterable[Metric]:
        family = GaugeMetricFamily(
            "guard_quarantined_clients",
            "Clients in quarantine now, read from the state store. Quarantine is shared: "
            "every enforcing policy refuses each of them, so aggregate with max, not sum.",
            labels=("policy",),
        )
        count = self._count()
        if count is not None:
            for policy in self._policies:
                family.add_metric((policy,), float(count))
        return [family]


class WithLocal(Collector):
    """Every worker's samples from the multiprocess directory, and this worker's own rest.

    The rest: the families of ``registry`` that no worker writes to the
    directory (build info, quarantined clients, process metrics).
    """

    def __init__(self, registry: CollectorRegistry | None) -> None:
        self._registry = registry

    def collect(self) -> Iterator[Metric]:
        from prometheus_client import multiprocess

        shared = list(
            multiprocess.MultiProcessCollector(None).collect()  # type: ignore[no-untyped-call]
        )
        yield from shared
        if self._registry is None:
            return
        names = {family.name for family in shared}
        for family in self._registry.collect():
            if family.name not in names and family.samples:
                yield family
