"""``GuardMiddleware``: the pure-ASGI face of inference-guard.

Wrap any ASGI app (Starlette, FastAPI, a proxy)::

    app = GuardMiddleware(app, config="guard.yaml")
    # or, with Starlette / FastAPI:
    app.add_middleware(GuardMiddleware, config="guard.yaml")

Per request on a policy route: identify the client, read the body under a cap,
parse it into rows or texts (refusing bad input with a 4xx), let the policy's
detectors decide, then block, throttle, or pass the request on (replaying the
body unchanged) and watch or degrade the answer. Everything else (non-http
scopes, routes no policy matches) passes straight through.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import replace
from functools import partial
from types import MappingProxyType
from typing import Any

from prometheus_client import CollectorRegistry

from detectors.base import Answer, Query
from guard.capture import CapturedRequest
from guard.config import DegradeConfig, GuardConfig
from guard.decisions import Action, Decision
from guard.errors import PayloadError
from guard.identity import ClientId
from guard.payload._json import is_json_media_type
from guard.payload._plain import READERS
from guard.payload.adapters import (
    ParsedRequest,
    detect_format,
    parse_request,
    parse_response,
    pattern_format,
)
from guard.payload.degrade import RowNoise, degrade_response, noise_key
from guard.payload.formats import PayloadFormat, payload_format
from guard.pipeline import FailClosed, Guard
from guard.policy import CompiledPolicy
from middleware._body import BodyReader, ClientDisconnected, receive_within
from middleware.answer_capture import AnswerCapture
from middleware.metrics_endpoint import serve_metrics
from middleware.refusals import send_error
from middleware.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["GuardMiddleware"]

log = logging.getLogger("guard")

_CREDENTIAL_LIKE = (b"authorization", b"x-forwarded-for")
#: the one header an adapter reads besides the content type (Triton's binary extension)
_BINARY_HEADER_STR = "inference-header-content-length"
_BINARY_HEADER = _BINARY_HEADER_STR.encode()
_NO_HEADERS: Mapping[str, str] = MappingProxyType({})
_JSON = b"application/json"
_CLOSE = (("connection", "close"),)
#: what ASGI servers put in scope["client"]: (host, port), as a tuple or a list, or None
_PEERS = (tuple, list, type(None))

#: what a request's (method, path) is to the guard (see GuardMiddleware._route)
_METRICS = "metrics"
_UNGUARDED = "unguarded"
_PASSTHROUGH = "passthrough"
_LEAN = "lean"
_GUARDED = "guarded"
#: distinct (method, path) pairs whose route is remembered
_ROUTE_MEMO = 1024
#: a route: its kind, its policy, and on the lean lane the format the path names
_Route = tuple[str, CompiledPolicy | None, str]

#: encoded names of the detectors' response headers (a handful, from code: RateLimit...)
_HEADER_NAMES: dict[str, bytes] = {}


class GuardMiddleware:
    """Pure-ASGI inference guard.

    Parameters
    ----------
    app:
        The ASGI application to protect.
    config:
        A path to a YAML file, a mapping, a :class:`~guard.config.GuardConfig`,
        or ``None`` for the safe defaults.
    registry:
        Prometheus registry for the guard's metrics (a fresh one by default).
    clock:
        Monotonic clock, injectable for tests.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        config: str | os.PathLike[str] | Mapping[str, Any] | GuardConfig | None = None,
        registry: CollectorRegistry | None = None,
        clock: Any = time.monotonic,
        guard: Guard | None = None,
    ) -> None:
        self.app = app
        self.config = GuardConfig.load(config)
        self.guard = (
            guard if guard is not None else Guard(self.config, registry=registry, clock=clock)
        )
        self._clock = clock
        self._metrics_path = self.config.metrics.path if self.config.metrics.enabled else ""
        self._metrics_networks = tuple(
            ipaddress.ip_network(c, strict=False) for c in self.config.metrics.allow_from
        )
        self._limits = self.config.limits
        self._identity_headers = (
            frozenset(h.encode("latin-1") for h in self.config.client_identity.api_key_headers)
            | frozenset(_CREDENTIAL_LIKE)
            | {self.config.client_identity.forwarded_header.encode("latin-1")}
        )
        # everyone's answers are coarsened without the noise kept for degraded clients
        self._always_specs = {p.name: replace(p.degrade, noise=0.0) for p in self.config.policies}
        # request ids must not count requests for the client (a counter leaks volume)
        self._request_id = _request_ids().__next__
        self._tally = self.guard.metrics.tally
        self._routes: dict[tuple[str, str], _Route] = {}
        self._lean_updates: dict[tuple[str, str], tuple[Any, ...]] = {}
        # the custom JSON shapes policies declare (payload:), which read their routes
        self._payloads: dict[str, PayloadFormat] = {
            p.name: f for p in self.config.policies if (f := payload_format(p.payload)) is not None
        }
        # policies whose every request is either refused or let through (its answer
        # perhaps rounded): no detectors, no quarantine, answers never watched, no
        # capture (the lean lane in __call__), and the built-in formats
        self._lean_policies = frozenset(
            p.name
            for p in self.guard.policies
            if p.allow is not None
            and p.config.validate
            and p.name not in self._payloads
            and not (p.observes or p.passthrough)
            and not self.guard.quarantine_enabled
            and self.guard.capture is None
        )
        # a degraded client's noise is a keyed function of (client, row): the key, when
        # some policy can degrade with noise
        self._noise_key = (
            noise_key() if any(_noisy_degrade(p) for p in self.guard.policies) else None
        )
        _log_unnamed_routes(self.guard.policies)

    @property
    def registry(self) -> CollectorRegistry:
        return self.guard.metrics.registry

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        key = (scope["method"], scope["path"])
        kind, policy, fmt = self._routes.get(key) or self._route(key)
        if kind is _METRICS:
            if self._may_scrape(scope):
                # this process's deferred updates first (a multiprocess scrape reads files)
                self.guard.metrics.tally.flush()
                await serve_metrics(self.guard.metrics.registry, send)
                return
            # not for this client: as if there were no endpoint here
            kind, policy, fmt = self._policy_route(*key)
        try:
            request_id = self._request_id()
        except ValueError:  # the generator is busy in another thread: draw one alone
            request_id = os.urandom(12).hex()
        if policy is None:
            await self.app(scope, receive, _with_request_id(send, request_id))
            return
        if kind is _PASSTHROUGH:
            # metrics only: nothing to parse or decide; count and pass on untouched
            started = time.perf_counter()
            self.guard.record_outcome(policy.name, "allow", 0)
            self.guard.observe_overhead(policy.name, time.perf_counter() - started)
            await self.app(scope, receive, _with_request_id(send, request_id))
            return
        if kind is _LEAN:
            # The lean lane, inline to spare a coroutine per request. A policy without
            # detectors or quarantine only ever refuses a request or passes it on
            # (its answer rounded, with degrade.always). A plain request (one JSON
            # message, no repeated or identity headers, a body one of
            # guard.payload._plain's readers accepts) is accepted here in a few C calls,
            # and the consumed message replayed as it came. Everything else, valid or
            # not, goes to _guarded for the exact verdict: this lane only accepts, and
            # only what _guarded accepts. It needs no client identity (nothing here is
            # per client); a request with identity headers takes the full path, so a
            # bad credential is refused as ever.
            started = time.perf_counter()
            raw: Any = scope.get("headers")
            try:
                headers: dict[bytes, bytes] = dict(raw) if type(raw) is list else {}
                length = headers.get(b"content-length", b"0")
                plain = bool(
                    headers
                    and type(scope.get("client")) in _PEERS  # else identity fails: full path
                    and len(headers) == len(raw)  # a repeated header: _headers' call
                    and self._identity_headers.isdisjoint(headers)
                    and headers.get(b"content-type", _JSON) == _JSON
                    and _BINARY_HEADER not in headers
                    and length.isdigit()
                    and len(length) <= 19
                    and int(length) <= self._limits.max_body_bytes
                )
            except Exception:  # malformed header pairs: the full path decides
                plain = False
            if not plain:
                await self._guarded(policy, scope, receive, send, request_id, started)
                return
            try:
                message = await receive_within(receive, self._limits.body_timeout_s)
            except PayloadError as exc:  # the body did not arrive in time: 408
                await self._refuse_invalid(policy, exc, None, request_id, send, started)
                return
            except Exception:  # as the full path would: the failure mode decides
                await self._internal_failure(policy, scope, receive, send, request_id)
                return
            n_rows = None
            if (
                type(message) is dict
                and message.get("type") == "http.request"
                and not message.get("more_body", False)
                and type(body := message.get("body", b"")) is bytes
            ):
                try:
                    n_rows = READERS[fmt](body, self._limits)
                except Exception:  # an adapter bug: counted, and the full path decides
                    self.guard.count_error("parse")
                    log.warning(
                        "plain %s reader failed on policy %s", fmt, policy.name, exc_info=True
                    )
            replay = _replay_first(message, receive)
            if n_rows is None:
                await self._guarded(policy, scope, replay, send, request_id, started)
                return
            try:
                updates = self._lean_updates.get((policy.name, fmt))
                if updates is None:
                    updates = self._lean_updates[(policy.name, fmt)] = _lean_updates(
                        self.guard.allowed_updates(policy, fmt)
                    )
                if updates:
                    counted, format_counted, rows, overhead = updates
                    if policy.rewrites:  # the overhead includes rewriting the answer
                        self._tally.add_all((counted, format_counted, (rows, n_rows)))
                    else:
                        seconds = time.perf_counter() - started
                        self._tally.add_all(
                            (counted, format_counted, (rows, n_rows), (overhead, seconds))
                        )
            except Exception:
                await self._internal_failure(policy, scope, replay, send, request_id)
                return
            if policy.rewrites:
                # every answer rounded (degrade.always): the AnswerCapture's work, as ever
                assert policy.allow is not None  # a lean policy has no detectors
                parsed = ParsedRequest(fmt, None, n_rows=n_rows)
                await self._forward(
                    policy,
                    scope,
                    replay,
                    send,
                    request_id,
                    policy.allow,
                    parsed,
                    query=None,
                    client=None,
                    started=started,
                )
                return
            await self.app(scope, replay, _with_request_id(send, request_id))
            return
        await self._guarded(policy, scope, receive, send, request_id)

    def _route(self, key: tuple[str, str]) -> _Route:
        """What a ``(method, path)`` is to the guard, and its policy; remembered (bounded).

        ``metrics`` (the endpoint), ``unguarded`` (no policy), ``passthrough``
        (count only), ``lean`` (the lean lane first: no detectors, and a path
        naming a format with a plain reader, given as the third element) or
        ``guarded``. Paths are client-chosen: past :data:`_ROUTE_MEMO` entries
        the memo stops growing and further paths are looked up afresh.
        """
        method, path = key
        if path == self._metrics_path and method in ("GET", "HEAD"):
            route: _Route = (_METRICS, None, "")
        else:
            route = self._policy_route(method, path)
        if len(self._routes) < _ROUTE_MEMO:
            self._routes[key] = route
        return route

    def _policy_route(self, method: str, path: str) -> _Route:
        """The route of a request that is not a scrape of the metrics endpoint."""
        policy = self.guard.match(method, path)
        if policy is None:
            return (_UNGUARDED, None, "")
        if policy.passthrough and not self.guard.quarantine_enabled:
            return (_PASSTHROUGH, policy, "")
        if policy.name in self._lean_policies:
            fmt = detect_format(path)
            if fmt in READERS:
                return (_LEAN, policy, fmt)
        return (_GUARDED, policy, "")

    def _may_scrape(self, scope: Scope) -> bool:
        """Whether the client may read the metrics: its address is in ``metrics.allow_from``.

        The address is the one client identity uses (``X-Forwarded-For`` only
        from trusted proxies). A request without a client address (a unix
        socket, where anyone behind the front proxy could be asking) and spoofed
        or conflicting headers mean no.
        """
        peer = scope.get("client")
        if peer is None:  # no address to check (a unix socket): no endpoint
            return False
        try:
            headers = self._headers(scope)
            address = ipaddress.ip_address(
                self.guard.identifier.client_ip(
                    headers, str(peer[0]), forwarded_applied=_forwarded_applied(peer)
                )
            )
        except (PayloadError, ValueError, TypeError, IndexError):
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in net for net in self._metrics_networks)

    async def _guarded(
        self,
        policy: CompiledPolicy,
        scope: Scope,
        receive: Receive,
        send: Send,
        request_id: str,
        started: float | None = None,
    ) -> None:
        if started is None:
            started = time.perf_counter()
        guard = self.guard
        reader = BodyReader(receive, self._limits.max_body_bytes, self._limits.body_timeout_s)
        client: ClientId | None = None
        parsed: ParsedRequest | None = None
        query: Query | None
        try:
            headers = self._headers(scope)
            peer = scope.get("client")
            client = guard.identifier.identify(
                headers,
                str(peer[0]) if peer else None,
                forwarded_applied=_forwarded_applied(peer),
            )
            quarantined = (
                await guard.check_quarantine(policy, client.id, exempt=client.exempt)
                if guard.quarantine_enabled
                else None
            )
            if quarantined is not None:
                # before any parsing: nothing a quarantined client sends is looked at
                decision = quarantined
                query = self._query(policy, client, None, request_id)
            elif policy.passthrough:
                query = self._query(policy, client, None, request_id)
                decision = await guard.decide(policy, query, exempt=client.exempt)
            else:
                _check_length(headers.get(b"content-length"), reader.limit)
                body = await reader.read()
                parsed = self._parse(policy, body, path=scope["path"], headers=headers)
                if policy.rewrites or policy.observes:
                    _check_readable_answer(parsed)
                if policy.allow is not None:
                    # no detectors: nothing reads a Query, and the verdict is fixed
                    query = None
                    decision = guard.allow(policy, parsed.n_rows, parsed.fmt)
                else:
                    guard.count_payload(policy.name, parsed.fmt)
                    query = self._query(policy, client, parsed, request_id)
                    decision = await guard.decide(policy, query, exempt=client.exempt)
        except PayloadError as exc:
            await self._refuse_invalid(policy, exc, client, request_id, send, started)
            return
        except ClientDisconnected:
            return
        except FailClosed as exc:
            guard.record_outcome(policy.name, "error", 1)
            log.warning(
                "guard failure (%s) on policy %s: failing closed", exc.component, policy.name
            )
            await send_error(send, 503, request_id)
            return
        except Exception:
            await self._internal_failure(policy, scope, reader.replay(), send, request_id)
            return

        if decision is not policy.allow and decision.recorded:
            guard.audit.record(
                decision,
                request_id=request_id,
                client=client.id,
                client_source=client.source,
                techniques=guard.techniques,
                n_rows=parsed.n_rows if parsed else 1,
            )
        captured = (
            None
            if guard.capture is None
            else self._captured(policy, scope, client, parsed, request_id)
        )
        if decision.action is Action.BLOCK:
            guard.observe_overhead(policy.name, time.perf_counter() - started)
            if captured is not None:
                self._record_capture(captured, decision, 403, None)
            await send_error(send, 403, request_id, headers=decision.headers)
            return
        if decision.action is Action.THROTTLE:
            guard.observe_overhead(policy.name, time.perf_counter() - started)
            if captured is not None:
                self._record_capture(captured, decision, 429, None)
            await send_error(
                send,
                429,
                request_id,
                headers=decision.headers,
                retry_after=decision.retry_after if decision.retry_after is not None else 1.0,
            )
            return
        app_receive = reader.replay() if reader.complete else receive
        if (
            decision is policy.allow
            and not policy.rewrites
            and not policy.observes
            and captured is None
        ):
            # no detectors and nothing to rewrite: only the request id to add; the
            # guard's work is done, so its overhead is counted before the app runs
            guard.observe_overhead(policy.name, time.perf_counter() - started)
            await self.app(scope, app_receive, _with_request_id(send, request_id))
            return
        await self._forward(
            policy,
            scope,
            app_receive,
            send,
            request_id,
            decision,
            parsed,
            query,
            client,
            started,
            captured,
        )

    def _captured(
        self,
        policy: CompiledPolicy,
        scope: Scope,
        client: ClientId,
        parsed: ParsedRequest | None,
        request_id: str,
    ) -> CapturedRequest | None:
        """The capture line's request half, for a sampled client's parsed request."""
        capture = self.guard.capture
        if (
            capture is None
            or parsed is None
            or (parsed.rows is None and not parsed.texts)
            or not capture.sampled(client.id)
        ):
            return None
        return CapturedRequest(
            ts=self.guard.wall_clock(),
            request_id=request_id,
            client=client.id,
            exempt=client.exempt,
            policy=policy.name,
            route=scope["path"],
            method=scope["method"],
            fmt=parsed.fmt,
            n_rows=parsed.n_rows,
            rows=parsed.rows,
            texts=parsed.texts,
        )

    def _record_capture(
        self, captured: CapturedRequest, decision: Decision, status: int, answer: Answer | None
    ) -> None:
        capture = self.guard.capture
        if capture is not None:
            capture.record(captured, decision=str(decision.action), status=status, answer=answer)

    async def _internal_failure(
        self, policy: CompiledPolicy, scope: Scope, replay: Receive, send: Send, request_id: str
    ) -> None:
        """A bug in the guard: count and log it, then apply the policy's failure mode.

        ``replay`` gives the app whatever body was consumed, then the live stream.
        """
        self.guard.count_error("internal")
        self.guard.record_outcome(policy.name, "error", 1)
        log.exception("guard failure on policy %s", policy.name)
        if policy.failure_mode == "fail_closed":
            await send_error(send, 503, request_id)
            return
        # fail open: the request goes on, nothing lost
        await self.app(scope, replay, _with_request_id(send, request_id))

    async def _forward(
        self,
        policy: CompiledPolicy,
        scope: Scope,
        receive: Receive,
        send: Send,
        request_id: str,
        decision: Decision,
        parsed: ParsedRequest | None,
        query: Query | None,
        client: ClientId | None,
        started: float,
        captured: CapturedRequest | None = None,
    ) -> None:
        guard = self.guard
        degrade = self._degrade_spec(policy, decision)
        observe = (
            policy.observes and parsed is not None and query is not None and client is not None
        )
        watch = observe or captured is not None
        if degrade is None and not watch and not decision.headers:
            # nothing to watch, rewrite or add but the request id: the guard's work is done
            guard.observe_overhead(policy.name, time.perf_counter() - started)
            await self.app(scope, receive, _with_request_id(send, request_id))
            return
        extra = [(b"x-request-id", request_id.encode())]
        if decision.headers:
            names = _HEADER_NAMES
            for k, v in decision.headers:
                name = names.get(k)
                if name is None:
                    name = k.lower().encode("latin-1")
                    if len(names) < 64:
                        names[k] = name
                extra.append((name, v.encode("latin-1")))
        fmt = parsed.fmt if parsed is not None else "unknown"
        rewrite = None
        if degrade is not None:
            noise = None
            if (
                decision.action is Action.DEGRADE
                and degrade.noise > 0.0
                and client is not None
                and self._noise_key is not None
            ):
                rows = parsed.rows if parsed is not None else None
                noise = RowNoise(self._noise_key, client.id, rows)
            rewrite = partial(
                _degrade,
                fmt=fmt,
                spec=degrade,
                noise=noise,
                payload=self._payloads.get(policy.name),
            )
        responder = AnswerCapture(
            send,
            extra,
            capture=watch,
            rewrite=rewrite,
            limit=self._limits.max_response_bytes,
            request_id=request_id,
        )
        if degrade is not None or watch:
            scope = _identity_encoding(scope)
        before = time.perf_counter() - started
        await self.app(scope, receive, responder.send)
        after_started = time.perf_counter()
        if degrade is not None:
            guard.count_degraded(
                policy.name,
                "degraded"
                if responder.degraded
                else "too_large"
                if responder.too_large
                else ("unparsed" if responder.rewrite_failed else "passed_through"),
            )
        if watch:
            answer = self._answer(responder, fmt, self._payloads.get(policy.name))
            ok = 200 <= responder.status < 300
            if observe and ok and query is not None and client is not None:
                await self._observe(
                    policy, query, answer, client_source=client.source, exempt=client.exempt
                )
            if captured is not None:
                self._record_capture(captured, decision, responder.status, answer)
        guard.observe_overhead(policy.name, before + (time.perf_counter() - after_started))

    def _answer(self, responder: AnswerCapture, fmt: str, payload: PayloadFormat | None) -> Answer:
        """The model's answer as far as it could be read (its status at least)."""
        body = responder.body
        answer: Answer | None = None
        if body is not None:
            try:
                if payload is not None:
                    answer = payload.read_answer(body, responder.content_type)
                else:
                    answer = parse_response(body, fmt=fmt, content_type=responder.content_type)
            except Exception:
                self.guard.count_error("response")
                answer = None
        if answer is None:
            return Answer(status=responder.status)
        if answer.status != responder.status:
            return Answer(responder.status, answer.labels, answer.probabilities)
        return answer

    async def _observe(
        self,
        policy: CompiledPolicy,
        query: Query,
        answer: Answer,
        *,
        client_source: str,
        exempt: bool,
    ) -> None:
        # the answer is on its way already: a failure here is counted, never raised
        try:
            await self.guard.observe(
                policy, query, answer, client_source=client_source, exempt=exempt
            )
        except Exception:
            self.guard.count_error("internal")
            log.exception("guard failure after the answer on policy %s", policy.name)

    def _degrade_spec(self, policy: CompiledPolicy, decision: Decision) -> DegradeConfig | None:
        spec = policy.config.degrade
        if decision.action is Action.DEGRADE:
            return spec
        if spec.always:
            return self._always_specs[policy.name]
        return None

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
            else _NO_HEADERS
        )
        try:
            parsed = parse_request(
                body,
                path=path,
                content_type=ctype,
                headers=str_headers,
                limits=self._limits,
                want_rows=bool(policy.detectors) or self.guard.capture is not None,
                payload=self._payloads.get(policy.name),
            )
        except PayloadError:
            if not policy.config.validate:
                return ParsedRequest(fmt="unknown", rows=None)
            raise
        except Exception:
            # an adapter bug; the input is what provoked it, so it is refused, not let through
            self.guard.count_error("parse")
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
            self.guard.note_unknown_format(policy, path)
        return parsed

    def _headers(self, scope: Scope) -> dict[bytes, bytes]:
        """Headers by name; repeated ones joined with ``", "`` (in linear time).

        A repeated identity header must repeat the same value: two different
        credentials (or forwarding chains) in one request are refused.
        """
        headers: dict[bytes, bytes] = {}
        repeated: dict[bytes, list[bytes]] = {}
        identity = self._identity_headers
        for name, value in scope.get("headers", ()):
            if name in headers:
                if name in identity:
                    if headers[name] != value:
                        raise PayloadError(
                            400, "bad_header", f"conflicting {name.decode()} headers"
                        )
                    continue
                # joined once at the end: joining as they come copies the value each time
                parts = repeated.get(name)
                if parts is None:
                    repeated[name] = [headers[name], value]
                else:
                    parts.append(value)
                continue
            headers[name] = value
        for name, parts in repeated.items():
            headers[name] = b", ".join(parts)
        return headers

    def _query(
        self,
        policy: CompiledPolicy,
        client: ClientId,
        parsed: ParsedRequest | None,
        request_id: str,
    ) -> Query:
        if parsed is None:
            return Query(
                client=client.id,
                policy=policy.name,
                rows=None,
                n_rows=1,
                now=self._clock(),
                request_id=request_id,
            )
        return Query(
            client=client.id,
            policy=policy.name,
            rows=parsed.rows,
            texts=parsed.texts,
            n_rows=parsed.n_rows,
            fmt=parsed.fmt,
            now=self._clock(),
            request_id=request_id,
            extra=parsed.extra,
        )

    async def _refuse_invalid(
        self,
        policy: CompiledPolicy,
        exc: PayloadError,
        client: ClientId | None,
        request_id: str,
        send: Send,
        started: float,
    ) -> None:
        guard = self.guard
        guard.count_invalid(policy.name, exc.reason)
        guard.record_outcome(policy.name, "invalid", 1)
        guard.audit.record_invalid(
            policy=policy.name,
            request_id=request_id,
            client=client.id if client else "unidentified",
            client_source=client.source if client else "none",
            status=exc.status,
            reason=exc.reason,
        )
        guard.observe_overhead(policy.name, time.perf_counter() - started)
        # a 408 leaves the rest of the body unread: the connection cannot serve another request
        headers = _CLOSE if exc.status == 408 else ()
        await send_error(send, exc.status, request_id, message=exc.message, headers=headers)


