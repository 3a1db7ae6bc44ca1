"""A front end's two calls: a request turned into a verdict, the model's answer handled.

:meth:`Admission.admit` identifies the client, checks quarantine (before the
body is read: nothing a quarantined client sends is looked at), reads the body
through the front end's reader, parses it (:mod:`guard.payload`), has the
detectors decide (:class:`Detectors`, the pipeline), writes the audit line,
takes the capture line's request half, and answers a
:class:`~guard.engine.Refusal` or a :class:`~guard.engine.Pass`. Malformed input
is refused (4xx, counted as ``invalid``); a failure of the guard itself is
counted and the policy's failure mode applied. :meth:`Admission.after` handles
the answer to a pass. :class:`guard.pipeline.Guard` offers both as
:meth:`~guard.pipeline.Guard.admit` and :meth:`~guard.pipeline.Guard.after`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import replace
from time import perf_counter
from typing import Any, Protocol

from inference_guard.detectors.base import Answer, Query
from inference_guard.detectors.rate import RateLimitDetector
from inference_guard.guard._counts import Counts
from inference_guard.guard._offload import ParseOffload
from inference_guard.guard.audit import AuditLog
from inference_guard.guard.capture import CapturedRequest, CaptureLog
from inference_guard.guard.config import DegradeConfig, GuardConfig, LimitsConfig
from inference_guard.guard.decisions import Action, Decision, FailClosed
from inference_guard.guard.engine import (
    Headers,
    Pass,
    Refusal,
    Request,
    Rewrite,
    Seen,
    Verdict,
    Watch,
    encode_headers,
    refusal,
)
from inference_guard.guard.errors import ClientDisconnected, PayloadError
from inference_guard.guard.identity import ClientId, ClientIdentifier, forwarded_applied, peer_host
from inference_guard.guard.payload._json import is_json_media_type
from inference_guard.guard.payload._plain import READERS, REQUESTS
from inference_guard.guard.payload.adapters import (
    ParsedRequest,
    check_readable_answer,
    detect_format,
    parse_request,
)
from inference_guard.guard.payload.degrade import RowNoise, noise_key
from inference_guard.guard.payload.formats import PayloadFormat
from inference_guard.guard.policy import CompiledPolicy, detectors_may_degrade
from inference_guard.guard.signatures import Signatures

__all__ = ["Admission", "Detectors", "RateGate"]

log = logging.getLogger("guard")

#: :meth:`Admission.rate_gate`'s gate: ``gate(client, n_rows, started)``, the answer's
#: rate fields when the request was admitted at once (and counted), else ``None``
RateGate = Callable[[ClientId, int, float], "Headers | None"]

#: the one header an adapter reads besides the content type (Triton's binary extension)
_BINARY_HEADER_STR = "inference-header-content-length"
_BINARY_HEADER = _BINARY_HEADER_STR.encode()


class Detectors(Protocol):
    """What admission needs of the detector pipeline (:class:`guard.pipeline.Guard`)."""

    @property
    def quarantine_enabled(self) -> bool:
        """Some policy quarantines clients."""

    async def check_quarantine(
        self,
        policy: CompiledPolicy,
        client: str,
        *,
        exempt: bool = False,
        ip: str = "",
        subnet: str = "",
    ) -> Decision | None: ...

    async def decide(
        self, policy: CompiledPolicy, query: Query, *, exempt: bool = False
    ) -> Decision: ...

    def allow(self, policy: CompiledPolicy, n_rows: int, fmt: str | None = None) -> Decision: ...

    async def observe(
        self,
        policy: CompiledPolicy,
        query: Query,
        answer: Answer,
        *,
        client_source: str,
        exempt: bool = False,
    ) -> Decision | None: ...


class Admission:
    """Everything between a front end and the detectors, built once per guard."""

    def __init__(
        self,
        config: GuardConfig,
        policies: tuple[CompiledPolicy, ...],
        detectors: Detectors,
        *,
        counts: Counts,
        identifier: ClientIdentifier,
        audit: AuditLog,
        capture: CaptureLog | None,
        payloads: Mapping[str, PayloadFormat],
        signatures: Mapping[str, Signatures],
        techniques: Mapping[str, str],
        clock: Callable[[], float],
        wall_clock: Callable[[], float],
    ) -> None:
        self._detectors = detectors
        self._counts = counts
        self._identifier = identifier
        self._audit = audit
        self._capture = capture
        self._payloads = payloads
        self._signatures = signatures
        #: per policy, its models' signatures (read-only for the guard)
        self.signatures: Mapping[str, Signatures] = signatures
        self._techniques = techniques
        self._clock = clock
        self._wall_clock = wall_clock
        self._limits = config.limits
        # large bodies are parsed in a worker thread, with a deadline
        self._offload = ParseOffload(config.limits)
        # everyone's answers are coarsened without the noise kept for degraded clients
        self._always: dict[str, Rewrite | None] = {
            p.name: Rewrite(replace(p.degrade, noise=0.0)) if p.degrade.always else None
            for p in config.policies
        }
        # a degraded client's noise is a keyed function of (client, row): the key, when
        # some policy can degrade with noise
        self._noise_key = noise_key() if any(map(_noisy_degrade, policies)) else None
        # per policy, whether anything reads the request's matrix (a detector, the
        # capture log, a degraded answer's row-keyed noise): without it, OIP v2 rows
        # are counted and checked but no matrix is built
        self._want_rows: dict[str, bool] = {
            p.name: capture is not None
            or p.observes
            or (_noisy_degrade(p) and detectors_may_degrade(p.detectors))
            or any(getattr(a.detector, "reads_rows", True) for a in p.detectors)
            for p in policies
        }
        # per format, the plain reader that counts a plain body's rows when nothing reads
        # more of the request (guard.payload._plain)
        self._plain_readers: Mapping[str, Callable[[bytes, LimitsConfig], int | None]] = READERS
        # and, where something reads the matrix, the request they make of a plain body
        self._plain_requests: Mapping[
            str, Callable[[bytes, LimitsConfig], ParsedRequest | None]
        ] = REQUESTS
        # the one verdict on every admitted request of a policy without detectors, by format
        self._fixed: dict[tuple[str, str], Pass] = {}
        # per policy, the route patterns already warned about an unknown format
        self._unknown_warned: dict[str, set[str]] = {p.name: set() for p in policies}

    async def admit(self, request: Request) -> Verdict:
        """:meth:`Guard.admit <guard.pipeline.Guard.admit>`."""
        policy = request.policy
        if policy.passthrough and not self._detectors.quarantine_enabled:
            # metrics only: nothing to read or decide
            self._counts.outcome(policy.name, "allow", 0)
            return self._fixed_pass(policy, "unknown")
        client: ClientId | None = None
        try:
            headers = self._identifier.read_headers(request.headers)
            peer = request.peer
            client = self._identifier.identify(
                headers, peer_host(peer), forwarded_applied=forwarded_applied(peer)
            )
            decision, parsed, query = await self._judge(request, headers, client)
        except PayloadError as exc:
            return self._refuse_invalid(request, exc, client)
        except ClientDisconnected:
            raise
        except FailClosed as exc:
            self._counts.outcome(policy.name, "error", 1)
            log.warning(
                "guard failure (%s) on policy %s: failing closed", exc.component, policy.name
            )
            return refusal(503, request.request_id, path=request.path, counted=False)
        except Exception:
            return self._internal_failure(request)
        return self._verdict(request, client, decision, parsed, query)

    def admit_fixed(self, policy: CompiledPolicy, fmt: str, n_rows: int) -> Pass:
        """:meth:`Guard.admit_fixed <guard.pipeline.Guard.admit_fixed>`."""
        self._detectors.allow(policy, n_rows, fmt)
        return self._fixed_pass(policy, fmt)

    def fixed_verdict(
        self, policy: CompiledPolicy, fmt: str
    ) -> tuple[Pass, Callable[[int, float | None], None]]:
        """:meth:`admit_fixed` for one ``(policy, fmt)``, bound once: the verdict, and
        ``count(n_rows, seconds)``, which counts an admitted request as
        :meth:`admit_fixed` does (and the guard's ``seconds`` on it, unless ``None``).

        The same verdict, counted the same, in one call and one deferred batch
        (the fast lane's, per request).
        """
        if policy.allow is None:
            raise ValueError(f"policy {policy.name!r} has detectors: its verdict is not fixed")
        count = self._counts.allowed_counter(policy.name, policy.allow.action, fmt)
        return self._fixed_pass(policy, fmt), count

    def rate_gated(self, policy: CompiledPolicy) -> bool:
        """Whether :meth:`rate_gate` gives ``policy`` a gate (see there)."""
        if (
            policy.allow is not None
            or len(policy.detectors) != 1
            or policy.observes
            or policy.passthrough
            or policy.rewrites
            or self._want_rows.get(policy.name, True)
            or self._payloads.get(policy.name) is not None
            or self._signatures.get(policy.name) is not None
            or self._capture is not None
            or self._detectors.quarantine_enabled
        ):
            return False
        detector = policy.detectors[0].detector
        return isinstance(detector, RateLimitDetector) and detector.answers_now

    def rate_gate(self, policy: CompiledPolicy, fmt: str) -> RateGate | None:
        """A fast lane's way with a plain request to a policy whose one detector is a rate
        limit that may answer at once; ``None`` for any other policy.

        The policy: one ``rate`` detector costing ``rows`` or ``constant`` on a
        store that answers some checks at once (``memory://``, or Redis with
        leases), answers untouched and unwatched, nothing that reads more of a
        request than its row count, no quarantine, no capture.

        ``gate(client, n_rows, started)``, for a plain request in format ``fmt``
        (its ``n_rows`` counted by the format's plain reader) from an identified,
        not exempt ``client``, the guard's work on it begun at ``started``
        (:func:`time.perf_counter`): when the detector admits it at once
        (:meth:`RateLimitDetector.admit_now
        <detectors.rate.RateLimitDetector.admit_now>`), the request is counted as
        :meth:`admit` counts it (payload, ``allow``, the score, the overhead) and
        the answer's rate fields are returned, encoded (none in shadow mode, as
        :meth:`Guard.decide <guard.pipeline.Guard.decide>` sends none); otherwise ``None``, having
        consumed and counted nothing: ask :meth:`admit`, which then decides as
        ever (from a local refusal, or the store).
        """
        if not self.rate_gated(policy):
            return None
        detector = policy.detectors[0].detector
        assert isinstance(detector, RateLimitDetector)
        count = self._counts.admitted_counter(policy.name, detector.name, fmt)
        admit_now = detector.admit_now
        name = policy.name
        counts = self._counts
        shadow = policy.config.shadow

        def gate(client: ClientId, n_rows: int, started: float) -> Headers | None:
            admitted = admit_now(client.id, name, client.ip, client.subnet, n_rows)
            if admitted is None:
                return None
            score, fields = admitted
            if shadow:
                fields = ()
            try:
                # the detector's threshold is 0: its score is the margin
                count(n_rows, perf_counter() - started, score)
            except Exception:  # admitted (the cost is spent): passed on, the failure counted
                counts.error("internal")
                log.exception("counting an admitted request failed on policy %s", name)
            return fields

        return gate

    async def after(self, verdict: Pass, seen: Seen) -> None:
        """:meth:`Guard.after <guard.pipeline.Guard.after>`."""
        watched = self.settle(verdict, seen)
        if watched is not None:
            await watched

    def settle(self, verdict: Pass, seen: Seen) -> Coroutine[Any, Any, None] | None:
        """:meth:`after`, its synchronous part done now: what remains (a watched
        answer's detectors and capture line) to await, or ``None``.

        For a front end's hot path: an answer only rewritten costs no coroutine.
        """
        if verdict.rewrite is not None:
            self._counts.degraded(verdict.policy.name, seen.rewrite)
        if verdict.watch is None:
            return None
        return self._watched(verdict, verdict.watch, seen)

    async def _watched(self, verdict: Pass, watch: Watch, seen: Seen) -> None:
        """What :meth:`after` does with a watched answer."""
        policy = verdict.policy
        answer = self._answer(verdict, seen)
        if watch.query is not None and 200 <= seen.status < 300:
            try:
                await self._detectors.observe(
                    policy,
                    watch.query,
                    answer,
                    client_source=watch.client_source,
                    exempt=watch.exempt,
                )
            except Exception:
                self._counts.error("internal")
                log.exception("guard failure after the answer on policy %s", policy.name)
        if watch.captured is not None and self._capture is not None:
            self._capture.record(
                watch.captured,
                decision=str(verdict.decision.action),
                status=seen.status,
                answer=answer,
            )

    async def _judge(
        self, request: Request, headers: Mapping[bytes, bytes], client: ClientId
    ) -> tuple[Decision, ParsedRequest | None, Query | None]:
        """The decision on an identified client's request, with what it was read into."""
        policy = request.policy
        quarantined = (
            await self._detectors.check_quarantine(
                policy, client.id, exempt=client.exempt, ip=client.ip, subnet=client.subnet
            )
            if self._detectors.quarantine_enabled
            else None
        )
        if quarantined is not None:
            return quarantined, None, None
        if policy.passthrough:
            query = self._query(request, client, None)
            return await self._detectors.decide(policy, query, exempt=client.exempt), None, query
        body = await request.body.read(headers.get(b"content-length"))
        parsed = self._plain(policy, body, request.path, headers)
        if parsed is None:
            parsed = await self._offload.run(
                len(body), lambda: self._parse(policy, body, path=request.path, headers=headers)
            )
        signatures = self._signatures.get(policy.name)
        if signatures is not None:
            await signatures.check(request.path, parsed)
        if policy.rewrites or policy.observes:
            check_readable_answer(parsed)
        if policy.allow is not None:
            # no detectors: nothing reads a Query, and the verdict is fixed
            return self._detectors.allow(policy, parsed.n_rows, parsed.fmt), parsed, None
        self._counts.payload(policy.name, parsed.fmt)
        query = self._query(request, client, parsed)
        return await self._detectors.decide(policy, query, exempt=client.exempt), parsed, query

    def _verdict(
        self,
        request: Request,
        client: ClientId,
        decision: Decision,
        parsed: ParsedRequest | None,
        query: Query | None,
    ) -> Verdict:
        """A decision turned into a verdict, audited and (for a sampled client) captured."""
        policy = request.policy
        if decision is not policy.allow and decision.recorded:
            self._audit.record(
                decision,
                request_id=request.request_id,
                client=client.id,
                client_source=client.source,
                techniques=self._techniques,
                n_rows=parsed.n_rows if parsed else 1,
            )
        captured = None if self._capture is None else self._captured(request, client, parsed)
        action = decision.action
        if action is Action.BLOCK or action is Action.THROTTLE:
            status = 403 if action is Action.BLOCK else 429
            if captured is not None and self._capture is not None:
                self._capture.record(captured, decision=str(action), status=status, answer=None)
            retry = decision.retry_after if decision.retry_after is not None else 1.0
            return refusal(
                status,
                request.request_id,
                path=request.path,
                headers=decision.headers,
                retry_after=retry if action is Action.THROTTLE else None,
            )
        fmt = parsed.fmt if parsed is not None else "unknown"
        if decision is policy.allow and captured is None:
            return self._fixed_pass(policy, fmt)
        observe = policy.observes and parsed is not None and query is not None
        watch = (
            Watch(query if observe else None, client.source, client.exempt, captured)
            if observe or captured is not None
            else None
        )
        return Pass(
            policy,
            decision,
            fmt,
            self._payloads.get(policy.name),
            encode_headers(decision.headers),
            self._rewrite(policy, decision, client, parsed),
            watch,
        )

    def _fixed_pass(self, policy: CompiledPolicy, fmt: str) -> Pass:
        """The shared verdict on every admitted request of a policy without detectors."""
        verdict = self._fixed.get((policy.name, fmt))
        if verdict is None:
            assert policy.allow is not None  # only policies without detectors get here
            verdict = self._fixed[(policy.name, fmt)] = Pass(
                policy,
                policy.allow,
                fmt,
                self._payloads.get(policy.name),
                rewrite=self._always[policy.name],
            )
        return verdict

    def _rewrite(
        self,
        policy: CompiledPolicy,
        decision: Decision,
        client: ClientId,
        parsed: ParsedRequest | None,
    ) -> Rewrite | None:
        """How the answer is rewritten: degraded, or coarsened for everyone (``always``)."""
        spec: DegradeConfig = policy.config.degrade
        if decision.action is not Action.DEGRADE:
            return self._always[policy.name]
        noise = None
        if spec.noise > 0.0 and self._noise_key is not None:
            noise = RowNoise(self._noise_key, client.id, parsed.rows if parsed else None)
        return Rewrite(spec, noise)

    def _answer(self, verdict: Pass, seen: Seen) -> Answer:
        """The model's answer as far as it could be read (its status at least)."""
        reviewed = seen.reviewed
        if reviewed is None and seen.body is not None:
            try:
                reviewed = verdict.review(seen.body, seen.content_type, rewrite=False)
            except Exception:
                self._counts.error("response")
        answer = reviewed.answer if reviewed is not None else None
        if answer is None:
            return Answer(status=seen.status)
        if answer.status != seen.status:
            return Answer(seen.status, answer.labels, answer.probabilities)
        return answer

    def _plain(
        self, policy: CompiledPolicy, body: bytes, path: str, headers: Mapping[bytes, bytes]
    ) -> ParsedRequest | None:
        """A plain body read by its format's plain reader; else ``None``.

        For a policy with detectors, no custom payload and no model signature, a
        plain OIP v2 or KServe v1 JSON body (the usual one) is read by its
        format's plain reader (:mod:`guard.payload._plain`), which accepts only
        what :func:`parse_request` accepts and returns ``None`` for anything else
        (the full parser's to accept or refuse). Where nothing reads the matrix
        (no detector reading rows, no capture, no row-keyed noise: a rate limit
        costing rows, say) its rows are counted, whatever the body's size (its
        cost is bounded by the parse budget, so it reads on the event loop, as
        the fast lane does); else, for a body up to ``offload_bytes``, the
        request the full parser would give is made of what it read, matrix
        included (:data:`~guard.payload._plain.REQUESTS`).
        """
        if (
            policy.allow is not None  # no detectors: the fast lane's plain reader ran
            or headers.get(b"content-type", b"application/json") != b"application/json"
            or _BINARY_HEADER in headers
            or self._payloads.get(policy.name) is not None
            or self._signatures.get(policy.name) is not None
        ):
            return None
        fmt = detect_format(path)
        if fmt is None:
            return None
        try:
            if self._want_rows.get(policy.name, True):
                read_request = self._plain_requests.get(fmt)
                return None if read_request is None else read_request(body, self._limits)
            read_rows = self._plain_readers.get(fmt)
            if read_rows is None:
                return None
            n_rows = read_rows(body, self._limits)
        except Exception:  # a reader bug: counted, and the full parser decides
            self._counts.error("parse")
            log.warning("plain %s reader failed on policy %s", fmt, policy.name, exc_info=True)
            return None
        return None if n_rows is None else ParsedRequest(fmt, None, (), n_rows)

    def _parse(
        self, policy: CompiledPolicy, body: bytes, *, path: str, headers: Mapping[bytes, bytes]
    ) -> ParsedRequest:
        # the adapters read two headers at most: decode only those
        raw_ctype = headers.get(b"content-type")
        ctype = raw_ctype.decode("latin-1") if raw_ctype is not None else None
        binary_header = headers.get(_BINARY_HEADER)
        str_headers = (
            {_BINARY_HEADER_STR: binary_header.decode("latin-1")}
            if binary_header is not None
            else {}
        )
        try:
            parsed = parse_request(
                body,
                path=path,
                content_type=ctype,
                headers=str_headers,
                limits=self._limits,
                want_rows=self._want_rows.get(policy.name, True),
                payload=self._payloads.get(policy.name),
            )
        except PayloadError:
            if not policy.config.validate:
                return ParsedRequest(fmt="unknown", rows=None)
            raise
        except Exception:
            # an adapter bug; the input is what provoked it, so it is refused, not let through
            self._counts.error("parse")
            log.warning("payload adapter failed on policy %s", policy.name, exc_info=True)
            if not policy.config.validate:
                return ParsedRequest(fmt="unknown", rows=None)
            raise PayloadError(400, "bad_shape", "the payload could not be interpreted") from None
        if parsed.fmt == "unknown":
            if policy.config.unknown_format == "refuse":
                # not JSON at all (415), or JSON of no shape the guard reads (400)
                status = 400 if is_json_media_type(ctype) else 415
                raise PayloadError(
                    status, "unknown_format", "the payload format is not accepted here"
                )
            self._note_unknown_format(policy, path)
        return parsed

    def _query(self, request: Request, client: ClientId, parsed: ParsedRequest | None) -> Query:
        if parsed is None:
            return Query(
                client=client.id,
                policy=request.policy.name,
                rows=None,
                n_rows=1,
                now=self._clock(),
                request_id=request.request_id,
                ip=client.ip,
                subnet=client.subnet,
            )
        return Query(
            client=client.id,
            policy=request.policy.name,
            rows=parsed.rows,
            texts=parsed.texts,
            n_rows=parsed.n_rows,
            fmt=parsed.fmt,
            now=self._clock(),
            request_id=request.request_id,
            extra=parsed.extra,
            ip=client.ip,
            subnet=client.subnet,
        )

    def _captured(
        self, request: Request, client: ClientId, parsed: ParsedRequest | None
    ) -> CapturedRequest | None:
        """The capture line's request half, for a sampled client's parsed request."""
        capture = self._capture
        if (
            capture is None
            or parsed is None
            or (parsed.rows is None and not parsed.texts)
            or not capture.sampled(client.id)
        ):
            return None
        return CapturedRequest(
            ts=self._wall_clock(),
            request_id=request.request_id,
            client=client.id,
            exempt=client.exempt,
            policy=request.policy.name,
            route=request.path,
            method=request.method,
            fmt=parsed.fmt,
            n_rows=parsed.n_rows,
            rows=parsed.rows,
            texts=parsed.texts,
        )

    def _refuse_invalid(
        self, request: Request, exc: PayloadError, client: ClientId | None
    ) -> Refusal:
        policy, request_id = request.policy, request.request_id
        self._counts.invalid(policy.name, exc.reason)
        self._counts.outcome(policy.name, "invalid", 1)
        self._audit.record_invalid(
            policy=policy.name,
            request_id=request_id,
            client=client.id if client else "unidentified",
            client_source=client.source if client else "none",
            status=exc.status,
            reason=exc.reason,
        )
        return refusal(exc.status, request_id, message=exc.message, path=request.path)

    def _internal_failure(self, request: Request) -> Verdict:
        """A bug in the guard: count and log it, then apply the policy's failure mode.

        Called from within an ``except`` block (the traceback is logged). Failing
        open, the request goes on untouched, with whatever body was read replayed.
        """
        policy = request.policy
        self._counts.error("internal")
        self._counts.outcome(policy.name, "error", 1)
        log.exception("guard failure on policy %s", policy.name)
        if policy.failure_mode == "fail_closed":
            return refusal(503, request.request_id, path=request.path, counted=False)
        failed = Decision(action=Action.ALLOW, intended=Action.ALLOW, policy=policy.name)
        return Pass(policy, failed, counted=False)

    def _note_unknown_format(self, policy: CompiledPolicy, path: str) -> None:
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


def _noisy_degrade(policy: CompiledPolicy) -> bool:
    """Whether ``policy`` may degrade an answer with noise: it has detectors and noise."""
    return bool(policy.detectors) and policy.config.degrade.noise > 0.0
