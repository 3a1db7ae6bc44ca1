"""The engine's per-request metric updates, with their label children bound once.

prometheus_client's ``.labels()`` validates and hashes its labels on every
call, and each ``inc()`` or ``observe()`` takes a lock of its own: a request's
dozen updates would cost more than its detectors. So the children are looked
up once, each with the running total of the metrics' tally
(:class:`guard.metrics.Tally`) that stands in for it, and a request's updates
are a few additions to those totals, without a lock (the event loop's thread
is their only writer); the tally applies them to prometheus_client in batches.
"""

from __future__ import annotations

import asyncio
import logging
import math
from bisect import bisect_left
from collections.abc import Callable
from typing import Any, Protocol

from inference_guard.detectors.base import DetectorResult
from inference_guard.guard import metrics as _metrics
from inference_guard.guard.decisions import Action, Decision
from inference_guard.guard.metrics import CounterTotal, GuardMetrics, HistogramBuckets

__all__ = ["Counts", "LaneCount"]

log = logging.getLogger("guard")

#: the running event loop or None, without raising (asyncio's low-level accessor, in C)
_running_loop = asyncio.events._get_running_loop


class LaneCount(Protocol):
    """A fast lane's count of one request (:meth:`Counts.allowed_counter`,
    :meth:`Counts.admitted_counter`): its rows, the guard's ``seconds`` on it
    (``None``: not timed) and, for a detector's count, its score ``margin``."""

    def __call__(self, n_rows: int, seconds: float | None, margin: float = ...) -> None: ...


def _uncounted(n_rows: int, seconds: float | None, margin: float = math.nan) -> None:
    """The count of a guard whose metrics are off."""


def _unobserved(seconds: float) -> None:
    """The overhead of a guard whose metrics are off."""


