"""``UpstreamProxy``: an ASGI app that forwards every HTTP request to one upstream server.

It puts the guard in front of a model server running in a process of its own
(MLServer, Triton, KServe, vLLM, TorchServe)::

    app = build_proxy_app("http://127.0.0.1:8080", config="guard.yaml")

is ``GuardMiddleware(UpstreamProxy(...), config=...)``: the guard's policies
decide, and the proxy only carries what they let through. ``guard proxy`` on
the command line serves it with uvicorn.

What the proxy does with a request:

* the path and query go upstream byte for byte (``raw_path``), after the
  upstream URL's own path prefix. A path the guard and the upstream could read
  differently (``.`` or ``..`` segments, raw bytes an HTTP client would
  re-encode, no leading ``/``) is refused with 400: a policy matched on one
  path must never let another through;
* hop-by-hop headers are dropped both ways, ``X-Forwarded-For`` gets the peer
  appended, ``X-Forwarded-Proto`` and ``X-Forwarded-Host`` are set
  (:mod:`middleware._forwarding`);
* request and answer bodies are streamed, never buffered here; connections
  to the upstream are pooled (one ``httpx.AsyncClient`` per process, opened on
  ASGI lifespan startup or on first use, closed on shutdown);
* when the client goes away, the upstream exchange is cancelled (an LLM
  server stops generating for nobody).

An upstream that cannot be reached, resets the connection or speaks broken
HTTP is answered ``502``, one that does not answer within the timeouts
``504``, and a request that finds no free pooled connection in time ``503``;
the body is shaped for the route's protocol (``{"error": "<message>"}`` on
OIP v2 and KServe v1 routes, OpenAI's error object on OpenAI routes,
``{"error": {"code", "message", "reason"}}`` elsewhere) and each failure is
counted in ``guard_upstream_errors_total{reason}`` (:data:`REASONS`) in the
guard's own registry, so ``/metrics`` shows it. A failure after the answer
has started can no longer change its status: it is counted and the
connection is aborted, so the client sees a truncated answer, never a
complete-looking one.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any, Final
from urllib.parse import quote

import httpx
from prometheus_client import CollectorRegistry, Counter

from inference_guard.guard.config import GuardConfig
from inference_guard.guard.errors import ConfigurationError
from inference_guard.guard.payload.error_bodies import error_body, error_style
from inference_guard.middleware._forwarding import request_headers, response_headers
from inference_guard.middleware.asgi import GuardMiddleware
from inference_guard.middleware.types import Message, Receive, Scope, Send

__all__ = [
    "REASONS",
    "ProxyTimeouts",
    "UpstreamError",
    "UpstreamProxy",
    "app_from_env",
    "build_proxy_app",
]

log = logging.getLogger("guard.proxy")

#: ``reason`` -> (status, code, message) for a request the upstream could not answer
_FAILURES: Final[dict[str, tuple[int, str, str]]] = {
    "connect": (502, "bad_gateway", "the model server could not be reached"),
    "timeout": (504, "gateway_timeout", "the model server did not answer in time"),
    "pool": (503, "unavailable", "too many requests are waiting for the model server"),
    "reset": (502, "bad_gateway", "the model server closed the connection or answered badly"),
    "other": (502, "bad_gateway", "the model server's answer could not be delivered"),
}
#: the label values of ``guard_upstream_errors_total``
REASONS: Final = tuple(_FAILURES)
#: most seconds lifespan startup waits on :attr:`UpstreamProxy.on_startup`
STARTUP_S: Final = 10.0
#: the httpx client's default headers: a proxy adds none of its own. Accept-Encoding
#: above all: it would ask the upstream for compressed answers the guard cannot read
_CLIENT_DEFAULTS: Final = ("accept", "accept-encoding", "connection", "user-agent")


@dataclass(frozen=True, slots=True)
class ProxyTimeouts:
    """Seconds the proxy waits on the upstream before answering 504 (503 for ``pool_s``)."""

    #: to open a connection
    connect_s: float = 5.0
    #: for each read of the answer: its headers, then each chunk (a stream may run
    #: longer in all, as long as it keeps sending)
    read_s: float = 60.0
    #: for each write of the request to the upstream
    write_s: float = 60.0
    #: for a free pooled connection when ``max_connections`` are busy
    pool_s: float = 5.0

    def httpx(self) -> httpx.Timeout:
        return httpx.Timeout(
            connect=self.connect_s, read=self.read_s, write=self.write_s, pool=self.pool_s
        )


class UpstreamError(Exception):
    """The upstream failed after the answer had started; the connection is aborted."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"upstream failed mid-answer ({reason})")
        self.reason = reason


