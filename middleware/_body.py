"""Reading a request body with a running cap and a deadline, and replaying it to the app.

:class:`BodyReader` is the one place ``limits.max_body_bytes`` is enforced on the
way in: on the declared ``Content-Length`` before a byte is read, and as a
running count while reading. It is the engine's :class:`~guard.engine.BodySource`
and the fast lane's reader alike.

The deadline covers the whole body, not each message: a client trickling one
byte a second would otherwise hold a connection (and its buffered bytes) for
as long as it liked. Past it the guard answers 408 and never calls the app.
It bounds what the guard waits for; holding idle connections and slow headers
in check is the server's or the front proxy's job (see the README's security
model).
"""

from __future__ import annotations

import asyncio
import types
import weakref
from collections.abc import Awaitable, Coroutine, Generator
from types import CoroutineType
from typing import Any, NamedTuple, TypeVar

from inference_guard.guard.errors import ClientDisconnected, PayloadError
from inference_guard.middleware.types import Message, Receive

__all__ = ["BodyReader", "body_timeout", "check_length", "receive_within", "within"]

T = TypeVar("T")


def body_timeout(timeout: float) -> PayloadError:
    """The refusal of a body that did not arrive within ``timeout`` seconds (408)."""
    return PayloadError(
        408, "body_timeout", f"the request body did not arrive within {timeout:g} s"
    )


class _Watchdog:
    """One timer per event loop for every body being read.

    ``asyncio.timeout`` arms and cancels a timer per request, which costs more
    than the whole lean lane's parsing; here a read registers its task and
    deadline in a dict, and one timer sweeps it every :data:`_SWEEP_S` seconds
    at most, cancelling the reads past their deadline (so a deadline may be
    overshot by up to one sweep period).
    """

    __slots__ = ("expired", "handle", "loop", "reads")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.reads: dict[asyncio.Task[Any], float] = {}
        self.expired: set[asyncio.Task[Any]] = set()
        self.handle: asyncio.TimerHandle | None = None

    def watch(self, task: asyncio.Task[Any], timeout: float) -> None:
        deadline = self.loop.time() + timeout
        self.reads[task] = deadline
        handle = self.handle
        if handle is None or deadline < handle.when():
            if handle is not None:
                handle.cancel()
            self.handle = self.loop.call_at(deadline, self._sweep)

    def _sweep(self) -> None:
        self.handle = None
        now = self.loop.time()
        soonest = None
        for task, deadline in list(self.reads.items()):
            if deadline <= now:
                del self.reads[task]
                self.expired.add(task)
                task.cancel()
            elif soonest is None or deadline < soonest:
                soonest = deadline
        if soonest is not None:
            # coarse on purpose: one sweep per period however many reads are due in it
            self.handle = self.loop.call_at(max(soonest, now + _SWEEP_S), self._sweep)


#: the longest a deadline is overshot (and the shortest time between two sweeps)
_SWEEP_S = 0.05
_WATCHDOGS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Watchdog] = (
    weakref.WeakKeyDictionary()
)


def _watchdog() -> tuple[asyncio.Task[Any], _Watchdog]:
    """The running task and its event loop's watchdog (the last loop's is remembered)."""
    task = asyncio.current_task()
    if task is None:  # pragma: no cover - always inside a task under an ASGI server
        raise RuntimeError("a body deadline needs a running task")
    loop = task.get_loop()
    last = _LAST_DOG[0]
    if last is not None and last.loop is loop:
        return task, last
    dog = _WATCHDOGS.get(loop)
    if dog is None:
        dog = _WATCHDOGS[loop] = _Watchdog(loop)
    _LAST_DOG[0] = dog
    return task, dog


#: the watchdog of the loop last asked for (one loop per process, as a rule)
_LAST_DOG: list[_Watchdog | None] = [None]


