"""Prometheus metrics, in one object built around an injectable registry.

Nothing is registered at import time. Each :class:`GuardMetrics` registers its
families in the registry it is given (a fresh ``CollectorRegistry`` by
default), so two guards in one process, or one per test, never collide.

Label values come from closed sets only: policy and detector names come from
the config file (validated as short identifiers), decisions, actions, reasons,
components and backends from enums in code. Client ids and paths never become
labels.

Series exist from start-up: :meth:`GuardMetrics.declare` creates, at 0, every
series the config implies (each policy's decisions, each ``{policy, detector,
action}`` a detector can fire with, each policy's quarantines, ...), so that
``increase()`` sees the very first event instead of a series appearing
already at 1 (or at 16, after a batch). It also sets ``guard_build_info``, the
per-detector bucket layouts of ``guard_detector_score`` (from calibration, see
:mod:`guard.score_buckets`) and ``guard_quarantined_clients``, read from the
store at scrape time.

Multiprocess mode (``uvicorn --workers N``): set ``PROMETHEUS_MULTIPROC_DIR``
to an empty directory before the workers start. Every worker then writes its
samples there and ``/metrics`` on any worker aggregates all of them (see
:func:`exposition`). The families no worker writes to that directory come
from the worker answering the scrape: ``guard_build_info`` (the same in every
worker), ``guard_quarantined_clients`` (read from the store: with ``redis://``
the shared count; with ``memory://`` that worker's own quarantines),
``guard_store_eviction_policy`` (read from Redis at start-up) and the
``process_*`` families, summed over the live workers
(:mod:`guard._process_metrics`).
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import dataclasses
import hashlib
import json
import logging
import operator
import os
import threading
import weakref
from bisect import bisect_left
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client import values as prometheus_values
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from inference_guard.guard._collectors import (
    BuildInfo,
    QuarantinedClients,
    StoreEvictionPolicy,
    WithLocal,
)
from inference_guard.guard._process_metrics import ProcessMetrics
from inference_guard.guard.errors import PayloadError

if TYPE_CHECKING:
    from inference_guard.guard.config import GuardConfig

__all__ = [
    "CODE_CLASSES",
    "DECISIONS",
    "FLUSH_AFTER_S",
    "FLUSH_AT",
    "NO_WRITER",
    "CounterTotal",
    "GuardMetrics",
    "HistogramBuckets",
    "Tally",
    "code_class",
    "config_sha",
    "exposition",
]

log = logging.getLogger("guard")

#: longest a deferred per-request update waits before it reaches its metric (seconds)
FLUSH_AFTER_S = 1.0
#: deferred updates held at most; reaching it applies them at once
FLUSH_AT = 256

#: the running event loop or None, without raising (asyncio's low-level accessor, in C)
_running_loop = asyncio.events._get_running_loop


#: :attr:`Tally.writer` while no loop is: no running loop (nor None) is it
NO_WRITER = object()


class CounterTotal:
    """One counter child's increments: a running total the hot path adds to.

    Made once per child (:meth:`Tally.total`). Only the thread of the tally's
    :attr:`~Tally.writer` loop adds to :attr:`value`, and only a flush reads
    it: the flush applies what was added since :attr:`applied` (one ``inc``)
    and moves :attr:`applied` up. Reading a number is atomic, so an addition
    racing a flush is in this flush or the next, never lost or applied twice,
    with no lock on the hot path.
    """

    __slots__ = ("applied", "child", "value")

    def __init__(self, child: Any) -> None:
        #: the prometheus_client counter child the total is applied to
        self.child = child
        #: everything added so far (never less than before: see :meth:`apply_now`)
        self.value: float = 0.0
        #: the part of :attr:`value` a flush has applied to the child
        self.applied: float = 0.0

    def add(self, amount: float) -> None:
        """``child.inc(amount)``, deferred (from the writer loop's thread).

        The hot paths inline it as ``total.value += n if n >= 0 else
        total.apply_now(n)``, with :meth:`apply_now` for a ``TypeError`` too.
        """
        try:
            self.value += amount if amount >= 0 else self.apply_now(amount)
        except TypeError:
            self.apply_now(amount)

    def apply_now(self, amount: Any) -> float:
        """``child.inc(amount)`` at once, its failure logged; returns 0 (to add to the total).

        For a caller that is not the writer, and for an amount that is negative
        or not a number: summed with the others it would spoil them, alone its
        failure costs only itself.
        """
        _apply(self.child.inc, amount)
        return 0.0


class HistogramBuckets:
    """One histogram child's observations: running counts per bucket and their sum.

    Made once per child (:meth:`Tally.histogram`) with the child's own upper
    bounds. An observation is placed as ``Histogram.observe`` places it (the
    first bucket whose bound is at or above it; a NaN joins the sum and no
    bucket), found with ``bisect`` instead of a scan. Written and read as
    :class:`CounterTotal` is: a flush applies what the counts and the sum
    gained since it last looked (one ``inc`` to the sum and one per bucket
    touched).
    """

    __slots__ = ("applied_counts", "applied_sum", "bounds", "child", "counts", "sum")

    def __init__(self, child: Any) -> None:
        bounds = child._upper_bounds
        if len(bounds) != len(child._buckets) or not hasattr(child, "_sum"):
            raise TypeError(f"{child!r} is not a prometheus_client histogram child")
        #: the prometheus_client histogram child the observations are applied to
        self.child = child
        #: the child's upper bounds, the last one +Inf
        self.bounds: list[float] = list(bounds)
        #: observations so far, per bucket (not cumulative)
        self.counts: list[int] = [0] * len(bounds)
        #: the sum of the observations so far
        self.sum: float = 0.0
        #: what a flush has applied of :attr:`counts` and :attr:`sum`
        self.applied_counts: list[int] = [0] * len(bounds)
        self.applied_sum: float = 0.0

    def add(self, value: float) -> None:
        """``child.observe(value)``, deferred (from the writer loop's thread)."""
        try:
            i = bisect_left(self.bounds, value)
            total = self.sum + value
        except TypeError:
            self.apply_now(value)
            return
        if value == value:  # NaN: in no bucket (and bisect cannot place it)
            self.counts[i] += 1
        self.sum = total

    def apply_now(self, value: Any) -> None:
        """``child.observe(value)`` at once, its failure logged (as
        :meth:`CounterTotal.apply_now`)."""
        _apply(self.child.observe, value)

    def take(self) -> tuple[list[int], float] | None:
        """What the counts and the sum gained since the last take (a flush's, serialised)."""
        counts = list(self.counts)  # one C call: a consistent copy, whatever the writer does
        total = self.sum
        applied = self.applied_counts
        gained = list(map(operator.sub, counts, applied))
        before_sum = self.applied_sum
        if total == before_sum or (total != total and before_sum != before_sum):
            gained_sum = 0.0  # nothing new (an infinite sum stays what it is; NaN too)
        else:
            gained_sum = total - before_sum  # inf - finite: inf; inf - inf (a -inf came): NaN
        if gained_sum == 0.0 and not any(gained):
            return None
        self.applied_counts = counts
        self.applied_sum = total
        return gained, gained_sum


class Tally:
    """Per-request metric updates, applied to prometheus_client in batches.

    Each ``inc()`` or ``observe()`` of prometheus_client validates the metric
    and takes a lock; the guard makes four to twenty per request, and on a
    served process (cold caches between requests) they cost more than the
    JSON parse. The hot path therefore only adds to plain numbers kept here,
    one :class:`CounterTotal` per counter child and one
    :class:`HistogramBuckets` per histogram child (made when the child is first
    counted), and what they gained is applied, one ``inc()`` per counter and
    per histogram bucket touched:

    * whenever this process's registry is collected (every scrape of
      ``/metrics``, and ``get_sample_value`` in tests): the tally is registered
      in the registry before the guard's metrics, so it runs first;
    * when :data:`FLUSH_AT` updates (or batches of them, one per request) are
      pending;
    * at most :data:`FLUSH_AFTER_S` after the first pending one (a timer on
      the running event loop), so that with ``PROMETHEUS_MULTIPROC_DIR`` the
      other workers' samples are never more than a second behind;
    * at interpreter exit.

    The totals have one writer: the event loop in :attr:`writer`, whose thread
    adds to them without a lock (see :class:`CounterTotal`); a flush, from any
    thread, only reads them. The hot path's protocol is therefore::

        if running_loop() is tally.writer or tally.enter():
            ...add to the totals...
            tally.batches += 1
            if tally.batches >= FLUSH_AT:
                tally.flush()
        else:
            ...apply at once (apply_now)...

    :meth:`enter` makes the calling thread's loop the writer when no other
    loop can still be writing (none is, it is closed, or it is this thread's
    own, stopped), and arms the timer. Outside an event loop (scripts,
    synchronous tests), or from a second loop running in another thread,
    updates apply at once. Flushes are serialised by a lock: a scrape racing
    another flush waits for it, so it still sees all that was counted before it.

    :meth:`add` and :meth:`add_all` defer an update of any kind (a bound
    ``inc`` or ``observe``, or any callable taking one number) to a pending
    list instead, for the rarer paths: a counter's increments are summed into
    one ``inc()`` at the flush, histogram observations bucketed, other updates
    applied one by one, in order. A flush takes a prefix of that list and
    removes exactly that prefix, so an update appended meanwhile is kept for
    the next flush.

    :meth:`attach` adds a list of values that its owner appends to directly
    (one C call on the hot path, no Python frame); each flush hands what was
    appended to the list's ``apply`` in one batch, under the same prefix rule.
    Its owner appends only alongside an update of its own to the tally, so the
    list is drained as often as the pending updates are.
    """

    def __init__(self) -> None:
        self._pending: list[tuple[Callable[[float], Any], float]] = []
        #: the loop whose thread adds to the totals (see above); :data:`NO_WRITER`: none
        #: yet, or idle (never None: outside a loop, the running loop is None)
        self.writer: object = NO_WRITER
        self._writer_thread = 0
        # held while the writer changes
        self._lock = threading.Lock()
        # held by a flush from its first read to the end of its applying
        self._flushing = threading.Lock()
        self._timer_loop: asyncio.AbstractEventLoop | None = None
        self._attached: list[tuple[list[Any], Callable[[list[Any]], Any]]] = []
        # read at each flush (watch); one that answers False is dropped
        self._sources: list[Callable[[], bool]] = []
        self._totals: dict[Any, CounterTotal] = {}
        self._histograms: dict[Any, HistogramBuckets] = {}
        #: batches added to the totals since the last flush (by the writer; it only times flushes)
        self.batches = 0
        atexit.register(_flush_ref, weakref.ref(self))

    def total(self, child: Any) -> CounterTotal:
        """The total a counter child's increments are added to (made on first call)."""
        total = self._totals.get(child)
        if total is None:  # setdefault: one total per child, whichever thread asks first
            total = self._totals.setdefault(child, CounterTotal(child))
        return total

    def histogram(self, child: Any) -> HistogramBuckets:
        """The buckets a histogram child's observations are added to (made on first call)."""
        buckets = self._histograms.get(child)
        if buckets is None:
            buckets = self._histograms.setdefault(child, HistogramBuckets(child))
        return buckets

    def enter(self) -> bool:
        """Whether the calling thread may add to the totals now (making its loop the writer).

        Call it only when the running loop is not :attr:`writer`. False outside
        an event loop, and while another loop that may still write (running,
        or stopped in another thread) is the writer: apply at once then.
        """
        loop = _running_loop()
        if loop is None:
            return False
        me = threading.get_ident()
        with self._lock:
            writer = self.writer
            if isinstance(writer, asyncio.AbstractEventLoop) and writer is not loop:
                free = writer.is_closed() or (self._writer_thread == me and not writer.is_running())
                if not free:
                    return False
            self.writer = loop
            self._writer_thread = me
        loop.call_later(FLUSH_AFTER_S, self._on_writer_timer, loop)
        return True

    def _on_writer_timer(self, loop: asyncio.AbstractEventLoop) -> None:
        # on the writer's thread: no addition can be under way
        if self.writer is not loop:
            return
        if self.flush():
            loop.call_later(FLUSH_AFTER_S, self._on_writer_timer, loop)
        else:  # idle: the next addition enters again, and arms a new timer
            with self._lock:
                if self.writer is loop:
                    self.writer = NO_WRITER

    def attach(self, values: list[Any], apply: Callable[[list[Any]], Any]) -> None:
        """Hand what is appended to ``values`` to ``apply`` at each flush (see above)."""
        with self._flushing:
            self._attached.append((values, apply))

    def watch(self, source: Callable[[], bool]) -> None:
        """Call ``source()`` at each flush, under the flush's lock, until it returns False.

        For counts that something else keeps (a leased rate store's checks): the
        source applies what they gained since its last call, at no cost to the
        path that counts them.
        """
        with self._flushing:
            self._sources.append(source)

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

    def flush(self) -> bool:
        """Apply every pending update now; whether the totals had gained anything."""
        with self._flushing:
            self.batches = 0
            sums, observed = self._take()
            for values, apply in self._attached:
                n = len(values)
                if n:
                    batch = values[:n]
                    del values[:n]
                    try:
                        apply(batch)
                    except Exception:  # one bad value must not cost the others
                        log.exception("metric update %r(%d values) failed", apply, n)
            if self._sources:
                self._sources = [source for source in self._sources if _read_source(source)]
            for child, amount in sums:
                _apply(child.inc, amount)
            for child, counts, total in observed:
                _add_buckets(child, counts, total)
            pending = self._pending
            n = len(pending)
            if n:
                batch = pending[:n]
                del pending[:n]
                _apply_updates(batch)
        return bool(sums or observed)

    def _take(self) -> tuple[list[tuple[Any, float]], list[tuple[Any, list[int], float]]]:
        """What the totals gained since the last flush (under ``_flushing``)."""
        sums: list[tuple[Any, float]] = []
        observed: list[tuple[Any, list[int], float]] = []
        # list(): a copy made in one C call, should another thread add a child meanwhile
        for total in list(self._totals.values()):
            now = total.value
            if now != total.applied:
                sums.append((total.child, now - total.applied))
                total.applied = now
        for buckets in list(self._histograms.values()):
            gained = buckets.take()
            if gained is not None:
                observed.append((buckets.child, *gained))
        return sums, observed

    # the Collector protocol: collecting the registry applies what is pending first
    def collect(self) -> list[Any]:
        self.flush()
        return []

    def describe(self) -> list[Any]:
        return []


def _apply_updates(batch: list[tuple[Callable[[float], Any], float]]) -> None:
    """Apply updates deferred with :meth:`Tally.add`: counters summed, histograms bucketed."""
    # a counter's increments add up: one inc() per counter instead of one per update;
    # a histogram's observations are bucketed together: one inc() per bucket touched
    sums: dict[Callable[[float], Any], float] = {}
    observed: dict[Callable[[float], Any], list[float]] = {}
    for update, value in batch:
        kind = type(getattr(update, "__self__", None))
        if kind is Counter:
            try:
                summable = value >= 0
            except TypeError:  # not a number: applied alone, so its failure is logged
                summable = False
            if summable:
                sums[update] = sums.get(update, 0.0) + value
                continue
        elif kind is Histogram and isinstance(value, float):
            held = observed.get(update)
            if held is None:
                observed[update] = [value]
            else:
                held.append(value)
            continue
        _apply(update, value)
    for update, total in sums.items():
        _apply(update, total)
    for update, held_values in observed.items():
        _observe_all(update, held_values)


def _add_buckets(child: Any, counts: list[int], total: float) -> None:
    """Apply a flush's :class:`HistogramBuckets` to its child: the sum, then each bucket."""
    try:
        child._sum.inc(total)
        buckets = child._buckets
        for i, count in enumerate(counts):
            if count:
                buckets[i].inc(count)
    except Exception:  # one bad child must not cost the others
        log.exception("metric update %r(%d observations) failed", child, sum(counts))


def _read_source(source: Callable[[], bool]) -> bool:
    """A watched source read once (:meth:`Tally.watch`): whether to keep it; a failure
    is logged and keeps it."""
    try:
        return bool(source())
    except Exception:
        log.exception("metric source %r failed", source)
        return True


def _apply(update: Callable[[float], Any], value: float) -> None:
    try:
        update(value)
    except Exception:  # one bad value must not cost the others, nor a request
        log.exception("metric update %r(%r) failed", update, value)


def _observe_all(observe: Callable[[float], Any], values: list[float]) -> None:
    """``observe(v)`` for each of ``values`` (a histogram child's), bucketed in one pass.

    What ``Histogram.observe`` does one value at a time (the sum, then the
    first bucket whose bound is at or above the value; a NaN joins the sum and
    no bucket), with one ``inc`` per bucket touched. Falls back to ``observe``
    per value on a histogram of another make.
    """
    hist = getattr(observe, "__self__", None)
    bounds = getattr(hist, "_upper_bounds", None)
    buckets = getattr(hist, "_buckets", None)
    total_of = getattr(hist, "_sum", None)
    if bounds is None or buckets is None or total_of is None or len(bounds) != len(buckets):
        for value in values:
            _apply(observe, value)
        return
    try:
        counts = [0] * len(bounds)
        n = len(bounds)
        for value in values:
            i = bisect_left(bounds, value)
            if i < n and value == value:  # NaN: in no bucket (and bisect cannot place it)
                counts[i] += 1
        total_of.inc(sum(values))
        for i, count in enumerate(counts):
            if count:
                buckets[i].inc(count)
    except Exception:  # one bad value must not cost the others, nor a request
        log.exception("metric update %r(%d values) failed", observe, len(values))


def _flush_ref(ref: weakref.ref[Tally]) -> None:
    tally = ref()
    if tally is not None:
        tally.flush()


#: values of the ``decision`` label: the actions, plus ``invalid`` (bad input
#: refused with a 4xx) and ``error`` (the guard failed, failure mode applied)
DECISIONS = ("allow", "flag", "degrade", "throttle", "block", "invalid", "error")

#: values of the ``component`` label of guard_errors_total
COMPONENTS = ("detector", "store", "internal", "parse", "response", "signature")

#: margin buckets for guard_detector_score of a detector the config does not describe
#: (score minus threshold, < 0 means fired); configured detectors get their own layout
SCORE_BUCKETS = (-100.0, -10.0, -3.0, -1.0, -0.3, -0.1, 0.0, 0.1, 0.3, 1.0, 3.0, 10.0, 100.0)

#: values of the ``outcome`` label of guard_degraded_responses_total
DEGRADE_OUTCOMES = ("degraded", "passed_through", "too_large", "unparsed")

#: values of the ``code_class`` label of guard_upstream_responses_total
CODE_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx", "other")

#: breaker states counted by guard_store_breaker_transitions_total
BREAKER_STATES = ("open", "half_open", "closed")

_SCORE_NAME = "guard_detector_score"
_SCORE_HELP = "Detector score minus its threshold (below 0: the detector fired)."


def code_class(status: int) -> str:
    """The ``code_class`` label of an HTTP status: ``2xx``, ``5xx``, ... or ``other``."""
    return f"{status // 100}xx" if 100 <= status <= 599 else "other"


def _backend_of(uri: str) -> str:
    """The ``backend`` label a store URI's store reports (``memory``, ``redis``, ...)."""
    scheme = uri.split("://", 1)[0]
    if scheme == "memory":
        return "memory"
    return "redis-cluster" if "cluster" in scheme else "redis"


def config_sha(config: GuardConfig) -> str:
    """The first 12 hex digits of the SHA-256 of the loaded config, canonically serialised.

    Canonical: the parsed config (defaults filled in, paths resolved) as JSON
    with sorted keys, so two files that differ only in layout, comments or
    spelled-out defaults give the same value.
    """
    body = json.dumps(
        dataclasses.asdict(config), sort_keys=True, separators=(",", ":"), default=str
    )
    return hashlib.sha256(body.encode("utf-8")).hexdigest()[:12]


_PROBE_LOCK = threading.Lock()


def _check_histogram_internals() -> None:
    """Fail at start-up, not on a request, when prometheus_client's histograms lack what
    :class:`HistogramBuckets` reads (their bounds, bucket counters and sum)."""
    # the probe's values in memory, whatever the mode: in multiprocess mode a metric made
    # the usual way writes its samples to PROMETHEUS_MULTIPROC_DIR, and every worker's
    # scrape would export it
    with _PROBE_LOCK:
        saved = prometheus_values.ValueClass
        prometheus_values.ValueClass = prometheus_values.MutexValue
        try:
            probe = Histogram("guard_selfcheck", "start-up check", registry=None)
        finally:
            prometheus_values.ValueClass = saved
    try:
        HistogramBuckets(probe)
    except (AttributeError, TypeError) as exc:
        raise RuntimeError(
            "this prometheus_client's histograms lack the bounds, bucket counters and sum "
            "(_upper_bounds, _buckets, _sum) the guard's metrics apply in bulk; "
            "install a prometheus-client release the guard supports"
        ) from exc


class GuardMetrics:
    """Every metric the guard exports. Pass ``registry`` to control where they live."""

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        overhead_buckets: Iterable[float] = (
            1e-5,
            2.5e-5,
            5e-5,
            1e-4,
            2.5e-4,
            5e-4,
            1e-3,
            2.5e-3,
            5e-3,
            1e-2,
            0.1,
        ),
    ) -> None:
        _check_histogram_internals()
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        #: per-request updates, batched (see Tally); registered first so a collect flushes it
        self.tally = Tally()
        # the leased rate stores whose checks are exported (watch_rate_checks)
        self._rate_stores: weakref.WeakSet[Any] = weakref.WeakSet()
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
            _SCORE_NAME, _SCORE_HELP, ("detector",), buckets=SCORE_BUCKETS, registry=r
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
        self.rate_checks = Counter(
            "guard_rate_checks",
            "Rate checks of a detector on a shared store with leases, by where they were "
            "answered: local (this worker's lease, or its repeat of a refusal) or store.",
            ("detector", "answered"),
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
            ("backend", "state"),
            registry=r,
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
        self.observations_dropped = Counter(
            "guard_observations_dropped",
            "Answers the detectors that learn from them never saw: the observation queue "
            "was full (observation.max_pending).",
            ("policy",),
            registry=r,
        )
        self.upstream = Counter(
            "guard_upstream_responses",
            "Answers of the protected app (the model), by status class.",
            ("policy", "code_class"),
            registry=r,
        )
        self._upstream_statuses: dict[str, list[int]] = {}
        self.reloads = Counter(
            "guard_config_reloads",
            "Config reloads (SIGHUP, POST /-/reload), by result: ok, or error (old config kept).",
            ("result",),
            registry=r,
        )
        for result in ("ok", "error"):
            self.reloads.labels(result)
        #: guard_build_info and guard_quarantined_clients, set by declare()
        self.build_info = BuildInfo()
        r.register(self.build_info)
        self.quarantined_now = QuarantinedClients()
        r.register(self.quarantined_now)
        #: the shared store's eviction policy, set once it is read at start-up
        self.store_eviction_policy = StoreEvictionPolicy()
        r.register(self.store_eviction_policy)
        try:
            r.register(ProcessMetrics())
        except ValueError:  # the registry has process metrics already (prometheus' default one)
            log.debug("registry already exports process_* metrics")

        # series that alerts watch exist from the start at 0, so that increase() sees
        # the very first error instead of a series appearing already at 1
        for component in COMPONENTS:
            self.errors.labels(component)

    def declare(self, config: GuardConfig, *, store: object | None = None) -> None:
        """Create every series ``config`` implies at 0; set build info and score layouts.

        Call it once the config is loaded, before any request (whoever builds
        the guard: ``guard demo`` does). ``store`` is the guard's state store:
        when it can count quarantined clients
        (:class:`~guard.stores.base.QuarantineCount`) and a policy quarantines,
        ``guard_quarantined_clients`` reports that count, for every policy that
        enforces (quarantine is shared: a client quarantined by one policy is
        refused by every non-shadow policy). Calling it again (the same config)
        changes nothing; with a reloaded config it adds the new series and
        replaces ``guard_build_info``'s one series (the old policies' series stay).
        """
        from inference_guard.guard import __version__
        from inference_guard.guard.score_buckets import score_buckets
        from inference_guard.guard.stores.base import QuarantineCount

        calibration_dir = Path(config.calibration_dir) if config.calibration_dir else None
        for policy in config.policies:
            p = policy.name
            for decision in DECISIONS:
                self.requests.labels(p, decision)
                self.rows.labels(p, decision)
            for reason in sorted(PayloadError.REASONS):
                self.invalid.labels(p, reason)
            for outcome in DEGRADE_OUTCOMES:
                self.degraded.labels(p, outcome)
            for cls in CODE_CLASSES:
                self.upstream.labels(p, cls)
            self.quarantined.labels(p)
            self.observations_dropped.labels(p)
            self.exempt.labels(p)
            self.overhead.labels(p)
            for spec in policy.detectors:
                actions = {spec.action, *(a for _, a in spec.escalate + spec.escalate_margin)}
                for action in sorted(actions, key=lambda a: a.severity):
                    self.detections.labels(p, spec.name, str(action))
                self.score_layout(spec.name, score_buckets(spec, calibration_dir))
        backend = str(getattr(store, "backend", "") or _backend_of(config.state.store))
        for child in (self.store_errors, self.store_fallback, self.store_evictions):
            child.labels(backend)
        self.store_flag_overflows.labels(backend)
        if backend != "memory":
            for state in BREAKER_STATES:
                self.breaker.labels(backend, state)
        self.build_info.set(__version__, config_sha(config))
        enforcing = tuple(p.name for p in config.policies if not p.shadow)
        quarantines = any(p.quarantine_s > 0 for p in config.policies)
        if isinstance(store, QuarantineCount) and quarantines:
            self.quarantined_now.watch(store, enforcing)

    def score_layout(self, detector: str, buckets: Sequence[float]) -> None:
        """Give ``detector``'s series of ``guard_detector_score`` its own bucket layout.

        Only before its first observation: a series keeps the layout it was
        made with. A detector never given one uses :data:`SCORE_BUCKETS`.
        """
        family = self.score
        key = (detector,)
        # prometheus_client keeps one layout per family; a child made here with its own
        # buckets is what family.labels(detector) returns from now on
        with family._lock:
            children: dict[Any, Any] = family._metrics
            if key not in children:
                children[key] = Histogram(
                    _SCORE_NAME,
                    _SCORE_HELP,
                    ("detector",),
                    _labelvalues=key,
                    buckets=tuple(buckets),
                )

    def count_upstream(self, policy: str, status: int) -> None:
        """Count one answer of the protected app by its status class (deferred, as requests).

        ``status`` 0 (the app sent no response start) counts as ``other``.
        """
        self.upstream_statuses(policy).append(status)
        if _running_loop() is None:
            self.tally.flush()

    def upstream_statuses(self, policy: str) -> list[int]:
        """The list a front end appends the app's statuses to, for one policy.

        ``guard_upstream_responses_total`` counts them at each flush of the
        tally (:meth:`Tally.attach`): appending costs the request one C call.
        The front end appends only for a request it also counts otherwise.
        """
        statuses = self._upstream_statuses.get(policy)
        if statuses is None:
            statuses = self._upstream_statuses[policy] = []
            self.tally.attach(statuses, partial(self._count_statuses, policy))
        return statuses

    def _count_statuses(self, policy: str, statuses: list[int]) -> None:
        # a flush's statuses are mostly one or two values: classify each (type, value) once
        seen: Iterable[tuple[tuple[type, Any], int]]
        try:
            seen = collections.Counter(zip(map(type, statuses), statuses, strict=True)).items()
        except TypeError:  # an unhashable status
            seen = [((type(status), status), 1) for status in statuses]
        by_class: dict[str, int] = {}
        for (kind, status), n in seen:
            label = code_class(status) if kind is int else "other"
            by_class[label] = by_class.get(label, 0) + n
        for label, n in by_class.items():
            self.upstream.labels(policy, label).inc(n)

    def watch_rate_checks(self, detector: str, store: Any) -> None:
        """Export ``store``'s checks (``local`` and ``remote``, a leased rate store's
        counts) as ``guard_rate_checks_total{detector, answered}``, read at each flush.

        A store already watched is not watched twice (a reload keeps a detector it
        did not change); one that is gone stops being read.
        """
        if store in self._rate_stores:
            return
        self._rate_stores.add(store)
        local = self.rate_checks.labels(detector, "local")
        remote = self.rate_checks.labels(detector, "store")
        ref = weakref.ref(store)
        seen = [0, 0]

        def source() -> bool:
            current = ref()
            if current is None:
                return False
            now_local, now_remote = current.local, current.remote
            if now_local != seen[0]:
                local.inc(now_local - seen[0])
                seen[0] = now_local
            if now_remote != seen[1]:
                remote.inc(now_remote - seen[1])
                seen[1] = now_remote
            return True

        self.tally.watch(source)

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
    ``PROMETHEUS_MULTIPROC_DIR``; of ``registry``, only the families no worker
    writes there are added (see the module docstring).
    """
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        merged = CollectorRegistry()
        merged.register(WithLocal(registry))
        return generate_latest(merged), CONTENT_TYPE_LATEST
    if registry is None:
        from prometheus_client import REGISTRY

        registry = REGISTRY
    return generate_latest(registry), CONTENT_TYPE_LATEST
