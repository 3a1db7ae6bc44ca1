"""What a reverse proxy does to headers: hop-by-hop ones dropped, forwarding ones added.

Hop-by-hop headers (RFC 9110 section 7.6.1) describe one connection, not the
message: ``Connection`` and every header it names, ``Keep-Alive``,
``Proxy-*``, ``TE``, ``Trailer``, ``Transfer-Encoding`` and ``Upgrade``. A
proxy must not forward them in either direction; the body framing
(``Transfer-Encoding`` against ``Content-Length``) is each side's own
business. ``Expect`` is dropped too: the client's server has answered any
``100-continue`` already.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

__all__ = ["request_headers", "response_headers"]

#: hop-by-hop headers, lower case; any ``proxy-*`` header is one too
HOP_BY_HOP: Final = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"te",
        b"trailer",
        b"trailers",
        b"transfer-encoding",
        b"upgrade",
    }
)
_PROXY_PREFIX: Final = b"proxy-"
#: request headers the proxy sets itself (``host`` is the upstream's, from its URL)
_REPLACED: Final = frozenset(
    {b"host", b"expect", b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host"}
)

Headers = list[tuple[bytes, bytes]]


def _named_in_connection(headers: Iterable[tuple[bytes, bytes]]) -> frozenset[bytes]:
    """The header names a ``Connection`` header lists (``Connection: close, X-Foo``)."""
    names: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            names.update(t.strip().lower() for t in value.split(b",") if t.strip())
    return frozenset(names)


def _end_to_end(headers: Iterable[tuple[bytes, bytes]], also: frozenset[bytes]) -> Headers:
    """``headers`` (names lower-cased) without hop-by-hop ones and without ``also``."""
    pairs = [(name.lower(), value) for name, value in headers]
    dropped = HOP_BY_HOP | _named_in_connection(pairs) | also
    return [
        (name, value)
        for name, value in pairs
        if name not in dropped and not name.startswith(_PROXY_PREFIX)
    ]


def request_headers(
    headers: Iterable[tuple[bytes, bytes]], *, peer: str | None, scheme: str
) -> Headers:
    """The headers to send upstream for a client request with ``headers``.

    ``X-Forwarded-For`` keeps the chain the client sent (joined into one
    header) with ``peer`` appended, the way nginx's
    ``$proxy_add_x_forwarded_for`` does: whoever reads it decides which hops
    to believe. ``X-Forwarded-Proto`` and ``X-Forwarded-Host`` are set to
    what this proxy saw (the scheme it was reached by and the ``Host`` the
    client asked for), replacing any the client sent.
    """
    pairs = list(headers)
    chain = [v.strip() for n, v in pairs if n.lower() == b"x-forwarded-for" and v.strip()]
    host = next((v for n, v in pairs if n.lower() == b"host"), None)
    out = _end_to_end(pairs, _REPLACED)
    if peer:
        chain.append(peer.encode("latin-1"))
    if chain:
        out.append((b"x-forwarded-for", b", ".join(chain)))
    out.append((b"x-forwarded-proto", scheme.encode("latin-1")))
    if host is not None:
        out.append((b"x-forwarded-host", host))
    return out


def response_headers(headers: Iterable[tuple[bytes, bytes]]) -> Headers:
    """The upstream answer's headers to pass to the client: end-to-end ones only."""
    return _end_to_end(headers, frozenset())
