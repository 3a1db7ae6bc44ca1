"""The lean lane: a policy without detectors accepting plain OIP v2 JSON in a few C calls.

The lane may only ever *accept*, and only what the full path accepts, with the
same counts; everything else must reach the full path and get its exact
verdict. These tests hold it to that by running the same hostile traffic
through two guards, one with the lane and one without, and comparing every
answer and every metric.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

import inference_guard.guard.admission as engine_module
import inference_guard.middleware.fast_lane as fast_lane_module
from inference_guard.guard.errors import PayloadError
from inference_guard.middleware._request_ids import request_ids as _request_ids
from inference_guard.middleware.asgi import GuardMiddleware
from tests.conftest import sample
from tests.error_bodies import error_message
from tests.middleware.test_fuzz import (
    JSON_CT,
    V1,
    V2,
    Echo,
    Result,
    drive,
    random_request,
    request,
    total,
    valid_requests,
)

#: validation only, answers untouched: the lane passes plain requests straight on
LEAN: dict[str, Any] = {
    "audit": {"enabled": False},
    "policies": [{"name": "inference", "degrade": {"always": False}}],
}
#: the defaults: validation, and every answer rounded (the lane hands it to the AnswerCapture)
DEFAULTS: dict[str, Any] = {"audit": {"enabled": False}}
CONFIGS = pytest.mark.parametrize("config", [LEAN, DEFAULTS], ids=["answers_untouched", "defaults"])

PLAIN = json.dumps(
    {"inputs": [{"name": "x", "shape": [2, 3], "datatype": "FP32", "data": [1, 2, 3, 4, 5.5, 6]}]}
).encode()
PLAIN_V1 = json.dumps({"instances": [[1, 2, 3], [4, 5.5, 6]]}).encode()


def lean_and_full(
    config: dict[str, Any] = LEAN,
) -> tuple[tuple[GuardMiddleware, Echo], tuple[GuardMiddleware, Echo]]:
    """The same config twice: with the lean lane, and with it switched off."""
    out = []
    for lane in (True, False):
        echo = Echo()
        mw = GuardMiddleware(echo, config=config, registry=CollectorRegistry())
        if not lane:
            mw._front = mw._front._replace(lean_policies=frozenset())
        out.append((mw, echo))
    assert out[0][0]._front.lean_policies == {"inference"}
    return out[0], out[1]


def answer(res: Result) -> tuple[Any, ...]:
    """Status, headers and body, with the (random) request id taken out."""
    if not res.messages:
        return ("nothing sent",)
    rid = res.header(b"x-request-id")
    assert len(rid) == 1
    body = res.body.replace(rid[0], b"<rid>")
    headers = sorted((k, v) for k, v in res.messages[0].get("headers", ()) if k != b"x-request-id")
    return res.status, tuple(headers), body


METRICS = (
    ("guard_requests", ("decision",)),
    ("guard_rows", ("decision",)),
    ("guard_invalid_requests", ("reason",)),
    ("guard_payloads", ("format",)),
    ("guard_errors", ("component",)),
)


def counts(registry: CollectorRegistry) -> dict[tuple[str, ...], float]:
    out: dict[tuple[str, ...], float] = {}
    for family in registry.collect():
        for name, labels in METRICS:
            if family.name != name:
                continue
            for s in family.samples:
                if s.name.endswith("_total"):
                    out[(name, *(s.labels[k] for k in labels))] = s.value
        if family.name == "guard_overhead_seconds":
            for s in family.samples:
                if s.name.endswith("_count"):
                    out[("overhead_count",)] = s.value
    return out


@CONFIGS
@pytest.mark.parametrize("seed", [21, 22])
def test_lane_gives_the_full_paths_verdict_on_hostile_traffic(
    seed: int, config: dict[str, Any]
) -> None:
    (lean, lean_echo), (full, full_echo) = lean_and_full(config)
    r = random.Random(seed)
    plain_accepted = 0
    for i in range(700):
        method, path, headers, chunks = random_request(r)
        if r.random() < 0.3:  # more of the lane's own shapes, mutated or not
            path = r.choice([V2, V1])
            headers = [JSON_CT, *r.sample(headers, k=len(headers) // 2)]
        if path == "/metrics":
            continue  # its body holds each guard's own timings
        a = request(lean, path, chunks=chunks, headers=headers, method=method)
        b = request(full, path, chunks=chunks, headers=headers, method=method)
        context = f"request {i}: {method} {path} {headers!r:.200} {b''.join(chunks)!r:.200}"
        assert answer(a) == answer(b), context
        assert a.receives == b.receives, context
        plain_accepted += a.status == 200 and path in (V1, V2) and len(chunks) == 1
    assert lean_echo.bodies == full_echo.bodies
    assert counts(lean.registry) == counts(full.registry)
    # the comparison means something only if the lane took part
    assert plain_accepted > 20


@CONFIGS
def test_lane_accepts_valid_requests_of_every_shape_like_the_full_path(
    config: dict[str, Any],
) -> None:
    (lean, _), (full, _) = lean_and_full(config)
    r = random.Random(3)
    for _ in range(20):
        for path, doc in valid_requests(r):
            body = json.dumps(doc).encode()
            for headers in ([JSON_CT], [], [JSON_CT, (b"content-length", str(len(body)).encode())]):
                a = request(lean, path, body, headers=headers)
                b = request(full, path, body, headers=headers)
                assert answer(a) == answer(b), (path, headers)
    assert counts(lean.registry) == counts(full.registry)


def test_plain_request_skips_the_full_parser(monkeypatch: pytest.MonkeyPatch) -> None:
    """A plain request is decided without parse_request; anything else still uses it."""
    calls: list[str] = []

    def refuse(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs["path"])
        raise PayloadError(400, "bad_shape", "refused by the test")

    monkeypatch.setattr(engine_module, "parse_request", refuse)
    (lean, echo), _ = lean_and_full()
    assert request(lean, V2, PLAIN, headers=[JSON_CT]).status == 200
    assert request(lean, V1, PLAIN_V1, headers=[JSON_CT]).status == 200
    assert calls == [] and echo.bodies == [PLAIN, PLAIN_V1]
    # not plain: an extra top-level key the lane leaves to the full parser
    with_outputs = json.loads(PLAIN)
    with_outputs["outputs"] = [{"name": "label"}]
    res = request(lean, V2, json.dumps(with_outputs).encode(), headers=[JSON_CT])
    assert res.status == 400 and calls == [V2]
    flat = request(lean, V1, b'{"instances": [1, 2]}', headers=[JSON_CT])
    assert flat.status == 400 and calls == [V2, V1]


def test_a_failing_plain_reader_is_counted_and_the_full_path_decides(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A bug in a plain reader (bound once per route) loses no request."""

    def broken(body: bytes, limits: Any) -> int | None:
        raise RuntimeError("a reader bug")

    monkeypatch.setitem(fast_lane_module.READERS, "oip_v2", broken)
    (lean, echo), _ = lean_and_full()
    assert request(lean, V2, PLAIN, headers=[JSON_CT]).status == 200
    assert echo.bodies == [PLAIN]
    assert total(lean.registry, "guard_errors", component="parse") == 1


