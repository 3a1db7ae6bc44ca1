"""Hostile input against the whole middleware, driven through raw ASGI calls.

A guard in front of a public API sees bad input as the normal case. Whatever a client
sends (random bytes, hostile JSON, mutated protocol payloads, lying or duplicated
headers, bodies in odd chunks), the guard must answer a clear 4xx with the
documented error shape and count it, or pass the request on; never a 5xx of its
own, never an exception it swallows (``guard_errors_total`` stays 0), never a raw
secret in a log, and never unbounded per-client state.

Every test is seeded and drives ``GuardMiddleware`` with hand-built ``scope`` /
``receive`` / ``send`` so that the headers are exactly what the test says.
Tests marked ``xfail(strict=True)`` document bugs found in review: they pass once
the bug is fixed (and then fail as XPASS, so the marker gets removed).
"""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import math
import random
import re
import threading
import time
import warnings
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry
from starlette.middleware.gzip import GZipMiddleware

from benchmarks.hostile_corpus import V1, V2, dumps, random_request
from benchmarks.hostile_corpus import valid_requests as valid_requests  # for test_lean_lane
from inference_guard.detectors.base import Query
from inference_guard.guard.audit import AuditLog
from inference_guard.guard.config import AuditConfig
from inference_guard.guard.errors import ConfigurationError
from inference_guard.guard.stores.memory import MemoryStore
from inference_guard.middleware.asgi import GuardMiddleware
from inference_guard.middleware.demo import (
    DigitsModel,
    build_model_app,
    demo_config,
    train_digits_model,
)
from tests.error_bodies import error_message

Message = dict[str, Any]
ASGI = Callable[..., Awaitable[None]]

HEX = re.compile(r"[0-9a-f]{8,64}")
GUARD_STATUSES = {400, 403, 413, 415, 429}
PEER = ("203.0.113.9", 40000)
SECRET_KEY = b"sk-live-7f3a9c0e11d24b6fb1e2-DO-NOT-LOG"
SECRET_TOKEN = b"eyJhbGciOiJIUzI1NiJ9.c2VjcmV0LXRva2Vu.DO-NOT-LOG"


# --------------------------------------------------------------------------- raw ASGI


class Result:
    """What the guard sent for one request, and how often it called ``receive``."""

    def __init__(self, messages: list[Message], receives: int, path: str = "") -> None:
        self.messages = messages
        self.receives = receives
        self.path = path

    @property
    def started(self) -> bool:
        return bool(self.messages)

    @property
    def status(self) -> int:
        start = self.messages[0]
        assert start["type"] == "http.response.start", start
        return int(start["status"])

    def header(self, name: bytes) -> list[bytes]:
        return [v for k, v in self.messages[0].get("headers", ()) if k == name]

    @property
    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.messages[1:])

    def json(self) -> Any:
        return json.loads(self.body)


async def drive(
    app: ASGI,
    path: str,
    body: bytes = b"",
    *,
    headers: Sequence[tuple[bytes, bytes]] = (),
    method: str = "POST",
    chunks: Sequence[bytes] | None = None,
    disconnect: bool = False,
    client: tuple[str, int] | None = PEER,
) -> Result:
    """One request: ``chunks`` (default: ``body`` in one message), then a disconnect.

    With ``disconnect`` the client goes away after the chunks, with more_body
    still set on the last one.
    """
    parts = list(chunks) if chunks is not None else [body]
    queue: list[Message] = [
        {"type": "http.request", "body": c, "more_body": disconnect or i < len(parts) - 1}
        for i, c in enumerate(parts)
    ]
    receives = 0

    async def receive() -> Message:
        nonlocal receives
        receives += 1
        if queue:
            return queue.pop(0)
        await asyncio.sleep(0)
        return {"type": "http.disconnect"}

    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    scope: dict[str, Any] = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode("latin-1", "replace"),
        "root_path": "",
        "query_string": b"",
        "headers": list(headers),
        "client": client,
        "server": ("127.0.0.1", 8000),
    }
    await app(scope, receive, send)
    return Result(sent, receives, path)


def request(app: ASGI, path: str, body: bytes = b"", **kw: Any) -> Result:
    return asyncio.run(drive(app, path, body, **kw))


JSON_CT = (b"content-type", b"application/json")


# --------------------------------------------------------------------------- apps


