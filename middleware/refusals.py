"""The guard's own answers: JSON errors. Clients never learn which detector fired."""

from __future__ import annotations

import json
import math

from middleware.types import Send

__all__ = ["ERROR_CODES", "send_error"]

#: status -> (code, default message)
ERROR_CODES: dict[int, tuple[str, str]] = {
    400: ("invalid_request", "the request is malformed"),
    403: ("forbidden", "the request was refused"),
    408: ("request_timeout", "the request body did not arrive in time"),
    413: ("payload_too_large", "the request is too large"),
    415: ("unsupported_media_type", "the content type is not supported"),
    429: ("rate_limited", "too many requests; retry later"),
    502: ("bad_gateway", "the model's answer could not be delivered"),
    503: ("unavailable", "the service is temporarily unavailable"),
}


async def send_error(
    send: Send,
    status: int,
    request_id: str,
    *,
    message: str | None = None,
    headers: tuple[tuple[str, str], ...] = (),
    retry_after: float | None = None,
) -> None:
    """Send ``{"error": {"code", "message", "request_id"}}`` with ``status``."""
    code, default = ERROR_CODES.get(status, ("error", "error"))
    body = json.dumps(
        {"error": {"code": code, "message": message or default, "request_id": request_id}},
        separators=(",", ":"),
    ).encode()
    raw: list[tuple[bytes, bytes]] = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"x-request-id", request_id.encode()),
        (b"cache-control", b"no-store"),
    ]
    if retry_after is not None:
        raw.append((b"retry-after", str(max(1, math.ceil(retry_after))).encode()))
    raw.extend((k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers)
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body, "more_body": False})
