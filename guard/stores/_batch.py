"""Automatic pipelining of Redis commands for :class:`~guard.stores.redis.RedisStore`.

Every command submitted during one turn of the event loop is queued; at the end
of the turn the queue goes to Redis as one pipeline (no ``MULTI``) on one
connection, one write and one round trip, and each caller's future receives
its own reply. While every connection (*lane*) is busy, commands keep
queueing and leave in the next batch, so batches grow with the load and the
Python cost per command falls. Each command is still executed on its own by
Redis; a Lua script stays atomic, so nothing about exactness changes.

Errors stay per command where Redis reports them per command: a script error
fails only the caller whose script failed. A connection error, a timeout or a
closed store fails every command of the batch still waiting for its reply,
and the connection is dropped (the next batch reconnects). Replies are never
matched to the wrong caller: a connection is used by one batch at a time and
is discarded on any failure that could leave replies unread.

Time: every command must be answered within ``timeout`` seconds of being
submitted, queueing included: one timer per loop turn fails whatever of that
turn is still unanswered (with :class:`TimeoutError`); a command that timed
out (or whose caller was cancelled) while queued is never sent. A batch not
answered within ``timeout`` seconds of being sent drops its connection (a
late reply to a caller that gave up is read and discarded, so a queue that is
merely slow does not cost the connections).

Scripts are sent as ``EVALSHA``; when Redis answers ``NOSCRIPT`` (restarted,
``SCRIPT FLUSH``), the batch loads the missing scripts and resends those
commands on the same connection, once.

The pipeline is bound to the running event loop it is first used on; used from
another loop (a new one after the first was closed), it starts afresh.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError

__all__ = ["AutoPipeline", "Script"]

#: one command: its arguments (``bytes``, ``str``, ``int`` or ``float`` each)
Command = tuple[Any, ...]


def _encode(arg: Any) -> bytes:
    if isinstance(arg, bytes):
        return arg
    if isinstance(arg, str):
        return arg.encode("utf-8")
    if isinstance(arg, int) and not isinstance(arg, bool):
        return b"%d" % arg
    if isinstance(arg, float):
        return repr(arg).encode("ascii")
    raise TypeError(f"cannot send a {type(arg).__name__} to Redis")


def pack(commands: Iterable[Command]) -> bytes:
    """``commands`` in the Redis protocol (RESP), ready to write."""
    out: list[bytes] = []
    for command in commands:
        out.append(b"*%d\r\n" % len(command))
        for arg in command:
            data = _encode(arg)
            out.append(b"$%d\r\n%b\r\n" % (len(data), data))
    return b"".join(out)


class Script:
    """A Lua script run by ``EVALSHA``; its text is loaded again if Redis forgot it."""

    __slots__ = ("sha", "text")

    def __init__(self, text: str) -> None:
        self.text = text.encode("utf-8")
        # the name Redis itself gives the script, not a security measure
        self.sha = hashlib.sha1(self.text, usedforsecurity=False).hexdigest().encode("ascii")


class _Op:
    __slots__ = ("command", "future", "script")

    def __init__(
        self, command: Command, future: asyncio.Future[Any], script: Script | None
    ) -> None:
        self.command = command
        self.future = future
        self.script = script


class _Lane:
    """One connection carrying batches, one after the other, while there is work."""

    __slots__ = ("batch", "conn", "task")

    def __init__(self, conn: AbstractConnection, batch: list[_Op]) -> None:
        self.conn = conn
        #: the batch in flight
        self.batch = batch
        self.task: asyncio.Task[None] | None = None


def _resolve(op: _Op, reply: Any) -> None:
    if not op.future.done():
        op.future.set_result(reply)


def _fail(op: _Op, exc: BaseException) -> None:
    if not op.future.done():
        op.future.set_exception(exc)


def _expire(group: list[_Op]) -> None:
    for op in group:
        if not op.future.done():
            op.future.set_exception(TimeoutError())


def _failure(exc: BaseException) -> BaseException:
    """A fresh exception per caller (one instance raised in many tasks grows its traceback)."""
    if isinstance(exc, TimeoutError):
        return TimeoutError()
    err = RedisConnectionError(str(exc) or type(exc).__name__)
    err.__cause__ = exc
    return err


class AutoPipeline:
    """Queue commands and send each loop turn's worth in one round trip.

    ``connect`` makes a new (unconnected) redis-py connection; at most
    ``lanes`` of them carry batches at once, each batch at most ``max_batch``
    commands.
    """

    def __init__(
        self,
        connect: Callable[[], AbstractConnection],
        *,
        timeout: float,
        lanes: int = 4,
        max_batch: int = 128,
    ) -> None:
        if lanes < 1:
            raise ValueError("lanes must be >= 1")
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self.timeout = timeout
        self.lanes = lanes
        self.max_batch = max_batch
        self._connect = connect
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: deque[_Op] = deque()
        #: commands submitted in this loop turn (``None``: none yet)
        self._group: list[_Op] | None = None
        #: connections waiting for work
        self._idle: list[AbstractConnection] = []
        #: lanes at work
        self._lanes: set[_Lane] = set()
        #: batches sent (a metric for tests and benchmarks)
        self.batches = 0
        #: commands sent
        self.commands = 0
        #: the most commands sent in one batch
        self.largest_batch = 0

    # -- submitting

    def submit(self, command: Command, script: Script | None = None) -> asyncio.Future[Any]:
        """Queue ``command``; the future gets its reply or its exception."""
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self._rebind(loop)
        future: asyncio.Future[Any] = loop.create_future()
        group = self._group
        if group is None:
            group = self._group = []
            loop.call_later(self.timeout, _expire, group)
            loop.call_soon(self._flush)
        op = _Op(command, future, script)
        group.append(op)
        self._queue.append(op)
        return future

    def _rebind(self, loop: asyncio.AbstractEventLoop) -> None:
        # whatever belonged to another loop cannot be awaited from this one: drop it
        self._loop = loop
        self._queue.clear()
        self._group = None
        self._idle = []
        self._lanes = set()

    def _flush(self) -> None:
        self._group = None
        self._dispatch()

    def _take(self) -> list[_Op]:
        queue = self._queue
        batch: list[_Op] = []
        while queue and len(batch) < self.max_batch:
            op = queue.popleft()
            if not op.future.done():  # not timed out or cancelled while queued
                batch.append(op)
        return batch

    def _dispatch(self) -> None:
        assert self._loop is not None
        while self._queue and len(self._lanes) < self.lanes:
            batch = self._take()
            if not batch:
                return
            lane = _Lane(self._idle.pop() if self._idle else self._connect(), batch)
            self._lanes.add(lane)
            lane.task = self._loop.create_task(self._run(lane))

    # -- sending

    async def _run(self, lane: _Lane) -> None:
        # until the queue is empty: what queued during a round trip is the next batch
        lanes = self._lanes
        try:
            while lane.batch:
                await self._send(lane.conn, lane.batch)
                lane.batch = self._take()
        finally:
            lanes.discard(lane)
        if lanes is self._lanes:  # not rebound to another loop meanwhile
            self._idle.append(lane.conn)

    async def _send(self, conn: AbstractConnection, batch: list[_Op]) -> None:
        self.batches += 1
        self.commands += len(batch)
        if len(batch) > self.largest_batch:
            self.largest_batch = len(batch)
        try:
            # the callers' own deadlines are kept by their turn's timer; this one
            # only tells a hung connection from a slow queue
            async with asyncio.timeout(self.timeout):
                if not conn.is_connected:
                    connect: Callable[[], Awaitable[None]] = conn.connect  # untyped in redis-py
                    await connect()
                await conn.send_packed_command(
                    pack([op.command for op in batch]), check_health=False
                )
                retry = await self._read(conn, batch, reload=True)
                if retry:
                    await self._reload(conn, retry)
        except asyncio.CancelledError:
            closed = RedisConnectionError("the store was closed")
            for op in batch:
                _fail(op, _failure(closed))
            await self._drop(conn)
            raise
        except Exception as exc:  # TimeoutError, RedisError, OSError: the connection is suspect
            for op in batch:
                _fail(op, _failure(exc))
            await self._drop(conn)

    @staticmethod
    async def _read(conn: AbstractConnection, batch: list[_Op], *, reload: bool) -> list[_Op]:
        """Read one reply per command, in order; the commands to resend after a reload."""
        retry: list[_Op] = []
        for op in batch:
            try:
                reply = await conn.read_response()
            except NoScriptError as exc:
                if reload and op.script is not None:
                    retry.append(op)
                else:
                    _fail(op, exc)
                continue
            except ResponseError as exc:  # this command's own error: only its caller fails
                _fail(op, exc)
                continue
            _resolve(op, reply)
        return retry

    async def _reload(self, conn: AbstractConnection, retry: list[_Op]) -> None:
        scripts: dict[bytes, Script] = {}
        for op in retry:
            assert op.script is not None
            scripts.setdefault(op.script.sha, op.script)
        loads = [(b"SCRIPT", b"LOAD", s.text) for s in scripts.values()]
        await conn.send_packed_command(
            pack([*loads, *(op.command for op in retry)]), check_health=False
        )
        for _ in loads:
            with contextlib.suppress(ResponseError):  # the EVALSHA that follows reports it
                await conn.read_response()
        await self._read(conn, retry, reload=False)

    @staticmethod
    async def _drop(conn: AbstractConnection) -> None:
        with contextlib.suppress(Exception):  # closing a broken socket may fail too
            await conn.disconnect(nowait=True)

    # -- closing

    async def aclose(self) -> None:
        """Cancel the batches in flight (their callers get an error) and close every connection."""
        if self._loop is not asyncio.get_running_loop():
            self._rebind(asyncio.get_running_loop())
            return
        lanes, self._lanes = self._lanes, set()
        for lane in lanes:
            assert lane.task is not None
            lane.task.cancel()
        await asyncio.gather(*(lane.task for lane in lanes if lane.task), return_exceptions=True)
        closed = RedisConnectionError("the store was closed")
        for lane in lanes:  # a lane cancelled before it started did not clean up
            for op in lane.batch:
                _fail(op, _failure(closed))
            await self._drop(lane.conn)
        while self._queue:
            _fail(self._queue.popleft(), _failure(closed))
        idle, self._idle = self._idle, []
        for conn in idle:
            await self._drop(conn)
