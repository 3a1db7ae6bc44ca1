"""The lifespan scope as :class:`~middleware.asgi.GuardMiddleware` sees it.

At the server's ``lifespan.startup`` the SIGHUP reload handler is installed
(:class:`~middleware.reload.SighupReload`, when the config came from a file). At
``lifespan.shutdown`` (after the server's last request, before the wrapped app
shuts down) the handler is removed, the answers still waiting in the observation
queue are applied within :data:`SHUTDOWN_DRAIN_S`, and the metrics batch is
flushed: a rolling restart loses no evidence, nor what the answers write to a
shared store. What a drain that fails or runs out of time leaves is counted as
dropped (``guard_observations_dropped_total``), and the shutdown goes on. An app
that takes no part in the lifespan protocol gets no such messages from its server.
"""

from __future__ import annotations

import asyncio
import logging

from inference_guard.guard.pipeline import Guard
from inference_guard.middleware.reload import SighupReload
from inference_guard.middleware.types import Message, Receive

__all__ = ["SHUTDOWN_DRAIN_S", "drain_for_shutdown", "watch_lifespan"]

#: the longest the lifespan shutdown waits for the queued observations (the store's own
#: timeouts bound each call well within it); what is left then is counted as dropped
SHUTDOWN_DRAIN_S = 10.0

log = logging.getLogger("guard")


def watch_lifespan(receive: Receive, guard: Guard, sighup: SighupReload | None) -> Receive:
    """``receive`` of a lifespan scope, with what the guard does at startup and shutdown."""

    async def lifespan_receive() -> Message:
        message = await receive()
        if message["type"] == "lifespan.startup":
            if sighup is not None:
                sighup.install()
        elif message["type"] == "lifespan.shutdown":
            if sighup is not None:
                sighup.remove()
            await drain_for_shutdown(guard)
        return message

    return lifespan_receive


async def drain_for_shutdown(guard: Guard) -> None:
    """Apply the queued observations and flush the metrics; never raises."""
    observations = guard.observations
    waiting, dropped = len(observations), observations.dropped
    try:
        await asyncio.wait_for(guard.drain(), SHUTDOWN_DRAIN_S)
    except Exception:  # a store down or too slow: what is left is counted as dropped
        observations.abandon()  # (a batch cut short in flight counted itself)
        log.warning(
            "applying %d queued observations at shutdown failed; %d dropped",
            waiting,
            observations.dropped - dropped,
            exc_info=True,
        )
    guard.metrics.tally.flush()
