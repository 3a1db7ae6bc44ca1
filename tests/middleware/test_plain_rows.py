"""Reading a plain request without the full parser.

A policy with detectors, no custom payload and no model signature has its plain
OIP v2 and KServe v1 bodies read by the plain readers (:mod:`guard.payload._plain`)
instead of :func:`~guard.payload.adapters.parse_request`: their rows counted where
nothing reads more (a rate limit costing ``rows``), their matrix built where a
detector reads it (here a rate limit costing ``values``). These tests hold that
shortcut to the full parser's answers: the same hostile traffic through two
guards, one with the shortcut and one without, must get the same statuses,
headers, bodies, replayed bodies and metrics, with validation on and off, and
with a limit tight enough to throttle.
"""

from __future__ import annotations

import json
import random
import re
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from inference_guard.guard.payload import adapters
from inference_guard.middleware.asgi import GuardMiddleware
from tests.middleware.test_fuzz import (
    JSON_CT,
    V1,
    V2,
    Echo,
    Result,
    random_request,
    request,
    valid_requests,
)
from tests.middleware.test_lean_lane import answer as exact_answer
from tests.middleware.test_lean_lane import counts
from tests.stores_fixture import FakeClock

#: the seconds in rate-limit fields, which the two guards read at different times
_SECONDS = re.compile(rb"(;t=|^)\d+$")


def answer(res: Result) -> tuple[Any, ...]:
    """:func:`~tests.middleware.test_lean_lane.answer`, the rate fields' seconds taken out.

    The remaining budget stays exact: the throttling limit refills one unit in
    288 s, so both guards see the same budget however long the test takes.
    """
    got = exact_answer(res)
    if len(got) != 3:
        return got
    status, headers, body = got
    timeless = tuple(
        (k, _SECONDS.sub(rb"\1<s>", v) if k in (b"ratelimit", b"retry-after") else v)
        for k, v in headers
    )
    return status, timeless, body


def rate_only(*, validate: bool, rate: int, per: str = "60s", cost: str = "rows") -> dict[str, Any]:
    return {
        "audit": {"enabled": False},
        "policies": [
            {
                "name": "inference",
                "validate": validate,
                "degrade": {"always": False},
                "detectors": [
                    {
                        "type": "rate",
                        "action": "throttle",
                        "params": {"cost": cost, "limits": [{"rate": rate, "per": per}]},
                    }
                ],
            }
        ],
    }


CONFIGS = pytest.mark.parametrize(
    "config",
    [
        rate_only(validate=False, rate=10_000_000),
        rate_only(validate=True, rate=10_000_000),
        rate_only(validate=True, rate=300, per="1d"),
        rate_only(validate=True, rate=10_000_000, cost="values"),
        rate_only(validate=True, rate=3000, per="1d", cost="values"),
    ],
    ids=["no_validation", "validation", "throttling", "matrix", "matrix_throttling"],
)


def with_and_without(
    config: dict[str, Any],
) -> tuple[tuple[GuardMiddleware, Echo], tuple[GuardMiddleware, Echo]]:
    """The same config twice: with the plain readers (counting rows, or making the
    request, matrix included, where a detector reads it), and with them switched off.

    Both without the rate lane (``tests/middleware/test_rate_lane.py``), which
    counts plain rows before the engine does: what is tested here is the engine's
    own shortcut.
    """
    out = []
    clock = FakeClock()
    for plain in (True, False):
        echo = Echo()
        # a clock that stands still: a budget spent by hundreds of values a request
        # refills between the two guards' turns on a real clock, but not on this one
        mw = GuardMiddleware(echo, config=config, registry=CollectorRegistry(), clock=clock)
        mw._front = mw._front._replace(rate_policies=frozenset())
        admission = mw.guard.loadout.admission
        cost = config["policies"][0]["detectors"][0]["params"]["cost"]
        assert admission._want_rows == {"inference": cost != "rows"}
        if not plain:
            admission._plain_readers = {}
            admission._plain_requests = {}
        out.append((mw, echo))
    return out[0], out[1]


