"""Watching (and, for ``degrade``, rewriting) the model's answer.

One :class:`Responder` is made per request. It wraps ``send``:

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

from middleware.types import Message, Send

__all__ = ["Responder"]

Rewriter = Callable[[bytes, str | None], bytes | None]


class Responder:
    __slots__ = (
        "_chunks",
        "_extra",
        "_held",
        "_limit",
        "_rewrite",
        "_send",
        "_size",
        "capture",
        "content_type",
        "degraded",
        "rewrite_failed",
        "status",
        "streaming",
    )

    def __init__(
        self,
        send: Send,
        extra_headers: list[tuple[bytes, bytes]],
        *,
        capture: bool,
        rewrite: Rewriter | None,
        limit: int,
    ) -> None:
        self._send = send
        self._extra = extra_headers
        self.capture = capture or rewrite is not None
        self._rewrite = rewrite
        self._limit = limit
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
            if (
                length < 0
                or length > self._limit
                or "json" not in ctype
                or ctype.startswith("text/event-stream")
                or not 200 <= self.status < 300
            ):
                self.streaming = True
            elif self._rewrite is not None:
                self._held = message
                return
        await self._send(message)

    async def _body(self, message: Message) -> None:
        chunk = message.get("body", b"")
        self._size += len(chunk)
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
        held["headers"] = [
            (k, str(len(new)).encode() if k == b"content-length" else v) for k, v in held["headers"]
        ]
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
