"""Request ids: drawn unpredictably, and put on every answer as ``x-request-id``."""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any

from inference_guard.middleware.types import Send

__all__ = ["draw_request_id", "request_ids", "with_request_id"]

#: bumped in a child process after ``os.fork()``, so that it draws its own request ids
_FORKS = [0]
os.register_at_fork(after_in_child=lambda: _FORKS.__setitem__(0, _FORKS[0] + 1))
_RID_BATCH = 512
_RID = b"x-request-id"
_RID_ONLY = {_RID: b""}


def request_ids() -> Iterator[str]:
    """Unpredictable request ids (96 bits, hex), drawn from the OS 512 at a time.

    One ``os.urandom`` call per batch keeps the per-request cost to a slice. A
    forked child (a pre-forking server) discards the batch it inherited, so two
    workers never hand out the same ids. Ids never count requests: a counter
    would leak the client's volume.
    """
    while True:
        forks = _FORKS[0]
        pool = os.urandom(12 * _RID_BATCH).hex()
        for start in range(0, 24 * _RID_BATCH, 24):
            if _FORKS[0] != forks:
                break
            yield pool[start : start + 24]


def draw_request_id(draw: Callable[[], str]) -> str:
    """The next id from ``draw`` (a :func:`request_ids` generator's ``__next__``).

    A generator runs in one thread at a time: when another thread is inside
    it, one id is drawn from the OS alone.
    """
    try:
        return draw()
    except ValueError:  # the generator is busy in another thread
        return os.urandom(12).hex()


def with_request_id(
    send: Send,
    request_id: str,
    statuses: list[int] | None = None,
    extra: Sequence[tuple[bytes, bytes]] = (),
) -> Send:
    """``send``, with the guard's request id on the answer (the app's own gives way).

    ``extra`` headers (a verdict's rate-limit fields, encoded) go on the answer
    too, each replacing any of the app's under the same name. The app's status is
    appended to ``statuses`` as its answer starts
    (:meth:`GuardMetrics.upstream_statuses <guard.metrics.GuardMetrics.upstream_statuses>`).
    A plain function handing back ``send``'s own awaitable: ``await send(message)``
    costs the app no coroutine of the guard's per message.
    """
    added = [(_RID, request_id.encode()), *extra]
    # the names the guard sets (a dict: built in C, and as quick to ask as a set)
    own = dict(added) if extra else _RID_ONLY

    def wrapped(message: Any) -> Awaitable[None]:
        if message["type"] == "http.response.start":
            if statuses is not None:
                statuses.append(message.get("status", 0))
            headers = list(message.get("headers", ()))
            for name, _ in headers:
                if name in own:  # the app's own id (or rate fields) give way to the guard's
                    headers = [h for h in headers if h[0] not in own]
                    break
            headers.extend(added)
            message["headers"] = headers
        return send(message)

    return wrapped