def _check_length(length: bytes | None, limit: int) -> None:
    """Refuse a declared body size over the cap before reading a byte of it."""
    if length is None:
        return
    if not length.isdigit():
        raise PayloadError(400, "bad_header", "malformed content-length")
    if len(length) > 19 or int(length) > limit:
        raise PayloadError(413, "body_too_large", f"request body exceeds {limit} bytes")


def _check_readable_answer(parsed: ParsedRequest) -> None:
    """Refuse request options whose answers the guard could not round, degrade or watch.

    Triton's binary outputs and streamed log-probabilities would otherwise carry
    full-precision probabilities past the output policy.
    """
    extra = parsed.extra
    if extra.get("binary_output"):
        raise PayloadError(
            400, "bad_type", "binary outputs are not available on this route; ask for JSON outputs"
        )
    if extra.get("stream") and (extra.get("logprobs") or extra.get("top_logprobs")):
        raise PayloadError(400, "bad_type", "log-probabilities cannot be streamed on this route")


def _degrade(
    body: bytes,
    content_type: str | None,
    *,
    fmt: str,
    spec: DegradeConfig,
    noise: RowNoise | None,
    payload: PayloadFormat | None,
) -> bytes | None:
    if payload is not None:  # the policy's own shape: its answers hold probabilities there
        return payload.rewrite_answer(body, content_type, spec=spec, noise=noise)
    return degrade_response(body, fmt=fmt, content_type=content_type, spec=spec, noise=noise)


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


