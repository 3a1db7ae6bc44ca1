"""The parse budget and the off-loop parse through the middleware: refusals, counts, threads.

The fast lane must give the full path's verdict on every budget body (it
leaves them all to ``admit``); a body over ``offload_bytes`` is parsed in a
worker thread (asserted by the thread's name, not by timing); a parse past
``parse_timeout_s`` is answered 503 ``parse_timeout`` and counted.
"""

from __future__ import annotations

import json
import threading
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

import inference_guard.guard.admission as admission_module
from inference_guard.guard._offload import THREAD_PREFIX, WORKERS
from inference_guard.middleware.asgi import GuardMiddleware
from tests.guard.payload.test_budget import binary_rows, deep_lists, small_lists
from tests.middleware.test_fuzz import JSON_CT, V1, V2, Echo, request, total
from tests.middleware.test_lean_lane import LEAN, answer, counts, lean_and_full

OCTET = (b"content-type", b"application/octet-stream")


def guarded(**config: Any) -> GuardMiddleware:
    return GuardMiddleware(
        Echo(), config={"audit": {"enabled": False}, **config}, registry=CollectorRegistry()
    )


def invalid(mw: GuardMiddleware, reason: str) -> float:
    return total(mw.registry, "guard_invalid_requests", reason=reason)


def oip(rows: int, width: int) -> bytes:
    doc = {"inputs": [{"name": "x", "shape": [rows, width], "datatype": "FP32", "data": []}]}
    doc["inputs"][0]["data"] = [0.5] * (rows * width)
    return json.dumps(doc).encode()


# ------------------------------------------------------------------ refusals, counted


@pytest.mark.parametrize(
    ("path", "body", "headers", "reason"),
    [
        (V1, deep_lists(), [JSON_CT], "too_many_containers"),
        (V1, small_lists(), [JSON_CT], "too_many_containers"),
        (V2, *binary_rows(4, 65_500), "too_many_values"),
    ],
    ids=["nested_27_deep", "262_000_lists", "wide_binary_rows"],
)
def test_the_issues_bodies_are_refused_413_and_counted(
    path: str, body: bytes, headers: Any, reason: str
) -> None:
    if isinstance(headers, dict):
        headers = [OCTET, *((k.encode(), v.encode()) for k, v in headers.items())]
    mw = guarded()
    res = request(mw, path, body, headers=headers)
    assert res.status == 413, res.body
    assert invalid(mw, reason) == 1
    assert total(mw.registry, "guard_requests", decision="invalid") == 1


# ------------------------------------------------------------------ the fast lane


BUDGET = {"max_json_containers": 8, "max_json_keys": 6, "max_json_elements": 60, "max_values": 20}
LANE_BODIES = [
    (V1, json.dumps({"instances": [[1, 2]] * 7}).encode()),  # 9 containers
    (V1, json.dumps({"instances": [[1, 2, 3, 4, 5, 6, 7]] * 3}).encode()),  # 21 values
    (V1, json.dumps({"instances": [[1] * 30] * 2}).encode()),  # 65 elements
    (V1, json.dumps({"instances": [[1, 2]], **{f"k{i}": 1 for i in range(6)}}).encode()),
    (V2, oip(3, 7)),  # 21 values
    (V2, oip(1, 60)),  # elements
    (V1, json.dumps({"instances": [[1, 2]] * 6}).encode()),  # within every budget
    (V2, oip(2, 10)),  # within every budget
]


@pytest.mark.parametrize(("path", "body"), LANE_BODIES)
def test_lane_leaves_budget_bodies_to_the_full_path(path: str, body: bytes) -> None:
    config = {**LEAN, "limits": BUDGET}
    (lean, _), (full, _) = lean_and_full(config)
    a = request(lean, path, body, headers=[JSON_CT])
    b = request(full, path, body, headers=[JSON_CT])
    assert answer(a) == answer(b)
    assert a.status in (200, 413)
    assert counts(lean.registry) == counts(full.registry)


def test_lane_bodies_cover_every_budget() -> None:
    mw = guarded(limits=BUDGET)
    statuses = [request(mw, path, body, headers=[JSON_CT]).status for path, body in LANE_BODIES]
    assert statuses == [413] * 6 + [200] * 2
    for reason in ("too_many_containers", "too_many_keys", "too_many_elements", "too_many_values"):
        assert invalid(mw, reason) >= 1, reason


# ------------------------------------------------------------------ off the event loop