@pytest.mark.parametrize(
    ("path", "body", "fmt"), [(V2, PLAIN, "oip_v2"), (V1, PLAIN_V1, "kserve_v1")]
)
@CONFIGS
def test_lane_counts_what_the_full_path_counts(
    path: str, body: bytes, fmt: str, config: dict[str, Any]
) -> None:
    (lean, echo), (full, _) = lean_and_full(config)
    reg = lean.registry
    for _ in range(3):
        assert request(lean, path, body, headers=[JSON_CT]).status == 200
        assert request(full, path, body, headers=[JSON_CT]).status == 200
    assert sample(reg, "guard_requests_total", policy="inference", decision="allow") == 3
    assert sample(reg, "guard_rows_total", policy="inference", decision="allow") == 6
    assert sample(reg, "guard_payloads_total", policy="inference", format=fmt) == 3
    assert sample(reg, "guard_overhead_seconds_count", policy="inference") == 3
    assert echo.bodies == [body] * 3
    assert counts(reg) == counts(full.registry)


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ([JSON_CT, (b"x-api-key", b"")], 400),  # a malformed credential
        ([JSON_CT, (b"x-api-key", b"a"), (b"x-api-key", b"b")], 400),  # two credentials
        ([JSON_CT, (b"x-forwarded-for", b"10.0.0.1")], 400),  # from an untrusted peer
        ([JSON_CT, (b"content-length", b"9" * 30)], 413),  # declared past the cap
        ([JSON_CT, (b"content-length", b"12x")], 400),
        ([(b"content-type", b"text/plain")], 415),
        ([JSON_CT, JSON_CT], 415),  # repeated: joined by the full path, no longer JSON
        ([(b"content-type", b"application/json; charset=utf-8")], 200),
        ([JSON_CT, (b"x-api-key", b"k1")], 200),
    ],
)
@CONFIGS
def test_headers_the_lane_leaves_to_the_full_path(
    headers: list[tuple[bytes, bytes]], status: int, config: dict[str, Any]
) -> None:
    (lean, _), (full, _) = lean_and_full(config)
    a = request(lean, V2, PLAIN, headers=headers)
    b = request(full, V2, PLAIN, headers=headers)
    assert a.status == status
    assert answer(a) == answer(b)