def _noisy_degrade(policy: CompiledPolicy) -> bool:
    """Whether ``policy`` may degrade an answer with noise: it has detectors and noise."""
    return bool(policy.detectors) and policy.config.degrade.noise > 0.0


def _identity_encoding(scope: Scope) -> Scope:
    """The scope with ``accept-encoding: identity``, so answers arrive readable.

    A compressed answer could be neither rounded, degraded nor watched: asking
    the app for an uncompressed one closes that bypass. Compression, where
    wanted, belongs outside the guard.
    """
    headers = scope.get("headers", ())
    if not any(name == b"accept-encoding" for name, _ in headers):
        return scope
    scope = dict(scope)
    scope["headers"] = [(n, v) for n, v in headers if n != b"accept-encoding"] + [
        (b"accept-encoding", b"identity")
    ]
    return scope


def _forwarded_applied(peer: Any) -> bool:
    """Whether the server took this client address from ``X-Forwarded-For`` itself.

    uvicorn's proxy-headers middleware, having lost the real peer's port,
    gives such a client port 0, which no TCP peer has.
    """
    try:
        return len(peer) > 1 and peer[1] == 0
    except TypeError:
        return False


def _lean_updates(updates: tuple[Any, ...]) -> tuple[Any, ...]:
    """``allowed_updates`` for the lean lane: its two fixed ``(inc, 1.0)`` pairs prebuilt."""
    if not updates:
        return ()
    requests, rows, payload, overhead = updates
    return ((requests, 1.0), (payload, 1.0), rows, overhead)


