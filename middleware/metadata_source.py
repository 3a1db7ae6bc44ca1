"""The OIP v2 metadata lookup a guard learns model signatures from: the wrapped app, in process.

:class:`~guard.signatures.Signatures` asks ``GET /v2/models/{name}`` of the
app the middleware wraps, as an ASGI call that never goes over the network
(and, in ``guard proxy``, so reaches the upstream through the proxy's pooled
connections). The answer is capped at :data:`MAX_BYTES` and must come within
``timeout`` seconds; anything else is a failed lookup.
"""

from __future__ import annotations

import asyncio
from typing import Final

from inference_guard.guard.signatures import MetadataSource
from inference_guard.middleware.types import ASGIApp, Message

__all__ = ["MAX_BYTES", "metadata_source"]

#: most bytes of a metadata answer read
MAX_BYTES: Final = 1 << 20


def metadata_source(app: ASGIApp, *, timeout: float = 5.0) -> MetadataSource:
    """A lookup that asks ``app`` for ``GET path``: ``(status, body)``."""

    async def fetch(path: str) -> tuple[int, bytes]:
        scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "method": "GET",
            "scheme": "http",
            "path": path,
            "raw_path": path.encode("utf-8"),
            "query_string": b"",
            "root_path": "",
            "headers": [(b"accept", b"application/json")],
            "client": None,
            "server": None,
        }
        sent = False
        never = asyncio.get_running_loop().create_future()
        status = 0
        chunks: list[bytes] = []
        size = 0

        async def receive() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": b"", "more_body": False}
            # the request is complete; nothing more arrives (the client never leaves)
            await never
            return {"type": "http.disconnect"}

        async def send(message: Message) -> None:
            nonlocal status, size
            if message["type"] == "http.response.start":
                status = int(message["status"])
            elif message["type"] == "http.response.body":
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > MAX_BYTES:
                    raise ValueError("the metadata answer is too large")
                chunks.append(chunk)

        try:
            await asyncio.wait_for(app(scope, receive, send), timeout)
        finally:
            never.cancel()
        return status, b"".join(chunks)

    return fetch
