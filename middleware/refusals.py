"""The guard's own answers on the wire: a :class:`~guard.engine.Refusal` as two ASGI messages.

The engine renders them (:func:`guard.engine.refusal`: status, headers and a
JSON body that never names a detector); this module only sends them.
"""

from __future__ import annotations

from inference_guard.guard.engine import Refusal
from inference_guard.middleware.types import Send

__all__ = ["send_refusal"]


async def send_refusal(send: Send, refusal: Refusal) -> None:
    """Send ``refusal``: the start message with its headers, then its whole body."""
    await send(
        {"type": "http.response.start", "status": refusal.status, "headers": list(refusal.headers)}
    )
    await send({"type": "http.response.body", "body": refusal.body, "more_body": False})