async def within(work: Awaitable[T], timeout: float, *, shown: float | None = None) -> T:
    """``await work``, or :func:`body_timeout` raised once ``timeout`` seconds have passed.

    ``shown``: the timeout the refusal names, when ``timeout`` is what was left of it.
    """
    task, dog = _watchdog()
    dog.watch(task, timeout)
    try:
        return await work
    except asyncio.CancelledError:
        if task not in dog.expired:
            raise  # someone else's cancellation
        task.uncancel()
        raise body_timeout(timeout if shown is None else shown) from None
    finally:
        dog.reads.pop(task, None)
        dog.expired.discard(task)


@types.coroutine
def _rest_of(step: Coroutine[Any, Any, T], pending: Any) -> Generator[Any, Any, T]:
    """Await what is left of the coroutine ``step``, stepped once by hand to ``pending``.

    What ``await`` does with a coroutine (PEP 380's ``yield from``), from its
    second step on: what it yields goes to the task, what the task sends or
    throws goes back to it, and its return value is the result.
    """
    while True:
        try:
            sent = yield pending
        except GeneratorExit:
            step.close()
            raise
        except BaseException as exc:  # a cancellation: thrown into the coroutine
            try:
                pending = step.throw(exc)
            except StopIteration as done:
                return done.value  # type: ignore[no-any-return]
        else:
            try:
                pending = step.send(sent)
            except StopIteration as done:
                return done.value  # type: ignore[no-any-return]


async def receive_within(receive: Receive, timeout: float | None) -> Message:
    """``await receive()``, or :func:`body_timeout` raised once ``timeout`` seconds pass."""
    if timeout is None:
        return await receive()
    return await within(receive(), timeout)


def check_length(length: bytes | None, limit: int) -> None:
    """Refuse a declared body size over the cap before reading a byte of it."""
    if length is None:
        return
    if not length.isdigit():
        raise PayloadError(400, "bad_header", "malformed content-length")
    if len(length) > 19 or int(length) > limit:
        raise PayloadError(413, "body_too_large", f"request body exceeds {limit} bytes")


