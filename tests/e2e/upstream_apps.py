"""Upstream servers for the proxy tests (``uvicorn --factory``), with no guard in them.

``echo_app`` tells what reached it; ``/v1/chat/completions`` streams SSE events
and holds back the last one until ``/release`` is called, so a test can prove
the first event went through the proxy before the upstream finished.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from inference_guard.middleware.types import ASGIApp, Receive, Scope, Send


async def _send_json(send: Send, content: Any, headers: list[tuple[bytes, bytes]]) -> None:
    body = json.dumps(content).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def _read_body(receive: Receive) -> tuple[bytes, int]:
    """The whole request body and the number of messages it came in."""
    chunks: list[bytes] = []
    messages = 0
    while True:
        message = await receive()
        messages += 1
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(chunks), messages


#: hop-by-hop headers the echo app puts in its answers (the proxy must drop them)
ANSWER_HOP_HEADERS: list[tuple[bytes, bytes]] = [
    (b"connection", b"x-upstream-hop"),
    (b"x-upstream-hop", b"secret"),
    (b"keep-alive", b"timeout=9"),
    (b"proxy-authenticate", b"Basic realm=up"),
    (b"trailer", b"x-checksum"),
    (b"upgrade", b"h2c"),
]


def echo_app() -> ASGIApp:
    """Answers every request with what it saw: method, raw path, query, headers, body size.

    ``/healthz`` answers ok, ``/count`` how many requests were echoed,
    ``/slow?s=SECONDS`` sleeps before answering. Every answer carries
    :data:`ANSWER_HOP_HEADERS` and ``x-upstream-keep: 1``.
    """
    seen = [0]

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        path = scope["path"]
        if path == "/healthz":
            await _send_json(send, {"status": "ok"}, [])
            return
        if path == "/count":
            await _send_json(send, {"echoed": seen[0]}, [])
            return
        seen[0] += 1
        body, messages = await _read_body(receive)
        if path == "/slow":
            query = dict(p.split("=", 1) for p in scope["query_string"].decode().split("&") if p)
            await asyncio.sleep(float(query.get("s", "1")))
        seen_headers = [[k.decode("latin-1"), v.decode("latin-1")] for k, v in scope["headers"]]
        await _send_json(
            send,
            {
                "method": scope["method"],
                "path": path,
                "raw_path": scope.get("raw_path", b"").decode("latin-1"),
                "query": scope["query_string"].decode("latin-1"),
                "headers": seen_headers,
                "body_bytes": len(body),
                "body_messages": messages,
            },
            [*ANSWER_HOP_HEADERS, (b"x-upstream-keep", b"1")],
        )

    return app


def stream_app() -> ASGIApp:
    """An OpenAI-style SSE stream whose last event waits for ``GET /release``.

    ``POST /v1/chat/completions`` sends one ``chat.completion.chunk`` event at
    once, then waits (30 s at most) until ``/release`` is requested, then sends
    the second event and ``[DONE]``. A client that disconnects meanwhile ends
    the stream; ``/status`` says how many did.
    """
    release = asyncio.Event()
    disconnected = [0]

    async def gone(receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        path = scope["path"]
        await _read_body(receive)
        if path == "/release":
            release.set()
            await _send_json(send, {"released": True}, [])
            return
        if path == "/status":
            await _send_json(send, {"disconnected": disconnected[0]}, [])
            return
        if path != "/v1/chat/completions":
            await _send_json(send, {"status": "ok"}, [])
            return
        release.clear()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream")],
            }
        )

        def event(text: str) -> bytes:
            chunk = {
                "id": "c1",
                "object": "chat.completion.chunk",
                "model": "m",
                "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}],
            }
            return f"data: {json.dumps(chunk)}\n\n".encode()

        await send({"type": "http.response.body", "body": event("first"), "more_body": True})
        released = asyncio.ensure_future(release.wait())
        left = asyncio.ensure_future(gone(receive))
        await asyncio.wait((released, left), timeout=30.0, return_when=asyncio.FIRST_COMPLETED)
        for task in (released, left):
            task.cancel()
        if left.done() and not left.cancelled():
            disconnected[0] += 1
            return
        await send({"type": "http.response.body", "body": event("second"), "more_body": True})
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})

    return app
