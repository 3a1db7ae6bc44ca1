"""Corpus requests on the wire: bytes out, and what came back, over one fresh connection each.

A raw-socket HTTP/1.1 client, because the corpus holds what client libraries refuse
to send (NUL bytes in header values, repeated and oversized headers, bad framing).
Each request gets a connection of its own and says ``connection: close``, so no
answer can be mistaken for another's and a server that drops the connection is
seen doing it.

How a :class:`~benchmarks.hostile_corpus.HostileRequest` becomes bytes
(:func:`encode`):

* ``raw`` requests go out exactly as they are;
* otherwise ``METHOD target HTTP/1.1``, ``host``, ``connection: close``, the
  request's headers in order and as given (repeats, odd bytes and all), except
  ``content-length``: over HTTP it is the framing, not a header the app reads,
  and a lie in it splits the request or stalls it (the body timeout's concern, not
  this benchmark's). The corpus's content-length lies are replaced by the true
  length; the fuzz test sends them as plain ASGI headers, and the ``raw_http``
  kinds send lies that do not stall;
* a body the corpus cuts into several pieces is sent chunked, one HTTP chunk per
  non-empty piece (an empty chunk would end the body).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import NamedTuple

from benchmarks.hostile_corpus import HostileRequest

#: seconds for a whole exchange; the guard's body timeout is 5 s, so anything longer
#: is a server that never answers
TIMEOUT_S = 30.0


def encode(req: HostileRequest, host: bytes) -> bytes:
    """The bytes a client puts on the wire for ``req``."""
    if req.raw is not None:
        return req.raw
    lines = [
        b"%s %s HTTP/1.1" % (req.method.encode(), req.path.encode()),
        b"host: " + host,
        b"connection: close",
    ]
    lines += [name + b": " + value for name, value in req.headers if name != b"content-length"]
    pieces = [c for c in req.chunks if c]
    if len(pieces) > 1:
        lines.append(b"transfer-encoding: chunked")
        body = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in pieces) + b"0\r\n\r\n"
    else:
        body = b"".join(pieces)
        lines.append(b"content-length: %d" % len(body))
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


class Outcome(NamedTuple):
    """What one exchange came to."""

    #: the final status (``None``: the connection ended, or the time ran out, with no answer)
    status: int | None
    #: ``answered``, ``truncated`` (a status line and headers, then the body cut short),
    #: ``closed`` (no answer before the connection ended), ``reset``, ``timeout``, ``refused``
    how: str
    #: the first bytes of the answer's body
    body: bytes = b""
    #: the answer says ``cache-control: no-store``: the guard made it (its refusals do)
    no_store: bool = False


class _Head(NamedTuple):
    status: int
    length: int | None
    chunked: bool
    no_store: bool
    rest: bytes


def _head(buf: bytes) -> _Head | None:
    """The final answer's head in ``buf`` (interim 1xx answers skipped), once it is all there."""
    while True:
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            return None
        lines = buf[:end].split(b"\r\n")
        try:
            status = int(lines[0].split()[1])
        except (IndexError, ValueError):
            return None  # not an HTTP answer: no answer
        rest = buf[end + 4 :]
        if 100 <= status < 200 and status != 101:
            buf = rest
            continue
        length: int | None = None
        chunked = no_store = False
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length" and value.strip().isdigit():
                length = int(value)
            elif name == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
            elif name == b"cache-control" and value.strip() == b"no-store":
                no_store = True
        return _Head(status, length, chunked, no_store, rest)


def _complete(head: _Head, method: str, body: bytes) -> bool:
    if method.upper() == "HEAD" or head.status in (101, 204, 304):
        return True
    if head.chunked:
        return body.endswith(b"0\r\n\r\n")
    if head.length is not None:
        return len(body) >= head.length
    return False  # delimited by the end of the connection


async def exchange(
    req: HostileRequest, port: int, *, source: str = "127.0.0.1", timeout: float = TIMEOUT_S
) -> Outcome:
    """Send ``req`` to 127.0.0.1:``port`` from the address ``source``; read its answer."""
    try:
        return await asyncio.wait_for(_exchange(req, port, source), timeout)
    except TimeoutError:
        return Outcome(None, "timeout")


async def _exchange(req: HostileRequest, port: int, source: str) -> Outcome:
    try:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, local_addr=(source, 0), limit=1 << 20
        )
    except OSError:
        return Outcome(None, "refused")
    data = encode(req, b"127.0.0.1:%d" % port)

    async def send() -> None:
        # a server may answer and close before it has read everything (a 413, a 400 on
        # the headers): the answer is what counts, not whether the rest went out
        with contextlib.suppress(OSError):
            writer.write(data)
            await writer.drain()

    sender = asyncio.create_task(send())
    buf = b""
    how = "closed"
    try:
        while chunk := await reader.read(1 << 16):
            buf += chunk
            head = _head(buf)
            if head is not None and _complete(head, req.method, head.rest):
                how = "answered"
                break
    except OSError:
        how = "reset"
    finally:
        sender.cancel()
        await asyncio.gather(sender, return_exceptions=True)
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    head = _head(buf)
    if head is None:
        return Outcome(None, how)
    if how != "answered":
        # an answer without length or chunking ends with the connection
        ends_with_close = head.length is None and not head.chunked and how == "closed"
        how = "answered" if ends_with_close else "truncated"
    return Outcome(head.status, how, head.rest[:300], head.no_store)