class Counts:
    """Every count the engine keeps about requests, by policy (and decision, format, ...).

    Each per-request method follows the tally's protocol (see
    :class:`~guard.metrics.Tally`): on the writer loop's thread it adds to the
    totals and counts one batch; elsewhere (no loop, another thread's loop) it
    applies its updates at once.
    """

    def __init__(self, metrics: GuardMetrics, *, enabled: bool) -> None:
        self.metrics = metrics
        #: ``metrics.enabled``: the per-request counts are kept at all
        self.enabled = enabled
        self._tally = metrics.tally
        self._children: dict[tuple[str, ...], Any] = {}
        # the tally's totals for the per-request metrics, keyed without the metric name
        self._outcomes: dict[tuple[str, str], tuple[CounterTotal, CounterTotal]] = {}
        self._detections: dict[tuple[str, str, str], CounterTotal] = {}
        self._scores: dict[str, HistogramBuckets] = {}
        self._overheads: dict[str, HistogramBuckets] = {}
        self._payloads: dict[tuple[str, str], CounterTotal] = {}
        self._degraded: dict[tuple[str, str], CounterTotal] = {}
        self._exempt: dict[str, CounterTotal] = {}

    def child(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, looked up once."""
        key = (metric._name, *labels)
        child = self._children.get(key)
        if child is None:
            child = metric.labels(*labels)
            self._children[key] = child
        return child

    def decision(self, policy: str, decision: Decision, n_rows: int) -> None:
        """A detector decision: the request and its rows, what fired, every score margin."""
        if not self.enabled:
            return
        pair = self._outcomes.get((policy, decision.action))
        requests, rows = pair if pair is not None else self._outcome(policy, decision.action)
        tally = self._tally
        if _running_loop() is not tally.writer and not tally.enter():
            self._decision_now(policy, decision, n_rows)
            return
        requests.value += 1.0
        try:
            rows.value += n_rows if n_rows >= 0 else rows.apply_now(n_rows)
        except TypeError:
            rows.apply_now(n_rows)
        for name, action in decision.fired:
            self._detection(policy, name, action).value += 1.0
        scores = self._scores
        for r in decision.results:
            # as Histogram.observe would, less its lock and scan; a NaN margin is skipped
            try:
                margin = r.score - r.threshold
                if margin != margin:
                    continue
                buckets = scores.get(r.detector)
                if buckets is None:
                    buckets = self._score(r.detector)
                i = bisect_left(buckets.bounds, margin)
                total_margin = buckets.sum + margin
            except Exception:  # a score that is not a number costs only itself
                self._unplaced(r)
                continue
            buckets.counts[i] += 1
            buckets.sum = total_margin
        tally.batches += 1
        if tally.batches >= _metrics.FLUSH_AT:
            tally.flush()

    def _decision_now(self, policy: str, decision: Decision, n_rows: int) -> None:
        # decision(), applied at once (not the writer's thread)
        requests, rows = self._outcome(policy, decision.action)
        requests.apply_now(1.0)
        rows.apply_now(n_rows)
        for name, action in decision.fired:
            self._detection(policy, name, action).apply_now(1.0)
        for r in decision.results:
            try:
                margin = r.score - r.threshold
                if margin != margin:
                    continue
                buckets = self._scores.get(r.detector) or self._score(r.detector)
            except Exception:
                self._unplaced(r)
                continue
            buckets.apply_now(margin)

    def allowed(self, policy: str, decision: str, n_rows: int, fmt: str | None) -> None:
        """A fixed verdict: the request, its rows and (with ``fmt``) its payload format."""
        if not self.enabled:
            return
        requests, rows = self._outcome(policy, decision)
        payload = None if fmt is None else self._payload(policy, fmt)
        tally = self._tally
        if _running_loop() is not tally.writer and not tally.enter():
            requests.apply_now(1.0)
            rows.apply_now(n_rows)
            if payload is not None:
                payload.apply_now(1.0)
            return
        requests.value += 1.0
        rows.add(n_rows)
        if payload is not None:
            payload.value += 1.0
        tally.batches += 1
        if tally.batches >= _metrics.FLUSH_AT:
            tally.flush()

    def allowed_counter(self, policy: str, decision: str, fmt: str) -> LaneCount:
        """:meth:`allowed` for one ``(policy, decision, fmt)``: ``count(n_rows, seconds)``.

        A fast lane's per-request count, in one call and one deferred batch:
        the request, its rows, its payload format and, unless ``seconds`` is
        ``None``, the guard's overhead (as :meth:`overhead` records it). The
        children are bound when first counted, as :meth:`allowed` makes them: a
        route no request has taken shows no series.
        """
        return self._lane_counter(policy, decision, fmt, None)

    def admitted_counter(self, policy: str, detector: str, fmt: str) -> LaneCount:
        """What :meth:`payload` and :meth:`decision` count for a request one detector
        (``detector``) admitted, with nothing fired, bound for one ``(policy, fmt)``:
        ``count(n_rows, seconds, margin)``.

        As :meth:`allowed_counter` (the decision ``allow``), and the detector's
        score ``margin`` (its score less its threshold) too: a fast lane's count
        of a request the rate detector admitted at once. A margin that is not a
        number is left out, as :meth:`decision` leaves it.
        """
        return self._lane_counter(policy, Action.ALLOW, fmt, detector)

    def _lane_counter(
        self, policy: str, decision: str, fmt: str, detector: str | None
    ) -> LaneCount:
        if not self.enabled:
            return _uncounted
        tally = self._tally
        # (requests, rows, payload totals; the score (with a detector), overhead buckets),
        # bound on first use; two threads racing to bind append two equal tuples, and
        # the first is used
        bound: list[
            tuple[
                CounterTotal, CounterTotal, CounterTotal, HistogramBuckets | None, HistogramBuckets
            ]
        ] = []

        def count(n_rows: int, seconds: float | None, margin: float = math.nan) -> None:
            if not bound:
                requests, rows = self._outcome(policy, decision)
                score = (
                    None
                    if detector is None
                    else self._scores.get(detector) or self._score(detector)
                )
                bound.append(
                    (requests, rows, self._payload(policy, fmt), score, self._overhead(policy))
                )
            requests, rows, payload, score, overhead = bound[0]
            if _running_loop() is not tally.writer and not tally.enter():
                requests.apply_now(1.0)
                rows.apply_now(n_rows)
                payload.apply_now(1.0)
                if score is not None and margin == margin:
                    score.apply_now(margin)
                if seconds is not None:
                    overhead.apply_now(seconds)
                return
            requests.value += 1.0
            payload.value += 1.0
            try:
                rows.value += n_rows if n_rows >= 0 else rows.apply_now(n_rows)
            except TypeError:
                rows.apply_now(n_rows)
            if score is not None and margin == margin:
                score.add(margin)
            if seconds is not None:
                overhead.add(seconds)
            tally.batches += 1
            if tally.batches >= _metrics.FLUSH_AT:
                tally.flush()

        return count

    def outcome(self, policy: str, decision: str, n_rows: int) -> None:
        """A request that ended without a detector decision (``invalid``, ``error``)."""
        if not self.enabled:
            return
        requests, rows = self._outcome(policy, decision)
        tally = self._tally
        if _running_loop() is not tally.writer and not tally.enter():
            requests.apply_now(1.0)
            if n_rows:
                rows.apply_now(n_rows)
            return
        requests.value += 1.0
        if n_rows:
            rows.add(n_rows)
        tally.batches += 1
        if tally.batches >= _metrics.FLUSH_AT:
            tally.flush()

    def error(self, component: str) -> None:
        self.child(self.metrics.errors, component).inc()

    def invalid(self, policy: str, reason: str) -> None:
        self.child(self.metrics.invalid, policy, reason).inc()

    def payload(self, policy: str, fmt: str) -> None:
        if self.enabled:
            total = self._payloads.get((policy, fmt))
            self._count(total if total is not None else self._payload(policy, fmt))

    def degraded(self, policy: str, outcome: str) -> None:
        total = self._degraded.get((policy, outcome))
        if total is None:
            total = self._degraded[policy, outcome] = self._total(
                self.metrics.degraded, policy, outcome
            )
        self._count(total)

    def exempt(self, policy: str) -> None:
        if self.enabled:
            total = self._exempt.get(policy)
            if total is None:
                total = self._exempt[policy] = self._total(self.metrics.exempt, policy)
            self._count(total)

    def overhead_observer(self, policy: str) -> Callable[[float], None]:
        """:meth:`overhead` for one policy, its child bound on first use (a front end's,
        per route)."""
        if not self.enabled:
            return _unobserved
        bound: list[HistogramBuckets] = []

        def observe(seconds: float) -> None:
            if not bound:
                bound.append(self._overhead(policy))
            self._observe(bound[0], seconds)

        return observe

    def overhead(self, policy: str, seconds: float) -> None:
        """The guard's own time on one request (``guard_overhead_seconds``)."""
        if self.enabled:
            self._observe(self._overhead(policy), seconds)

    def _observe(self, buckets: HistogramBuckets, seconds: float) -> None:
        # one histogram observation, as its own batch (as _count does a counter's)
        tally = self._tally
        if _running_loop() is not tally.writer and not tally.enter():
            buckets.apply_now(seconds)
            return
        buckets.add(seconds)
        tally.batches += 1
        if tally.batches >= _metrics.FLUSH_AT:
            tally.flush()

    def _count(self, total: CounterTotal) -> None:
        # one counter's increment, as its own batch
        tally = self._tally
        if _running_loop() is not tally.writer and not tally.enter():
            total.apply_now(1.0)
            return
        total.value += 1.0
        tally.batches += 1
        if tally.batches >= _metrics.FLUSH_AT:
            tally.flush()

    def _unplaced(self, result: DetectorResult) -> None:
        # a margin the buckets cannot take: observed alone, its failure logged
        try:
            self.child(self.metrics.score, result.detector).observe(result.score - result.threshold)
        except Exception:
            log.exception("metric update of %r's score failed", result.detector)

    def _total(self, metric: Any, *labels: str) -> CounterTotal:
        return self._tally.total(self.child(metric, *labels))

    def _outcome(self, policy: str, decision: str) -> tuple[CounterTotal, CounterTotal]:
        # the totals of the two children (requests, rows)
        key = (policy, decision)
        pair = self._outcomes.get(key)
        if pair is None:
            label = str(decision)
            m = self.metrics
            pair = (self._total(m.requests, policy, label), self._total(m.rows, policy, label))
            self._outcomes[key] = pair
        return pair

    def _detection(self, policy: str, name: str, action: str) -> CounterTotal:
        key = (policy, name, action)
        total = self._detections.get(key)
        if total is None:
            total = self._detections[key] = self._total(
                self.metrics.detections, policy, name, str(action)
            )
        return total

    def _score(self, detector: str) -> HistogramBuckets:
        buckets = self._tally.histogram(self.child(self.metrics.score, detector))
        self._scores[detector] = buckets
        return buckets

    def _overhead(self, policy: str) -> HistogramBuckets:
        buckets = self._overheads.get(policy)
        if buckets is None:
            buckets = self._overheads[policy] = self._tally.histogram(
                self.child(self.metrics.overhead, policy)
            )
        return buckets

    def _payload(self, policy: str, fmt: str) -> CounterTotal:
        key = (policy, fmt)
        total = self._payloads.get(key)
        if total is None:
            total = self._payloads[key] = self._total(self.metrics.payloads, policy, fmt)
        return total
