"""Watching (and, for ``degrade``, rewriting) the model's answer.

One :class:`AnswerCapture` is made per request. It wraps ``send``:

* every response gets the ``x-request-id`` header and any rate-limit headers;
* streamed answers (``text/event-stream``, or no ``content-length``) and answers
  larger than the cap pass through untouched and unbuffered;
* for observing detectors, a bounded copy of a JSON answer is kept while the
  chunks go straight on to the client;
* for ``degrade``, the start message is held until the whole JSON body has
  arrived, the body is coarsened, and ``content-length`` is fixed up.
"""

from __future__ import annotations

from collections.abc import Callable

from middleware.refusals import send_error
from middleware.types import Message, Send

__all__ = ["AnswerCapture"]

Rewriter = Callable[[bytes, str | None], bytes | None]


class AnswerCapture:
    __slots__ = (
        "_chunks",
        "_discard",
        "_extra",
        "_held",
        "_limit",
        "_request_id",
        "_rewrite",
        "_rewrite_limit",
        "_send",
        "_size",
        "capture",
        "content_type",
        "degraded",
        "rewrite_failed",
        "status",
        "streaming",
        "too_large",
    )

    def __init__(
        self,
        send: Send,
        extra_headers: list[tuple[bytes, bytes]],
        *,
        capture: bool,
        rewrite: Rewriter | None,
        limit: int,
        rewrite_limit: int | None = None,
        request_id: str = "",
    ) -> None:
        self._send = send
        self._extra = extra_headers
        self.capture = capture or rewrite is not None
        self._rewrite = rewrite
        self._limit = limit
        # an answer the output policy must rewrite is held whatever its size, up to this
        self._rewrite_limit = rewrite_limit if rewrite_limit is not None else 16 * limit
        self._request_id = request_id
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
            ctype = (self.content_type or "").lower()
            readable = (
                "json" in ctype
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
            await send_error(
                self._send,
                502,
                self._request_id,
                message="the answer is too large for this route's output policy",
            )
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
            new = self._rewrite(body, self.content_type)
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
        held["headers"] = [(k, v) for k, v in held["headers"] if k != b"content-length"]
        held["headers"].append((b"content-length", length))
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