class _ClientGone(Exception):
    """The client disconnected while its request body was being forwarded."""


class UpstreamProxy:
    """Forward every HTTP request to ``upstream`` (``http[s]://host[:port][/prefix]``).

    Parameters
    ----------
    upstream:
        The model server's base URL. A path in it is a prefix put before every
        request path.
    timeouts:
        How long to wait on the upstream (:class:`ProxyTimeouts`).
    max_connections:
        Most connections open to the upstream at once (per process).
    registry:
        Prometheus registry for ``guard_upstream_errors_total``; give it the
        guard's (:func:`build_proxy_app` does) so that ``/metrics`` shows it.
        ``None`` registers the counter nowhere (it still counts: :attr:`errors`).
    """

    def __init__(
        self,
        upstream: str,
        *,
        timeouts: ProxyTimeouts | None = None,
        max_connections: int = 100,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.base = _upstream_url(upstream)
        self._prefix = self.base.raw_path.rstrip(b"/")
        self.timeouts = timeouts if timeouts is not None else ProxyTimeouts()
        if max_connections < 1:
            raise ConfigurationError("max_connections", "must be at least 1")
        self._limits = httpx.Limits(
            max_connections=max_connections, max_keepalive_connections=max_connections
        )
        self.errors = Counter(
            "guard_upstream_errors_total",
            "Requests the upstream model server failed, by reason",
            ["reason"],
            registry=registry,
        )
        self._errors = {reason: self.errors.labels(reason) for reason in REASONS}
        self._client: httpx.AsyncClient | None = None
        #: awaited on lifespan startup, once the pooled client is open (at most
        #: :data:`STARTUP_S` seconds): :func:`build_proxy_app` learns signatures there
        self.on_startup: Callable[[], Awaitable[None]] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)
        elif kind == "websocket":
            # not proxied: closing before accepting answers the handshake with 403
            await send({"type": "websocket.close", "code": 1003})

    async def aclose(self) -> None:
        """Close the pooled connections (lifespan shutdown does)."""
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    def client(self) -> httpx.AsyncClient:
        """The pooled client, made on first use in the running event loop."""
        if self._client is None:
            client = httpx.AsyncClient(
                timeout=self.timeouts.httpx(),
                limits=self._limits,
                follow_redirects=False,
                trust_env=False,
            )
            for name in _CLIENT_DEFAULTS:
                del client.headers[name]
            self._client = client
        return self._client

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self.client()
                if self.on_startup is not None:
                    try:
                        await asyncio.wait_for(self.on_startup(), STARTUP_S)
                    except Exception:  # the guard works without what start-up learns
                        log.warning("start-up lookups at %s failed", self.base, exc_info=True)
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        url = self._target(scope)
        if url is None:
            await _send_json(
                send, scope, 400, "invalid_request", "the request path is not in normal form"
            )
            return
        # the exchange runs beside a watch on the client: a client that goes away
        # once its request is sent cancels it (receive() then only ever says disconnect)
        body_sent = asyncio.Event()
        exchange = asyncio.ensure_future(self._exchange(scope, url, receive, send, body_sent))
        watch = asyncio.ensure_future(_disconnect(receive, body_sent))
        try:
            await asyncio.wait((exchange, watch), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (watch, exchange):
                if not task.done():
                    task.cancel()
            await asyncio.gather(watch, exchange, return_exceptions=True)
        if not exchange.cancelled():
            exchange.result()  # a mid-answer failure (UpstreamError) is re-raised here

    async def _exchange(
        self, scope: Scope, url: httpx.URL, receive: Receive, send: Send, body_sent: asyncio.Event
    ) -> None:
        message = await receive()
        if message["type"] != "http.request":  # gone before sending a byte
            return
        first = message.get("body", b"")
        content: bytes | AsyncIterator[bytes]
        if message.get("more_body", False):
            content = _body(first, receive, body_sent)
        else:
            content = first
            body_sent.set()
        peer = scope.get("client")
        client = self.client()
        request = client.build_request(
            scope["method"],
            url,
            headers=request_headers(
                scope.get("headers", ()),
                peer=str(peer[0]) if peer else None,
                scheme=scope.get("scheme", "http"),
            ),
            content=content,
        )
        try:
            response = await client.send(request, stream=True)
        except _ClientGone:
            return
        except httpx.TransportError as exc:
            reason = _reason(exc)
            self._errors[reason].inc()
            log.warning("upstream %s failed (%s): %r", self.base, reason, exc)
            await _send_failure(send, scope, reason)
            return
        body_sent.set()
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": response.status_code,
                    "headers": response_headers(response.headers.raw),
                }
            )
            async for chunk in response.aiter_raw():
                if chunk:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except httpx.TransportError as exc:
            reason = _reason(exc)
            self._errors[reason].inc()
            log.warning("upstream %s failed mid-answer (%s): %r", self.base, reason, exc)
            raise UpstreamError(reason) from exc
        finally:
            await response.aclose()

    def _target(self, scope: Scope) -> httpx.URL | None:
        """The upstream URL for this request, or ``None`` when the path is not plain.

        The guard matched its policies on ``scope["path"]``; the upstream must be
        asked for that very path. httpx removes ``.`` and ``..`` segments and
        re-encodes some bytes, so a path it would change is refused, as is one
        with dot segments hidden by percent-encoding (``%2e%2e``), which the
        upstream might resolve.
        """
        path: str = scope["path"]
        raw = scope.get("raw_path") or quote(path).encode("ascii")
        if not raw.startswith(b"/") or any(s in (".", "..") for s in path.split("/")):
            return None
        query = scope.get("query_string", b"")
        wanted = self._prefix + raw
        try:
            url = self.base.copy_with(raw_path=wanted + b"?" + query if query else wanted)
        except (httpx.InvalidURL, UnicodeError, ValueError):
            return None
        if url.raw_path.partition(b"?")[0] != wanted:
            return None
        return url