def test_chunked_plain_body_is_replayed_whole() -> None:
    (lean, echo), _ = lean_and_full()
    res = request(lean, V2, headers=[JSON_CT], chunks=[PLAIN[:10], PLAIN[10:]])
    assert res.status == 200 and echo.bodies == [PLAIN]


def test_disconnect_before_the_body_sends_nothing() -> None:
    (lean, echo), _ = lean_and_full()

    async def receive() -> dict[str, Any]:
        return {"type": "http.disconnect"}

    sent: list[Any] = []

    async def send(message: Any) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": V2, "headers": [JSON_CT]}
    asyncio.run(lean(scope, receive, send))
    assert sent == [] and echo.calls == 0
    assert total(lean.registry, "guard_errors") == 0


def test_apps_own_request_id_gives_way_to_the_guards() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"x-request-id", b"app-made"), (b"content-length", b"0")],
            }
        )
        await send({"type": "http.response.body", "body": b""})

    mw = GuardMiddleware(app, config=LEAN, registry=CollectorRegistry())
    res = asyncio.run(drive(mw, V2, PLAIN, headers=[JSON_CT]))
    rid = res.header(b"x-request-id")
    assert len(rid) == 1 and rid[0] != b"app-made" and len(rid[0]) == 24
    assert res.header(b"content-length") == [b"0"]


def test_request_ids_are_unique_and_hex() -> None:
    ids = _request_ids()
    seen = [next(ids) for _ in range(2000)]  # across batches of 512
    assert len(set(seen)) == 2000
    assert all(len(i) == 24 and int(i, 16) >= 0 for i in seen)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_forked_worker_draws_its_own_request_ids() -> None:
    """A pre-forking server copies the parent's batch; the child must not reuse it."""
    ids = _request_ids()
    next(ids)  # a batch is drawn before the fork
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its next id
        try:
            os.write(write, next(ids).encode())
        finally:
            os._exit(0)
    os.close(write)
    child = os.read(read, 64).decode()
    os.close(read)
    os.waitpid(pid, 0)
    parent = next(ids)
    assert len(child) == 24 and child != parent


def _odd_receive(first: Any) -> Any:
    """A receive whose first call gives ``first`` (or raises it), then the plain body."""
    calls = 0

    async def receive() -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            if isinstance(first, BaseException):
                raise first
            return first
        return {"type": "http.request", "body": PLAIN, "more_body": False}

    return receive


