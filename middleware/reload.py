"""Reloading the config from outside: ``POST /-/reload`` and ``SIGHUP``.

Both call :meth:`Guard.reload <guard.pipeline.Guard.reload>`, which reads the
file the guard was started with, builds everything first and swaps the
policies in one assignment (what may change is in :mod:`guard.reload`).

``POST /-/reload`` (:data:`RELOAD_PATH`) answers only the addresses that may
scrape the metrics (``metrics.allow_from``); for anyone else there is no
endpoint and the request goes on like any other (to the app: usually a 404).
Its answers, JSON:

* 200 ``{"reloaded": true, "config_sha": ..., "kept": [...], "built": [...],
  "dropped": [...]}``: the new config runs; detectors as ``policy/detector``;
* 409 ``{"error": ...}``: there is no file to reload (the guard was built from
  a mapping, a ``GuardConfig`` or the defaults);
* 422 ``{"error": ..., "problems": [{"key": ..., "problem": ...}]}``: the file
  is invalid, changes a section that cannot change on reload, or a detector
  cannot be built; the running config is kept.

``SIGHUP``: :class:`SighupReload` installs a handler on the running event
loop (at the ASGI lifespan startup, else at the first request), in the process
that receives it: under ``uvicorn --workers N`` each worker reloads itself, so
send the signal to every worker (``pkill -HUP -P <the supervisor's pid> -f
spawn_main``: its other child, the resource tracker, would die of it), not to the
supervisor, which restarts its workers on ``SIGHUP``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
from collections.abc import Awaitable, Callable
from typing import Any

from inference_guard.guard.errors import ConfigurationError
from inference_guard.guard.pipeline import Guard
from inference_guard.middleware.types import Send

__all__ = ["RELOAD_PATH", "SighupReload", "serve_reload"]

log = logging.getLogger("guard")

#: the path of the reload endpoint (POST), beside the metrics, for ``metrics.allow_from`` only
RELOAD_PATH = "/-/reload"


async def serve_reload(guard: Guard, send: Send) -> None:
    """Reload ``guard``'s config and answer how it went (see the module docstring)."""
    if guard.source is None:
        await _answer(
            send,
            409,
            {"error": "no config file to reload: the guard was built from a mapping or defaults"},
        )
        return
    try:
        result = await guard.reload()
    except ConfigurationError as exc:  # counted and logged by the guard
        problems = [{"key": key, "problem": problem} for key, problem in exc.problems]
        await _answer(
            send,
            422,
            {"error": "config reload failed; the running config is kept", "problems": problems},
        )
        return
    await _answer(
        send,
        200,
        {
            "reloaded": True,
            "config_sha": result.config_sha,
            "kept": list(result.kept),
            "built": list(result.built),
            "dropped": list(result.dropped),
        },
    )


async def _answer(send: Send, status: int, content: dict[str, Any]) -> None:
    body = json.dumps(content, separators=(",", ":")).encode()
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


class SighupReload:
    """A ``SIGHUP`` handler on the running event loop that calls ``reload``.

    :meth:`install` is idempotent per loop and does nothing where signals
    cannot be handled (not the main thread, no ``SIGHUP`` on the platform). A
    failed reload is counted and logged by the guard; the handler carries on.
    """

    def __init__(self, reload: Callable[[], Awaitable[object]]) -> None:
        self._reload = reload
        self._loop: asyncio.AbstractEventLoop | None = None
        # the reloads under way: the loop keeps only weak references to tasks
        self._tasks: set[asyncio.Task[None]] = set()

    def install(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is loop:
            return
        self._loop = loop  # tried once per loop, whatever comes of it
        sighup = getattr(signal, "SIGHUP", None)
        if sighup is None:
            return
        try:
            loop.add_signal_handler(sighup, self._on_signal)
        except (NotImplementedError, RuntimeError, ValueError):
            # another thread's loop (signals reach the main thread only), or no unix signals
            log.debug("no SIGHUP handler on this event loop: reload with POST %s", RELOAD_PATH)

    def remove(self) -> None:
        loop, self._loop = self._loop, None
        sighup = getattr(signal, "SIGHUP", None)
        if loop is not None and sighup is not None and not loop.is_closed():
            loop.remove_signal_handler(sighup)

    def _on_signal(self) -> None:
        loop = self._loop
        if loop is None:  # removed meanwhile
            return
        log.info("SIGHUP: reloading the config")
        task = loop.create_task(self._run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self) -> None:
        try:
            await self._reload()
        except ConfigurationError:
            pass  # counted and logged by the guard; the running config is kept
        except Exception:
            log.exception("SIGHUP reload failed")
