"""``GuardMiddleware``: the pure-ASGI face of inference-guard.

Wrap any ASGI app (Starlette, FastAPI, a proxy)::

    app = GuardMiddleware(app, config="guard.yaml")
    # or, with Starlette / FastAPI:
    app.add_middleware(GuardMiddleware, config="guard.yaml")

The engine decides and this layer translates. Per request on a policy route,
the middleware turns the ASGI scope into a :class:`~guard.engine.Request` (its
body read on demand by a :class:`~middleware._body.BodyReader`), asks
:meth:`Guard.admit <guard.pipeline.Guard.admit>` for the verdict, and turns the
verdict back into ASGI messages: a refusal is sent as it is; a pass goes on to
the app, the consumed body replayed unchanged, its answer watched or rewritten
by an :class:`~middleware.answer_capture.AnswerCapture` and handed to
:meth:`Guard.after <guard.pipeline.Guard.after>` (as :meth:`Admission.settle
<guard.admission.Admission.settle>`, which spares an answer only rewritten a
coroutine). Parsing payloads, identity,
detectors, rewriting answers: all the engine's (``guard/``, formats in
``guard/payload/``). The fast lane (:mod:`middleware.fast_lane`) serves plain
requests to lean policies, whose verdict is fixed, in a few C calls.
Everything else (non-http scopes, routes no policy matches) passes straight
through; the metrics endpoint answers scrapes from ``metrics.allow_from``, and
so does ``POST /-/reload`` (:mod:`middleware.reload`).

The lifespan scope passes through with the guard's startup and shutdown steps
(:mod:`middleware.lifespan`: the SIGHUP handler; the observation queue applied
before the app shuts down).

Reloads: the engine swaps its policies in one assignment
(:attr:`Guard.loadout <guard.pipeline.Guard.loadout>`). The middleware keeps
what it derives from them (route handlers bound to policies, the fast lane) in
one :class:`_Front` per loadout, taken once per request, so a request finishes
on the policies it started with and the first one after a reload builds the
new front.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Coroutine, Mapping
from functools import partial
from typing import Any, NamedTuple

from prometheus_client import CollectorRegistry

from inference_guard.guard.config import GuardConfig
from inference_guard.guard.engine import Pass, Request, Seen, Verdict
from inference_guard.guard.errors import ClientDisconnected
from inference_guard.guard.loadout import Loadout
from inference_guard.guard.pipeline import Guard
from inference_guard.guard.policy import CompiledPolicy
from inference_guard.middleware._body import BodyReader
from inference_guard.middleware._request_ids import draw_request_id, request_ids, with_request_id
from inference_guard.middleware.answer_capture import AnswerCapture, identity_encoding
from inference_guard.middleware.fast_lane import (
    CarryOut,
    FastLane,
    begin,
    lean_policies,
    rate_policies,
)
from inference_guard.middleware.lifespan import watch_lifespan
from inference_guard.middleware.metadata_source import metadata_source
from inference_guard.middleware.metrics_endpoint import may_scrape, networks, serve_metrics
from inference_guard.middleware.refusals import send_refusal
from inference_guard.middleware.reload import RELOAD_PATH, SighupReload, serve_reload
from inference_guard.middleware.types import ASGIApp, Receive, Scope, Send

__all__ = ["GuardMiddleware"]

#: distinct (method, path) pairs whose handler is remembered
_ROUTE_MEMO = 1024


class _Front(NamedTuple):
    """What the middleware derives from one loadout of the engine."""

    loadout: Loadout
    #: each (method, path)'s handler, an ASGI app bound to its policy (_route)
    routes: dict[tuple[str, str], ASGIApp]
    fast_lane: FastLane
    #: the policies whose plain requests take the fast lane (read when routing)
    lean_policies: frozenset[str]
    #: the policies whose plain requests a rate limit may admit in the fast lane
    rate_policies: frozenset[str]


class _Route(NamedTuple):
    """A policy route's handler's own: its policy, and what it binds once."""

    policy: CompiledPolicy
    #: ``guard_overhead_seconds`` of the policy
    overhead: Callable[[float], None]
    #: the app's statuses, for ``guard_upstream_responses_total`` (``None``: metrics off)
    statuses: list[int] | None
    #: :meth:`Admission.settle <guard.admission.Admission.settle>` of the loadout
    settle: Callable[[Pass, Seen], Coroutine[Any, Any, None] | None]


class GuardMiddleware:
    """Pure-ASGI inference guard.

    Parameters
    ----------
    app:
        The ASGI application to protect.
    config:
        A path to a YAML file, a mapping, a :class:`~guard.config.GuardConfig`,
        or ``None`` for the safe defaults.
    registry:
        Prometheus registry for the guard's metrics (a fresh one by default).
    clock:
        Monotonic clock, injectable for tests.
    guard:
        The engine, when one is built already (it then brings its own config
        clock and registry).
    reload_on_sighup:
        Reload the config file on ``SIGHUP`` (when ``config`` is a path): a
        handler on the event loop, installed at the lifespan startup or the
        first request. ``False`` leaves ``SIGHUP`` alone.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        config: str | os.PathLike[str] | Mapping[str, Any] | GuardConfig | None = None,
        registry: CollectorRegistry | None = None,
        clock: Any = time.monotonic,
        guard: Guard | None = None,
        reload_on_sighup: bool = True,
    ) -> None:
        self.app = app
        self.config = GuardConfig.load(config)
        source = config if isinstance(config, (str, os.PathLike)) else None
        self.guard = (
            guard
            if guard is not None
            else Guard(self.config, registry=registry, clock=clock, source=source)
        )
        self._metrics_path = self.config.metrics.path if self.config.metrics.enabled else ""
        self._metrics_networks = networks(self.config.metrics.allow_from)
        self._limits = self.config.limits
        # request ids must not count requests for the client (a counter leaks volume)
        self._request_id = request_ids().__next__
        self._front = self._new_front()
        self._sighup = (
            SighupReload(self.guard.reload)
            if reload_on_sighup and self.guard.source is not None
            else None
        )
        # model signatures are learned from the wrapped app's metadata endpoint
        self.guard.set_metadata_source(metadata_source(app))

    @property
    def registry(self) -> CollectorRegistry:
        return self.guard.metrics.registry

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "lifespan":
                receive = watch_lifespan(receive, self.guard, self._sighup)
            await self.app(scope, receive, send)
            return
        front = self._front
        if front.loadout is not self.guard.loadout:  # reloaded since
            front = self._reloaded()
        key = (scope["method"], scope["path"])
        handler = front.routes.get(key) or self._route(front, key)
        await handler(scope, receive, send)

    def _new_front(self) -> _Front:
        guard = self.guard
        loadout = guard.loadout
        return _Front(
            loadout,
            {},
            FastLane(guard, loadout),
            lean_policies(guard, loadout),
            rate_policies(guard, loadout),
        )

    def _reloaded(self) -> _Front:
        """The front of the engine's new loadout, after a reload."""
        self.config = self.guard.config  # the running config (its frozen sections unchanged)
        self._front = self._new_front()
        return self._front

    def _route(self, front: _Front, key: tuple[str, str]) -> ASGIApp:
        """The handler of a ``(method, path)``; remembered (bounded).

        Paths are client-chosen: past :data:`_ROUTE_MEMO` entries the memo stops
        growing and further paths are looked up afresh.
        """
        if self._sighup is not None:  # no lifespan (or an app that ignores it): now
            self._sighup.install()
        method, path = key
        if path == self._metrics_path and method in ("GET", "HEAD"):
            handler: ASGIApp = self._scrape
        elif path == RELOAD_PATH and method == "POST":
            handler = self._reload
        else:
            handler = self._policy_route(front, method, path)
        if len(front.routes) < _ROUTE_MEMO:
            front.routes[key] = handler
        return handler

    def _policy_route(self, front: _Front, method: str, path: str) -> ASGIApp:
        """The handler of a request for none of the guard's own endpoints."""
        policy = front.loadout.match(method, path)
        if policy is None:
            return self._unguarded
        counts = self.guard.counts
        statuses = self.guard.metrics.upstream_statuses(policy.name) if counts.enabled else None
        settle = front.loadout.admission.settle
        route = _Route(policy, counts.overhead_observer(policy.name), statuses, settle)
        carry_out = partial(self._carry_out, front.loadout, route)
        lane = front.fast_lane
        if policy.name in front.lean_policies:
            fmt = lane.format_of(path)
            if fmt is not None:
                return lane.bind(policy, fmt, self.app, carry_out, statuses, self._request_id)
        elif policy.name in front.rate_policies:
            fmt = lane.format_of(path)
            gate = front.loadout.rate_gate(policy, fmt) if fmt is not None else None
            if fmt is not None and gate is not None:
                return lane.bind_rate(
                    policy, fmt, gate, self.app, carry_out, statuses, self._request_id
                )
        return partial(self._guarded, carry_out)

    async def _unguarded(self, scope: Scope, receive: Receive, send: Send) -> None:
        request_id = draw_request_id(self._request_id)
        await self.app(scope, receive, with_request_id(send, request_id))

    async def _scrape(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not may_scrape(self.guard.identifier, self._metrics_networks, scope):
            await self._not_here(scope, receive, send)
            return
        # this process's deferred updates first (a multiprocess scrape reads files)
        self.guard.metrics.tally.flush()
        await serve_metrics(self.guard.metrics.registry, send)

    async def _reload(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not may_scrape(self.guard.identifier, self._metrics_networks, scope):
            await self._not_here(scope, receive, send)
            return
        await serve_reload(self.guard, send)

    async def _not_here(self, scope: Scope, receive: Receive, send: Send) -> None:
        """An endpoint of the guard's, asked by a client it is not for: as if it were not there."""
        handler = self._policy_route(self._front, scope["method"], scope["path"])
        await handler(scope, receive, send)

    async def _guarded(
        self, carry_out: CarryOut, scope: Scope, receive: Receive, send: Send
    ) -> None:
        """A request on a policy route without a fast lane: the engine's verdict, carried out."""
        request_id, started, reader = begin(self._request_id, self._limits, receive)
        await carry_out(scope, reader, send, request_id, started, None)

    async def _carry_out(
        self,
        loadout: Loadout,
        route: _Route,
        scope: Scope,
        reader: BodyReader,
        send: Send,
        request_id: str,
        started: float,
        verdict: Verdict | None,
    ) -> None:
        """The engine's verdict (asked for here when ``verdict`` is ``None``), carried out.

        The guard's overhead is recorded here (and, for what it serves whole, in
        the fast lane): before a refusal is sent, or a request the guard is done
        with is passed on; for an answer to watch or rewrite, once the engine has
        handled it, the app's own time left out (and not at all when the app raises).
        """
        if verdict is None:
            request = Request(
                route.policy,
                scope["method"],
                scope["path"],
                scope.get("headers", ()),
                scope.get("client"),
                request_id,
                reader,
            )
            try:
                verdict = await loadout.admit(request)
            except ClientDisconnected:
                return  # no one to answer
        if not isinstance(verdict, Pass):
            if verdict.counted:
                route.overhead(time.perf_counter() - started)
            await send_refusal(send, verdict)
            return
        if verdict.rewrite is None and verdict.watch is None:
            # the answer untouched but for the request id (and rate fields): no capture
            if verdict.counted:
                route.overhead(time.perf_counter() - started)
            send = with_request_id(send, request_id, route.statuses, verdict.headers)
            await self.app(scope, reader.for_app(), send)
            return
        # the answer watched or rewritten as the verdict asks; the app's own time left out
        capture = AnswerCapture(
            send, verdict, request_id, limit=self._limits.max_response_bytes, path=scope["path"]
        )
        receive = reader.for_app()
        scope = identity_encoding(scope)  # the answer is read: not compressed
        app_started = time.perf_counter()
        await self.app(scope, receive, capture.send)
        started += time.perf_counter() - app_started
        if route.statuses is not None:
            route.statuses.append(capture.status)
        watched = route.settle(verdict, capture.seen())
        if watched is not None:
            await watched
        if verdict.counted:
            route.overhead(time.perf_counter() - started)