class Echo:
    """A model server stand-in: reads the whole body, answers a probability vector.

    The answer carries the number of bytes the app received, so a test can check
    that the guard replayed the body unchanged.
    """

    def __init__(self) -> None:
        self.calls = 0
        self.bodies: list[bytes] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        self.calls += 1
        body = b""
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        self.bodies.append(body)
        out = json.dumps({"predictions": [[0.1234567, 0.8765433]], "n": len(body)}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(out)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": out, "more_body": False})


def responder_app(
    start: Message, chunks: Sequence[bytes], *, raise_after: int | None = None
) -> Callable[..., Awaitable[None]]:
    """An app that answers ``start`` then ``chunks`` (raising after ``raise_after`` chunks)."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        while (await receive()).get("more_body", False):
            pass
        await send(dict(start, headers=list(start.get("headers", []))))
        for i, chunk in enumerate(chunks):
            if raise_after is not None and i == raise_after:
                raise RuntimeError("model server crashed mid-answer")
            await send(
                {"type": "http.response.body", "body": chunk, "more_body": i < len(chunks) - 1}
            )
        if raise_after is not None and raise_after >= len(chunks):
            raise RuntimeError("model server crashed after its answer")

    return app


# --------------------------------------------------------------------------- metrics


def total(registry: CollectorRegistry, metric: str, **labels: str) -> float:
    """Sum of a counter's ``_total`` samples whose labels include ``labels``."""
    out = 0.0
    for family in registry.collect():
        if family.name != metric:
            continue
        for s in family.samples:
            if s.name.endswith("_total") and all(s.labels.get(k) == v for k, v in labels.items()):
                out += s.value
    return out


def guard_errors(mw: GuardMiddleware) -> float:
    return total(mw.registry, "guard_errors")


def invalid_count(mw: GuardMiddleware) -> float:
    return total(mw.registry, "guard_invalid_requests")


def echo_guard(
    registry: CollectorRegistry, *, clock: Callable[[], float] = time.monotonic, **config: Any
) -> tuple[GuardMiddleware, Echo]:
    echo = Echo()
    cfg: dict[str, Any] = {"audit": {"enabled": False}, **config}
    return GuardMiddleware(echo, config=cfg, registry=registry, clock=clock), echo


# --------------------------------------------------------------------------- invariants


def check_guard_error(res: Result) -> None:
    """The documented error shape of the route, its request id that of the header."""
    assert res.header(b"content-type") == [b"application/json"]
    assert res.header(b"content-length") == [str(len(res.body)).encode()]
    error_message(res.body, res.path, res.header(b"x-request-id")[0].decode())


def check_invariants(res: Result, *, app_errors: bool) -> None:
    assert res.started, "no response"
    assert res.messages[-1]["type"] == "http.response.body"
    assert not res.messages[-1].get("more_body", False)
    rids = res.header(b"x-request-id")
    assert len(rids) == 1 and HEX.fullmatch(rids[0].decode()), rids
    status = res.status
    assert status < 500, status
    guard_made = res.header(b"cache-control") == [b"no-store"]
    if status >= 400 and (guard_made or not app_errors):
        assert status in GUARD_STATUSES, status
        check_guard_error(res)


async def fuzz(
    mw: GuardMiddleware, seed: int, n: int, *, echo: Echo | None = None, model: str = "m"
) -> dict[int, int]:
    r = random.Random(seed)
    statuses: dict[int, int] = {}
    routes = {f"/v2/models/{model}/infer", f"/v1/models/{model}:predict"}
    for i in range(n):
        for _ in range(1 if echo is not None else 4):  # a real model: mostly its own routes
            method, path, headers, chunks = random_request(r)
            path = path.replace("/models/m", f"/models/{model}")
            if method == "POST" and path in routes:
                break
        errors_before = guard_errors(mw)
        invalid_before = invalid_count(mw)
        calls_before = echo.calls if echo is not None else 0
        res = await drive(mw, path, headers=headers, method=method, chunks=chunks)
        context = f"request {i}: {method} {path} {headers!r:.300} {b''.join(chunks)!r:.300}"
        try:
            if path == "/metrics" and method in ("GET", "HEAD"):
                # PEER is a public address: metrics.allow_from keeps the endpoint from it
                assert b"guard_requests_total" not in res.body
            else:
                check_invariants(res, app_errors=echo is None)
            assert guard_errors(mw) == errors_before, "the guard swallowed an exception"
            if res.status in (400, 413, 415) and res.header(b"cache-control") == [b"no-store"]:
                assert invalid_count(mw) == invalid_before + 1, "a refusal was not counted"
            if echo is not None and echo.calls > calls_before and res.status == 200:
                # the app saw exactly the bytes the client sent
                assert echo.bodies[-1] == b"".join(chunks)
        except AssertionError as exc:
            raise AssertionError(f"{context}: {exc}") from exc
        statuses[res.status] = statuses.get(res.status, 0) + 1
    return statuses


# --------------------------------------------------------------------------- fuzzing


#: validation only, answers untouched: served by the middleware's lean lane where plain
VALIDATION_ONLY: dict[str, Any] = {
    "policies": [{"name": "inference", "degrade": {"always": False}}]
}
CONFIGS = pytest.mark.parametrize(
    "config", [{}, VALIDATION_ONLY], ids=["defaults", "validation_only"]
)


@CONFIGS
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_fuzz_default_config_around_echo_app(
    registry: CollectorRegistry, seed: int, config: dict[str, Any]
) -> None:
    mw, echo = echo_guard(registry, **config)
    statuses = asyncio.run(fuzz(mw, seed, 1200, echo=echo))
    # the generator reaches both sides: refusals and requests passed on
    assert statuses.get(200, 0) > 50 and statuses.get(400, 0) > 200, statuses
    assert {413, 415} & set(statuses), statuses


def test_fuzz_fail_closed_never_answers_5xx_without_a_guard_failure(
    registry: CollectorRegistry,
) -> None:
    mw, echo = echo_guard(registry, failure_mode="fail_closed")
    asyncio.run(fuzz(mw, 11, 600, echo=echo))


@pytest.fixture(scope="module")
def digits_model() -> DigitsModel:
    return train_digits_model()


@pytest.fixture(scope="module")
def demo(
    tmp_path_factory: pytest.TempPathFactory, digits_model: DigitsModel
) -> Iterator[tuple[GuardMiddleware, Path]]:
    """The full demo policy (rate, anomaly, extraction) with small per-client caps."""
    tmp = tmp_path_factory.mktemp("demo")
    cfg = demo_config(tmp / "calibration", model=digits_model)
    audit = tmp / "audit.jsonl"
    cfg["audit"] = {"path": str(audit)}
    cfg["state"] = {"max_keys": 400}
    # every fuzzed client comes from the one test peer: quarantine keys alone, or the
    # first block would refuse everyone after it
    cfg["policies"][0]["quarantine_address"] = "off"
    for det in cfg["policies"][0]["detectors"]:
        if det["type"] in ("near_duplicate", "prada", "boundary"):
            det.setdefault("params", {})["max_clients"] = 40
    mw = GuardMiddleware(build_model_app(digits_model), config=cfg, registry=CollectorRegistry())
    yield mw, audit
    mw.guard.audit.close()


def test_fuzz_full_demo_policy(demo: tuple[GuardMiddleware, Path]) -> None:
    mw, _ = demo
    statuses = asyncio.run(fuzz(mw, 7, 900, model="digits"))
    assert statuses.get(200, 0) > 10 and statuses.get(400, 0) > 100, statuses


EXTREMES = [0.0, 16.0, 1e308, -1e308, 5e-324, -5e-324, 1e-300, 2.0**63, -(2.0**63), 1e16, 7.5]


def test_demo_detectors_survive_extreme_finite_values(
    demo: tuple[GuardMiddleware, Path],
) -> None:
    """Valid shapes, hostile (finite) values: every detector runs on them, none may fail."""
    mw, _ = demo
    r = random.Random(5)

    async def run() -> dict[int, int]:
        statuses: dict[int, int] = {}
        for i in range(300):
            n = r.randint(1, 4)
            rows = [
                [r.choice(EXTREMES) if r.random() < 0.3 else r.uniform(0, 16) for _ in range(64)]
                for _ in range(n)
            ]
            if i % 2:
                path, body = "/v1/models/digits:predict", dumps({"instances": rows})
            else:
                path, body = (
                    "/v2/models/digits/infer",
                    v2_doc([x for row in rows for x in row], [n, 64], r.choice(["FP32", "FP64"])),
                )
            key = (b"x-api-key", b"extreme-%d" % r.randrange(30))
            res = await drive(mw, path, body, headers=[JSON_CT, key])
            check_invariants(res, app_errors=True)
            statuses[res.status] = statuses.get(res.status, 0) + 1
        return statuses

    errors = guard_errors(mw)
    with warnings.catch_warnings():
        # as in production: numpy's overflow warnings are not errors there (see the xfail below)
        warnings.simplefilter("ignore", RuntimeWarning)
        statuses = asyncio.run(run())
    assert guard_errors(mw) == errors, "a detector or the guard failed on extreme values"
    assert set(statuses) <= {200, 400, 403, 429}, statuses
    assert statuses.get(200, 0) > 30, statuses


@pytest.mark.parametrize("value", [1e308, 1e200, 1e40])
def test_anomaly_detectors_fire_on_huge_finite_values(
    demo: tuple[GuardMiddleware, Path], digits_model: DigitsModel, value: float
) -> None:
    mw, _ = demo
    row = digits_model.X_test[0].copy()
    row[5] = value
    query = Query(client="huge", policy="inference", rows=row.reshape(1, 64), n_rows=1)
    for armed in mw.guard.policies[0].detectors:
        if armed.detector.name in ("envelope", "mahalanobis", "knn"):
            result = asyncio.run(armed.detector.inspect(query))
            assert result.anomalous, (armed.detector.name, result.score)
            assert not math.isnan(result.score), armed.detector.name


# --------------------------------------------------------------------------- each bad input


def v2_doc(data: Any, shape: list[Any] | None = None, datatype: str = "FP32") -> bytes:
    shape = shape if shape is not None else [1, len(data) if isinstance(data, list) else 1]
    return dumps({"inputs": [{"name": "x", "shape": shape, "datatype": datatype, "data": data}]})


def binary_case(
    size: int, blob: bytes, *, data: bool = False
) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    """A Triton binary request body for one [1, 2] FP32 input, and its headers."""
    tensor: dict[str, Any] = {
        "name": "x",
        "shape": [1, 2],
        "datatype": "FP32",
        "parameters": {"binary_data_size": size},
    }
    if data:
        tensor["data"] = [1.0, 2.0]
    header = json.dumps({"inputs": [tensor]}).encode()
    return header + blob, [
        (b"content-type", b"application/octet-stream"),
        (b"inference-header-content-length", str(len(header)).encode()),
    ]


BAD_INPUTS: list[tuple[str, str, bytes, list[tuple[bytes, bytes]], int, str]] = [
    (
        "nan",
        V2,
        b'{"inputs":[{"name":"x","shape":[1,2],"datatype":"FP32","data":[1,NaN]}]}',
        [JSON_CT],
        400,
        "non_finite",
    ),
    ("infinity", V1, b'{"instances":[[1,-Infinity]]}', [JSON_CT], 400, "non_finite"),
    ("1e400", V1, b'{"instances":[[1,1e400]]}', [JSON_CT], 400, "non_finite"),
    (
        "10**400",
        V1,
        b'{"instances":[[1,' + b"1" + b"0" * 400 + b"]]}",
        [JSON_CT],
        400,
        "non_finite",
    ),
    (
        "10**5000",
        V1,
        b'{"instances":[[1,' + b"1" + b"0" * 5000 + b"]]}",
        [JSON_CT],
        400,
        "invalid_json",
    ),
    ("not json", V2, b"{nope", [JSON_CT], 400, "invalid_json"),
    ("empty body", V2, b"", [JSON_CT], 400, "invalid_json"),
    ("latin-1", V1, b'{"instances":[["\xe9"]]}', [JSON_CT], 400, "bad_encoding"),
    ("utf-16", V1, '{"instances":[[1]]}'.encode("utf-16"), [JSON_CT], 400, "bad_encoding"),
    (
        "deep",
        V1,
        b'{"instances":' + b"[" * 40 + b"1" + b"]" * 40 + b"}",
        [JSON_CT],
        400,
        "too_deep",
    ),
    ("deep and big", V1, b"[" * 600_000 + b"]" * 600_000, [JSON_CT], 413, "body_too_large"),
    ("recursion", V1, b"[" * 100_000 + b"]" * 100_000, [JSON_CT], 400, "too_deep"),
    ("text/plain", V2, b"{}", [(b"content-type", b"text/plain")], 415, "unsupported_media_type"),
    ("ragged", V1, b'{"instances":[[1,2],[3]]}', [JSON_CT], 400, "bad_shape"),
    ("empty rows", V1, b'{"instances":[]}', [JSON_CT], 400, "bad_shape"),
    ("empty row", V1, b'{"instances":[[]]}', [JSON_CT], 400, "bad_shape"),
    ("shape lie", V2, v2_doc([1, 2, 3], [2, 2]), [JSON_CT], 400, "bad_shape"),
    ("negative dim", V2, v2_doc([1, 2], [-1, 2]), [JSON_CT], 400, "bad_shape"),
    ("bool dim", V2, v2_doc([1, 2], [True, 2]), [JSON_CT], 400, "bad_shape"),
    ("huge dims", V2, v2_doc([1, 2], [2**62, 2**62]), [JSON_CT], 400, "bad_shape"),
    ("strings as numbers", V1, b'{"instances":[["1.5", 2]]}', [JSON_CT], 400, "bad_type"),
    ("null in FP32", V2, v2_doc([1, None]), [JSON_CT], 400, "bad_type"),
    ("too many rows", V1, dumps({"instances": [[1]] * 1025}), [JSON_CT], 413, "too_many_rows"),
    ("too wide", V2, v2_doc([1] * 70_000, [1, 70_000]), [JSON_CT], 400, "too_many_features"),
    (
        "long prompt",
        "/v1/completions",
        dumps({"prompt": "a" * 100_001}),
        [JSON_CT],
        413,
        "text_too_long",
    ),
    (
        "max_tokens as string",
        "/v1/chat/completions",
        dumps({"messages": [{"role": "user", "content": "x"}], "max_tokens": "9"}),
        [JSON_CT],
        400,
        "bad_type",
    ),
    (
        "spoofed xff",
        V1,
        b'{"instances":[[1]]}',
        [JSON_CT, (b"x-forwarded-for", b"10.0.0.1")],
        400,
        "bad_header",
    ),
    (
        "conflicting keys",
        V1,
        b'{"instances":[[1]]}',
        [JSON_CT, (b"x-api-key", b"a"), (b"x-api-key", b"b")],
        400,
        "bad_header",
    ),
    (
        "conflicting auth",
        V1,
        b'{"instances":[[1]]}',
        [JSON_CT, (b"authorization", b"Bearer a"), (b"authorization", b"Bearer b")],
        400,
        "bad_header",
    ),
    ("empty key", V1, b'{"instances":[[1]]}', [JSON_CT, (b"x-api-key", b"")], 400, "bad_header"),
    (
        "binary key",
        V1,
        b'{"instances":[[1]]}',
        [JSON_CT, (b"x-api-key", b"\xff")],
        400,
        "bad_header",
    ),
    (
        "oversized key",
        V1,
        b'{"instances":[[1]]}',
        [JSON_CT, (b"x-api-key", b"k" * 5000)],
        400,
        "bad_header",
    ),
    (
        "empty bearer",
        V1,
        b'{"instances":[[1]]}',
        [JSON_CT, (b"authorization", b"Bearer   ")],
        400,
        "bad_header",
    ),
    (
        "content-length not a number",
        V1,
        b'{"instances":[[1]]}',
        [JSON_CT, (b"content-length", b"12abc")],
        400,
        "bad_header",
    ),
    (
        "content-length over the cap",
        V1,
        b'{"instances":[[1]]}',
        [JSON_CT, (b"content-length", b"99999999999999999999")],
        413,
        "body_too_large",
    ),
    (
        "two content-lengths",
        V1,
        b'{"instances":[[1]]}',
        [JSON_CT, (b"content-length", b"19"), (b"content-length", b"19")],
        400,
        "bad_header",
    ),
    (
        "binary header length lies",
        V2,
        b'{"inputs":[]}',
        [
            (b"content-type", b"application/octet-stream"),
            (b"inference-header-content-length", b"999"),
        ],
        400,
        "bad_header",
    ),
    (
        "binary header length not a number",
        V2,
        b'{"inputs":[]}',
        [
            (b"content-type", b"application/octet-stream"),
            (b"inference-header-content-length", b"\xd9\xa1"),
        ],
        400,
        "bad_header",
    ),
    ("binary size lies", V2, *binary_case(8, b"\x00\x00\x80?"), 400, "bad_shape"),
    ("binary inf", V2, *binary_case(8, b"\x00\x00\x80?\x00\x00\x80\x7f"), 400, "non_finite"),
    ("binary short", V2, *binary_case(8, b"\x00" * 7), 400, "bad_shape"),
    ("binary trailing", V2, *binary_case(8, b"\x00" * 9), 400, "bad_shape"),
    ("binary and data", V2, *binary_case(8, b"\x00" * 8, data=True), 400, "bad_shape"),
]


@CONFIGS
@pytest.mark.parametrize(
    ("path", "body", "headers", "status", "reason"),
    [case[1:] for case in BAD_INPUTS],
    ids=[case[0] for case in BAD_INPUTS],
)
def test_each_bad_input_gets_a_clear_4xx_and_a_count(
    registry: CollectorRegistry,
    path: str,
    body: bytes,
    headers: list[tuple[bytes, bytes]],
    status: int,
    reason: str,
    config: dict[str, Any],
) -> None:
    mw, echo = echo_guard(registry, **config)
    res = request(mw, path, body, headers=headers)
    assert res.status == status, res.body
    check_guard_error(res)
    assert total(registry, "guard_invalid_requests", reason=reason) == 1
    assert total(registry, "guard_requests", decision="invalid") == 1
    assert guard_errors(mw) == 0
    assert echo.calls == 0


def test_unknown_json_on_unnamed_route_passes_and_is_counted(registry: CollectorRegistry) -> None:
    mw, echo = echo_guard(registry, policies=[{"name": "all", "routes": ["/**"]}])
    res = request(mw, "/custom/predict", b'{"whatever": [1, 2]}', headers=[JSON_CT])
    assert res.status == 200 and echo.calls == 1
    assert total(registry, "guard_payloads", format="unknown") == 1


# --------------------------------------------------------------------------- secrets


def test_no_raw_secret_or_payload_in_audit_log_or_logs(
    demo: tuple[GuardMiddleware, Path], caplog: pytest.LogCaptureFixture
) -> None:
    mw, audit = demo
    caplog.set_level(logging.DEBUG)
    marker = 4242.4242  # far outside the pixel envelope: the anomaly detectors fire
    odd = [marker] * 64
    cases: list[tuple[str, bytes, list[tuple[bytes, bytes]]]] = [
        # first, before the client is quarantined (a quarantined client is refused before
        # its body is parsed): invalid payloads, then a row extreme enough to overflow
        ("/v2/models/digits/infer", v2_doc([*odd[:3], float("nan")], [1, 4]), []),  # invalid
        ("/v1/models/digits:predict", b'{"instances": [[4242.4242, "x"]]}', []),  # bad type
        ("/v1/models/digits:predict", dumps({"instances": [[*odd[:63], 1e308]]}), []),
        ("/v1/models/digits:predict", dumps({"instances": [odd]}), []),
        ("/v1/models/digits:predict", dumps({"instances": [odd] * 200}), []),  # throttled
        (
            "/v1/models/digits:predict",
            dumps({"instances": [odd]}),
            [(b"x-forwarded-for", b"10.9.9.9")],
        ),  # spoofed
        # logs a traceback today: the parser crash of test_zero_element_tensor_is_a_clean_400
        (
            "/v2/models/digits/infer",
            dumps(
                {
                    "inputs": [
                        {"name": "pad", "shape": [0, 1, 1], "datatype": "FP32", "data": []},
                        {"name": "x", "shape": [1, 64], "datatype": "FP32", "data": odd},
                    ]
                }
            ),
            [],
        ),
    ]
    statuses = set()
    for credential in ((b"x-api-key", SECRET_KEY), (b"authorization", b"Bearer " + SECRET_TOKEN)):
        for _ in range(3):
            for path, body, extra in cases:
                res = request(mw, path, body, headers=[JSON_CT, credential, *extra])
                statuses.add(res.status)
                assert SECRET_KEY not in res.body and SECRET_TOKEN not in res.body
                # the payload is never quoted (the random request id is taken out first)
                quoted = res.body.replace(res.header(b"x-request-id")[0], b"")
                assert b"4242" not in quoted or res.status == 200
    # once quarantined, a client is refused before its body is parsed: 403, not 400
    assert 200 in statuses and statuses & {403, 429}, statuses
    mw.guard.audit.close()
    text = audit.read_text()
    lines = [json.loads(line) for line in text.splitlines()]
    assert any(line["decision"] == "invalid" for line in lines)
    assert any(line["decision"] not in ("invalid", "allow") for line in lines)
    logs = caplog.text + "".join(str(r.args) for r in caplog.records)
    for haystack in (text, logs):
        assert SECRET_KEY.decode() not in haystack
        assert SECRET_TOKEN.decode() not in haystack
        assert "sk-live" not in haystack and "DO-NOT-LOG" not in haystack
        assert "4242.4242" not in haystack


# --------------------------------------------------------------------------- bounded state


def test_identity_memo_and_store_stay_bounded_under_a_key_flood(
    registry: CollectorRegistry,
) -> None:
    cfg = {
        "state": {"max_keys": 300},
        "policies": [
            {
                "name": "inference",
                "detectors": [
                    {
                        "type": "rate",
                        "action": "throttle",
                        "params": {"limits": [{"rate": 10, "per": "1s", "burst": 10}]},
                    }
                ],
            }
        ],
    }
    mw, _ = echo_guard(registry, clock=lambda: 1000.0, **cfg)  # frozen: nothing expires
    body = b'{"instances": [[1.0, 2.0]]}'

    async def flood() -> None:
        for i in range(5000):
            res = await drive(mw, V1, body, headers=[JSON_CT, (b"x-api-key", b"key-%d" % i)])
            assert res.status == 200

    asyncio.run(flood())
    store = mw.guard.store
    assert isinstance(store, MemoryStore)
    assert len(store) <= 300
    assert store.evictions == 5000 - 300  # one rate key per client
    assert len(mw.guard.identifier._memo) <= 4096
    assert guard_errors(mw) == 0
    assert total(registry, "guard_store_evictions") == 5000 - 300


def test_detector_client_maps_stay_bounded_under_a_key_flood(
    demo: tuple[GuardMiddleware, Path], digits_model: DigitsModel
) -> None:
    mw, _ = demo
    rows = digits_model.X_test
    body_of = [v2_doc(rows[i].tolist(), [1, 64]) for i in range(len(rows))]

    async def flood() -> None:
        for i in range(300):
            res = await drive(
                mw,
                "/v2/models/digits/infer",
                body_of[i % len(body_of)],
                headers=[JSON_CT, (b"x-api-key", b"flood-%d" % i)],
            )
            assert res.status == 200, res.body

    errors = guard_errors(mw)
    asyncio.run(flood())
    sizes = {}
    for armed in mw.guard.policies[0].detectors:
        clients = getattr(armed.detector, "clients", None)
        if clients is not None:
            sizes[armed.detector.name] = len(clients)
            assert len(clients) <= 40, armed.detector.name
    assert set(sizes) == {"near_duplicate", "prada", "boundary"}, sizes
    store = mw.guard.store
    # the LRU table holds at most max_keys; quarantine and standing flags (from the
    # module's earlier hostile traffic) live in their own table, never evicted early
    assert isinstance(store, MemoryStore) and store.lru_keys <= 400
    assert len(store) == store.lru_keys + store.flag_keys
    assert guard_errors(mw) == errors


def test_memory_store_eviction_cost_does_not_grow_with_the_store() -> None:
    async def per_insert(full: int) -> float:
        store = MemoryStore(max_keys=20_000, clock=lambda: 0.0)
        for i in range(full):
            await store.set(f"fill-{i}", b"1", 60.0)
        started = time.perf_counter()
        for i in range(300):
            await store.set(f"new-{i}", b"1", 60.0)
        return (time.perf_counter() - started) / 300

    async def compare() -> tuple[float, float]:
        return await per_insert(1_000), await per_insert(20_000)

    below_cap, at_cap = asyncio.run(compare())
    # an eviction should cost about as much as an insert, not a pass over 20 000 keys
    assert at_cap < 50 * below_cap + 20e-6, (below_cap, at_cap)


# --------------------------------------------------------------------------- body handling


def test_body_streamed_in_small_chunks_is_cut_off_at_the_cap(registry: CollectorRegistry) -> None:
    mw, echo = echo_guard(registry, limits={"max_body_bytes": 1000})
    chunks = [b"[" + b"1," * 4] + [b"1,"] * 5000 + [b"1]"]
    res = request(mw, V1, headers=[JSON_CT], chunks=chunks)
    assert res.status == 413
    check_guard_error(res)
    # stopped reading right after the cap: 1000 bytes are 496 two-byte chunks
    assert res.receives <= 1000 // 2 + 2
    assert echo.calls == 0
    assert total(registry, "guard_invalid_requests", reason="body_too_large") == 1


def test_content_length_over_the_cap_is_refused_before_reading(
    registry: CollectorRegistry,
) -> None:
    mw, echo = echo_guard(registry, limits={"max_body_bytes": 1000})
    res = request(mw, V1, b"[1]", headers=[JSON_CT, (b"content-length", b"1001")])
    assert res.status == 413 and res.receives == 0 and echo.calls == 0


def test_lying_small_content_length_does_not_truncate_the_body(
    registry: CollectorRegistry,
) -> None:
    # the guard reads what the server delivers; a short content-length is the server's job
    mw, echo = echo_guard(registry)
    body = b'{"instances": [[1.0, 2.0]]}'
    res = request(mw, V1, headers=[JSON_CT, (b"content-length", b"3")], chunks=[body[:5], body[5:]])
    assert res.status == 200 and echo.bodies == [body]


def test_client_disconnect_mid_body_sends_nothing_and_counts_no_error(
    registry: CollectorRegistry,
) -> None:
    mw, echo = echo_guard(registry)
    res = request(mw, V1, headers=[JSON_CT], chunks=[b'{"instances": [[1,'], disconnect=True)
    assert res.messages == []
    assert echo.calls == 0
    assert guard_errors(mw) == 0
    assert total(registry, "guard_invalid_requests") == 0


@pytest.mark.parametrize(
    "messages",
    [
        [{"type": "http.request"}],  # no body, no more_body
        [
            {"type": "http.request", "body": b"", "more_body": True},
            {"type": "http.request", "body": b'{"instances": [[1]]}'},
        ],
        [
            {"type": "http.request", "body": b'{"instances": ', "more_body": True},
            {"type": "http.request", "body": b"", "more_body": True},
            {"type": "http.request", "body": b"[[1]]}", "more_body": False},
        ],
        [
            {"type": "lifespan.startup"},  # a message of another type is skipped
            {"type": "http.request", "body": b'{"instances": [[1]]}'},
        ],
    ],
    ids=["bare", "empty-first", "empty-middle", "foreign-message"],
)
def test_more_body_edge_cases_replay_exactly_what_was_sent(
    registry: CollectorRegistry, messages: list[Message]
) -> None:
    mw, echo = echo_guard(registry)
    queue = list(messages)
    sent: list[Message] = []

    async def receive() -> Message:
        return queue.pop(0) if queue else {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": V1, "headers": [JSON_CT], "client": PEER}
    asyncio.run(mw(scope, receive, send))
    expected = b"".join(m.get("body", b"") for m in messages if m["type"] == "http.request")
    status = sent[0]["status"]
    if expected:
        assert status == 200 and echo.bodies == [expected]
    else:
        assert status == 400 and echo.calls == 0
    assert guard_errors(mw) == 0


def test_concurrent_requests_do_not_share_state(registry: CollectorRegistry) -> None:
    mw, _ = echo_guard(registry)

    class Slow(Echo):
        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            await asyncio.sleep(0)
            await super().__call__(scope, receive, send)

    mw.app = Slow()

    async def many() -> list[tuple[int, Result]]:
        async def one(i: int) -> tuple[int, Result]:
            body = dumps({"instances": [[float(i)] * (1 + i % 7)]})
            chunks = [body[:7], body[7:]]
            res = await drive(
                mw, V1, headers=[JSON_CT, (b"x-api-key", b"c%d" % (i % 5))], chunks=chunks
            )
            return len(body), res

        return await asyncio.gather(*(one(i) for i in range(300)))

    results = asyncio.run(many())
    rids = [res.header(b"x-request-id")[0] for _, res in results]
    assert len(set(rids)) == len(rids)
    for length, res in results:
        assert res.status == 200 and res.json()["n"] == length


# --------------------------------------------------------------------------- response side


def json_start(
    body: bytes, *, length: int | None = None, ctype: bytes = b"application/json", status: int = 200
) -> Message:
    headers = [(b"content-type", ctype)]
    if length is not None:
        headers.append((b"content-length", str(length).encode()))
    return {"type": "http.response.start", "status": status, "headers": headers}


PROBS = json.dumps({"predictions": [[0.1234567, 0.8765433]] * 50}).encode()


def guarded(app: Any, registry: CollectorRegistry, **config: Any) -> GuardMiddleware:
    return GuardMiddleware(app, config={"audit": {"enabled": False}, **config}, registry=registry)


def test_huge_json_answer_passes_through_unbuffered(registry: CollectorRegistry) -> None:
    """Where nothing must be rewritten, an answer over the cap is not even buffered."""
    chunks = [b'{"predictions": [' + b"[0.1, 0.9]," * 20] + [b"[0.1, 0.9],"] * 50 + [b"[0.1,0.9]]}"]
    size = sum(map(len, chunks))
    app = responder_app(json_start(b"", length=size), chunks)
    mw = guarded(
        app,
        registry,
        limits={"max_response_bytes": 200},
        policies=[{"name": "p", "degrade": {"always": False}}],
    )
    res = request(mw, V1, b'{"instances": [[1]]}', headers=[JSON_CT])
    assert res.status == 200
    assert [m.get("body") for m in res.messages[1:]] == chunks  # chunk for chunk
    assert res.header(b"content-length") == [str(size).encode()]
    assert guard_errors(mw) == 0


@pytest.mark.parametrize("lie", [10, 100_000], ids=["short", "long"])
def test_json_answer_with_lying_content_length(registry: CollectorRegistry, lie: int) -> None:
    app = responder_app(json_start(PROBS, length=lie), [PROBS[:100], PROBS[100:]])
    mw = guarded(app, registry, policies=[{"name": "p", "degrade": {"decimals": 3}}])
    res = request(mw, V1, b'{"instances": [[1]]}', headers=[JSON_CT])
    assert res.status == 200
    declared = res.header(b"content-length")
    # rewritten and fixed up, or passed on as the app sent it: never a new inconsistency
    if declared != [str(lie).encode()]:
        assert declared == [str(len(res.body)).encode()]
        assert res.json()["predictions"][0] == [0.123, 0.877]
    assert guard_errors(mw) == 0


@pytest.mark.parametrize(
    ("ctype", "length"),
    [
        (b"text/plain", True),
        (b"text/event-stream", False),
        (b"application/json", False),
        (b"application/x-ndjson", False),
        (b"application/octet-stream", True),
    ],
)
def test_non_json_or_streamed_answers_pass_through_untouched(
    registry: CollectorRegistry, ctype: bytes, length: bool
) -> None:
    chunks = [b'data: {"p": [0.1234567]}\n\n', b"\xff\x00 raw", b"data: [DONE]\n\n"]
    start = json_start(b"", ctype=ctype, length=sum(map(len, chunks)) if length else None)
    mw = guarded(responder_app(start, chunks), registry)
    res = request(mw, V1, b'{"instances": [[1]]}', headers=[JSON_CT])
    assert res.status == 200
    assert [m.get("body") for m in res.messages[1:]] == chunks
    assert guard_errors(mw) == 0


def test_sse_events_are_forwarded_before_the_app_finishes(registry: CollectorRegistry) -> None:
    seen_by_client: list[bytes] = []
    order: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send(json_start(b"", ctype=b"text/event-stream"))
        for i in range(3):
            await send(
                {"type": "http.response.body", "body": b"data: %d\n\n" % i, "more_body": True}
            )
            order.append(f"app sent {i}, client has {len(seen_by_client)}")
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    mw = guarded(app, registry)

    async def run() -> None:
        async def receive() -> Message:
            return {"type": "http.request", "body": b'{"instances": [[1]]}'}

        async def send(message: Message) -> None:
            if message["type"] == "http.response.body":
                seen_by_client.append(message.get("body", b""))

        scope = {"type": "http", "method": "POST", "path": V1, "headers": [JSON_CT], "client": PEER}
        await mw(scope, receive, send)

    asyncio.run(run())
    assert order == [f"app sent {i}, client has {i + 1}" for i in range(3)]


def test_app_500_passes_through_and_is_not_a_guard_error(registry: CollectorRegistry) -> None:
    body = b'{"detail": "model exploded"}'
    app = responder_app(json_start(body, length=len(body), status=500), [body])
    mw = guarded(app, registry)
    res = request(mw, V1, b'{"instances": [[1]]}', headers=[JSON_CT])
    assert res.status == 500 and res.body == body
    assert res.header(b"x-request-id")
    assert guard_errors(mw) == 0


@pytest.mark.parametrize("always", [True, False], ids=["degrade-held", "plain"])
@pytest.mark.parametrize("raise_after", [0, 1, 2], ids=["before-body", "mid-body", "after-body"])
def test_app_exception_after_start_reaches_the_server(
    registry: CollectorRegistry, always: bool, raise_after: int
) -> None:
    app = responder_app(
        json_start(PROBS, length=len(PROBS)), [PROBS[:50], PROBS[50:]], raise_after=raise_after
    )
    mw = guarded(app, registry, policies=[{"name": "p", "degrade": {"always": always}}])
    with pytest.raises(RuntimeError, match="model server crashed"):
        request(mw, V1, b'{"instances": [[1]]}', headers=[JSON_CT])
    assert guard_errors(mw) == 0


def test_app_exception_before_start_reaches_the_server(registry: CollectorRegistry) -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        raise ValueError("boom")

    mw = guarded(app, registry)
    with pytest.raises(ValueError, match="boom"):
        request(mw, V1, b'{"instances": [[1]]}', headers=[JSON_CT])
    with pytest.raises(ValueError, match="boom"):  # unmatched route too
        request(mw, "/other", b"")
    assert guard_errors(mw) == 0


# --------------------------------------------------------------------------- bugs found


@pytest.mark.parametrize(
    ("shape", "binary"),
    [([0, 4, 1], False), ([0, 2**62], False), ([2, 2**62, 0], False), ([0, 4, 1], True)],
    ids=["3d-json", "huge-dim-json", "huge-middle-json", "3d-binary"],
)
def test_zero_element_tensor_is_a_clean_400(
    registry: CollectorRegistry, shape: list[int], binary: bool
) -> None:
    mw, echo = echo_guard(registry)
    if binary:
        header = json.dumps(
            {
                "inputs": [
                    {
                        "name": "x",
                        "shape": shape,
                        "datatype": "FP32",
                        "parameters": {"binary_data_size": 0},
                    }
                ]
            }
        ).encode()
        headers = [
            (b"content-type", b"application/octet-stream"),
            (b"inference-header-content-length", str(len(header)).encode()),
        ]
        res = request(mw, V2, header, headers=headers)
    else:
        res = request(mw, V2, v2_doc([], shape), headers=[JSON_CT])
    assert guard_errors(mw) == 0
    assert res.status == 400 and echo.calls == 0


def test_parser_failure_does_not_bypass_quarantine_and_rate_limits(
    registry: CollectorRegistry,
) -> None:
    cfg = {
        "policies": [
            {
                "name": "inference",
                "quarantine_s": 60,
                "detectors": [
                    {
                        "type": "rate",
                        "action": "block",
                        "params": {"limits": [{"rate": 1, "per": "1h", "burst": 1}]},
                    }
                ],
            }
        ]
    }
    mw, echo = echo_guard(registry, **cfg)
    key = (b"x-api-key", b"attacker")
    ok = v2_doc([1.0, 2.0], [1, 2])
    trojan = dumps(
        {
            "inputs": [
                {"name": "pad", "shape": [0, 1, 1], "datatype": "FP32", "data": []},
                {"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1.0, 2.0]},
            ]
        }
    )
    assert request(mw, V2, ok, headers=[JSON_CT, key]).status == 200
    assert request(mw, V2, ok, headers=[JSON_CT, key]).status == 403  # now quarantined
    calls = echo.calls
    res = request(mw, V2, trojan, headers=[JSON_CT, key])
    assert echo.calls == calls, "a quarantined client's request reached the model"
    assert res.status in (400, 403)


def test_content_length_with_too_many_digits_is_a_clean_4xx(registry: CollectorRegistry) -> None:
    mw, echo = echo_guard(registry)
    res = request(
        mw, V1, b'{"instances": [[1]]}', headers=[JSON_CT, (b"content-length", b"1" * 5000)]
    )
    assert guard_errors(mw) == 0
    assert res.status in (400, 413) and echo.calls == 0


def test_accept_encoding_does_not_bypass_output_rounding(
    registry: CollectorRegistry, digits_model: DigitsModel
) -> None:
    app = GZipMiddleware(build_model_app(digits_model), minimum_size=10)
    mw = guarded(app, registry)  # the default policy rounds every answer
    body = dumps({"instances": [digits_model.X_test[0].tolist()]})
    res = request(
        mw, "/v1/models/digits:predict", body, headers=[JSON_CT, (b"accept-encoding", b"gzip")]
    )
    assert res.status == 200
    raw = res.body
    if res.header(b"content-encoding") == [b"gzip"]:
        raw = gzip.decompress(raw)
    probs = np.asarray(json.loads(raw)["predictions"])
    decimals = mw.config.policies[0].degrade.decimals
    assert decimals is not None
    assert np.array_equal(probs, np.round(probs, decimals)), "unrounded probabilities leaked"


def test_binary_output_request_does_not_bypass_output_rounding(
    registry: CollectorRegistry,
) -> None:
    probs = np.array([[0.1234567, 0.8765433]], dtype=np.float32)

    async def triton(scope: Any, receive: Any, send: Any) -> None:
        request_body = b""
        while True:
            m = await receive()
            request_body += m.get("body", b"")
            if not m.get("more_body"):
                break
        binary = json.loads(request_body).get("parameters", {}).get("binary_data_output")
        blob = probs.tobytes()
        header = json.dumps(
            {
                "outputs": [
                    {
                        "name": "probabilities",
                        "datatype": "FP32",
                        "shape": [1, 2],
                        **(
                            {"parameters": {"binary_data_size": len(blob)}}
                            if binary
                            else {"data": probs.ravel().tolist()}
                        ),
                    }
                ]
            }
        ).encode()
        out = header + blob if binary else header
        headers = [(b"content-length", str(len(out)).encode())]
        if binary:
            headers += [
                (b"content-type", b"application/octet-stream"),
                (b"inference-header-content-length", str(len(header)).encode()),
            ]
        else:
            headers.append((b"content-type", b"application/json"))
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": out})

    mw = guarded(triton, registry)
    doc = {
        "inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1.0, 2.0]}],
        "parameters": {"binary_data_output": True},
    }
    res = request(mw, V2, dumps(doc), headers=[JSON_CT])
    assert res.status == 200
    assert probs.tobytes() not in res.body, "raw float32 probabilities leaked"
    # rewritten, not refused: still a binary answer, its sizes fixed up
    (n,) = res.header(b"inference-header-content-length")
    assert res.header(b"content-length") == [str(len(res.body)).encode()]
    header = json.loads(res.body[: int(n)])
    (out,) = header["outputs"]
    blob = res.body[int(n) :]
    assert out["parameters"] == {"binary_data_size": len(blob)} and "data" not in out
    got = np.frombuffer(blob, "<f4")
    assert got.tolist() == np.array([0.12, 0.88], dtype=np.float32).tolist()


def test_oversized_answer_does_not_bypass_output_rounding(registry: CollectorRegistry) -> None:
    classes = 100

    async def model(scope: Any, receive: Any, send: Any) -> None:
        request_body = b""
        while True:
            m = await receive()
            request_body += m.get("body", b"")
            if not m.get("more_body"):
                break
        n = len(json.loads(request_body)["instances"])
        out = json.dumps({"predictions": [[1 / 3] * (classes - 1) + [0.0]] * n}).encode()
        await send(json_start(out, length=len(out)))
        await send({"type": "http.response.body", "body": out})

    mw = guarded(model, registry, limits={"max_response_bytes": 64 * 1024, "max_rows": 1024})
    small = request(mw, V1, dumps({"instances": [[1.0]]}), headers=[JSON_CT])
    assert "0.3333" not in small.body.decode()  # one row: rounded
    big = request(mw, V1, dumps({"instances": [[1.0]] * 100}), headers=[JSON_CT])
    assert big.status == 200
    assert "0.3333" not in big.body.decode(), "a big enough batch gets full-precision answers"


def test_streaming_does_not_bypass_logprob_removal(registry: CollectorRegistry) -> None:
    chunk = {
        "choices": [
            {
                "index": 0,
                "text": "hi",
                "logprobs": {"tokens": ["hi"], "token_logprobs": [-0.123456789]},
            }
        ]
    }

    async def llm(scope: Any, receive: Any, send: Any) -> None:
        request_body = b""
        while True:
            m = await receive()
            request_body += m.get("body", b"")
            if not m.get("more_body"):
                break
        if json.loads(request_body).get("stream"):
            await send(json_start(b"", ctype=b"text/event-stream"))
            event = b"data: " + json.dumps(chunk).encode() + b"\n\n"
            await send({"type": "http.response.body", "body": event, "more_body": True})
            await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})
        else:
            out = json.dumps(chunk).encode()
            await send(json_start(out, length=len(out)))
            await send({"type": "http.response.body", "body": out})

    mw = guarded(llm, registry)
    doc = {"model": "m", "prompt": "hello", "logprobs": 1, "max_tokens": 1}
    plain = request(mw, "/v1/completions", dumps(doc), headers=[JSON_CT])
    assert plain.status == 200 and b"-0.123456789" not in plain.body  # stripped
    streamed = request(mw, "/v1/completions", dumps({**doc, "stream": True}), headers=[JSON_CT])
    assert streamed.status >= 400 or b"-0.123456789" not in streamed.body


def test_unopenable_audit_path_is_a_startup_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match=r"audit\.path"):
        AuditLog(AuditConfig(path=str(tmp_path / "missing" / "audit.jsonl")))