@pytest.fixture
def parse_threads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The name of the thread each full parse ran in."""
    names: list[str] = []
    parse_request = admission_module.parse_request

    def recording(*args: Any, **kwargs: Any) -> Any:
        names.append(threading.current_thread().name)
        return parse_request(*args, **kwargs)

    monkeypatch.setattr(admission_module, "parse_request", recording)
    return names


def test_a_body_over_offload_bytes_is_parsed_in_a_worker_thread(parse_threads: list[str]) -> None:
    small = json.dumps({"instances": [[1, 2], [3]]}).encode()  # not plain: the full parser
    large = json.dumps({"instances": [[1, 2]] * 200 + [[3]]}).encode()
    mw = guarded(limits={"offload_bytes": len(small)})
    assert request(mw, V1, small, headers=[JSON_CT]).status == 400
    assert request(mw, V1, large, headers=[JSON_CT]).status == 400
    assert parse_threads[0] == threading.current_thread().name
    assert parse_threads[1].startswith(THREAD_PREFIX)
    assert invalid(mw, "bad_shape") == 2


def test_a_plain_body_over_offload_bytes_stays_in_the_lane(parse_threads: list[str]) -> None:
    """The lane's reader is bounded by the budget: one decode, on the loop (module docstring)."""
    body = json.dumps({"instances": [[1, 2]] * 200}).encode()
    mw = guarded(limits={"offload_bytes": 0})
    res = request(mw, V1, body, headers=[JSON_CT])
    assert res.status == 200
    assert parse_threads == []  # the full parser never ran
    assert total(mw.registry, "guard_rows", decision="allow") == 200
    # a policy whose detectors only count rows reads a plain body the same way, on the loop
    rate = {"type": "rate", "params": {"limits": [{"rate": 1000, "per": "1s"}]}}
    rated = guarded(limits={"offload_bytes": 0}, policies=[{"name": "p", "detectors": [rate]}])
    assert request(rated, V1, body, headers=[JSON_CT]).status == 200
    assert parse_threads == []
    # a body that is not plain goes to the full parser, in a worker thread
    not_plain = json.dumps({"instances": [[1, 2]] * 200, "parameters": {}}).encode()
    assert request(rated, V1, not_plain, headers=[JSON_CT]).status == 200
    assert len(parse_threads) == 1 and parse_threads[0].startswith(THREAD_PREFIX)
    # and so does every body of a policy whose detector reads the rows
    values = {
        "type": "rate",
        "params": {"cost": "values", "limits": [{"rate": 10**6, "per": "1s"}]},
    }
    reader = guarded(limits={"offload_bytes": 0}, policies=[{"name": "p", "detectors": [values]}])
    assert request(reader, V1, body, headers=[JSON_CT]).status == 200
    assert len(parse_threads) == 2 and parse_threads[1].startswith(THREAD_PREFIX)


def test_a_parse_past_its_deadline_is_refused_503_and_counted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    parse_request = admission_module.parse_request
    release = threading.Event()

    def slow(*args: Any, **kwargs: Any) -> Any:
        release.wait(5.0)  # held until the request has been answered
        return parse_request(*args, **kwargs)

    monkeypatch.setattr(admission_module, "parse_request", slow)
    mw = guarded(limits={"offload_bytes": 0, "parse_timeout_s": 0.001})
    body = json.dumps({"instances": [[1, 2]], "parameters": {}}).encode()  # not plain
    try:
        res = request(mw, V1, body, headers=[JSON_CT])
    finally:
        release.set()
    assert res.status == 503
    assert json.loads(res.body) == {
        "error": "the guard could not read the request in time; retry later"
    }
    assert invalid(mw, "parse_timeout") == 1
    assert total(mw.registry, "guard_errors") == 0


# ------------------------------------------------------------------ rate cost in values


def rated(cost: str) -> GuardMiddleware:
    detector = {
        "type": "rate",
        "action": "throttle",
        "params": {"cost": cost, "limits": [{"limit": 100_000, "per": "1h"}]},
    }
    return guarded(policies=[{"name": "p", "detectors": [detector]}])


@pytest.mark.parametrize(("cost", "statuses"), [("values", [200, 429]), ("rows", [200, 200])])
def test_a_wide_row_is_charged_per_value(cost: str, statuses: list[int]) -> None:
    mw = rated(cost)
    wide = json.dumps({"instances": [[0.5] * 65_000]}).encode()
    got = [request(mw, V1, wide, headers=[JSON_CT]).status for _ in range(2)]
    assert got == statuses
    if cost == "values":
        assert total(mw.registry, "guard_rows", decision="throttle") == 1


def test_offloaded_parses_share_a_few_threads(parse_threads: list[str]) -> None:
    # the threads this guard starts (earlier guards' idle pools may end meanwhile)
    before = set(threading.enumerate())
    mw = guarded(limits={"offload_bytes": 0})
    body = b'{"instances": [[1, 2]], "parameters": {}}'  # not plain: the full parser
    for _ in range(10):
        assert request(mw, V1, body, headers=[JSON_CT]).status == 200
    assert len(parse_threads) == 10 and all(n.startswith(THREAD_PREFIX) for n in parse_threads)
    started = [t for t in threading.enumerate() if t not in before]
    assert 1 <= len(started) <= WORKERS
    assert all(t.name.startswith(THREAD_PREFIX) for t in started)