def _replay_first(first: Message, receive: Receive) -> Receive:
    """A ``receive`` that gives ``first`` (already consumed) once, then the live stream."""
    given = False

    async def replay() -> Message:
        nonlocal given
        if given:
            return await receive()
        given = True
        return first

    return replay


#: bumped in a child process after ``os.fork()``, so that it draws its own request ids
_FORKS = [0]
os.register_at_fork(after_in_child=lambda: _FORKS.__setitem__(0, _FORKS[0] + 1))
_RID_BATCH = 512


def _request_ids() -> Iterator[str]:
    """Unpredictable request ids (96 bits, hex), drawn from the OS 512 at a time.

    One ``os.urandom`` call per batch keeps the per-request cost to a slice. A
    forked child (a pre-forking server) discards the batch it inherited, so two
    workers never hand out the same ids.
    """
    while True:
        forks = _FORKS[0]
        pool = os.urandom(12 * _RID_BATCH).hex()
        for start in range(0, 24 * _RID_BATCH, 24):
            if _FORKS[0] != forks:
                break
            yield pool[start : start + 24]


_RID = b"x-request-id"


def _with_request_id(send: Send, request_id: str) -> Send:
    header = (_RID, request_id.encode())

    async def wrapped(message: Any) -> None:
        if message["type"] == "http.response.start":
            headers = list(message.get("headers", ()))
            if _RID in dict(headers):  # the app's own id gives way to the guard's
                headers = [h for h in headers if h[0] != _RID]
            headers.append(header)
            message["headers"] = headers
        await send(message)

    return wrapped