def full_parses(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the calls of the full parser from here on."""
    calls: list[int] = []
    real = adapters.parse_request

    def counted(*args: Any, **kw: Any) -> Any:
        calls.append(1)
        return real(*args, **kw)

    monkeypatch.setattr("inference_guard.guard.admission.parse_request", counted)
    return calls


@CONFIGS
@pytest.mark.parametrize("seed", [31, 32])
def test_plain_rows_give_the_full_parsers_verdict_on_hostile_traffic(
    seed: int, config: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    (plain, plain_echo), (full, full_echo) = with_and_without(config)
    parses = full_parses(monkeypatch)
    r = random.Random(seed)
    shortcut = 0
    for i in range(600):
        method, path, headers, chunks = random_request(r)
        if r.random() < 0.6:  # more of the plain readers' own shapes, mutated or not
            path = r.choice([V2, V1])
            headers = [JSON_CT, *r.sample(headers, k=len(headers) // 2)]
            if r.random() < 0.7:  # valid, plain or not
                path, doc = r.choice([(p, d) for p, d in valid_requests(r) if p in (V1, V2)])
                chunks = [json.dumps(doc).encode()]
        if path == "/metrics":
            continue  # its body holds each guard's own timings
        before = len(parses)
        a = request(plain, path, chunks=chunks, headers=headers, method=method)
        between = len(parses)
        b = request(full, path, chunks=chunks, headers=headers, method=method)
        context = f"request {i}: {method} {path} {headers!r:.200} {b''.join(chunks)!r:.200}"
        assert answer(a) == answer(b), context
        assert a.receives == b.receives, context
        # the shortcut counted what the guard without it had to parse
        shortcut += between == before and len(parses) == between + 1
    assert plain_echo.bodies == full_echo.bodies
    assert counts(plain.registry) == counts(full.registry)
    assert shortcut > 20, "the comparison means something only if the shortcut took part"


@CONFIGS
def test_plain_rows_count_valid_requests_of_every_shape_like_the_full_parser(
    config: dict[str, Any],
) -> None:
    (plain, _), (full, _) = with_and_without(config)
    r = random.Random(5)
    for _ in range(20):
        for path, doc in valid_requests(r):
            body = json.dumps(doc).encode()
            for headers in ([JSON_CT], [], [JSON_CT, (b"content-length", str(len(body)).encode())]):
                a = request(plain, path, body, headers=headers)
                b = request(full, path, body, headers=headers)
                assert answer(a) == answer(b), (path, headers)
    assert counts(plain.registry) == counts(full.registry)


def test_a_plain_request_is_counted_without_the_full_parser(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    (plain, echo), _ = with_and_without(rate_only(validate=False, rate=10_000_000))
    parses = full_parses(monkeypatch)
    body = json.dumps(
        {"inputs": [{"name": "x", "shape": [3, 2], "datatype": "FP32", "data": [1, 2, 3, 4, 5, 6]}]}
    ).encode()
    res = request(plain, V2, body, headers=[JSON_CT])
    assert res.status == 200
    assert parses == []
    assert echo.bodies == [body]
    assert counts(plain.registry)[("guard_rows", "allow")] == 3
    # one more key than a plain request holds: the full parser reads it
    doc = json.loads(body)
    doc["parameters"] = {"binary_data_output": False}
    assert request(plain, V2, json.dumps(doc).encode(), headers=[JSON_CT]).status == 200
    assert parses == [1]


def test_a_detector_reading_the_rows_gets_the_plain_requests_matrix(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Its matrix made of what the plain reader read, up to ``offload_bytes``; a larger
    plain body is the full parser's (in a worker thread)."""
    config = rate_only(validate=True, rate=10**6, cost="values")
    config["limits"] = {"offload_bytes": 2048}
    (plain, echo), _ = with_and_without(config)
    parses = full_parses(monkeypatch)
    for n_rows, parsed in ((3, 0), (60, 1)):  # 3 x 8 values: a small body; 60 x 8: over 2 KiB
        data = [round(0.1 * i, 1) for i in range(8 * n_rows)]
        doc = {"inputs": [{"name": "x", "shape": [n_rows, 8], "datatype": "FP64", "data": data}]}
        body = json.dumps(doc).encode()
        assert (len(body) > 2048) == bool(parsed)
        before = len(parses)
        assert request(plain, V2, body, headers=[JSON_CT]).status == 200
        assert len(parses) - before == parsed
        assert echo.bodies[-1] == body
    got = counts(plain.registry)
    assert got[("guard_rows", "allow")] == 63


@pytest.mark.parametrize("cost", ["rows", "values"])
def test_a_failing_plain_reader_is_counted_and_the_full_parser_decides(cost: str) -> None:
    (plain, echo), _ = with_and_without(rate_only(validate=True, rate=10_000_000, cost=cost))

    def broken(body: bytes, limits: Any) -> Any:
        raise RuntimeError("reader bug")

    admission = plain.guard.loadout.admission
    admission._plain_readers = {"oip_v2": broken}
    admission._plain_requests = {"oip_v2": broken}
    body = json.dumps(
        {"inputs": [{"name": "x", "shape": [2, 2], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
    ).encode()
    assert request(plain, V2, body, headers=[JSON_CT]).status == 200
    assert echo.bodies == [body]
    got = counts(plain.registry)
    assert got[("guard_errors", "parse")] == 1
    assert got[("guard_rows", "allow")] == 2
