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
from collections.abc import Callable, Coroutine, Mapping
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from inference_guard.detectors.base import Answer, Detector, DetectorResult, Query
from inference_guard.detectors.store import KeyValueStore
from inference_guard.guard._counts import Counts
from inference_guard.guard.admission import Admission
from inference_guard.guard.audit import AuditLog
from inference_guard.guard.capture import CaptureLog
from inference_guard.guard.config import GuardConfig
from inference_guard.guard.decisions import Action, Decision, FailClosed, FailureMode
from inference_guard.guard.engine import Pass, Request, Seen, Verdict
from inference_guard.guard.errors import ConfigurationError, StateError
from inference_guard.guard.identity import ClientIdentifier
from inference_guard.guard.loadout import Loadout, build_loadout
from inference_guard.guard.metrics import GuardMetrics, config_sha
from inference_guard.guard.payload.adapters import pattern_format
from inference_guard.guard.payload.formats import PayloadFormat
from inference_guard.guard.policy import CompiledPolicy
from inference_guard.guard.registry import BuildContext
from inference_guard.guard.reload import ReloadResult, check_frozen
from inference_guard.guard.signatures import MetadataSource, Signatures
from inference_guard.guard.stores import Store, store_from_uri
from inference_guard.guard.stores.base import EvictionPolicy
from inference_guard.guard.stores.resilient import ResilientStore

__all__ = ["FailClosed", "Guard"]

log = logging.getLogger("guard")

_QUARANTINE_PREFIX = "quarantine:"


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
        # where model signatures are learned (``signature: {learn: true}``); the front
        # end sets it (set_metadata_source), and every loadout's signatures read it
        self._metadata_source: MetadataSource | None = None
        #: the config file :meth:`reload` reads (``None``: nothing to reload)
        self.source: Path | None = Path(source) if source is not None else None
        #: the running policies and detectors; a front end takes it once per request.
        #: A reload replaces it in one assignment (:meth:`reload`)
        self.loadout: Loadout = build_loadout(config, self._ctx, self._make_admission)
        # detectors a reload replaced, closed at the next reload or at aclose (a request
        # in flight may still be using them)
        self._retired: list[Detector] = []
        self._reload_lock = asyncio.Lock()
        _log_unnamed_routes(self.policies)

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
            self,
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
        running = {id(d) for d in new.detectors()}
        dropped = [d for d in old.detectors() if id(d) not in running]
        to_close, self._retired = self._retired, dropped
        # the swap: one reference; a request holding the old loadout finishes on it
        self.loadout, self._ctx, self.config = new, ctx, config
        _log_unnamed_routes(new.policies)
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
        enforced action is ``allow`` and nothing is quarantined.
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
            headers=tuple(headers),
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
                self.counts.error("store")
                continue
            except Exception:
                log.exception("detector %s failed in observe", det.name)
                self.counts.error("detector")
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
            client_source=client_source,
            techniques=self.techniques,
            n_rows=query.n_rows,
            reason="after_answer",
        )
        return decision

    async def aclose(self) -> None:
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
