"""Parsing large bodies off the event loop, with a deadline.

A front end's event loop serves every client; a request body that takes
milliseconds to decode and validate holds all of them up for that long. Bodies
larger than ``limits.offload_bytes`` are therefore parsed in a worker thread,
smaller ones on the loop (a thread hop costs some 50 µs, more than parsing a
small body does).

The workers are few (:data:`WORKERS`) and shared by every request of a guard,
so a flood of large bodies queues instead of taking every thread of the
process. Queueing counts against ``limits.parse_timeout_s``: past it the request
is refused with 503 ``parse_timeout`` (the guard is overloaded, the request
itself may be fine, so a retry later is the right answer). A parse that has
started cannot be interrupted: it runs to its end in its thread and its result
is dropped, which is why the parse budget (:mod:`guard.payload._budget`) bounds
each parse's cost and the deadline only bounds the wait.

Most of a parse is C code that holds the GIL (``orjson``, numpy), so a worker
thread does not make it free for the loop; what it buys is that the loop runs
between those calls, and that no request waits on the loop behind a queue of
large bodies.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from inference_guard.guard.config import LimitsConfig
from inference_guard.guard.errors import PayloadError

__all__ = ["THREAD_PREFIX", "WORKERS", "ParseOffload"]

T = TypeVar("T")

#: worker threads per guard: parsing holds the GIL, so more would only queue inside Python
WORKERS = 2
#: the workers' thread-name prefix (tests and thread dumps recognise them by it)
THREAD_PREFIX = "guard-parse"


class ParseOffload:
    """Runs a parse on the loop or in a worker thread, by body size (see the module docstring)."""

    __slots__ = ("_executor", "_threshold", "_timeout")

    def __init__(self, limits: LimitsConfig) -> None:
        self._threshold = limits.offload_bytes
        self._timeout = limits.parse_timeout_s
        # threads start on first use; an idle executor dropped on reload ends its threads
        self._executor: ThreadPoolExecutor | None = None

    async def run(self, size: int, parse: Callable[[], T]) -> T:
        """``parse()``, in a worker thread when ``size`` is over the threshold.

        Raises whatever ``parse`` raises, or :class:`PayloadError` 503
        ``parse_timeout`` when the offloaded parse has not finished in time.
        """
        if size <= self._threshold:
            return parse()
        if self._executor is None:
            self._executor = ThreadPoolExecutor(WORKERS, thread_name_prefix=THREAD_PREFIX)
        future = asyncio.wrap_future(self._executor.submit(parse))
        try:
            return await asyncio.wait_for(future, self._timeout)
        except TimeoutError:
            # wait_for cancelled the future: a parse still queued never starts
            raise PayloadError(
                503, "parse_timeout", "the guard could not read the request in time; retry later"
            ) from None
