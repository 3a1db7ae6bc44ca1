"""Driving an ASGI app in-process, synchronously, on a simulated clock.

:class:`InProcess` sends one HTTP request at a time through the real ASGI app
(the guard's middleware and the model app behind it) on a private event loop:
the same bytes, headers and status codes a client sees over a socket, without
the server and the socket (about a millisecond less per request).

:class:`SimClock` is the time every guard detector sees when the app was built
with it (``Guard(clock=..., wall_clock=...)`` and the middleware's ``clock``):
clients say when each request is sent (:meth:`SimClock.at`), so a population
whose requests are spread over minutes runs in seconds and its detectors see
the minutes, rate windows and TTLs included.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

__all__ = ["InProcess", "SimClock"]


@dataclass
class SimClock:
    """A monotonic clock advanced by the caller; ``wall`` is the same instant as epoch time."""

    now: float = 0.0
    #: epoch seconds at ``now == 0``
    epoch: float = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now

    def wall(self) -> float:
        return self.epoch + self.now

    def at(self, t: float) -> None:
        """Move to ``t`` (never backwards)."""
        self.now = max(self.now, t)

    def advance(self, dt: float) -> None:
        self.now += dt


@dataclass
class InProcess:
    """Synchronous HTTP/1.1-style calls into an ASGI app, one at a time."""

    app: Any
    #: when given, advanced by ``tick`` seconds before every request
    clock: SimClock | None = None
    tick: float = 0.0
    client: tuple[str, int] = ("127.0.0.1", 50000)
    _loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.new_event_loop)

    def post(
        self, path: str, body: bytes, headers: dict[str, str]
    ) -> tuple[int, dict[str, str], bytes]:
        """``POST path``; the status, the response headers (lower-cased) and the body."""
        if self.clock is not None and self.tick:
            self.clock.advance(self.tick)
        return self._loop.run_until_complete(self._call("POST", path, body, headers))

    def close(self) -> None:
        self._loop.close()

    async def _call(
        self, method: str, path: str, body: bytes, headers: dict[str, str]
    ) -> tuple[int, dict[str, str], bytes]:
        raw_headers = [
            (k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()
        ]
        raw_headers.append((b"content-length", str(len(body)).encode()))
        raw_headers.append((b"host", b"testserver"))
        scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "method": method,
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "query_string": b"",
            "root_path": "",
            "headers": raw_headers,
            "client": self.client,
            "server": ("127.0.0.1", 8000),
        }
        sent = False
        status = 0
        out_headers: dict[str, str] = {}
        chunks: list[bytes] = []

        async def receive() -> dict[str, Any]:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            await asyncio.sleep(3600)  # the client never disconnects mid-request
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                for k, v in message.get("headers", []):
                    out_headers[k.decode("latin-1").lower()] = v.decode("latin-1")
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))

        await self.app(scope, receive, send)
        return status, out_headers, b"".join(chunks)