@pytest.mark.parametrize(
    ("first", "headers", "internal"),
    [
        (OSError("connection reset"), [JSON_CT], 1),  # receive() itself fails
        (None, [JSON_CT], 1),  # not a message
        ({"type": "http.request", "body": None}, [JSON_CT], 0),  # read as empty: a 400
        ({"type": "http.request", "body": PLAIN}, [JSON_CT, (b"content-length", 5)], 1),
        ({"type": "http.request", "body": PLAIN}, [JSON_CT, (b"content-type",)], 1),
    ],
    ids=["receive-raises", "none-message", "none-body", "int-length", "one-item-header"],
)
@CONFIGS
def test_broken_server_input_gets_the_full_paths_failure_handling(
    first: Any, headers: list[Any], internal: int, config: dict[str, Any]
) -> None:
    """What a broken server hands over: the lane must fail exactly as the full path fails."""
    outcomes = []
    for mw, echo in lean_and_full(config):
        sent: list[Any] = []

        async def send(message: Any, sent: list[Any] = sent) -> None:
            sent.append(message)

        scope = {
            "type": "http",
            "method": "POST",
            "path": V2,
            "headers": list(headers),
            "client": ("127.0.0.1", 1),
        }
        asyncio.run(mw(scope, _odd_receive(first), send))
        outcomes.append(
            (
                [m.get("status") for m in sent if m["type"] == "http.response.start"],
                echo.calls,
                counts(mw.registry),
            )
        )
    assert outcomes[0] == outcomes[1]
    assert outcomes[0][2][("guard_errors", "internal")] == internal  # counted, never raised


@CONFIGS
def test_overhead_is_counted_alike_when_the_app_fails(config: dict[str, Any]) -> None:
    async def failing(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        raise RuntimeError("model crashed")

    seen = []
    for lane in (True, False):
        mw = GuardMiddleware(failing, config=config, registry=CollectorRegistry())
        if not lane:
            mw._front = mw._front._replace(lean_policies=frozenset())
        with pytest.raises(RuntimeError):
            asyncio.run(drive(mw, V2, PLAIN, headers=[JSON_CT]))
        seen.append({k: v for k, v in counts(mw.registry).items() if v})  # a 0 is no sample
    assert seen[0] == seen[1]
    # answers untouched: the guard's work was done before the app ran; rewriting: it was not
    assert seen[0].get(("overhead_count",), 0) == (1 if config is LEAN else 0)
    assert seen[0][("guard_requests", "allow")] == 1


def test_request_id_when_the_generator_is_busy_in_another_thread() -> None:
    """Two threads on one middleware: the loser draws its id straight from the OS."""
    (mw, _), _ = lean_and_full()

    def busy() -> str:
        raise ValueError("generator already executing")

    mw._request_id = busy
    res = request(mw, V2, PLAIN, headers=[JSON_CT])
    rid = res.header(b"x-request-id")
    assert res.status == 200 and len(rid) == 1 and len(rid[0]) == 24
    int(rid[0], 16)


@CONFIGS
@pytest.mark.parametrize(
    ("path", "body"),
    [
        (V1, b'{"instances": ' + b"[" * 1000 + b"]" * 1000 + b', "instances": [[1, 2]]}'),
        (
            V2,
            PLAIN.replace(b'{"inputs"', b'{"inputs": ' + b"[" * 1000 + b"]" * 1000 + b', "inputs"'),
        ),
    ],
    ids=["kserve_v1", "oip_v2"],
)
def test_duplicate_keys_cannot_hide_a_deep_value(
    path: str, body: bytes, config: dict[str, Any]
) -> None:
    """orjson keeps the last of two equal keys; the depth limit still counts the first."""
    for mw, echo in lean_and_full(config):
        res = request(mw, path, body, headers=[JSON_CT])
        assert res.status == 400 and error_message(res.body, path).startswith("JSON nesting")
        assert echo.calls == 0


@CONFIGS
@pytest.mark.parametrize("peer", [5, "127.0.0.1", ()], ids=["int", "str", "empty"])
def test_a_broken_servers_client_field_meets_the_full_paths_handling(
    peer: Any, config: dict[str, Any]
) -> None:
    outcomes = []
    for mw, echo in lean_and_full(config):
        res = asyncio.run(drive(mw, V2, PLAIN, headers=[JSON_CT], client=peer))
        outcomes.append((res.status, echo.calls, counts(mw.registry)))
    assert outcomes[0] == outcomes[1]
