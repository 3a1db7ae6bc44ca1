"""The guard's engine: config in, verdicts out. Knows nothing of ASGI.

:class:`Guard` builds everything once (store, identity, metrics, audit log,
payload formats, policies with their detectors). A front end makes two calls
per request (:mod:`guard.engine` has the values they take and give):
:meth:`Guard.admit` before the model (identify the client, check quarantine,
read and parse the body, decide, audit, capture: a refusal or a pass) and
:meth:`Guard.after` once the model has answered (learn from the answer, record
the capture line, count the rewrite). Inside, :meth:`Guard.decide` and
:meth:`Guard.observe` run the detectors; :mod:`guard.replay` drives those
offline, on recorded traffic and recorded time.

Request parsing and answer rewriting live below, in :mod:`guard.payload`, so
that every front end gets the same verdict from the same bytes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from prometheus_client import CollectorRegistry

from inference_guard.detectors.base import Answer, Detector, DetectorResult, Query
from inference_guard.detectors.rate import RateLimitDetector
from inference_guard.detectors.store import KeyValueStore
from inference_guard.guard._counts import Counts
from inference_guard.guard.admission import Admission
from inference_guard.guard.audit import AuditLog
from inference_guard.guard.capture import CaptureLog
from inference_guard.guard.config import GuardConfig, ObservationConfig
from inference_guard.guard.decisions import Action, Decision, FailClosed, FailureMode
from inference_guard.guard.engine import Pass, Request, Seen, Verdict
from inference_guard.guard.errors import ConfigurationError, StateError
from inference_guard.guard.identity import ClientIdentifier
from inference_guard.guard.loadout import Loadout, build_loadout
from inference_guard.guard.metrics import GuardMetrics, config_sha
from inference_guard.guard.payload.adapters import pattern_format
from inference_guard.guard.payload.formats import PayloadFormat
from inference_guard.guard.policy import Armed, CompiledPolicy
from inference_guard.guard.registry import BuildContext
from inference_guard.guard.reload import ReloadResult, check_frozen
from inference_guard.guard.signatures import MetadataSource, Signatures
from inference_guard.guard.stores import Store, store_from_uri
from inference_guard.guard.stores.base import EvictionPolicy
from inference_guard.guard.stores.lease import LeasedRateStore
from inference_guard.guard.stores.resilient import ResilientStore

__all__ = ["FailClosed", "Guard", "Observation", "Observations", "QueuedDetectors"]

log = logging.getLogger("guard")

_QUARANTINE_PREFIX = "quarantine:"

#: the running event loop or None, without raising
_running_loop = asyncio.events._get_running_loop


class Observation(NamedTuple):
    """One answer for the detectors that learn from answers (``Guard.observe``'s arguments)."""

    policy: CompiledPolicy
    query: Query
    answer: Answer
    client_source: str
    exempt: bool = False


class Observations:
    """The observation queue: answers waiting for the detectors that learn from them.

    The detectors that learn from answers judge the client's *next* requests,
    so what they must see waits here and is applied in batches (``apply``,
    :meth:`Guard.observe_batch`), where they share the per-row work. An
    observation is applied at the latest

    * before the next verdict on a request of the same client (:meth:`pending`:
      the front drains first), so every verdict sees all of its own client's
      earlier answers, exactly as without the queue (in this process: other
      workers see what an answer writes to the shared store, a quarantine
      included, once the queue drains); and, where the policy
      quarantines by address (``quarantine_address``, enforced), before the
      next verdict on any request from that address or subnet, so that a
      quarantine an answer decides is in force there as without the queue;
    * when ``batch`` observations are waiting (drained right after the answer
      that completed the batch);
    * ``max_delay_s`` after it was queued (a timer on the running loop), so a
      quiet service still shares its standings and quarantines promptly.

    At most ``max_pending`` wait; past that (a drain stalled on a slow store)
    an observation is dropped and ``on_drop`` counts it. One drain runs at a
    time: a caller that needs the queue empty waits for the running one.
    """

    def __init__(
        self,
        apply: Callable[[Sequence[Observation]], Awaitable[object]],
        config: ObservationConfig,
        *,
        on_drop: Callable[[Observation], None] | None = None,
    ) -> None:
        self._apply = apply
        self._on_drop = on_drop
        self._items: list[Observation] = []
        # whose verdicts wait for each queued item (:func:`_waits_for`), in step with it
        self._keys: list[tuple[str, ...]] = []
        # client, address and subnet ids with observations waiting, and how many
        self._waiting: dict[str, int] = {}
        # the loop a drain is running on (awaiting the store), and what its waiters await
        self._busy: asyncio.AbstractEventLoop | None = None
        self._done: asyncio.Future[None] | None = None
        # the task applying the batch in flight (a drain it starts itself returns at once)
        self._drainer: asyncio.Task[Any] | None = None
        # about how many bytes the waiting observations hold (rows, their memo, answers)
        self._bytes = 0
        self._sizes: list[int] = []
        self._timer: asyncio.TimerHandle | None = None
        self._timer_loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        #: observations dropped because ``max_pending`` were waiting
        self.dropped = 0
        self.configure(config)

    def configure(self, config: ObservationConfig) -> None:
        """Take (re)loaded settings; what waits stays queued."""
        self.batch = config.batch
        self.max_pending = config.max_pending
        self.max_pending_bytes = config.max_pending_bytes
        self.max_delay_s = config.max_delay_s

    @property
    def queued(self) -> bool:
        """Whether observations are queued at all (``batch`` > 1)."""
        return self.batch > 1

    def __len__(self) -> int:
        return len(self._items)

    def pending(self, client: str, ip: str = "", subnet: str = "") -> bool:
        """Whether an observation that this client's verdict must see has not been applied:
        one of the client's own, or one that may quarantine its address or subnet."""
        waiting = self._waiting
        if not waiting:
            return False
        return (
            client in waiting
            or (ip != "" and ip in waiting)
            or (subnet != "" and subnet in waiting)
        )

    def put(self, item: Observation) -> bool:
        """Queue ``item``; ``False`` (and counted) when ``max_pending`` observations, or
        ``max_pending_bytes`` of them, are waiting (one alone is always queued)."""
        size = _observation_bytes(item)
        if self._items and (
            len(self._items) >= self.max_pending or self._bytes + size > self.max_pending_bytes
        ):
            self._lost((item,))
            return False
        self._items.append(item)
        self._sizes.append(size)
        self._bytes += size
        ids = _waits_for(item)
        self._keys.append(ids)
        waiting = self._waiting
        for key in ids:
            waiting[key] = waiting.get(key, 0) + 1
        return True

    async def submit(self, item: Observation) -> None:
        """Queue ``item``, draining now when a batch is complete, else by the timer.

        The batch is applied in a task of its own, so that a caller cancelled
        meanwhile (a client gone, a server shutting down) does not cut it short.
        """
        if not self.put(item):
            return
        if len(self._items) >= self.batch:
            await asyncio.shield(self.drain())
        else:
            self._schedule()

    def abandon(self) -> int:
        """Give up every waiting observation, counting each as dropped (a shutdown whose
        drain failed or ran out of time); how many there were."""
        items, keys = self._items, self._keys
        self._items, self._keys, self._sizes, self._bytes = [], [], [], 0
        self._release(keys)
        self._lost(items)
        return len(items)

    def _lost(self, items: Sequence[Observation]) -> None:
        """Count observations that will never be applied."""
        self.dropped += len(items)
        if self._on_drop is not None:
            for item in items:
                self._on_drop(item)

    def _schedule(self) -> None:
        loop = _running_loop()
        if loop is None:
            return
        if self._timer is not None and self._timer_loop is loop and not self._timer.cancelled():
            return
        self._timer_loop = loop
        self._timer = loop.call_later(self.max_delay_s, self._on_timer, loop)

    def _on_timer(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._timer_loop is loop:
            self._timer = None
        if self._items and (self._task is None or self._task.done()):
            self._task = loop.create_task(self.drain())

    async def drain(self) -> None:
        """Apply every waiting observation, waiting first for a batch in flight.

        On return nothing queued before the call is left unapplied, so a verdict
        that drains sees every answer it waits for, even one a concurrent drain
        (the timer's, another request's) had taken and was still applying. A
        drain started by the batch being applied returns at once.
        """
        while True:
            busy = self._busy
            if busy is not None and busy is _running_loop():
                if asyncio.current_task() is self._drainer:
                    return
                # a drain is applying its batch (awaiting the store): wait for it, then
                # apply what came after it
                waiter = self._done
                if waiter is None:
                    waiter = self._done = busy.create_future()
                await waiter
                continue
            if not self._items:
                return
            # (a drain still marked busy on a loop that is gone lost its batch with it)
            self._busy = asyncio.get_running_loop()
            self._drainer = asyncio.current_task()
            items, keys = self._items, self._keys
            self._items, self._keys, self._sizes, self._bytes = [], [], [], 0
            try:
                await self._apply(items)
            except asyncio.CancelledError:
                # cut short (a shutdown): counted as dropped, some may have been applied
                self._lost(items)
                raise
            except Exception:
                log.exception("applying %d queued observations failed", len(items))
            finally:
                self._release(keys)
                self._busy = None
                self._drainer = None
                waiter, self._done = self._done, None
                if waiter is not None and not waiter.done():
                    waiter.set_result(None)

    def _release(self, keys: Sequence[tuple[str, ...]]) -> None:
        waiting = self._waiting
        for ids in keys:
            for key in ids:
                left = waiting.get(key, 0) - 1
                if left > 0:
                    waiting[key] = left
                else:
                    waiting.pop(key, None)


def _observation_bytes(item: Observation) -> int:
    """About what a waiting observation holds: its rows twice (the matrix and the
    per-request memo's copy of its bytes), its answer's probabilities, its texts."""
    query, answer = item.query, item.answer
    size = 512
    if query.rows is not None:
        size += 2 * query.rows.nbytes
    if answer.probabilities is not None:
        size += answer.probabilities.nbytes
    if answer.labels is not None:
        size += answer.labels.nbytes
    return size + sum(map(len, query.texts))


def _waits_for(item: Observation) -> tuple[str, ...]:
    """Whose next verdict must wait for ``item``: its client, and the address layer the
    policy would quarantine with it (an enforcing policy with ``quarantine_address``)."""
    query, policy = item.query, item.policy
    cfg = policy.config
    if item.exempt or cfg.shadow or cfg.quarantine_s <= 0:
        return (query.client,)
    layer = _address_layer(policy, query.ip, query.subnet)
    return (query.client, layer) if layer and layer != query.client else (query.client,)


class QueuedDetectors:
    """The engine as a front end's admission sees it, answers going through the queue.

    :meth:`observe` queues the answer (:class:`Observations`); the verdicts
    (:meth:`check_quarantine`, :meth:`decide`) first apply what is queued for
    the same client, address or subnet, so that no verdict misses its own
    client's earlier answers. With ``observation.batch: 1`` every answer is
    observed at once, as :meth:`Guard.observe` does.
    """

    def __init__(self, guard: Guard, observations: Observations) -> None:
        self._guard = guard
        self._observations = observations

    @property
    def quarantine_enabled(self) -> bool:
        return self._guard.quarantine_enabled

    def check_quarantine(
        self,
        policy: CompiledPolicy,
        client: str,
        *,
        exempt: bool = False,
        ip: str = "",
        subnet: str = "",
    ) -> Coroutine[Any, Any, Decision | None]:
        # the engine's own coroutine when nothing waits (no second frame per request)
        if self._observations.pending(client, ip, subnet):
            return self._drained_check(policy, client, exempt, ip, subnet)
        return self._guard.check_quarantine(policy, client, exempt=exempt, ip=ip, subnet=subnet)

    async def _drained_check(
        self, policy: CompiledPolicy, client: str, exempt: bool, ip: str, subnet: str
    ) -> Decision | None:
        await self._observations.drain()
        return await self._guard.check_quarantine(
            policy, client, exempt=exempt, ip=ip, subnet=subnet
        )

    def decide(
        self, policy: CompiledPolicy, query: Query, *, exempt: bool = False
    ) -> Coroutine[Any, Any, Decision]:
        if self._observations.pending(query.client, query.ip, query.subnet):
            return self._drained_decide(policy, query, exempt)
        return self._guard.decide(policy, query, exempt=exempt)

    async def _drained_decide(self, policy: CompiledPolicy, query: Query, exempt: bool) -> Decision:
        await self._observations.drain()
        return await self._guard.decide(policy, query, exempt=exempt)

    def allow(self, policy: CompiledPolicy, n_rows: int, fmt: str | None = None) -> Decision:
        return self._guard.allow(policy, n_rows, fmt)

    async def observe(
        self,
        policy: CompiledPolicy,
        query: Query,
        answer: Answer,
        *,
        client_source: str,
        exempt: bool = False,
    ) -> Decision | None:
        """Queue the answer for the detectors that learn from it; ``None`` (not decided yet).

        With the queue off (``observation.batch: 1``), :meth:`Guard.observe`.
        """
        observations = self._observations
        if not observations.queued:
            if len(observations):  # queued before a reload turned the queue off
                await observations.drain()
            return await self._guard.observe(
                policy, query, answer, client_source=client_source, exempt=exempt
            )
        await observations.submit(Observation(policy, query, answer, client_source, exempt))
        return None


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
        source: str | os.PathLike[str] | None = None,
    ) -> None:
        self.config = config
        self.clock = clock
        self.wall_clock = wall_clock
        self.metrics = GuardMetrics(registry, overhead_buckets=config.metrics.overhead_buckets)
        #: the per-request metric updates (``counts.overhead(...)``, ...)
        self.counts = Counts(self.metrics, enabled=config.metrics.enabled)
        self.store: KeyValueStore = store if store is not None else self._build_store()
        # every series the config implies exists at 0 before the first request, so
        # that an alert on increase() sees the first event
        self.metrics.declare(config, store=self.store)
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
        self._ctx = BuildContext(
            store=self.store,
            clock=clock,
            wall_clock=wall_clock,
            calibration_dir=Path(config.calibration_dir) if config.calibration_dir else None,
            limits=config.limits,
        )
        #: answers on their way to the detectors that learn from them (README, "The
        #: observation queue"); a front end's admission reaches the engine through
        #: ``_front``, which queues them and applies them before the client's next verdict
        self._observations = Observations(
            self.observe_batch, config.observation, on_drop=self._observation_dropped
        )
        self._front = QueuedDetectors(self, self._observations)
        # where model signatures are learned (``signature: {learn: true}``); the front
        # end sets it (set_metadata_source), and every loadout's signatures read it
        self._metadata_source: MetadataSource | None = None
        #: the config file :meth:`reload` reads (``None``: nothing to reload)
        self.source: Path | None = Path(source) if source is not None else None
        #: the running policies and detectors; a front end takes it once per request.
        #: A reload replaces it in one assignment (:meth:`reload`)
        self.loadout: Loadout = build_loadout(config, self._ctx, self._make_admission)
        self._watch_rate_checks(self.loadout)
        # detectors a reload replaced, closed at the next reload or at aclose (a request
        # in flight may still be using them)
        self._retired: list[Detector] = []
        self._reload_lock = asyncio.Lock()
        _log_unnamed_routes(self.policies)

    def _watch_rate_checks(self, loadout: Loadout) -> None:
        """Export where the rate checks of ``loadout``'s leased stores were answered."""
        if not self.counts.enabled:
            return
        for det in loadout.detectors():
            store = getattr(det, "store", None)
            if isinstance(det, RateLimitDetector) and isinstance(store, LeasedRateStore):
                self.metrics.watch_rate_checks(det.name, store)

    def _build_store(self) -> KeyValueStore:
        base: Store = store_from_uri(
            self.config.state, clock=self.clock, on_event=self.metrics.store_event
        )
        if base.backend == "memory":
            return base
        if isinstance(base, EvictionPolicy):
            _check_eviction(base, self.metrics)
        return ResilientStore.from_config(
            base, self.config.state, clock=self.clock, on_event=self.metrics.store_event
        )

    # ------------------------------------------------------------------ matching

    # ------------------------------------------------------------------ the running policies

    @property
    def policies(self) -> tuple[CompiledPolicy, ...]:
        return self.loadout.policies

    @property
    def techniques(self) -> Mapping[str, str]:
        return self.loadout.techniques

    @property
    def quarantine_enabled(self) -> bool:
        return self.loadout.quarantine_enabled

    @property
    def payloads(self) -> Mapping[str, PayloadFormat]:
        return self.loadout.payloads

    def match(self, method: str, path: str) -> CompiledPolicy | None:
        """The first running policy whose methods and routes match, or ``None``."""
        return self.loadout.match(method, path)

    @property
    def signatures(self) -> Mapping[str, Signatures]:
        """Per policy, its OIP v2 models' signatures (``signature:``), of the running config."""
        return self.loadout.admission.signatures

    def set_metadata_source(self, source: MetadataSource) -> None:
        """Where signatures are learned from: the running config's and every reload's."""
        self._metadata_source = source
        for signatures in self.signatures.values():
            signatures.source = source

    def _make_admission(
        self,
        config: GuardConfig,
        policies: tuple[CompiledPolicy, ...],
        payloads: Mapping[str, PayloadFormat],
        techniques: Mapping[str, str],
    ) -> Admission:
        signatures = {
            p.name: Signatures(p.signature, self.counts, clock=self.clock)
            for p in config.policies
            if p.signature.enabled
        }
        for sig in signatures.values():
            sig.source = self._metadata_source
        return Admission(
            config,
            policies,
            self._front,
            counts=self.counts,
            identifier=self.identifier,
            audit=self.audit,
            capture=self.capture,
            payloads=payloads,
            signatures=signatures,
            techniques=techniques,
            clock=self.clock,
            wall_clock=self.wall_clock,
        )

    # ------------------------------------------------------------------ reloading

    async def reload(self) -> ReloadResult:
        """Reload the config file the guard was started with (``source``).

        The file is loaded and every detector built first; then the running
        policies are replaced in one assignment, the detectors whose identity
        and parameters did not change kept with their state (the rules are in
        :mod:`guard.reload`). Requests in flight finish on the config they
        started with. Counted in ``guard_config_reloads_total{result}``;
        ``guard_build_info`` then carries the new ``config_sha``. Raises
        :class:`~guard.errors.ConfigurationError`, the running config kept, when
        there is no file (a guard built from a mapping), the file is invalid,
        a section that cannot change on reload changed, or a detector cannot be
        built. Concurrent calls run one after the other.
        """
        async with self._reload_lock:
            try:
                result = await self._reload()
            except Exception as exc:
                self.metrics.reloads.labels("error").inc()
                if not isinstance(exc, ConfigurationError):
                    log.exception("config reload failed; the running config is kept")
                    raise ConfigurationError(
                        "", f"reload failed ({type(exc).__name__}); the running config is kept"
                    ) from exc
                log.error("config reload failed; the running config is kept: %s", exc)
                raise
        self.metrics.reloads.labels("ok").inc()
        log.info(
            "config reloaded from %s: config_sha %s; detectors kept %d, built %d, dropped %d",
            self.source,
            result.config_sha,
            len(result.kept),
            len(result.built),
            len(result.dropped),
        )
        return result

    async def _reload(self) -> ReloadResult:
        if self.source is None:
            raise ConfigurationError(
                "", "no config file to reload: the guard was built from a mapping or defaults"
            )
        config = await asyncio.to_thread(GuardConfig.from_file, self.source)
        old = self.loadout
        check_frozen(old.config, config)
        ctx = dataclasses.replace(
            self._ctx,
            calibration_dir=Path(config.calibration_dir) if config.calibration_dir else None,
        )
        new = build_loadout(config, ctx, self._make_admission, previous=old)
        self.metrics.declare(config, store=self.store)
        self._watch_rate_checks(new)
        running = {id(d) for d in new.detectors()}
        dropped = [d for d in old.detectors() if id(d) not in running]
        to_close, self._retired = self._retired, dropped
        # the swap: one reference; a request holding the old loadout finishes on it
        self.loadout, self._ctx, self.config = new, ctx, config
        self._observations.configure(config.observation)
        _log_unnamed_routes(new.policies)
        # observations queued for the detectors about to close are applied first
        await self._observations.drain()
        await _close(to_close)
        now = {f"{p}/{d}" for p, d, _ in new.built}
        return ReloadResult(
            config_sha=config_sha(config),
            kept=new.kept,
            built=new.fresh,
            dropped=tuple(f"{p}/{d}" for p, d, _ in old.built if f"{p}/{d}" not in now),
        )

    # ------------------------------------------------------------------ a front end's calls

    def admit(self, request: Request) -> Coroutine[Any, Any, Verdict]:
        """The verdict on a request before the model sees it: a :class:`Refusal` or a :class:`Pass`.

        Identifies the client, checks quarantine (before the body is read),
        reads the body through ``request.body`` and parses it, runs the policy's
        detectors, writes the audit line, takes the capture line's request half.
        Malformed input is refused (4xx, counted as ``invalid``). A failure of
        the guard itself is counted and the policy's failure mode applied: a
        503, or a pass that leaves the answer alone. Raises only
        :class:`~guard.errors.ClientDisconnected` (from the body reader): there
        is no one to answer. See :mod:`guard.admission`.
        """
        # the admission's own coroutine, handed out as it is: no second frame per request
        return self.loadout.admission.admit(request)

    def admit_fixed(self, policy: CompiledPolicy, fmt: str, n_rows: int) -> Pass:
        """:meth:`admit`'s verdict on a request already known valid, for a policy whose
        verdict is fixed (no detectors, no quarantine, no capture), counted the same.

        For a front end's fast lane, which validates some plain requests itself.
        """
        return self.loadout.admission.admit_fixed(policy, fmt, n_rows)

    def after(self, verdict: Pass, seen: Seen) -> Coroutine[Any, Any, None]:
        """Handle the model's answer to a :class:`Pass`, once it has gone to the client.

        Counts what became of the rewrite, lets the detectors that learn from
        answers see a 2xx answer, and records the capture line. The answer is
        decoded at most once: ``seen.reviewed`` when the front end rewrote it
        with :meth:`Pass.review`, else here. Nothing raises: the answer is gone.
        """
        return self.loadout.admission.after(verdict, seen)

    # ------------------------------------------------------------------ before the model

    async def check_quarantine(
        self,
        policy: CompiledPolicy,
        client: str,
        *,
        exempt: bool = False,
        ip: str = "",
        subnet: str = "",
    ) -> Decision | None:
        """A block decision when ``client``, or its address layer, is in quarantine.

        ``ip`` and ``subnet`` are the client's address layers (:class:`ClientId`);
        the one the policy's ``quarantine_address`` names is checked too, so a
        client quarantined at an address stays refused there whatever
        credential it presents next. Called right after the client is
        identified, before the body is read or parsed, so a quarantined client
        costs almost nothing and no parser path can let it through. Shadow
        policies neither quarantine nor enforce it, and an exempt client is
        never refused by it. Returns ``None`` otherwise.
        """
        if not self.quarantine_enabled or policy.config.shadow or exempt:
            return None
        layer = _address_layer(policy, ip, subnet)
        store = self.store
        try:
            if not layer or layer == client:
                if await store.get(_QUARANTINE_PREFIX + client) is None:
                    return None
            else:
                # both flags in one round trip where the store batches reads (Redis MGET)
                keys = (_QUARANTINE_PREFIX + client, _QUARANTINE_PREFIX + layer)
                get_many = getattr(store, "get_many", None)
                values = (
                    await get_many(keys)
                    if get_many is not None
                    else [await store.get(key) for key in keys]
                )
                if values[0] is None and values[1] is None:
                    return None
        except StateError:
            self._failed(policy, "store")
            return None
        decision = Decision(
            action=Action.BLOCK, intended=Action.BLOCK, policy=policy.name, quarantined=True
        )
        self.counts.decision(policy.name, decision, 1)
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
        enforced action is ``allow`` and nothing is quarantined. Neither an exempt
        client nor any client of a shadow policy is sent rate fields (the
        decision's ``headers`` are empty).
        """
        if exempt:
            self.counts.exempt(policy.name)
        if policy.allow is not None:  # no detectors: one immutable decision for all
            self.counts.decision(policy.name, policy.allow, query.n_rows)
            return policy.allow
        quarantined = False
        results: list[DetectorResult] = []
        fired: list[tuple[str, Action]] = []
        intended = Action.ALLOW
        retry_after: float | None = None
        headers: list[tuple[str, str]] = []
        shadow = policy.config.shadow
        # a client nothing is enforced on sees nothing of the guard's limits either:
        # rate fields would report a budget no one enforces (and make a client that
        # heeds them slow down), so shadow mode and exempt clients get none
        enforced = not (shadow or exempt)
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
            if result.headers and enforced:
                headers.extend(result.headers)
            if result.anomalous:
                action = armed.action_for(result)
                fired.append((det.name, action))
                if action.severity > intended.severity:
                    intended = action
                if action is Action.THROTTLE and result.retry_after is not None:
                    retry_after = max(retry_after or 0.0, result.retry_after)
        if intended is Action.BLOCK and enforced and policy.config.quarantine_s > 0:
            quarantined = await self.quarantine(
                policy, query.client, ip=query.ip, subnet=query.subnet
            )
        row_detectors = policy.row_detectors
        decision = Decision(
            action=intended if enforced else Action.ALLOW,
            intended=intended,
            policy=policy.name,
            results=tuple(results),
            fired=tuple(fired),
            retry_after=retry_after if intended is Action.THROTTLE and enforced else None,
            headers=(
                _combined(headers)
                if len(headers) > 2 or (len(headers) == 2 and headers[0][0] == headers[1][0])
                else tuple(headers)
            ),
            quarantined=quarantined,
            shadow=shadow,
            exempt=exempt,
            row_flags_only=intended is Action.FLAG
            and bool(row_detectors)
            and all(name in row_detectors for name, _ in fired),
        )
        self.counts.decision(policy.name, decision, query.n_rows)
        return decision

    def allow(self, policy: CompiledPolicy, n_rows: int, fmt: str | None = None) -> Decision:
        """The fixed verdict of a policy without detectors, counted like any other.

        What :meth:`decide` returns for such a policy, without building a
        :class:`Query` that nothing would read. With ``fmt`` the payload format
        is counted too, in the same batch.
        """
        decision = policy.allow
        if decision is None:
            raise ValueError(f"policy {policy.name!r} has detectors: use decide()")
        self.counts.allowed(policy.name, decision.action, n_rows, fmt)
        return decision

    def _observation_dropped(self, item: Observation) -> None:
        self.counts.child(self.metrics.observations_dropped, item.policy.name).inc()

    def _failed(self, policy: CompiledPolicy, component: str) -> None:
        self.counts.error(component)
        if component == "store":
            # a decision taken without the store, whichever way the failure mode goes
            backend = getattr(self.store, "backend", "unknown")
            self.counts.child(self.metrics.store_fallback, str(backend)).inc()
        if policy.failure_mode is FailureMode.FAIL_CLOSED:
            raise FailClosed(component)

    async def quarantine(
        self, policy: CompiledPolicy, client: str, *, ip: str = "", subnet: str = ""
    ) -> bool:
        """Quarantine ``client`` for the policy's TTL; False if the store failed.

        With ``ip`` (``subnet``) and the policy's ``quarantine_address: ip``
        (``subnet``), the address layer the evidence came from is quarantined
        too, for ``quarantine_address_s`` (default ``quarantine_s``): its key is
        the id an address-identified client there has, kept like any other
        quarantine (in the memory store's flag table, in Redis's index).
        """
        cfg = policy.config
        layer = _address_layer(policy, ip, subnet)
        try:
            await self.store.set(_QUARANTINE_PREFIX + client, b"1", cfg.quarantine_s)
            ttl = cfg.quarantine_s if cfg.quarantine_address_s is None else cfg.quarantine_address_s
            if layer and layer != client and ttl > 0:
                await self.store.set(_QUARANTINE_PREFIX + layer, b"1", ttl)
        except StateError:
            self.counts.error("store")
            return False
        self.counts.child(self.metrics.quarantined, policy.name).inc()
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

        This applies the observation at once. A front end's answers go through
        the observation queue instead (:meth:`drain`, README "The observation
        queue"), which applies them in batches with :meth:`observe_batch`.
        """
        item = Observation(policy, query, answer, client_source, exempt)
        return (await self.observe_batch((item,)))[0]

    async def observe_batch(self, items: Sequence[Observation]) -> list[Decision | None]:
        """:meth:`observe` of several answers, in order: the decision recorded for each.

        Every detector sees the batch in one call (``observe_many``), so it can
        share the per-row work; its state ends as if the answers had been
        observed one by one, and so do quarantines, audit lines and counts.
        """
        if len(items) == 1:  # the usual drain before a verdict: the client's one answer
            return await self._observe_run(items[0].policy, items)
        out: list[Decision | None] = []
        start = 0
        while start < len(items):  # runs of one policy (a reload may split a batch)
            policy = items[start].policy
            stop = start + 1
            while stop < len(items) and items[stop].policy is policy:
                stop += 1
            out.extend(await self._observe_run(policy, items[start:stop]))
            start = stop
        return out

    async def _observe_run(
        self, policy: CompiledPolicy, items: Sequence[Observation]
    ) -> list[Decision | None]:
        n = len(items)
        if n == 1:
            return [await self._observe_one(policy, items[0])]
        results: list[list[DetectorResult]] = [[] for _ in range(n)]
        fired: list[list[tuple[str, Action]]] = [[] for _ in range(n)]
        pairs = [(item.query, item.answer) for item in items]
        for armed in policy.observers:
            try:
                outcomes = await armed.detector.observe_many(pairs)
            except Exception as exc:  # a detector's own bug: every item failed with it
                outcomes = [exc] * n
            for k, outcome in enumerate(outcomes):
                if outcome is not None:
                    self._take(armed, outcome, results[k], fired[k])
        out: list[Decision | None] = []
        for k, item in enumerate(items):
            out.append(
                await self._observed(policy, item, results[k], fired[k]) if fired[k] else None
            )
        return out

    async def _observe_one(self, policy: CompiledPolicy, item: Observation) -> Decision | None:
        """:meth:`_observe_run` of one answer (the usual drain before a verdict): each
        detector's ``observe``, which its ``observe_many`` of one item must equal."""
        results: list[DetectorResult] = []
        fired: list[tuple[str, Action]] = []
        query, answer = item.query, item.answer
        for armed in policy.observers:
            try:
                outcome: DetectorResult | Exception | None = await armed.detector.observe(
                    query, answer
                )
            except Exception as exc:
                outcome = exc
            if outcome is not None:
                self._take(armed, outcome, results, fired)
        return await self._observed(policy, item, results, fired) if fired else None

    def _take(
        self,
        armed: Armed,
        outcome: DetectorResult | BaseException,
        results: list[DetectorResult],
        fired: list[tuple[str, Action]],
    ) -> None:
        """One detector's outcome on one answer: kept (and what fired noted), or its
        failure counted."""
        if isinstance(outcome, BaseException):
            if isinstance(outcome, StateError):
                self.counts.error("store")
            else:
                name = armed.detector.name
                log.error("detector %s failed in observe", name, exc_info=outcome)
                self.counts.error("detector")
            return
        results.append(outcome)
        if outcome.anomalous:
            fired.append((armed.detector.name, armed.action_for(outcome)))

    async def _observed(
        self,
        policy: CompiledPolicy,
        item: Observation,
        results: list[DetectorResult],
        fired: list[tuple[str, Action]],
    ) -> Decision:
        """Record what fired on one observed answer (quarantine, counts, audit line)."""
        query, exempt = item.query, item.exempt
        intended = max((a for _, a in fired), key=lambda a: a.severity)
        quarantined = False
        enforced = not (policy.config.shadow or exempt)
        if intended is Action.BLOCK and enforced and policy.config.quarantine_s > 0:
            quarantined = await self.quarantine(
                policy, query.client, ip=query.ip, subnet=query.subnet
            )
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
            self.counts.child(self.metrics.detections, policy.name, name, str(action)).inc()
        self.audit.record(
            decision,
            request_id=query.request_id,
            client=query.client,
            client_source=item.client_source,
            techniques=self.techniques,
            n_rows=query.n_rows,
            reason="after_answer",
        )
        return decision

    # ------------------------------------------------------------------ the observation queue

    @property
    def observations(self) -> Observations:
        """The observation queue a front end's answers go through."""
        return self._observations

    async def drain(self) -> None:
        """Apply every queued observation now (tests, shutdown, a front end's idle hook)."""
        await self._observations.drain()

    async def aclose(self) -> None:
        await self._observations.drain()
        await _close(self.loadout.detectors() + self._retired)
        self._retired = []
        self.metrics.tally.flush()
        close = getattr(self.store, "aclose", None)
        if close is not None:
            await close()
        await asyncio.to_thread(self.audit.close)
        if self.capture is not None:
            await asyncio.to_thread(self.capture.close)


#: Redis maxmemory-policy values, the closed set a metric label takes (else "other")
_REDIS_POLICIES = frozenset(
    {
        "noeviction",
        *(f"{keys}-{how}" for keys in ("allkeys", "volatile") for how in ("lru", "lfu", "random")),
        "volatile-ttl",
    }
)


def _check_eviction(store: EvictionPolicy, metrics: GuardMetrics) -> None:
    """Say at start-up, in the log and in ``guard_store_eviction_policy``, whether the
    shared store may evict the guard's keys: a quarantine evicted early lets its
    client back in, an evicted rate key is a fresh budget."""
    backend = str(getattr(store, "backend", "redis"))
    policy = store.eviction_policy()
    if policy is None:
        log.info(
            "%s maxmemory-policy could not be read (CONFIG GET refused?): make sure it is "
            "noeviction, or quarantines may be evicted before they expire",
            backend,
        )
        return
    evicts = EvictionPolicy.evicts(policy)
    metrics.store_eviction_policy.set(
        backend, policy if policy in _REDIS_POLICIES else "other", evicts
    )
    if evicts:
        log.warning(
            "%s maxmemory-policy is %s: under memory pressure Redis may evict the guard's "
            "keys, quarantines and detector standings included, so a quarantined client "
            "could be let back in early and a rate budget start afresh. Set "
            "maxmemory-policy noeviction on a Redis instance of the guard's own (the policy "
            "is per instance, not per database) and size its maxmemory",
            backend,
            policy,
        )


#: header fields that are structured-field lists, which :func:`_combined` joins
_LIST_FIELDS = frozenset({"ratelimit", "ratelimit-policy"})


def _combined(headers: Sequence[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    """Header fields of several detectors, one field line per list-valued name.

    Two rate detectors each give a ``RateLimit-Policy`` and a ``RateLimit``
    field. Both are structured-field lists, which a recipient may join with a
    comma, so one line of each (where the first one was) says the same as
    several, and costs the server and the client one header each, not one per
    detector. Any other field a detector asks for is kept as it came.
    """
    # the usual case, rate detectors' pairs alone (as they spell them): two joins
    if headers[0][0] == "RateLimit-Policy":
        policies: list[str] = []
        currents: list[str] = []
        for name, value in headers:
            if name == "RateLimit-Policy":
                policies.append(value)
            elif name == "RateLimit":
                currents.append(value)
            else:
                break
        else:
            if currents:
                return (
                    ("RateLimit-Policy", ", ".join(policies)),
                    ("RateLimit", ", ".join(currents)),
                )
            return (("RateLimit-Policy", ", ".join(policies)),)
    out: list[tuple[str, str]] = []
    at: dict[str, int] = {}
    for name, value in headers:
        key = name.lower()
        if key not in _LIST_FIELDS:
            out.append((name, value))
            continue
        i = at.get(key)
        if i is None:
            at[key] = len(out)
            out.append((name, value))
        else:
            out[i] = (out[i][0], f"{out[i][1]}, {value}")
    return tuple(out)


def _address_layer(policy: CompiledPolicy, ip: str, subnet: str) -> str:
    """The address layer ``policy`` quarantines with a client (``""``: none)."""
    where = policy.config.quarantine_address
    if where == "ip":
        return ip
    if where == "subnet":
        return subnet
    return ""


async def _close(detectors: list[Detector]) -> None:
    for detector in detectors:
        try:
            await detector.aclose()
        except Exception:
            log.exception("closing detector %s failed", detector.name)


def _log_unnamed_routes(policies: tuple[CompiledPolicy, ...]) -> None:
    """Say at start-up which detector routes name no protocol and declare no ``payload:``.

    Requests there are read by their JSON shape; one of no known shape gets
    past the detectors (``unknown_format: pass``, warned on first sight) or is
    refused (``refuse``).
    """
    for policy in policies:
        if not policy.detectors or policy.config.payload is not None:
            continue
        unnamed = [r for r in policy.config.routes if pattern_format(r) is None]
        if unnamed:
            log.info(
                "policy %s: routes %s name no known protocol; requests there are read by "
                "their JSON shape, and one of no known shape is %s. Declare a custom shape "
                "with payload: {rows: <JSON pointer>, ...}",
                policy.name,
                ", ".join(unnamed),
                "refused" if policy.config.unknown_format == "refuse" else "passed unguarded",
            )
