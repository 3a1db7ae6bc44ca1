"""Reading a request body with a running cap, and replaying it to the app."""

from __future__ import annotations

from guard.errors import PayloadError
from middleware.types import Message, Receive

__all__ = ["BodyReader", "ClientDisconnected"]


class ClientDisconnected(Exception):
    """The client went away before the body was complete."""


class BodyReader:
    """Reads ``http.request`` messages up to ``limit`` bytes; remembers what it consumed.

    Whatever happens (a 413, a guard failure half-way), :meth:`replay` gives
    the app a ``receive`` that first yields exactly what was consumed and then
    continues with the real stream, so a request is never lost.
    """

    __slots__ = ("_chunks", "_receive", "complete", "limit")

    def __init__(self, receive: Receive, limit: int) -> None:
        self._receive = receive
        self.limit = limit
        self._chunks: list[bytes] = []
        self.complete = False

    async def read(self) -> bytes:
        size = 0
        while True:
            message = await self._receive()
            mtype = message["type"]
            if mtype == "http.disconnect":
                raise ClientDisconnected()
            if mtype != "http.request":
                continue
            chunk = message.get("body", b"")
            if chunk:
                size += len(chunk)
                self._chunks.append(chunk)
                if size > self.limit:
                    raise PayloadError(
                        413, "body_too_large", f"request body exceeds {self.limit} bytes"
                    )
            if not message.get("more_body", False):
                break
        self.complete = True
        if len(self._chunks) > 1:
            self._chunks = [b"".join(self._chunks)]
        return self._chunks[0] if self._chunks else b""

    def replay(self) -> Receive:
        """A ``receive`` for the app: the consumed bytes first, then the live stream."""
        pending: list[bytes] | None = [b"".join(self._chunks)]
        complete = self.complete
        upstream = self._receive

        async def receive() -> Message:
            nonlocal pending
            if pending is not None:
                body = pending[0]
                pending = None
                return {"type": "http.request", "body": body, "more_body": not complete}
            return await upstream()

        return receive
