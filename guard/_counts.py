"""The engine's per-request metric updates, with their label children bound once.

prometheus_client's ``.labels()`` validates and hashes its labels on every
call; a request's few updates would cost more than its detectors. So the
children are looked up once and kept, and the hot-path updates are deferred
through the metrics' tally (:class:`guard.metrics.GuardMetrics`), one batch per
request where they come together.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from inference_guard.guard.decisions import Decision
from inference_guard.guard.metrics import GuardMetrics

__all__ = ["Counts"]


def _uncounted(n_rows: int, seconds: float | None) -> None:
    """The count of a guard whose metrics are off."""


def _unobserved(seconds: float) -> None:
    """The overhead of a guard whose metrics are off."""


class Counts:
    """Every count the engine keeps about requests, by policy (and decision, format, ...)."""

    def __init__(self, metrics: GuardMetrics, *, enabled: bool) -> None:
        self.metrics = metrics
        #: ``metrics.enabled``: the per-request counts are kept at all
        self.enabled = enabled
        self._tally = metrics.tally
        self._children: dict[tuple[str, ...], Any] = {}
        # pre-bound children for the per-request metrics, keyed without the metric name
        self._outcome_children: dict[tuple[str, str], tuple[Any, Any]] = {}
        self._score_children: dict[str, Any] = {}
        self._overhead_children: dict[str, Any] = {}
        self._payload_children: dict[tuple[str, str], Any] = {}

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
        requests, rows = self._outcome(policy, decision.action)
        updates: list[tuple[Any, float]] = [(requests, 1.0), (rows, n_rows)]
        for name, action in decision.fired:
            inc = self.child(self.metrics.detections, policy, name, str(action)).inc
            updates.append((inc, 1.0))
        scores = self._score_children
        for r in decision.results:
            margin = r.score - r.threshold
            if margin == margin:  # skip NaN
                observe = scores.get(r.detector)
                if observe is None:
                    observe = scores[r.detector] = self.child(
                        self.metrics.score, r.detector
                    ).observe
                updates.append((observe, margin))
        self._tally.add_all(updates)  # one request's updates in one batch

    def allowed(self, policy: str, decision: str, n_rows: int, fmt: str | None) -> None:
        """A fixed verdict: the request, its rows and (with ``fmt``) its payload format."""
        if not self.enabled:
            return
        requests, rows = self._outcome(policy, decision)
        if fmt is None:
            self._tally.add_all(((requests, 1.0), (rows, n_rows)))
        else:
            payload = self._payload_inc(policy, fmt)
            self._tally.add_all(((requests, 1.0), (rows, n_rows), (payload, 1.0)))

    def allowed_counter(
        self, policy: str, decision: str, fmt: str
    ) -> Callable[[int, float | None], None]:
        """:meth:`allowed` for one ``(policy, decision, fmt)``: ``count(n_rows, seconds)``.

        A fast lane's per-request count, in one call and one deferred batch:
        the request, its rows, its payload format and, unless ``seconds`` is
        ``None``, the guard's overhead (as :meth:`overhead` records it). The
        children are bound when first counted, as :meth:`allowed` makes them: a
        route no request has taken shows no series.
        """
        if not self.enabled:
            return _uncounted
        add_all = self._tally.add_all
        requests: Any = None
        rows: Any = None
        payload: Any = None
        overhead: Any = None

        def count(n_rows: int, seconds: float | None) -> None:
            nonlocal requests, rows, payload, overhead
            if requests is None:
                requests, rows = self._outcome(policy, decision)
                payload = self._payload_inc(policy, fmt)
            if seconds is None:
                add_all(((requests, 1.0), (rows, n_rows), (payload, 1.0)))
                return
            if overhead is None:
                overhead = self.child(self.metrics.overhead, policy).observe
            add_all(((requests, 1.0), (rows, n_rows), (payload, 1.0), (overhead, seconds)))

        return count

    def outcome(self, policy: str, decision: str, n_rows: int) -> None:
        """A request that ended without a detector decision (``invalid``, ``error``)."""
        if not self.enabled:
            return
        requests, rows = self._outcome(policy, decision)
        self._tally.add(requests, 1.0)
        if n_rows:
            self._tally.add(rows, n_rows)

    def error(self, component: str) -> None:
        self.child(self.metrics.errors, component).inc()

    def invalid(self, policy: str, reason: str) -> None:
        self.child(self.metrics.invalid, policy, reason).inc()

    def payload(self, policy: str, fmt: str) -> None:
        if self.enabled:
            self._tally.add(self._payload_inc(policy, fmt), 1.0)

    def degraded(self, policy: str, outcome: str) -> None:
        self._tally.add(self.child(self.metrics.degraded, policy, outcome).inc, 1.0)

    def exempt(self, policy: str) -> None:
        if self.enabled:
            self._tally.add(self.child(self.metrics.exempt, policy).inc, 1.0)

    def overhead_observer(self, policy: str) -> Callable[[float], None]:
        """:meth:`overhead` for one policy, its child bound on first use (a front end's,
        per route)."""
        if not self.enabled:
            return _unobserved
        add = self._tally.add
        bound: list[Any] = []

        def observe(seconds: float) -> None:
            if not bound:
                bound.append(self.child(self.metrics.overhead, policy).observe)
            add(bound[0], seconds)

        return observe

    def overhead(self, policy: str, seconds: float) -> None:
        """The guard's own time on one request (``guard_overhead_seconds``)."""
        if self.enabled:
            observe = self._overhead_children.get(policy)
            if observe is None:
                observe = self._overhead_children[policy] = self.child(
                    self.metrics.overhead, policy
                ).observe
            self._tally.add(observe, seconds)

    def _outcome(self, policy: str, decision: str) -> tuple[Any, Any]:
        # the bound inc() of the two children, for the tally
        key = (policy, decision)
        pair = self._outcome_children.get(key)
        if pair is None:
            label = str(decision)
            m = self.metrics
            pair = (
                self.child(m.requests, policy, label).inc,
                self.child(m.rows, policy, label).inc,
            )
            self._outcome_children[key] = pair
        return pair

    def _payload_inc(self, policy: str, fmt: str) -> Any:
        key = (policy, fmt)
        inc = self._payload_children.get(key)
        if inc is None:
            inc = self._payload_children[key] = self.child(self.metrics.payloads, policy, fmt).inc
        return inc