def test_audit_close_returns_when_writes_fail(tmp_path: Path) -> None:
    drops: list[int] = []
    log = AuditLog(
        AuditConfig(path=str(tmp_path / "audit.jsonl")), on_drop=lambda: drops.append(1), maxsize=8
    )
    log.record_invalid(
        policy="p",
        request_id="first",
        client="c",
        client_source="ip",
        status=400,
        reason="bad_shape",
    )  # starts the writer, which opens the file
    for _ in range(200):
        if log._out is not None:
            break
        time.sleep(0.01)
    assert log._out is not None
    log._out.close()  # the file goes bad under the writer, as with a full disk
    for i in range(20):
        log.record_invalid(
            policy="p",
            request_id=str(i),
            client="c",
            client_source="ip",
            status=400,
            reason="bad_shape",
        )
    closer = threading.Thread(target=log.close, kwargs={"timeout": 1.0}, daemon=True)
    closer.start()
    closer.join(3.0)
    assert not closer.is_alive(), "AuditLog.close() hung"
    assert len(drops) >= 20  # every line that could not be written is counted


def test_answer_too_large_even_to_rewrite_is_refused_not_leaked(
    registry: CollectorRegistry,
) -> None:
    """Past the rewrite cap (16 x max_response_bytes) the client gets a 502, never raw floats."""

    async def model(scope: Any, receive: Any, send: Any) -> None:
        while (await receive()).get("more_body"):
            pass
        out = json.dumps({"predictions": [[1 / 3, 2 / 3]] * 20_000}).encode()  # ~0.8 MB
        await send(json_start(out, length=len(out)))
        for i in range(0, len(out), 65536):
            await send(
                {
                    "type": "http.response.body",
                    "body": out[i : i + 65536],
                    "more_body": i + 65536 < len(out),
                }
            )

    mw = guarded(model, registry, limits={"max_response_bytes": 16 * 1024})
    res = request(mw, V1, dumps({"instances": [[1.0]]}), headers=[JSON_CT])
    assert res.status == 502
    assert b"0.3333" not in res.body
    assert total(registry, "guard_degraded_responses", outcome="too_large") == 1
