"""The fast lane: plain requests to a policy whose verdict is fixed, served in a few C calls.

Contract. On a *lean* policy (:func:`lean_policies`: no detectors, no
quarantine, no capture, validation on, the built-in formats) and a path that
names a format with a plain reader (OIP v2, KServe v1:
:data:`guard.payload._plain.READERS`), the handler :meth:`FastLane.bind`
returns serves a request exactly as the front end would with the verdict of
:meth:`Guard.admit <guard.pipeline.Guard.admit>`, counted exactly as ``admit``
counts it:

* a plain request gets the policy's one verdict (:meth:`Loadout.fixed_verdict
  <guard.loadout.Loadout.fixed_verdict>`, the verdict and count of
  :meth:`Guard.admit_fixed <guard.pipeline.Guard.admit_fixed>`). When the
  answer is left untouched, the lane passes the request on itself: the
  request, its rows, its format and the guard's overhead counted in one batch,
  the app's status counted as it answers, the request id on the answer, the
  consumed body replayed as it came. Any other verdict (answers rounded) goes
  to the front end's ``carry_out`` to be carried out as any other;
* every other request, valid or not, and any failure of the lane's own, goes
  to ``carry_out`` with no verdict, having refused and counted nothing: the
  front end asks ``admit``, which gives the exact verdict and reason from the
  same body reader (a second read gives the same body, or the same error).

The lane only ever accepts, and only what ``admit`` accepts; differential
tests hold it to that (``tests/middleware/test_lean_lane.py``).

The rate lane (:meth:`FastLane.bind_rate`). On a policy whose one detector is
a rate limit that may answer at once (:func:`rate_policies`, :meth:`Loadout.rate_gate
<guard.loadout.Loadout.rate_gate>`), a plain request from an identified client
that is not exempt has its rows counted by the plain reader and goes to the
gate: admitted at once (the memory store, or this process's lease on Redis), it
is counted there as ``admit`` counts it and passed on by the lane with its rate
fields; anything else (a refusal, a lease miss, an exempt client, a request
that is not plain, a failure before the cost is taken) goes to ``carry_out``
with no verdict, having consumed and counted nothing. (Once the cost is taken
the request passes: a failure to count it is counted as an internal error.)
Differential tests: ``tests/middleware/test_rate_lane.py``.

A plain request has headers (joined by the engine's own rule,
:meth:`ClientIdentifier.read_headers <guard.identity.ClientIdentifier.read_headers>`),
none of which carries an identity in the lean lane (nothing in such a policy is
per client, so the lane identifies no one; a request with a credential or a
forwarding header goes to ``admit``, and a bad credential is refused as ever;
the rate lane identifies the client as ``admit`` does), a peer a server
could report, ``content-type`` ``application/json`` or none, no binary-tensor
header, a body the shared :class:`~middleware._body.BodyReader` reads whole
(declared length, cap, deadline), and a body its format's plain reader accepts.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from functools import partial
from time import perf_counter
from typing import Any

from inference_guard.guard.admission import RateGate
from inference_guard.guard.config import LimitsConfig
from inference_guard.guard.engine import Pass
from inference_guard.guard.identity import forwarded_applied, peer_host
from inference_guard.guard.loadout import Loadout
from inference_guard.guard.payload._plain import READERS
from inference_guard.guard.payload.adapters import detect_format
from inference_guard.guard.pipeline import Guard
from inference_guard.guard.policy import CompiledPolicy
from inference_guard.middleware._body import BodyReader
from inference_guard.middleware._request_ids import draw_request_id, with_request_id
from inference_guard.middleware.types import ASGIApp, Receive, Scope, Send

__all__ = ["CarryOut", "FastLane", "lean_policies", "rate_policies"]

#: the front end's way with a request the lane does not serve whole:
#: ``carry_out(scope, reader, send, request_id, started, verdict)`` asks the
#: engine for the verdict when ``verdict`` is ``None``, and carries it out
CarryOut = Callable[[Scope, BodyReader, Send, str, float, "Pass | None"], Awaitable[None]]

log = logging.getLogger("guard")

_JSON = b"application/json"
#: Triton's binary-tensor header: such a body is not plain JSON
_BINARY_HEADER = b"inference-header-content-length"
#: what ASGI servers put in scope["client"]: (host, port), as a tuple or a list, or None
_PEERS = (tuple, list, type(None))


def lean_policies(guard: Guard, loadout: Loadout | None = None) -> frozenset[str]:
    """The policies that may take the fast lane: their verdict is fixed.

    No detectors (the verdict is ``allow``, its answer perhaps rounded), no
    quarantine anywhere, no capture (which needs a client), validation on (an
    invalid request is refused, so a valid one is all the lane must recognise),
    no custom ``payload:``, no model signature to check and answers never watched.
    Of ``loadout``'s policies, the guard's running ones by default.
    """
    loadout = loadout if loadout is not None else guard.loadout
    if loadout.quarantine_enabled or guard.capture is not None:
        return frozenset()
    return frozenset(
        p.name
        for p in loadout.policies
        if p.allow is not None
        and p.config.validate
        and p.name not in loadout.payloads
        and not p.config.signature.enabled
        and not (p.observes or p.passthrough)
    )


def rate_policies(guard: Guard, loadout: Loadout | None = None) -> frozenset[str]:
    """The policies whose plain requests a rate limit may admit in the fast lane.

    Those :meth:`Loadout.rate_gate <guard.loadout.Loadout.rate_gate>` gives a
    gate: one ``rate`` detector that may answer at once, answers untouched and
    unwatched, nothing else read of a request but its row count, no quarantine,
    no capture. Of ``loadout``'s policies, the guard's running ones by default.
    """
    loadout = loadout if loadout is not None else guard.loadout
    return frozenset(p.name for p in loadout.policies if loadout.rate_gated(p))


class FastLane:
    """The lane of one guard; see the module docstring for its contract."""

    __slots__ = ("_guard", "_identity", "_limits", "_loadout")

    def __init__(self, guard: Guard, loadout: Loadout | None = None) -> None:
        self._guard = guard
        # the verdicts of the loadout whose policies the lane is given (a reload's
        # requests in flight finish on theirs)
        self._loadout = loadout if loadout is not None else guard.loadout
        self._limits = guard.config.limits
        self._identity = guard.identifier.header_names

    @staticmethod
    def format_of(path: str) -> str | None:
        """The format ``path`` names when the lane has a plain reader for it, else ``None``."""
        fmt = detect_format(path)
        return fmt if fmt in READERS else None

    def bind(
        self,
        policy: CompiledPolicy,
        fmt: str,
        app: ASGIApp,
        carry_out: CarryOut,
        statuses: list[int] | None,
        next_id: Callable[[], str],
    ) -> ASGIApp:
        """The handler of a lean policy's route whose path names ``fmt``.

        ``app`` is the protected app, ``carry_out`` the front end's way with
        every other request and verdict, ``statuses`` where the app's statuses
        are counted (``None``: not counted), ``next_id`` draws request ids.
        """
        verdict, count = self._loadout.fixed_verdict(policy, fmt)
        # what the lane does with a plain request, decided once: pass it on itself, or not
        untouched = verdict.untouched
        return partial(
            self._serve,
            policy,
            fmt,
            READERS[fmt],
            verdict,
            untouched,
            count,
            app,
            carry_out,
            statuses,
            next_id,
        )

    async def _serve(
        self,
        policy: CompiledPolicy,
        fmt: str,
        read_rows: Callable[[bytes, LimitsConfig], int | None],
        verdict: Pass,
        untouched: bool,
        count: Callable[[int, float | None], None],
        app: ASGIApp,
        carry_out: CarryOut,
        statuses: list[int] | None,
        next_id: Callable[[], str],
        scope: Scope,
        receive: Receive,
        send: Send,
    ) -> None:
        request_id, started, reader = begin(next_id, self._limits, receive)
        limits = self._limits
        try:
            headers = self._plain_headers(scope)
            if not self._identity.isdisjoint(headers):
                raise _NotPlain  # a credential or a forwarding header: admit identifies it
            declared = headers.get(b"content-length")
            body = reader.read_now(declared)
            if body is None:  # not there whole yet, or not a plain body: read() goes on
                body = await reader.read(declared)
        except Exception:  # not plain; a refusal, a failure, a disconnect: admit meets it again
            await carry_out(scope, reader, send, request_id, started, None)
            return
        try:
            n_rows = read_rows(body, limits)
        except Exception:  # a reader bug: counted, and admit decides
            self._guard.counts.error("parse")
            log.warning("plain %s reader failed on policy %s", fmt, policy.name, exc_info=True)
            n_rows = None
        if n_rows is None:
            await carry_out(scope, reader, send, request_id, started, None)
            return
        try:
            count(n_rows, perf_counter() - started if untouched else None)
        except Exception:  # admit meets the failure again and applies the failure mode
            await carry_out(scope, reader, send, request_id, started, None)
            return
        if untouched:  # counted, overhead included: straight on to the app
            await app(scope, reader.for_app(), with_request_id(send, request_id, statuses))
        else:
            await carry_out(scope, reader, send, request_id, started, verdict)

    def _plain_headers(self, scope: Scope) -> dict[bytes, bytes]:
        """A plain request's headers, joined as the engine joins them; else raise.

        Plain: some headers, a peer a server could report (else identification
        fails: admit's call), ``content-type`` ``application/json`` or none, no
        binary-tensor header. Raises :class:`_NotPlain` otherwise, and what
        joining raises (conflicting identity headers): admit meets it again.
        """
        raw: Any = scope.get("headers")
        if type(raw) is list and len(headers := dict(raw)) == len(raw):
            pass  # nothing repeated, the usual case (read_headers' own shortcut)
        else:
            headers = self._guard.identifier.read_headers(raw if raw is not None else ())
        if not (
            headers
            and type(scope.get("client")) in _PEERS
            and headers.get(b"content-type", _JSON) == _JSON
            and _BINARY_HEADER not in headers
        ):
            raise _NotPlain
        return headers

    def bind_rate(
        self,
        policy: CompiledPolicy,
        fmt: str,
        gate: RateGate,
        app: ASGIApp,
        carry_out: CarryOut,
        statuses: list[int] | None,
        next_id: Callable[[], str],
    ) -> ASGIApp:
        """The handler of a rate-gated policy's route whose path names ``fmt``
        (:func:`rate_policies`); ``gate`` is the loadout's
        :meth:`rate_gate <guard.loadout.Loadout.rate_gate>` for it, the rest as in
        :meth:`bind`."""
        return partial(
            self._serve_rate,
            policy,
            fmt,
            READERS[fmt],
            gate,
            app,
            carry_out,
            statuses,
            next_id,
        )

    async def _serve_rate(
        self,
        policy: CompiledPolicy,
        fmt: str,
        read_rows: Callable[[bytes, LimitsConfig], int | None],
        gate: RateGate,
        app: ASGIApp,
        carry_out: CarryOut,
        statuses: list[int] | None,
        next_id: Callable[[], str],
        scope: Scope,
        receive: Receive,
        send: Send,
    ) -> None:
        request_id, started, reader = begin(next_id, self._limits, receive)
        limits = self._limits
        try:
            headers = self._plain_headers(scope)
            peer = scope.get("client")
            # as admit identifies it (a bad credential raises: admit refuses it)
            client = self._guard.identifier.identify(
                headers, peer_host(peer), forwarded_applied=forwarded_applied(peer)
            )
            if client.exempt:
                raise _NotPlain  # counted as exempt, and never enforced: admit's
            declared = headers.get(b"content-length")
            body = reader.read_now(declared)
            if body is None:  # not there whole yet, or not a plain body: read() goes on
                body = await reader.read(declared)
        except Exception:  # not plain; a refusal, a failure, a disconnect: admit meets it again
            await carry_out(scope, reader, send, request_id, started, None)
            return
        try:
            n_rows = read_rows(body, limits)
        except Exception:  # a reader bug: admit runs the same reader, counts it and decides
            n_rows = None
        if n_rows is None:
            await carry_out(scope, reader, send, request_id, started, None)
            return
        try:
            added = gate(client, n_rows, started)
        except Exception:  # nothing consumed nor counted: admit meets the failure again
            log.warning("rate lane failed on policy %s", policy.name, exc_info=True)
            added = None
        if added is None:  # refused, or a check for the store: admit decides
            await carry_out(scope, reader, send, request_id, started, None)
            return
        await app(scope, reader.for_app(), with_request_id(send, request_id, statuses, added))


def begin(
    next_id: Callable[[], str], limits: LimitsConfig, receive: Receive
) -> tuple[str, float, BodyReader]:
    """What every guarded request starts with: its id, the moment the guard took it
    (its overhead is timed from there), and the reader of its body under ``limits``."""
    return (
        draw_request_id(next_id),
        perf_counter(),
        BodyReader(receive, limits.max_body_bytes, limits.body_timeout_s),
    )


class _NotPlain(Exception):
    """The request is not plain: the full path decides."""