def build_proxy_app(
    upstream: str,
    *,
    config: str | os.PathLike[str] | Mapping[str, Any] | GuardConfig | None = None,
    timeouts: ProxyTimeouts | None = None,
    max_connections: int = 100,
    registry: CollectorRegistry | None = None,
) -> GuardMiddleware:
    """The guard in front of ``upstream``: ``GuardMiddleware(UpstreamProxy(...))``.

    ``config`` is whatever :class:`~middleware.asgi.GuardMiddleware` accepts;
    ``None`` is :meth:`GuardConfig.default <guard.config.GuardConfig.default>`.
    The proxy's error counter goes into the guard's registry, so the guard's
    ``/metrics`` endpoint shows it.
    """
    registry = registry if registry is not None else CollectorRegistry()
    proxy = UpstreamProxy(
        upstream, timeouts=timeouts, max_connections=max_connections, registry=registry
    )
    app = GuardMiddleware(proxy, config=config, registry=registry)
    if app.guard.signatures:
        proxy.on_startup = partial(_learn_signatures, proxy, app)
    return app


async def _learn_signatures(proxy: UpstreamProxy, app: GuardMiddleware) -> None:
    """Learn the signatures of the upstream's models at start-up.

    The models are those the upstream's repository index lists (``POST
    /v2/repository/index``, MLServer and Triton); an upstream without one is
    left to first sight of each model.
    """
    url = proxy.base.copy_with(raw_path=proxy._prefix + b"/v2/repository/index")
    try:
        r = await proxy.client().post(url, json={})
        index = r.json() if r.status_code == 200 else []
    except (httpx.HTTPError, ValueError):
        index = []
    names = []
    for model in index if isinstance(index, list) else ():
        if isinstance(model, dict) and isinstance(model.get("name"), str):
            names.append(model["name"])
    for signatures in app.guard.signatures.values():
        await signatures.prefetch(names)


#: environment variables :func:`app_from_env` reads (``guard proxy --workers N`` sets them)
ENV_UPSTREAM: Final = "GUARD_PROXY_UPSTREAM"
ENV_CONFIG: Final = "GUARD_PROXY_CONFIG"
ENV_CONNECT_TIMEOUT: Final = "GUARD_PROXY_CONNECT_TIMEOUT"
ENV_READ_TIMEOUT: Final = "GUARD_PROXY_READ_TIMEOUT"
ENV_MAX_CONNECTIONS: Final = "GUARD_PROXY_MAX_CONNECTIONS"


