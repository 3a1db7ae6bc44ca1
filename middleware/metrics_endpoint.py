"""The ``/metrics`` endpoint, as a tiny ASGI app.

The middleware serves it on ``metrics.path``; :func:`metrics_app` gives the same
app to mount elsewhere (for instance on a separate, internal-only port).
"""

from __future__ import annotations

import asyncio

from prometheus_client import CollectorRegistry

from inference_guard.guard.metrics import exposition
from inference_guard.middleware.types import ASGIApp, Receive, Scope, Send

__all__ = ["metrics_app", "serve_metrics"]


async def serve_metrics(registry: CollectorRegistry | None, send: Send) -> None:
    # rendering walks every sample (and, in multiprocess mode, reads files): off the loop
    body, content_type = await asyncio.to_thread(exposition, registry)
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", content_type.encode()),
                (b"content-length", str(len(body)).encode()),
                (b"cache-control", b"no-store"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})


def metrics_app(registry: CollectorRegistry | None = None) -> ASGIApp:
    """An ASGI app answering every GET with the Prometheus exposition."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        if scope.get("method") not in ("GET", "HEAD"):
            await send(
                {
                    "type": "http.response.start",
                    "status": 405,
                    "headers": [(b"allow", b"GET"), (b"content-length", b"0")],
                }
            )
            await send({"type": "http.response.body", "body": b""})
            return
        await serve_metrics(registry, send)

    return app
