"""Watching (and, for ``degrade``, rewriting) the model's answer on its way out.

One :class:`AnswerCapture` is made per request whose :class:`~guard.engine.Pass`
asks for anything but the request id. It wraps ``send``:

* every response gets the ``x-request-id`` header and any rate-limit headers;
* streamed answers (``text/event-stream``, or no ``content-length``) and answers
  larger than the cap pass through untouched and unbuffered;
* for an answer the engine watches, a bounded copy of a JSON answer is kept
  while the chunks go straight on to the client;
* for an answer the engine rewrites, the start message is held until the whole
  JSON body (or Triton binary answer: ``Inference-Header-Content-Length``) has
  arrived, the body goes through :meth:`Pass.review <guard.engine.Pass.review>`
  (which also reads it, decoding it once), and ``content-length`` (and a binary
  answer's header length) is fixed up.

:meth:`AnswerCapture.seen` then tells the engine (:meth:`Guard.after
<guard.pipeline.Guard.after>`) what the model answered.
"""

from __future__ import annotations

from typing import Protocol

from inference_guard.guard.engine import Pass, Seen, refusal
from inference_guard.guard.payload.review import Reviewed
from inference_guard.middleware.refusals import send_refusal
from inference_guard.middleware.types import Message, Scope, Send

__all__ = ["AnswerCapture", "identity_encoding"]

_BINARY_HEADER = b"inference-header-content-length"


class Reviewer(Protocol):
    """:meth:`Pass.review <guard.engine.Pass.review>`."""

    def __call__(
        self, body: bytes, content_type: str | None, *, binary_header: int | None = None
    ) -> Reviewed: ...


