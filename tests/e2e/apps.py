"""App factories for the end-to-end tests (``uvicorn --factory``).

The guard config comes from the file named by ``GUARD_TEST_CONFIG``.
"""

from __future__ import annotations

import os

from middleware.asgi import GuardMiddleware
from middleware.demo import build_model_app
from middleware.types import ASGIApp, Receive, Scope, Send


def _config() -> str | None:
    return os.environ.get("GUARD_TEST_CONFIG") or None


def demo_app() -> ASGIApp:
    """The digits demo model behind the guard."""
    return GuardMiddleware(build_model_app(), config=_config())


def stream_app() -> ASGIApp:
    """An SSE endpoint that emits events slowly, behind the guard."""
    import asyncio

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        if scope["path"] == "/healthz":
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-type", b"text/plain")],
                }
            )
            await send({"type": "http.response.body", "body": b"ok"})
            return
        while True:  # drain the request body
            msg = await receive()
            if not msg.get("more_body"):
                break
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream")],
            }
        )
        for i in range(3):
            await send(
                {"type": "http.response.body", "body": f"data: {i}\n\n".encode(), "more_body": True}
            )
            await asyncio.sleep(0.3)
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})

    return GuardMiddleware(app, config=_config())