def app_from_env(environ: Mapping[str, str] | None = None) -> GuardMiddleware:
    """:func:`build_proxy_app` from environment variables, for ``uvicorn --factory``.

    ``GUARD_PROXY_UPSTREAM`` (required), ``GUARD_PROXY_CONFIG`` (a YAML path;
    unset: the default policy), ``GUARD_PROXY_CONNECT_TIMEOUT`` and
    ``GUARD_PROXY_READ_TIMEOUT`` (seconds), ``GUARD_PROXY_MAX_CONNECTIONS``,
    read from ``environ`` (default: ``os.environ``). Each worker process of
    ``uvicorn --workers N`` builds its own app here.
    """
    env = os.environ if environ is None else environ
    upstream = env.get(ENV_UPSTREAM)
    if not upstream:
        raise ConfigurationError(ENV_UPSTREAM, "is not set (the upstream's URL)")
    defaults = ProxyTimeouts()
    timeouts = ProxyTimeouts(
        connect_s=_env_number(env, ENV_CONNECT_TIMEOUT, defaults.connect_s),
        read_s=_env_number(env, ENV_READ_TIMEOUT, defaults.read_s),
        write_s=defaults.write_s,
        pool_s=defaults.pool_s,
    )
    return build_proxy_app(
        upstream,
        config=env.get(ENV_CONFIG) or None,
        timeouts=timeouts,
        max_connections=int(_env_number(env, ENV_MAX_CONNECTIONS, 100)),
    )


def _env_number(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigurationError(name, f"must be a number, not {raw!r}") from None
    if not value > 0:
        raise ConfigurationError(name, f"must be positive, not {raw!r}")
    return value


def _upstream_url(upstream: str) -> httpx.URL:
    """The upstream's base URL, checked: ``http`` or ``https``, a host, nothing after the path."""
    try:
        url = httpx.URL(upstream)
    except (httpx.InvalidURL, TypeError, ValueError) as exc:
        raise ConfigurationError("upstream", f"{upstream!r} is not a URL: {exc}") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise ConfigurationError(
            "upstream", f"{upstream!r} must be an http:// or https:// URL with a host"
        )
    if url.query or url.fragment or url.userinfo:
        raise ConfigurationError(
            "upstream", f"{upstream!r} must not carry a query, a fragment or credentials"
        )
    return url


def _reason(exc: httpx.TransportError) -> str:
    """The ``reason`` label of a failed exchange."""
    if isinstance(exc, httpx.PoolTimeout):
        return "pool"
    if isinstance(exc, httpx.TimeoutException):
        return "timeout"
    if isinstance(exc, httpx.ConnectError):
        return "connect"
    # ReadError/WriteError (a reset), RemoteProtocolError (closed before answering, or
    # malformed HTTP): one reason, since a killed server shows as either
    if isinstance(exc, httpx.NetworkError | httpx.RemoteProtocolError):
        return "reset"
    return "other"


async def _body(first: bytes, receive: Receive, done: asyncio.Event) -> AsyncIterator[bytes]:
    """The request body as it arrives, ``first`` being what was received already."""
    if first:
        yield first
    while True:
        message = await receive()
        if message["type"] != "http.request":
            raise _ClientGone
        chunk = message.get("body", b"")
        if chunk:
            yield chunk
        if not message.get("more_body", False):
            done.set()
            return


async def _disconnect(receive: Receive, body_sent: asyncio.Event) -> None:
    """Return when the client disconnects, watching only once its body is all read."""
    await body_sent.wait()
    while True:
        message: Message = await receive()
        if message["type"] == "http.disconnect":
            return


async def _send_failure(send: Send, scope: Scope, reason: str) -> None:
    status, code, message = _FAILURES[reason]
    await _send_json(send, scope, status, code, message, reason=reason)


async def _send_json(
    send: Send, scope: Scope, status: int, code: str, message: str, *, reason: str | None = None
) -> None:
    """The proxy's own error, shaped for the route's protocol."""
    body = error_body(error_style(scope["path"]), status, code, message, reason=reason)
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"cache-control", b"no-store"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})
