"""The body reader: a running cap, and a deadline for the whole body (408, app never called)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from inference_guard.guard.config import GuardConfig
from inference_guard.guard.errors import ClientDisconnected, PayloadError
from inference_guard.middleware._body import BodyReader, receive_within
from inference_guard.middleware.asgi import GuardMiddleware
from inference_guard.middleware.types import Message
from tests.conftest import sample
from tests.error_bodies import error_message
from tests.middleware.test_fuzz import JSON_CT, V1, V2, Echo, Result

PLAIN_V1 = b'{"instances": [[1, 2, 3]]}'


def stalling(*chunks: bytes) -> Any:
    """A ``receive`` that gives ``chunks`` (more to come after each), then never answers."""
    queue = list(chunks)

    async def receive() -> Message:
        if queue:
            return {"type": "http.request", "body": queue.pop(0), "more_body": True}
        await asyncio.Event().wait()  # the client sends nothing more, and stays
        raise AssertionError("unreachable")

    return receive


def test_reader_refuses_a_stalled_body_with_408() -> None:
    reader = BodyReader(stalling(b'{"instances": '), limit=1000, timeout=0.05)
    with pytest.raises(PayloadError) as err:
        asyncio.run(reader.read())
    assert (err.value.status, err.value.reason) == (408, "body_timeout")
    assert not reader.complete


def test_receive_within_refuses_a_first_message_that_never_comes() -> None:
    with pytest.raises(PayloadError) as err:
        asyncio.run(receive_within(stalling(), 0.05))
    assert err.value.reason == "body_timeout"


def test_an_expired_read_leaves_the_others_alone() -> None:
    """One watchdog serves every read on the loop: it cuts only the reads past their deadline."""

    async def main() -> tuple[object, bytes]:
        arrived = asyncio.Event()

        async def slow_but_in_time() -> Message:
            await arrived.wait()
            return {"type": "http.request", "body": b"[1]", "more_body": False}

        stalled = asyncio.ensure_future(BodyReader(stalling(), 100, timeout=0.05).read())
        patient = asyncio.ensure_future(BodyReader(slow_but_in_time, 100, timeout=60).read())
        outcome = await asyncio.gather(stalled, return_exceptions=True)
        arrived.set()  # the stalled read is cut by now; this one's body comes in time
        return outcome[0], await patient

    cut, body = asyncio.run(main())
    assert isinstance(cut, PayloadError) and cut.status == 408
    assert body == b"[1]"


def test_someone_elses_cancellation_is_not_a_timeout() -> None:
    async def main() -> None:
        read = asyncio.ensure_future(BodyReader(stalling(), 100, timeout=60).read())
        await asyncio.sleep(0)
        read.cancel()
        await read

    with pytest.raises(asyncio.CancelledError):
        asyncio.run(main())


def test_reader_without_a_deadline_reads_the_whole_body() -> None:
    chunks = [b"[1,", b"2]"]

    async def receive() -> Message:
        body = chunks.pop(0)
        return {"type": "http.request", "body": body, "more_body": bool(chunks)}

    assert asyncio.run(BodyReader(receive, limit=100).read()) == b"[1,2]"


def test_a_message_that_waits_is_read_whole_after_suspending() -> None:
    """receive() is stepped once by hand; one that has to wait is resumed under the deadline,
    its value, and what the task sends and throws into it, passed through."""
    chunks = [b"[1,", b"2,", b"3]"]

    async def receive() -> Message:
        await asyncio.sleep(0)  # a bare yield: the task reschedules it
        await asyncio.sleep(0.01)  # a future: the task waits for it
        body = chunks.pop(0)
        return {"type": "http.request", "body": body, "more_body": bool(chunks)}

    assert asyncio.run(BodyReader(receive, limit=100, timeout=5).read()) == b"[1,2,3]"


def test_a_trickled_body_is_cut_at_the_deadline_of_the_whole_body() -> None:
    """Each message comes in time, the whole body does not: 408 once the deadline passes."""
    sent = []

    async def receive() -> Message:
        await asyncio.sleep(0.03)
        sent.append(1)
        return {"type": "http.request", "body": b" ", "more_body": True}

    reader = BodyReader(receive, limit=10_000, timeout=0.2)
    with pytest.raises(PayloadError) as err:
        asyncio.run(reader.read())
    assert err.value.reason == "body_timeout" and "0.2 s" in err.value.message
    assert 3 <= len(sent) <= 9  # cut near the deadline, not per message


@pytest.mark.parametrize("resolves", [True, False])
def test_a_receive_returning_another_awaitable_is_read_under_the_deadline(
    resolves: bool,
) -> None:
    """ASGI allows a receive returning any awaitable (here a Future), not only a coroutine."""

    async def main() -> bytes:
        loop = asyncio.get_running_loop()

        def receive() -> asyncio.Future[Message]:
            future: asyncio.Future[Message] = loop.create_future()
            if resolves:
                loop.call_later(0.01, future.set_result, {"type": "http.request", "body": b"[7]"})
            return future

        return await BodyReader(receive, limit=100, timeout=0.1).read()  # type: ignore[arg-type]

    if resolves:
        assert asyncio.run(main()) == b"[7]"
    else:
        with pytest.raises(PayloadError) as err:
            asyncio.run(main())
        assert err.value.status == 408


def test_a_failing_receive_is_the_readers_error_again() -> None:
    async def receive() -> Message:
        raise OSError("connection reset")

    async def main() -> None:
        reader = BodyReader(receive, limit=100, timeout=1)
        with pytest.raises(OSError):
            await reader.read()
        with pytest.raises(OSError):  # a second read meets the same error
            await reader.read()

    asyncio.run(main())


def messages(*sent: Message, wait: bool = False) -> Any:
    """A ``receive`` giving ``sent`` in turn, each after a suspension when ``wait``."""
    queue = list(sent)

    async def receive() -> Message:
        if wait:
            await asyncio.sleep(0.005)
        return queue.pop(0)

    return receive


async def _replayed(reader: BodyReader) -> list[Message]:
    """What the app gets from ``reader.for_app()`` until the body ends."""
    receive, got = reader.for_app(), []
    while True:
        got.append(await receive())
        if not got[-1].get("more_body"):
            return got


def test_read_now_takes_a_body_there_already_and_replays_it() -> None:
    async def main() -> None:
        sent = {"type": "http.request", "body": b"[1]"}
        reader = BodyReader(messages(sent), 100, 1)
        assert reader.read_now(b"3") == b"[1]" and reader.complete
        assert await reader.read() == b"[1]"  # a second read: the same body
        (replayed,) = await _replayed(reader)
        assert replayed is sent  # as it came

    asyncio.run(main())


@pytest.mark.parametrize(
    ("sent", "wait", "expected"),
    [
        # more to come: read() goes on from the first chunk
        (({"type": "http.request", "body": b"[1,", "more_body": True},
          {"type": "http.request", "body": b"2]"}), False, b"[1,2]"),
        # a receive that has to wait: read() awaits it under the deadline
        (({"type": "http.request", "body": b"[3]"},), True, b"[3]"),
        # another message first (ASGI lets a server send others): skipped by read()
        (({"type": "http.other"}, {"type": "http.request", "body": b"[4]"}), False, b"[4]"),
    ],
)  # fmt: skip
def test_read_now_leaves_what_it_took_to_read(
    sent: tuple[Message, ...], wait: bool, expected: bytes
) -> None:
    async def main() -> None:
        reader = BodyReader(messages(*sent, wait=wait), 100, 1)
        assert reader.read_now() is None
        assert await reader.read() == expected
        assert b"".join(m["body"] for m in await _replayed(reader)) == expected

    asyncio.run(main())


@pytest.mark.parametrize(
    ("sent", "declared", "error"),
    [
        ({"type": "http.disconnect"}, None, ClientDisconnected),
        ({"type": "http.request", "body": b"x" * 101}, None, PayloadError),  # 413
        ({"type": "http.request", "body": b"[1]"}, b"1x", PayloadError),  # 400: never read
        ({"type": "http.request", "body": b"[1]"}, b"101", PayloadError),  # 413: never read
    ],
)
def test_read_now_leaves_a_refusal_to_read(
    sent: Message, declared: bytes | None, error: type[Exception]
) -> None:
    async def main() -> None:
        reader = BodyReader(messages(sent), 100, 1)
        assert reader.read_now(declared) is None
        with pytest.raises(error):
            await reader.read(declared)
        with pytest.raises(error):  # again
            await reader.read(declared)

    asyncio.run(main())


def test_read_now_leaves_a_failing_receive_to_read() -> None:
    def receive() -> Any:
        raise OSError("connection reset")

    async def main() -> None:
        reader = BodyReader(receive, limit=100, timeout=1)
        assert reader.read_now() is None
        with pytest.raises(OSError):
            await reader.read()

    asyncio.run(main())


def test_read_now_leaves_another_awaitable_to_read() -> None:
    async def main() -> bytes:
        loop = asyncio.get_running_loop()

        def receive() -> asyncio.Future[Message]:
            future: asyncio.Future[Message] = loop.create_future()
            loop.call_later(0.01, future.set_result, {"type": "http.request", "body": b"[7]"})
            return future

        reader = BodyReader(receive, limit=100, timeout=1)  # type: ignore[arg-type]
        assert reader.read_now() is None
        return await reader.read()

    assert asyncio.run(main()) == b"[7]"


def test_body_timeout_is_configured_and_validated() -> None:
    assert GuardConfig.load(None).limits.body_timeout_s == 5.0
    assert GuardConfig.load({"limits": {"body_timeout_s": 0.5}}).limits.body_timeout_s == 0.5
    for bad in (0, -1, "5", float("inf")):
        with pytest.raises(ValueError, match=r"limits\.body_timeout_s"):
            GuardConfig.load({"limits": {"body_timeout_s": bad}})


#: validation only: plain requests take the lean lane
LEAN: dict[str, Any] = {
    "audit": {"enabled": False},
    "limits": {"body_timeout_s": 0.05},
    "policies": [{"name": "inference", "degrade": {"always": False}}],
}
#: a policy with a detector: the full path reads the body
FULL: dict[str, Any] = {
    "audit": {"enabled": False},
    "limits": {"body_timeout_s": 0.05},
    "policies": [
        {
            "name": "inference",
            "degrade": {"always": False},
            "detectors": [
                {"type": "rate", "params": {"limits": [{"rate": 1000, "per": "1m", "burst": 100}]}}
            ],
        }
    ],
}


async def drive(mw: GuardMiddleware, path: str, receive: Any, headers: list[Any]) -> Result:
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": "POST",
        "path": path,
        "headers": headers,
        "client": ("127.0.0.1", 5000),
    }
    await mw(scope, receive, send)
    return Result(sent, 0)


@pytest.mark.parametrize("config", [LEAN, FULL], ids=["lean_lane", "full_path"])
@pytest.mark.parametrize(
    ("path", "chunks"),
    [(V1, ()), (V1, (b'{"instances": ',)), (V2, (b"{", b'"inputs"'))],
    ids=["nothing", "half", "trickle"],
)
def test_stalled_body_gets_408_and_the_app_is_never_called(
    config: dict[str, Any], path: str, chunks: tuple[bytes, ...]
) -> None:
    echo = Echo()
    mw = GuardMiddleware(echo, config=config, registry=CollectorRegistry())
    assert (mw._front.lean_policies == {"inference"}) is (config is LEAN)
    headers = [JSON_CT, (b"content-length", b"100")]
    res = asyncio.run(drive(mw, path, stalling(*chunks), headers))
    assert res.status == 408
    assert res.header(b"connection") == [b"close"]
    assert "did not arrive" in error_message(res.body, path)
    assert echo.calls == 0
    reg = mw.registry
    assert (
        sample(reg, "guard_invalid_requests_total", policy="inference", reason="body_timeout") == 1
    )
    assert sample(reg, "guard_requests_total", policy="inference", decision="invalid") == 1
    # a body that arrives in time is untouched by the deadline
    done = [PLAIN_V1]

    async def whole() -> Message:
        return {"type": "http.request", "body": done.pop(), "more_body": False}

    assert asyncio.run(drive(mw, V1, whole, [JSON_CT])).status == 200
    assert echo.calls == 1