class BodyReader:
    """Reads ``http.request`` messages up to ``limit`` bytes; remembers what it consumed.

    The whole body must arrive within ``timeout`` seconds (``None``: no
    deadline), or :meth:`read` raises a 408 ``body_timeout``. A reader reads
    once: a second :meth:`read` gives the same body, or raises the same error,
    so that whoever reads after the fast lane meets what the lane met. Whatever
    happens (a 413, a guard failure half-way), :meth:`replay` gives the app a
    ``receive`` that first yields exactly what was consumed and then continues
    with the real stream, so a request is never lost.

    :meth:`read_now` is the fast lane's way in: the usual small body, there
    already in one message, read with no coroutine of the reader's own;
    anything else is left for :meth:`read` to go on with.
    """

    __slots__ = (
        "_chunks",
        "_deadline",
        "_error",
        "_message",
        "_next",
        "_receive",
        "_started",
        "complete",
        "limit",
        "timeout",
    )

    def __init__(self, receive: Receive, limit: int, timeout: float | None = None) -> None:
        self._receive = receive
        self.limit = limit
        self.timeout = timeout
        self._chunks: list[bytes] = []
        self._error: Exception | None = None
        self._started = False
        self._deadline: float | None = None
        #: what read_now took and left to read: a message, or a receive to await
        self._next: _Taken | None = None
        #: the one message read_now read the body from, replayed as it came
        self._message: Message | None = None
        self.complete = False

    def read_now(self, declared: bytes | None = None) -> bytes | None:
        """The whole body when it came in one message that is there already, else ``None``.

        ``None`` refuses nothing and loses nothing: whatever this took (a
        message, a receive still waiting, a failure) :meth:`read` goes on with,
        its declared length checked there, so a ``None`` is followed by :meth:`read`.
        Only on a reader nothing has read yet.
        """
        if self._started or (
            declared is not None
            and not (declared.isdigit() and len(declared) <= 19 and int(declared) <= self.limit)
        ):
            return None
        self._started = True
        try:
            step = self._receive()
            if type(step) is not CoroutineType:
                self._next = _Taken(None, step, None)
                return None
            try:
                pending = step.send(None)
            except StopIteration as done:
                message = done.value
            else:
                self._next = _Taken(None, step, pending)
                return None
        except Exception as exc:  # read raises it
            self._error = exc
            return None
        if (
            type(message) is dict
            and message.get("type") == "http.request"
            and not message.get("more_body", False)
            and type(body := message.get("body", b"")) is bytes
            and len(body) <= self.limit
        ):
            if body:
                self._chunks.append(body)
            self._message = message
            self.complete = True
            return body
        self._next = _Taken(message, None, None)
        return None

    async def read(self, declared: bytes | None = None) -> bytes:
        """The whole body, its declared length (``Content-Length``) checked first.

        Raises :class:`PayloadError` (400 malformed length, 413, 408) or
        :class:`ClientDisconnected`, and again on a second call.
        """
        if self.complete:
            return self._chunks[0] if self._chunks else b""
        if self._error is not None:
            raise self._error
        limit = self.limit
        try:
            if declared is not None and not (
                declared.isdigit() and len(declared) <= 19 and int(declared) <= limit
            ):
                check_length(declared, limit)  # raises: 400 or 413
            self._started = True
            receive, chunks, size = self._receive, self._chunks, 0
            taken, self._next = self._next, None
            while True:
                if taken is not None:  # what read_now took
                    message, waiting, pending = taken
                    taken = None
                    if waiting is not None:
                        message = await self._wait(
                            waiting if pending is None else _rest_of(waiting, pending)
                        )
                else:
                    # Step receive() once by hand: a message that is there already (the
                    # usual case: a small body comes with the headers) costs no deadline.
                    # Only a receive that has to wait is awaited under it.
                    step = receive()
                    if type(step) is CoroutineType:
                        try:
                            pending = step.send(None)
                        except StopIteration as done:
                            message = done.value
                        else:
                            message = await self._wait(_rest_of(step, pending))
                    else:  # another awaitable (ASGI allows any): awaited under the deadline
                        message = await self._wait(step)
                mtype = message["type"]
                if mtype == "http.disconnect":
                    raise ClientDisconnected()
                if mtype != "http.request":
                    continue
                chunk = message.get("body", b"")
                if chunk:
                    size += len(chunk)
                    chunks.append(chunk)
                    if size > limit:
                        raise PayloadError(
                            413, "body_too_large", f"request body exceeds {limit} bytes"
                        )
                if not message.get("more_body", False):
                    break
        except Exception as exc:
            self._error = exc
            raise
        self.complete = True
        if len(chunks) > 1:
            self._chunks = [b"".join(chunks)]
        return self._chunks[0] if self._chunks else b""

    async def _wait(self, message: Awaitable[Message]) -> Message:
        """A message the client has yet to send, awaited until the body's deadline.

        The deadline is set when the first message has to be waited for: until
        then the client kept no one waiting.
        """
        timeout = self.timeout
        if timeout is None:
            return await message
        now = asyncio.get_running_loop().time()
        if self._deadline is None:
            self._deadline = now + timeout
        left = self._deadline - now
        if left <= 0:
            if isinstance(message, Coroutine):
                message.close()
            raise body_timeout(timeout)
        return await within(message, left, shown=timeout)

    def for_app(self) -> Receive:
        """The ``receive`` to hand the app: :meth:`replay` once anything was read."""
        return self.replay() if self._started else self._receive

    def replay(self) -> Receive:
        """A ``receive`` for the app: the consumed bytes first, then the live stream.

        A body :meth:`read_now` took from one message is replayed as that message.
        """
        chunks = self._chunks
        first = self._message
        if first is None:
            first = {
                "type": "http.request",
                "body": chunks[0] if len(chunks) == 1 else b"".join(chunks),
                "more_body": not self.complete,
            }
        upstream = self._receive

        async def receive() -> Message:
            nonlocal first
            if first is not None:
                message, first = first, None
                return message
            return await upstream()

        return receive


class _Taken(NamedTuple):
    """What :meth:`BodyReader.read_now` took and did not read."""

    #: a message received and not read (``None``: none)
    message: Any
    #: a receive still to await: an awaitable, or a coroutine stepped once
    waiting: Any
    #: what the stepped coroutine yielded (``None``: not stepped)
    pending: Any
