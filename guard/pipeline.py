"""The guard's engine: config in, decisions out. Knows nothing of ASGI.

:class:`Guard` builds everything once (store, identity, metrics, audit log,
policies with their detectors) and offers the three calls the middleware makes
per request: :meth:`Guard.match`, :meth:`Guard.decide` (before the model) and
:meth:`Guard.observe` (after it). :mod:`guard.replay` drives the same calls
offline, on recorded traffic and recorded time.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from detectors.base import Answer, DetectorResult, Query
from detectors.store import KeyValueStore
from guard.audit import AuditLog
from guard.capture import CaptureLog
from guard.config import GuardConfig
from guard.decisions import Action, Decision, FailureMode
from guard.errors import StateError
from guard.identity import ClientIdentifier
from guard.metrics import GuardMetrics
from guard.policy import Armed, CompiledPolicy
from guard.registry import BuildContext, build_detector
from guard.stores import Store, store_from_uri
from guard.stores.resilient import ResilientStore

__all__ = ["FailClosed", "Guard"]

log = logging.getLogger("guard")

_QUARANTINE_PREFIX = "quarantine:"
#: (method, path) pairs whose matching policy is remembered
_MATCH_MEMO = 1024


class FailClosed(Exception):
    """The guard failed on a policy whose failure mode is ``fail_closed`` (answer 503)."""

    def __init__(self, component: str):
        self.component = component
        super().__init__(component)


class Guard:
    """Ties config, detectors, store, metrics and audit log together."""

    def __init__(
        self,
        config: GuardConfig,
        *,
        registry: CollectorRegistry | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        store: KeyValueStore | None = None,
        identity_secret: bytes | None = None,
    ) -> None:
        self.config = config
        self.clock = clock
        self.wall_clock = wall_clock
        self.metrics = GuardMetrics(registry, overhead_buckets=config.metrics.overhead_buckets)
        self.metrics_enabled = config.metrics.enabled
        self._tally = self.metrics.tally
        self.store: KeyValueStore = store if store is not None else self._build_store()
        self.identifier = ClientIdentifier(
            config.client_identity, secret=identity_secret, exempt=config.exempt
        )
        self.audit = AuditLog(config.audit, on_drop=self.metrics.audit_dropped.inc)
        #: the traffic recorder for ``guard replay``, when ``capture:`` is configured
        self.capture: CaptureLog | None = (
            CaptureLog(config.capture, on_drop=self.metrics.capture_dropped.inc)
            if config.capture.enabled
            else None
        )
        ctx = BuildContext(
            store=self.store,
            clock=clock,
            wall_clock=wall_clock,
            calibration_dir=Path(config.calibration_dir) if config.calibration_dir else None,
            limits=config.limits,
        )
        self.techniques: dict[str, str] = {}
        policies: list[CompiledPolicy] = []
        for pc in config.policies:
            built: list[Armed] = []
            for spec in pc.detectors:
                det = build_detector(spec, ctx)
                self.techniques[det.name] = det.technique
                built.append(Armed(det, spec.action, spec.escalate, spec.escalate_margin))
            policies.append(CompiledPolicy.build(pc, tuple(built), config.failure_mode))
        self.policies = tuple(policies)
        # per policy, the detectors whose flags are per row: a decision that only they
        # flagged is counted, not audited (Decision.row_flags_only)
        self._row_detectors: dict[str, frozenset[str]] = {
            p.name: frozenset(a.detector.name for a in p.detectors if a.detector.per_row)
            for p in self.policies
        }
        self.quarantine_enabled = any(p.config.quarantine_s > 0 for p in self.policies)
        self._children: dict[tuple[str, ...], Any] = {}
        self._match_memo: dict[tuple[str, str], CompiledPolicy | None] = {}
        # pre-bound children for the per-request metrics, keyed without the metric name
        self._outcome_children: dict[tuple[str, str], tuple[Any, Any]] = {}
        self._score_children: dict[str, Any] = {}
        self._overhead_children: dict[str, Any] = {}
        self._payload_children: dict[tuple[str, str], Any] = {}
        # per policy, the route patterns already warned about an unknown format
        self._unknown_warned: dict[str, set[str]] = {p.name: set() for p in self.policies}

    def _build_store(self) -> KeyValueStore:
        base: Store = store_from_uri(
            self.config.state, clock=self.clock, on_event=self.metrics.store_event
        )
        if base.backend == "memory":
            return base
        return ResilientStore.from_config(
            base, self.config.state, clock=self.clock, on_event=self.metrics.store_event
        )

    # ------------------------------------------------------------------ matching

    def match(self, method: str, path: str) -> CompiledPolicy | None:
        """The first policy whose methods and routes match, or ``None``.

        Answers are remembered for up to :data:`_MATCH_MEMO` distinct (method,
        path) pairs; paths are client-chosen, so past that the memo stops
        growing and further paths are matched afresh.
        """
        key = (method, path)
        memo = self._match_memo
        if key in memo:
            return memo[key]
        found = None
        for policy in self.policies:
            if policy.matches(method, path):
                found = policy
                break
        if len(memo) < _MATCH_MEMO:
            memo[key] = found
        return found

    def note_unknown_format(self, policy: CompiledPolicy, path: str) -> None:
        """Warn, once per (policy, route pattern), that a request of no known format passed.

        Such a request (``unknown_format: pass``) gets no row counting, no
        detectors and no rounding of its answer; it is counted as
        ``guard_payloads_total{format="unknown"}``. The warning names the route
        pattern from the config, never the client-chosen path.
        """
        warned = self._unknown_warned.setdefault(policy.name, set())
        if len(warned) >= len(policy.config.routes):
            return
        route = policy.route_of(path)
        if route in warned:
            return
        warned.add(route)
        log.warning(
            "policy %s: a request on route %s has no known payload format and passed without "
            "row counting, detectors or rounding of its answer (unknown_format: pass). "
            "Declare its shape with payload: {rows: <JSON pointer>, probabilities: <JSON "
            "pointer>}, or refuse such requests with unknown_format: refuse",
            policy.name,
            route,
        )

    # ------------------------------------------------------------------ before the model

    async def check_quarantine(
        self, policy: CompiledPolicy, client: str, *, exempt: bool = False
    ) -> Decision | None:
        """A block decision when ``client`` is in quarantine, else ``None``.

        Called right after the client is identified, before the body is read or
        parsed, so a quarantined client costs almost nothing and no parser path
        can let it through. Shadow policies neither quarantine nor enforce it,
        and an exempt client is never refused by it.
        """
        if not self.quarantine_enabled or policy.config.shadow or exempt:
            return None
        try:
            if await self.store.get(_QUARANTINE_PREFIX + client) is None:
                return None
        except StateError:
            self._failed(policy, "store")
            return None
        decision = Decision(
            action=Action.BLOCK, intended=Action.BLOCK, policy=policy.name, quarantined=True
        )
        self._record(policy, decision, 1)
        return decision

    async def decide(
        self, policy: CompiledPolicy, query: Query, *, exempt: bool = False
    ) -> Decision:
        """Run the policy's detectors on a request and combine their verdicts.

        Raises :class:`FailClosed` when a detector or the store fails and the
        policy's failure mode is ``fail_closed``; under ``fail_open`` the failing
        detector is skipped (and counted). Quarantine is checked before, by
        :meth:`check_quarantine`. For an ``exempt`` client every detector runs
        and is counted, and the decision records what was intended, but the
        enforced action is ``allow`` and nothing is quarantined.
        """
        if exempt and self.metrics_enabled:
            self._tally.add(self._child(self.metrics.exempt, policy.name).inc, 1.0)
        if policy.allow is not None:  # no detectors: one immutable decision for all
            self._record(policy, policy.allow, query.n_rows)
            return policy.allow
        quarantined = False
        results: list[DetectorResult] = []
        fired: list[tuple[str, Action]] = []
        intended = Action.ALLOW
        retry_after: float | None = None
        headers: list[tuple[str, str]] = []
        for armed in policy.detectors:
            det = armed.detector
            try:
                result = await det.inspect(query)
            except StateError:
                self._failed(policy, "store")
                continue
            except Exception:
                log.exception("detector %s failed", det.name)
                self._failed(policy, "detector")
                continue
            results.append(result)
            if result.headers:
                headers.extend(result.headers)
            if result.anomalous:
                action = armed.action_for(result)
                fired.append((det.name, action))
                if action.severity > intended.severity:
                    intended = action
                if action is Action.THROTTLE and result.retry_after is not None:
                    retry_after = max(retry_after or 0.0, result.retry_after)
        shadow = policy.config.shadow
        enforced = not (shadow or exempt)
        if intended is Action.BLOCK and enforced and policy.config.quarantine_s > 0:
            quarantined = await self.quarantine(policy, query.client)
        row_detectors = self._row_detectors[policy.name]
        decision = Decision(
            action=intended if enforced else Action.ALLOW,
            intended=intended,
            policy=policy.name,
            results=tuple(results),
            fired=tuple(fired),
            retry_after=retry_after if intended is Action.THROTTLE and enforced else None,
            headers=tuple(headers),
            quarantined=quarantined,
            shadow=shadow,
            exempt=exempt,
            row_flags_only=intended is Action.FLAG
            and bool(row_detectors)
            and all(name in row_detectors for name, _ in fired),
        )
        self._record(policy, decision, query.n_rows)
        return decision

    def allow(self, policy: CompiledPolicy, n_rows: int, fmt: str | None = None) -> Decision:
        """The fixed verdict of a policy without detectors, counted like any other.

        What :meth:`decide` returns for such a policy, without building a
        :class:`Query` that nothing would read. With ``fmt`` the payload format
        is counted too (what :meth:`count_payload` does), in the same batch.
        """
        decision = policy.allow
        if decision is None:
            raise ValueError(f"policy {policy.name!r} has detectors: use decide()")
        if self.metrics_enabled:
            requests, rows = self._outcome(policy.name, decision.action)
            if fmt is None:
                self._tally.add_all(((requests, 1.0), (rows, n_rows)))
            else:
                payload = self._payload_inc(policy.name, fmt)
                self._tally.add_all(((requests, 1.0), (rows, n_rows), (payload, 1.0)))
        return decision

    def allowed_updates(self, policy: CompiledPolicy, fmt: str) -> tuple[Any, ...]:
        """The metric updates of a request a policy without detectors lets through.

        ``(requests_inc, rows_inc, payload_inc, overhead_observe)``: the bound
        methods that :meth:`allow` (with ``fmt``) and :meth:`observe_overhead`
        defer to the tally, for a caller that defers them itself (the
        middleware's lean lane); ``()`` when metrics are off.
        """
        if policy.allow is None:
            raise ValueError(f"policy {policy.name!r} has detectors: use decide()")
        if not self.metrics_enabled:
            return ()
        requests, rows = self._outcome(policy.name, policy.allow.action)
        overhead = self._child(self.metrics.overhead, policy.name).observe
        return (requests, rows, self._payload_inc(policy.name, fmt), overhead)

    def _failed(self, policy: CompiledPolicy, component: str) -> None:
        self.count_error(component)
        if component == "store":
            # a decision taken without the store, whichever way the failure mode goes
            backend = getattr(self.store, "backend", "unknown")
            self._child(self.metrics.store_fallback, str(backend)).inc()
        if policy.failure_mode is FailureMode.FAIL_CLOSED:
            raise FailClosed(component)

    async def quarantine(self, policy: CompiledPolicy, client: str) -> bool:
        """Quarantine ``client`` for the policy's TTL; False if the store failed."""
        try:
            await self.store.set(_QUARANTINE_PREFIX + client, b"1", policy.config.quarantine_s)
        except StateError:
            self.count_error("store")
            return False
        self._child(self.metrics.quarantined, policy.name).inc()
        return True

    # ------------------------------------------------------------------ after the model

    async def observe(
        self,
        policy: CompiledPolicy,
        query: Query,
        answer: Answer,
        *,
        client_source: str,
        exempt: bool = False,
    ) -> Decision | None:
        """Let stateful detectors learn from the answer; record any that fire.

        The answer has already gone to the client, so failures here are counted
        and logged but cannot change this request (fail-open by necessity); a
        detector that fires here changes the decision on the client's next request
        (by quarantine; an ``exempt`` client is never quarantined). Returns the
        decision that was recorded, or ``None`` when nothing fired.
        """
        fired: list[tuple[str, Action]] = []
        results: list[DetectorResult] = []
        for armed in policy.detectors:
            det = armed.detector
            if not det.observes_answers:
                continue
            try:
                result = await det.observe(query, answer)
            except StateError:
                self.count_error("store")
                continue
            except Exception:
                log.exception("detector %s failed in observe", det.name)
                self.count_error("detector")
                continue
            if result is None:
                continue
            results.append(result)
            if result.anomalous:
                fired.append((det.name, armed.action_for(result)))
        if not fired:
            return None
        intended = max((a for _, a in fired), key=lambda a: a.severity)
        quarantined = False
        enforced = not (policy.config.shadow or exempt)
        if intended is Action.BLOCK and enforced and policy.config.quarantine_s > 0:
            quarantined = await self.quarantine(policy, query.client)
        decision = Decision(
            action=intended if enforced else Action.ALLOW,
            intended=intended,
            policy=policy.name,
            results=tuple(results),
            fired=tuple(fired),
            quarantined=quarantined,
            shadow=policy.config.shadow,
            exempt=exempt,
        )
        for name, action in fired:
            self._child(self.metrics.detections, policy.name, name, str(action)).inc()
        self.audit.record(
            decision,
            request_id=query.request_id,
            client=query.client,
            client_source=client_source,
            techniques=self.techniques,
            n_rows=query.n_rows,
            reason="after_answer",
        )
        return decision

    # ------------------------------------------------------------------ metrics

    def _child(self, metric: Any, *labels: str) -> Any:
        # prometheus_client's .labels() validates and hashes on every call; cache the children
        key = (metric._name, *labels)
        child = self._children.get(key)
        if child is None:
            child = metric.labels(*labels)
            self._children[key] = child
        return child

    def _outcome(self, policy: str, decision: str) -> tuple[Any, Any]:
        # the bound inc() of the two children, for the tally
        key = (policy, decision)
        pair = self._outcome_children.get(key)
        if pair is None:
            label = str(decision)
            m = self.metrics
            pair = (
                self._child(m.requests, policy, label).inc,
                self._child(m.rows, policy, label).inc,
            )
            self._outcome_children[key] = pair
        return pair

    def _record(self, policy: CompiledPolicy, decision: Decision, n_rows: int) -> None:
        if not self.metrics_enabled:
            return
        requests, rows = self._outcome(policy.name, decision.action)
        updates: list[tuple[Any, float]] = [(requests, 1.0), (rows, n_rows)]
        for name, action in decision.fired:
            inc = self._child(self.metrics.detections, policy.name, name, str(action)).inc
            updates.append((inc, 1.0))
        scores = self._score_children
        for r in decision.results:
            margin = r.score - r.threshold
            if margin == margin:  # skip NaN
                observe = scores.get(r.detector)
                if observe is None:
                    observe = scores[r.detector] = self._child(
                        self.metrics.score, r.detector
                    ).observe
                updates.append((observe, margin))
        self._tally.add_all(updates)  # one request's updates in one batch

    def record_outcome(self, policy: str, decision: str, n_rows: int) -> None:
        """Count a request that ended without a detector decision (``invalid``, ``error``)."""
        if not self.metrics_enabled:
            return
        requests, rows = self._outcome(policy, decision)
        self._tally.add(requests, 1.0)
        if n_rows:
            self._tally.add(rows, n_rows)

    def count_error(self, component: str) -> None:
        self._child(self.metrics.errors, component).inc()

    def count_invalid(self, policy: str, reason: str) -> None:
        self._child(self.metrics.invalid, policy, reason).inc()

    def count_payload(self, policy: str, fmt: str) -> None:
        if self.metrics_enabled:
            self._tally.add(self._payload_inc(policy, fmt), 1.0)

    def _payload_inc(self, policy: str, fmt: str) -> Any:
        key = (policy, fmt)
        inc = self._payload_children.get(key)
        if inc is None:
            inc = self._payload_children[key] = self._child(self.metrics.payloads, policy, fmt).inc
        return inc

    def count_degraded(self, policy: str, outcome: str) -> None:
        self._tally.add(self._child(self.metrics.degraded, policy, outcome).inc, 1.0)

    def observe_overhead(self, policy: str, seconds: float) -> None:
        if self.metrics_enabled:
            observe = self._overhead_children.get(policy)
            if observe is None:
                observe = self._overhead_children[policy] = self._child(
                    self.metrics.overhead, policy
                ).observe
            self._tally.add(observe, seconds)

    async def aclose(self) -> None:
        for policy in self.policies:
            for armed in policy.detectors:
                try:
                    await armed.detector.aclose()
                except Exception:
                    log.exception("closing detector %s failed", armed.detector.name)
        self.metrics.tally.flush()
        close = getattr(self.store, "aclose", None)
        if close is not None:
            await close()
        await asyncio.to_thread(self.audit.close)
        if self.capture is not None:
            await asyncio.to_thread(self.capture.close)
