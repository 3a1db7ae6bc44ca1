"""Prometheus metrics, in one object built around an injectable registry.

Nothing is registered at import time. Each :class:`GuardMetrics` registers its
families in the registry it is given (a fresh ``CollectorRegistry`` by
default), so two guards in one process, or one per test, never collide.

Label values come from closed sets only: policy and detector names come from
the config file (validated as short identifiers), decisions, actions, reasons,
components and backends from enums in code. Client ids and paths never become
labels.

Multiprocess mode (``uvicorn --workers N``): set ``PROMETHEUS_MULTIPROC_DIR``
to an empty directory before the workers start. Every worker then writes its
samples there and ``/metrics`` on any worker aggregates all of them (see
:func:`exposition`).
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import threading
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

__all__ = ["DECISIONS", "FLUSH_AFTER_S", "FLUSH_AT", "GuardMetrics", "Tally", "exposition"]

log = logging.getLogger("guard")

#: longest a deferred per-request update waits before it reaches its metric (seconds)
FLUSH_AFTER_S = 1.0
#: deferred updates held at most; reaching it applies them at once
FLUSH_AT = 256

#: the running event loop or None, without raising (asyncio's low-level accessor, in C)
_running_loop = asyncio.events._get_running_loop


class Tally:
    """Per-request metric updates, applied to prometheus_client in batches.

    Each ``inc()`` or ``observe()`` of prometheus_client validates the metric
    and takes a lock; the guard makes four or more per request, and on a
    served process (cold caches between requests) they cost more than the
    JSON parse. The hot path therefore only appends ``(update, value)`` here,
    and the updates are applied, all of them (a counter's increments summed
    into one ``inc()``, other updates one by one, in order):

    * whenever this process's registry is collected (every scrape of
      ``/metrics``, and ``get_sample_value`` in tests): the tally is registered
      in the registry before the guard's metrics, so it runs first;
    * when :data:`FLUSH_AT` updates are pending;
    * at most :data:`FLUSH_AFTER_S` after the first pending one (a timer on
      the running event loop), so that with ``PROMETHEUS_MULTIPROC_DIR`` the
      other workers' samples are never more than a second behind;
    * at interpreter exit.

    Outside an event loop (scripts, synchronous tests) updates apply at once.
    Safe against a scrape from another thread: a flush takes a prefix of the
    pending list under a lock and removes exactly that prefix, so an update
    appended meanwhile is kept for the next flush, never lost or applied twice.
    """

    def __init__(self) -> None:
        self._pending: list[tuple[Callable[[float], Any], float]] = []
        self._lock = threading.Lock()
        self._timer_loop: asyncio.AbstractEventLoop | None = None
        atexit.register(_flush_ref, weakref.ref(self))

    def add(self, update: Callable[[float], Any], value: float) -> None:
        """Defer ``update(value)`` (a bound ``inc`` or ``observe``)."""
        pending = self._pending
        pending.append((update, value))
        if len(pending) >= FLUSH_AT:
            self.flush()
            return
        loop = _running_loop()
        if loop is None:
            self.flush()
        elif self._timer_loop is not loop:
            self._timer_loop = loop
            loop.call_later(FLUSH_AFTER_S, self._on_timer, loop)

    def add_all(self, updates: Sequence[tuple[Callable[[float], Any], float]]) -> None:
        """Defer several updates at once (one request's), as :meth:`add` does each."""
        pending = self._pending
        pending.extend(updates)
        if len(pending) >= FLUSH_AT:
            self.flush()
            return
        loop = _running_loop()
        if loop is None:
            self.flush()
        elif self._timer_loop is not loop:
            self._timer_loop = loop
            loop.call_later(FLUSH_AFTER_S, self._on_timer, loop)

    def _on_timer(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._timer_loop is loop:
            self._timer_loop = None
        self.flush()

    def flush(self) -> None:
        """Apply every pending update now."""
        with self._lock:
            pending = self._pending
            n = len(pending)
            if not n:
                return
            batch = pending[:n]
            del pending[:n]
            # a counter's increments add up: one inc() per counter instead of one per update
            sums: dict[Callable[[float], Any], float] = {}
            for update, value in batch:
                try:
                    summable = type(getattr(update, "__self__", None)) is Counter and value >= 0
                except TypeError:  # not a number: applied alone, so that its failure is logged
                    summable = False
                if summable:
                    sums[update] = sums.get(update, 0.0) + value
                else:
                    _apply(update, value)
            for update, total in sums.items():
                _apply(update, total)

    # the Collector protocol: collecting the registry applies what is pending first
    def collect(self) -> list[Any]:
        self.flush()
        return []

    def describe(self) -> list[Any]:
        return []


def _apply(update: Callable[[float], Any], value: float) -> None:
    try:
        update(value)
    except Exception:  # one bad value must not cost the others, nor a request
        log.exception("metric update %r(%r) failed", update, value)


def _flush_ref(ref: weakref.ref[Tally]) -> None:
    tally = ref()
    if tally is not None:
        tally.flush()


#: values of the ``decision`` label: the actions, plus ``invalid`` (bad input
#: refused with a 4xx) and ``error`` (the guard failed, failure mode applied)
DECISIONS = ("allow", "flag", "degrade", "throttle", "block", "invalid", "error")

#: values of the ``component`` label of guard_errors_total
COMPONENTS = ("detector", "store", "internal", "parse", "response")

#: margin buckets for guard_detector_score: score minus threshold, < 0 means fired
SCORE_BUCKETS = (-100.0, -10.0, -3.0, -1.0, -0.3, -0.1, 0.0, 0.1, 0.3, 1.0, 3.0, 10.0, 100.0)


class GuardMetrics:
    """Every metric the guard exports. Pass ``registry`` to control where they live."""

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        overhead_buckets: Iterable[float] = (
            1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 0.1,
        ),
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        #: per-request updates, batched (see Tally); registered first so a collect flushes it
        self.tally = Tally()
        r.register(self.tally)
        self.requests = Counter(
            "guard_requests",
            "Requests seen by a policy, by decision.",
            ("policy", "decision"),
            registry=r,
        )
        self.rows = Counter(
            "guard_rows",
            "Rows (or prompts) seen by a policy, by decision.",
            ("policy", "decision"),
            registry=r,
        )
        self.detections = Counter(
            "guard_detections",
            "Detector firings, by the action they asked for.",
            ("policy", "detector", "action"),
            registry=r,
        )
        self.score = Histogram(
            "guard_detector_score",
            "Detector score minus its threshold (below 0: the detector fired).",
            ("detector",),
            buckets=SCORE_BUCKETS,
            registry=r,
        )
        self.overhead = Histogram(
            "guard_overhead_seconds",
            "Time the guard adds to a request (excluding the model).",
            ("policy",),
            buckets=tuple(overhead_buckets),
            registry=r,
        )
        self.errors = Counter(
            "guard_errors",
            "Failures inside the guard, by component.",
            ("component",),
            registry=r,
        )
        self.invalid = Counter(
            "guard_invalid_requests",
            "Requests refused as malformed, by reason.",
            ("policy", "reason"),
            registry=r,
        )
        self.payloads = Counter(
            "guard_payloads",
            "Request payloads by recognised format (unknown passes through).",
            ("policy", "format"),
            registry=r,
        )
        self.degraded = Counter(
            "guard_degraded_responses",
            "Answers the degrade action touched, by outcome.",
            ("policy", "outcome"),
            registry=r,
        )
        self.quarantined = Counter(
            "guard_quarantines",
            "Clients put in quarantine.",
            ("policy",),
            registry=r,
        )
        self.store_errors = Counter(
            "guard_store_errors",
            "State store operations that failed.",
            ("backend",),
            registry=r,
        )
        self.store_fallback = Counter(
            "guard_store_fallback",
            "Decisions taken without the shared store (failure mode or memory fallback).",
            ("backend",),
            registry=r,
        )
        self.store_evictions = Counter(
            "guard_store_evictions",
            "Keys evicted from a bounded store.",
            ("backend",),
            registry=r,
        )
        self.store_flag_overflows = Counter(
            "guard_store_flag_overflows",
            "Quarantine flags and standings kept with the evictable keys: the flag table was full.",
            ("backend",),
            registry=r,
        )
        self.breaker = Counter(
            "guard_store_breaker_transitions",
            "Circuit-breaker state changes of the shared store (open, half_open, closed).",
            ("backend", "state"), registry=r,
        )
        self.audit_dropped = Counter(
            "guard_audit_dropped",
            "Audit lines dropped because the writer fell behind.",
            registry=r,
        )
        self.exempt = Counter(
            "guard_exempt_requests",
            "Requests from exempt clients (exempt: in the config), decided but never enforced.",
            ("policy",),
            registry=r,
        )
        self.capture_dropped = Counter(
            "guard_capture_dropped",
            "Capture lines dropped because the writer fell behind or could not write.",
            registry=r,
        )

        # series that alerts watch exist from the start at 0, so that increase() sees
        # the very first error instead of a series appearing already at 1
        for component in COMPONENTS:
            self.errors.labels(component)

    def store_event(self, kind: str, backend: str) -> None:
        """Store events: ``error``, ``fallback``, ``eviction``, ``flag_overflow``, breaker moves."""
        if kind == "error":
            self.store_errors.labels(backend).inc()
        elif kind == "fallback":
            self.store_fallback.labels(backend).inc()
        elif kind == "eviction":
            self.store_evictions.labels(backend).inc()
        elif kind == "flag_overflow":
            self.store_flag_overflows.labels(backend).inc()
        elif kind in ("open", "half_open", "closed"):
            self.breaker.labels(backend, kind).inc()


def exposition(registry: CollectorRegistry | None) -> tuple[bytes, str]:
    """The text exposition and its content type.

    In multiprocess mode the samples of every worker are read from
    ``PROMETHEUS_MULTIPROC_DIR`` instead of from ``registry``.
    """
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        merged = CollectorRegistry()
        multiprocess.MultiProcessCollector(merged)  # type: ignore[no-untyped-call]
        return generate_latest(merged), CONTENT_TYPE_LATEST
    if registry is None:
        from prometheus_client import REGISTRY

        registry = REGISTRY
    return generate_latest(registry), CONTENT_TYPE_LATEST
