"""The ``/metrics`` endpoint, as a tiny ASGI app, and who may ask the guard's endpoints.

The middleware serves it on ``metrics.path``; :func:`metrics_app` gives the same
app to mount elsewhere (for instance on a separate, internal-only port).
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Iterable

from prometheus_client import CollectorRegistry

from inference_guard.guard.errors import PayloadError
from inference_guard.guard.identity import ClientIdentifier, forwarded_applied, peer_host
from inference_guard.guard.metrics import exposition
from inference_guard.middleware.types import ASGIApp, Receive, Scope, Send

__all__ = ["may_scrape", "metrics_app", "networks", "serve_metrics"]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def networks(allow_from: Iterable[str]) -> tuple[Network, ...]:
    """``metrics.allow_from``'s CIDRs, parsed."""
    return tuple(ipaddress.ip_network(c, strict=False) for c in allow_from)


def may_scrape(identifier: ClientIdentifier, allowed: tuple[Network, ...], scope: Scope) -> bool:
    """Whether the client may read the metrics, or reload: its address is in ``allowed``
    (``metrics.allow_from``).

    The address is the one client identity uses (``X-Forwarded-For`` only
    from trusted proxies). A request without a client address (a unix
    socket, where anyone behind the front proxy could be asking) and spoofed
    or conflicting headers mean no.
    """
    peer = scope.get("client")
    if peer is None:  # no address to check (a unix socket): no endpoint
        return False
    try:
        address = ipaddress.ip_address(
            identifier.client_ip(
                identifier.read_headers(scope.get("headers", ())),
                peer_host(peer),
                forwarded_applied=forwarded_applied(peer),
            )
        )
    except (PayloadError, ValueError, TypeError, IndexError):
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in net for net in allowed)


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