class AnswerCapture:
    """One request's ``send`` wrapper (:meth:`send`); see the module docstring.

    ``limit`` caps what is kept of a watched answer (``max_response_bytes``);
    an answer to rewrite is held up to ``rewrite_limit`` (16 times ``limit`` by
    default) and answered 502 past it, never passed on unrewritten.
    """

    __slots__ = (
        "_binary_header",
        "_chunks",
        "_discard",
        "_extra",
        "_held",
        "_limit",
        "_path",
        "_request_id",
        "_rewrite",
        "_rewrite_limit",
        "_send",
        "_size",
        "capture",
        "content_type",
        "degraded",
        "reviewed",
        "rewrite_failed",
        "status",
        "streaming",
        "too_large",
    )

    def __init__(
        self,
        send: Send,
        verdict: Pass,
        request_id: str,
        *,
        limit: int,
        rewrite_limit: int | None = None,
        path: str = "",
    ) -> None:
        self._send = send
        # the route's path: the guard's own error is shaped for its protocol
        self._path = path
        self._extra = [(b"x-request-id", request_id.encode()), *verdict.headers]
        self._rewrite: Reviewer | None = verdict.review if verdict.rewrite is not None else None
        self.capture = verdict.watch is not None or self._rewrite is not None
        self._limit = limit
        # an answer the output policy must rewrite is held whatever its size, up to this
        self._rewrite_limit = rewrite_limit if rewrite_limit is not None else 16 * limit
        self._request_id = request_id
        #: a Triton binary answer's ``Inference-Header-Content-Length``
        self._binary_header: int | None = None
        self._discard = False
        self.too_large = False
        self._chunks: list[bytes] = []
        self._size = 0
        self._held: Message | None = None
        self.status = 0
        self.content_type: str | None = None
        self.streaming = False
        self.degraded = False
        self.rewrite_failed = False
        #: the engine's review of the answer, made while rewriting it
        self.reviewed: Reviewed | None = None

    def seen(self) -> Seen:
        """What the model answered, for :meth:`Guard.after <guard.pipeline.Guard.after>`."""
        if self.degraded:
            rewrite = "degraded"
        elif self.too_large:
            rewrite = "too_large"
        else:
            rewrite = "unparsed" if self.rewrite_failed else "passed_through"
        return Seen(self.status, self.content_type, self.body, self.reviewed, rewrite)

    @property
    def body(self) -> bytes | None:
        """The captured answer, when it was captured in full."""
        if not self.capture or self.streaming:
            return None
        return b"".join(self._chunks)

    async def send(self, message: Message) -> None:
        mtype = message["type"]
        if self._discard:  # the answer was replaced by an error: swallow the rest
            return
        if mtype == "http.response.start":
            await self._start(message)
        elif mtype == "http.response.body" and self.capture and not self.streaming:
            await self._body(message)
        else:
            if self._held is not None:  # e.g. pathsend while holding: give up rewriting
                self.streaming = True
                await self._flush_held()
            await self._send(message)

    async def _start(self, message: Message) -> None:
        # the guard's request id (and rate headers) replace any the app set
        own = {name for name, _ in self._extra}
        headers = [h for h in message.get("headers", ()) if h[0] not in own]
        headers.extend(self._extra)
        message["headers"] = headers
        self.status = message["status"]
        if self.capture:
            length = -1
            for name, value in headers:
                if name == b"content-length":
                    try:
                        length = int(value)
                    except ValueError:
                        length = -1
                elif name == b"content-type":
                    self.content_type = value.decode("latin-1")
                elif name == _BINARY_HEADER and value.isdigit() and len(value) < 19:
                    self._binary_header = int(value)
            ctype = (self.content_type or "").lower()
            readable = (
                ("json" in ctype or self._binary_header is not None)
                and not ctype.startswith("text/event-stream")
                and 200 <= self.status < 300
            )
            if readable and self._rewrite is not None and length >= 0:
                # the output policy must apply: never let size decide to skip it (an
                # answer streamed without a length is a stream, and streams pass)
                self._limit = self._rewrite_limit
                self._held = message
                return
            if not readable or length < 0 or length > self._limit:
                self.streaming = True
        await self._send(message)

    async def _body(self, message: Message) -> None:
        chunk = message.get("body", b"")
        self._size += len(chunk)
        if self._size > self._limit and self._held is not None:
            # too large to rewrite, and not to be passed on unrewritten: answer an error
            self.too_large = True
            self._discard = True
            self._held = None
            self._chunks.clear()
            too_large = refusal(
                502,
                self._request_id,
                message="the answer is too large for this route's output policy",
                path=self._path,
            )
            await send_refusal(self._send, too_large)
            return
        if self._size > self._limit:  # content-length lied: stop capturing
            self.streaming = True
            self._chunks.clear()
            if self._held is not None:
                await self._flush_held()
            await self._send(message)
            return
        self._chunks.append(chunk)
        more = message.get("more_body", False)
        if self._held is None:
            await self._send(message)
            return
        if more:
            return
        body = b"".join(self._chunks)
        assert self._rewrite is not None
        new = None
        try:
            self.reviewed = self._rewrite(
                body, self.content_type, binary_header=self._binary_header
            )
            new = self.reviewed.body
        except Exception:  # a rewrite bug must not lose the answer
            self.rewrite_failed = True
        if new is None:
            self.rewrite_failed = True
            new = body
        else:
            self.degraded = True
        held = self._held
        self._held = None
        length = str(len(new)).encode()
        fixed = [(b"content-length", length)]
        header_length = self.reviewed.header_length if self.reviewed is not None else None
        if self._binary_header is not None and new is not body and header_length is not None:
            fixed.append((_BINARY_HEADER, str(header_length).encode()))
        names = {name for name, _ in fixed}
        held["headers"] = [(k, v) for k, v in held["headers"] if k not in names]
        held["headers"].extend(fixed)
        await self._send(held)
        await self._send({"type": "http.response.body", "body": new, "more_body": False})

    async def _flush_held(self) -> None:
        held, self._held = self._held, None
        if held is not None:
            await self._send(held)
            if self._chunks:
                await self._send(
                    {
                        "type": "http.response.body",
                        "body": b"".join(self._chunks),
                        "more_body": True,
                    }
                )
                self._chunks.clear()


def identity_encoding(scope: Scope) -> Scope:
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
