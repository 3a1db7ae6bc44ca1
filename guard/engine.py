"""What a front end hands the engine, and what it gets back.

The engine (:class:`guard.pipeline.Guard`) decides; a front end (the ASGI
middleware, a proxy) only translates. Per request on a policy route::

    verdict = await guard.admit(Request(...))     # before the model
    # a Refusal: send verdict.status, verdict.headers, verdict.body; done
    # a Pass: forward the request, add verdict.headers to the answer, and
    #   where verdict.rewrite or verdict.watch is set, keep the complete answer:
    #   reviewed = verdict.review(body, content_type)   # rewrite it (decoded once)
    #   await guard.after(verdict, Seen(...))           # what the model answered

A front end owns the bytes on the wire: it reads the request body for the
engine (:class:`BodySource`: the body cap, the declared length and the
deadline are its business) and buffers, holds or streams the answer. The
engine owns everything else: identity, quarantine, parsing
(:mod:`guard.payload`), detectors, audit, capture, metrics, and how the answer
is rewritten and read. :func:`refusal` renders the guard's own answers.

Nothing here imports a front end; the types are immutable values (named
tuples: one is made per request, and a tuple costs a third of a frozen
dataclass to make).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, NamedTuple, Protocol

from inference_guard.detectors.base import Query
from inference_guard.guard.capture import CapturedRequest
from inference_guard.guard.config import DegradeConfig
from inference_guard.guard.decisions import Decision
from inference_guard.guard.payload.degrade import RowNoise
from inference_guard.guard.payload.error_bodies import error_body, error_style
from inference_guard.guard.payload.formats import PayloadFormat
from inference_guard.guard.payload.review import Reviewed, review_answer
from inference_guard.guard.policy import CompiledPolicy

__all__ = [
    "ERROR_CODES",
    "BodySource",
    "Pass",
    "Refusal",
    "Request",
    "Rewrite",
    "Seen",
    "Verdict",
    "Watch",
    "encode_headers",
    "refusal",
]

Headers = tuple[tuple[bytes, bytes], ...]
#: encoded names of the detectors' response headers (a handful, from code: RateLimit...)
_HEADER_NAMES: dict[str, bytes] = {}

#: status -> (code, default message) of the guard's own answers
ERROR_CODES: dict[int, tuple[str, str]] = {
    400: ("invalid_request", "the request is malformed"),
    403: ("forbidden", "the request was refused"),
    408: ("request_timeout", "the request body did not arrive in time"),
    413: ("payload_too_large", "the request is too large"),
    415: ("unsupported_media_type", "the content type is not supported"),
    429: ("rate_limited", "too many requests; retry later"),
    502: ("bad_gateway", "the model's answer could not be delivered"),
    503: ("unavailable", "the service is temporarily unavailable"),
}


class BodySource(Protocol):
    """A front end's reader of one request body, called at most once per request by the engine.

    ``declared`` is the request's ``Content-Length`` header (repeated ones
    joined), or ``None``. The reader refuses a malformed or too large declared
    length before reading a byte (400 ``bad_header``, 413 ``body_too_large``),
    a body past ``limits.max_body_bytes`` (413) and one that does not arrive
    within ``limits.body_timeout_s`` (408), all as
    :class:`~guard.errors.PayloadError`; it raises
    :class:`~guard.errors.ClientDisconnected` when the client leaves.
    """

    async def read(self, declared: bytes | None) -> bytes: ...


class Request(NamedTuple):
    """One request on a policy route, as the engine sees it before reading its body."""

    #: the policy whose routes the request matched (:meth:`Guard.match`)
    policy: CompiledPolicy
    method: str
    path: str
    #: ``(name, value)`` byte pairs as received, names lower-case, repeats allowed
    headers: Iterable[tuple[bytes, bytes]]
    #: the peer as the server reports it: ``(host, port)``, or ``None`` (a unix socket)
    peer: Any
    #: the guard's id of the request (in answers, the audit log and capture lines)
    request_id: str
    #: the body, read only when the policy needs it
    body: BodySource


class Refusal(NamedTuple):
    """The guard answers itself; the model never sees the request."""

    #: 400, 403, 408, 413, 415, 429 or 503
    status: int
    #: the complete response headers (content type and length, request id, ...)
    headers: Headers
    #: the error in the route's protocol (:mod:`guard.payload.error_bodies`), never
    #: naming a detector
    body: bytes
    #: whether the guard's time on the request goes into ``guard_overhead_seconds``
    #: (not for the guard's own failures)
    counted: bool = True


class Rewrite(NamedTuple):
    """How the model's answer is coarsened before the client gets it."""

    #: rounding, top-k, labels only, noise
    spec: DegradeConfig
    #: a degraded client's noise, keyed by (client, row); ``None``: fresh randomness
    noise: RowNoise | None = None


class Watch(NamedTuple):
    """What the engine does with the model's answer once it is known."""

    #: the request as the detectors that learn from answers see it (``None``: none do)
    query: Query | None
    #: where the client's identity came from (audit lines)
    client_source: str
    #: the client is exempt (never quarantined by what it is answered)
    exempt: bool
    #: the capture line's request half (``None``: not captured)
    captured: CapturedRequest | None


class Pass(NamedTuple):
    """The request goes on to the model; the answer is handled as said here."""

    policy: CompiledPolicy
    decision: Decision
    #: the request's payload format (how its answer is read and rewritten)
    fmt: str = "unknown"
    #: the policy's own format (``payload:``), which then reads and rewrites answers
    payload: PayloadFormat | None = None
    #: headers to add to the answer (rate-limit fields), the request id aside
    headers: Headers = ()
    #: how to rewrite the answer (``None``: it passes untouched)
    rewrite: Rewrite | None = None
    #: what to do with the answer once known (``None``: nothing)
    watch: Watch | None = None
    #: whether the guard's time goes into ``guard_overhead_seconds`` (not when the
    #: guard failed and its failure mode let the request through)
    counted: bool = True

    @property
    def untouched(self) -> bool:
        """Nothing to do with the answer but add the request id."""
        return self.rewrite is None and self.watch is None and not self.headers

    def review(
        self,
        body: bytes,
        content_type: str | None,
        *,
        rewrite: bool = True,
        binary_header: int | None = None,
    ) -> Reviewed:
        """The complete answer rewritten as :attr:`rewrite` says (``rewrite=True``), and
        read where it is watched: decoded once for both. Never raises.

        ``binary_header`` is a Triton binary answer's ``Inference-Header-Content-Length``;
        the rewritten one's is :attr:`Reviewed.header_length`."""
        spec = self.rewrite if rewrite else None
        return review_answer(
            body,
            content_type,
            fmt=self.fmt,
            payload=self.payload,
            spec=spec.spec if spec is not None else None,
            noise=spec.noise if spec is not None else None,
            read=self.watch is not None,
            binary_header=binary_header,
        )


#: what :meth:`Guard.admit` returns
Verdict = Pass | Refusal


class Seen(NamedTuple):
    """What a front end saw of the model's answer to a :class:`Pass`."""

    #: the status the model answered with
    status: int
    content_type: str | None = None
    #: the complete answer as the model sent it, when it was kept (watched, not
    #: streamed, within ``limits.max_response_bytes``)
    body: bytes | None = None
    #: :meth:`Pass.review` made while rewriting it, when it was rewritten
    reviewed: Reviewed | None = None
    #: for a :attr:`Pass.rewrite`: ``degraded``, ``too_large`` (answered 502),
    #: ``unparsed`` or ``passed_through`` (streamed, not JSON, not 2xx)
    rewrite: str = "passed_through"


def refusal(
    status: int,
    request_id: str,
    *,
    message: str | None = None,
    path: str = "",
    headers: Iterable[tuple[str, str]] = (),
    retry_after: float | None = None,
    counted: bool = True,
) -> Refusal:
    """The guard's own answer with ``status``, its body shaped for the route ``path``.

    On OIP v2 and KServe v1 routes the body is ``{"error": "<message>"}``, on
    OpenAI routes OpenAI's ``{"error": {"message", "type", "param", "code"}}``,
    elsewhere ``{"error": {"code", "message", "request_id"}}``
    (:mod:`guard.payload.error_bodies`); the request id is always in ``X-Request-ID``.

    ``headers`` (a decision's rate-limit fields) are added after the standard
    ones; ``retry_after`` becomes ``Retry-After`` in whole seconds (at least 1).
    A 408 also says ``Connection: close``: the rest of the body is unread.

    Examples
    --------
    >>> import json
    >>> r = refusal(429, "abc", retry_after=0.2)
    >>> r.status, json.loads(r.body)["error"]["code"], dict(r.headers)[b"retry-after"]
    (429, 'rate_limited', b'1')
    >>> refusal(400, "abc", message="bad", path="/v2/models/m/infer").body
    b'{"error":"bad"}'
    """
    code, default = ERROR_CODES.get(status, ("error", "error"))
    body = error_body(error_style(path), status, code, message or default, request_id=request_id)
    raw: list[tuple[bytes, bytes]] = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"x-request-id", request_id.encode()),
        (b"cache-control", b"no-store"),
    ]
    if retry_after is not None:
        raw.append((b"retry-after", str(max(1, math.ceil(retry_after))).encode()))
    raw.extend((k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers)
    if status == 408:
        raw.append((b"connection", b"close"))
    return Refusal(status, tuple(raw), body, counted)


def encode_headers(headers: Iterable[tuple[str, str]]) -> Headers:
    """A decision's response headers (``RateLimit``, ...) as the byte pairs sent on the wire."""
    names = _HEADER_NAMES
    out = []
    for k, v in headers:
        name = names.get(k)
        if name is None:
            name = k.lower().encode("latin-1")
            if len(names) < 64:
                names[k] = name
        out.append((name, v.encode("latin-1")))
    return tuple(out)
