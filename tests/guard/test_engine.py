"""The engine alone: Guard.admit and Guard.after on engine values, no ASGI anywhere.

A request is a :class:`~guard.engine.Request` with a body source standing in
for a front end's reader; a verdict is checked as a value (status, headers,
body; or the pass's decision, rewrite and watch), and the model's answer comes
back as a :class:`~guard.engine.Seen`.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

import inference_guard.guard.payload.review as review_module
import tests.middleware.fakes as fakes
from inference_guard.guard.config import GuardConfig
from inference_guard.guard.decisions import Action
from inference_guard.guard.engine import Pass, Refusal, Request, Seen, Verdict, refusal
from inference_guard.guard.errors import ClientDisconnected, PayloadError
from inference_guard.guard.pipeline import Guard
from tests.conftest import sample
from tests.error_bodies import error_message

V2 = "/v2/models/m/infer"
JSON_CT = (b"content-type", b"application/json")
PEER = ("203.0.113.7", 5000)
ANSWER = json.dumps(fakes.V2_ANSWER).encode()


def v2_body(*rows: list[float]) -> bytes:
    flat = [x for r in rows for x in r]
    shape = [len(rows), len(rows[0])]
    return json.dumps(
        {"inputs": [{"name": "x", "shape": shape, "datatype": "FP32", "data": flat}]}
    ).encode()


class Body:
    """A front end's body reader: gives ``body``, or raises ``error``; counts its reads."""

    def __init__(self, body: bytes = b"", error: Exception | None = None) -> None:
        self.body = body
        self.error = error
        self.reads = 0

    async def read(self, declared: bytes | None) -> bytes:
        self.reads += 1
        if self.error is not None:
            raise self.error
        return self.body


def engine(registry: CollectorRegistry, tmp_path: Path, **policy: Any) -> Guard:
    pol: dict[str, Any] = {"name": "inference", "routes": [V2]}
    pol.update(policy)
    config = GuardConfig.from_dict({"policies": [pol], "audit": {"path": str(tmp_path / "a")}})
    return Guard(config, registry=registry)


def admit(
    guard: Guard,
    body: Body,
    *,
    headers: tuple[tuple[bytes, bytes], ...] = (JSON_CT,),
    peer: Any = PEER,
    request_id: str = "rid-1",
) -> Verdict:
    policy = guard.match("POST", V2)
    assert policy is not None
    request = Request(policy, "POST", V2, list(headers), peer, request_id, body)
    return asyncio.run(guard.admit(request))


def refused(verdict: Verdict) -> tuple[int, str, dict[bytes, bytes]]:
    """Status, message (OIP v2's ``{"error": "<message>"}``) and headers of a refusal."""
    assert isinstance(verdict, Refusal), verdict
    headers = dict(verdict.headers)
    assert headers[b"x-request-id"] == b"rid-1"
    return verdict.status, error_message(verdict.body, V2), headers


def passed(verdict: Verdict) -> Pass:
    assert isinstance(verdict, Pass), verdict
    return verdict


FIRE = [9.0, 1.0]  # the fake detector's first feature at or past fire_at
CALM = [1.0, 1.0]


def fixed(action: str, **params: Any) -> dict[str, Any]:
    return {"type": "test-fixed", "action": action, "params": {"fire_at": 5, **params}}


# ------------------------------------------------------------------ admit: passes


def test_valid_request_passes_with_the_default_rounding(
    registry: CollectorRegistry, tmp_path: Path
) -> None:
    guard = engine(registry, tmp_path)
    verdict = passed(admit(guard, Body(v2_body(CALM, CALM))))
    assert verdict.decision.action is Action.ALLOW and verdict.fmt == "oip_v2"
    assert verdict.rewrite is not None and verdict.rewrite.spec.decimals == 2
    assert verdict.watch is None and verdict.counted and not verdict.untouched
    assert sample(registry, "guard_requests_total", policy="inference", decision="allow") == 1
    assert sample(registry, "guard_rows_total", policy="inference", decision="allow") == 2
    assert sample(registry, "guard_payloads_total", policy="inference", format="oip_v2") == 1


def test_every_plain_request_of_a_fixed_policy_gets_one_shared_pass(
    registry: CollectorRegistry, tmp_path: Path
) -> None:
    guard = engine(registry, tmp_path, degrade={"always": False})
    first = passed(admit(guard, Body(v2_body(CALM))))
    assert first.untouched
    assert passed(admit(guard, Body(v2_body(CALM)))) is first
    policy = guard.match("POST", V2)
    assert policy is not None
    assert guard.admit_fixed(policy, "oip_v2", 3) is first  # the fast lane's verdict
    assert sample(registry, "guard_requests_total", policy="inference", decision="allow") == 3
    assert sample(registry, "guard_rows_total", policy="inference", decision="allow") == 5


def test_a_passthrough_policy_counts_without_reading(
    registry: CollectorRegistry, tmp_path: Path
) -> None:
    guard = engine(
        registry, tmp_path, validate=False, degrade={"always": False}, unknown_format="pass"
    )
    body = Body(b"not even json")
    verdict = passed(admit(guard, body))
    assert verdict.untouched and body.reads == 0
    assert sample(registry, "guard_requests_total", policy="inference", decision="allow") == 1
    assert sample(registry, "guard_rows_total", policy="inference", decision="allow") == 0


def test_rate_limit_headers_ride_on_a_pass(registry: CollectorRegistry, tmp_path: Path) -> None:
    guard = engine(registry, tmp_path, detectors=[fixed("flag")])
    verdict = passed(admit(guard, Body(v2_body(CALM))))
    assert verdict.headers == ((b"ratelimit", b'"fake";r=1;t=1'),)


def test_several_rate_limits_answer_in_one_field_line_each(
    registry: CollectorRegistry, tmp_path: Path
) -> None:
    def rate(name: str, *limits: dict[str, Any]) -> dict[str, Any]:
        params = {"key": "client", "cost": "rows", "limits": list(limits)}
        return {"type": "rate", "name": name, "action": "throttle", "params": params}

    guard = engine(
        registry,
        tmp_path,
        detectors=[
            rate("per-key", {"rate": 10, "per": "1s", "burst": 20}, {"limit": 100, "per": "1d"}),
            fixed("flag"),
            rate("ceiling", {"rate": 50, "per": "1s", "burst": 50}),
        ],
    )
    verdict = passed(admit(guard, Body(v2_body(CALM))))
    names = [name for name, _ in verdict.headers]
    assert names == [b"ratelimit-policy", b"ratelimit"]
    headers = dict(verdict.headers)
    assert headers[b"ratelimit-policy"] == (
        b'"per-key-0";q=20;w=2, "per-key-1";q=100;w=86400, "ceiling";q=50;w=1'
    )
    items = headers[b"ratelimit"].decode().split(", ")
    assert [i.split(";")[0] for i in items] == ['"per-key-0"', '"per-key-1"', '"fake"', '"ceiling"']
    assert items[0].startswith('"per-key-0";r=19;') and items[3].startswith('"ceiling";r=49;')


def test_two_detectors_rate_fields_alone_are_joined_too(
    registry: CollectorRegistry, tmp_path: Path
) -> None:
    guard = engine(registry, tmp_path, detectors=[fixed("flag"), {**fixed("flag"), "name": "f2"}])
    verdict = passed(admit(guard, Body(v2_body(CALM))))
    assert verdict.headers == ((b"ratelimit", b'"fake";r=1;t=1, "fake";r=1;t=1'),)


def test_only_list_valued_fields_are_joined() -> None:
    from inference_guard.guard.pipeline import _combined

    got = _combined(
        [
            ("RateLimit-Policy", '"a";q=1;w=1'),
            ("X-Other", "1"),
            ("RateLimit", '"a";r=0;t=1'),
            ("ratelimit-policy", '"b";q=2;w=1'),
            ("X-Other", "2"),
            ("RateLimit", '"b";r=1;t=1'),
        ]
    )
    assert got == (
        ("RateLimit-Policy", '"a";q=1;w=1, "b";q=2;w=1'),
        ("X-Other", "1"),
        ("RateLimit", '"a";r=0;t=1, "b";r=1;t=1'),
        ("X-Other", "2"),
    )


# ------------------------------------------------------------------ admit: refusals


@pytest.mark.parametrize(
    ("body", "headers", "status", "message"),
    [
        (b"{bad", (JSON_CT,), 400, "JSON"),
        (b"<xml/>", ((b"content-type", b"text/xml"),), 415, "application/json"),
        (b'{"instances": [[1, 2]]}', (JSON_CT, (b"x-api-key", b"")), 400, "credential"),
    ],
    ids=["invalid-json", "not-json", "bad-credential"],
)
def test_malformed_requests_are_refused_and_counted(
    registry: CollectorRegistry,
    tmp_path: Path,
    body: bytes,
    headers: tuple[tuple[bytes, bytes], ...],
    status: int,
    message: str,
) -> None:
    guard = engine(registry, tmp_path)
    verdict = admit(guard, Body(body), headers=headers)
    got, got_message, sent = refused(verdict)
    assert got == status and message in got_message, got_message
    assert sent[b"content-type"] == b"application/json" and sent[b"x-request-id"] == b"rid-1"
    assert sent[b"content-length"] == str(len(verdict.body)).encode()
    assert sample(registry, "guard_requests_total", policy="inference", decision="invalid") == 1


@pytest.mark.parametrize(
    ("error", "status", "close"),
    [
        (PayloadError(413, "body_too_large", "too big"), 413, False),
        (PayloadError(408, "body_timeout", "too slow"), 408, True),
    ],
)
def test_the_body_readers_refusals_come_back_as_verdicts(
    registry: CollectorRegistry, tmp_path: Path, error: PayloadError, status: int, close: bool
) -> None:
    guard = engine(registry, tmp_path)
    got, _, headers = refused(admit(guard, Body(error=error)))
    assert got == status
    assert (headers.get(b"connection") == b"close") is close
    reason = error.reason
    assert sample(registry, "guard_invalid_requests_total", policy="inference", reason=reason) == 1


def test_block_and_throttle(registry: CollectorRegistry, tmp_path: Path) -> None:
    guard = engine(registry, tmp_path, detectors=[fixed("block")])
    assert refused(admit(guard, Body(v2_body(FIRE))))[:2] == (403, "the request was refused")
    guard = engine(CollectorRegistry(), tmp_path, detectors=[fixed("throttle", retry_after=2.5)])
    status, message, headers = refused(admit(guard, Body(v2_body(FIRE))))
    assert (status, message) == (429, "too many requests; retry later")
    assert headers[b"retry-after"] == b"3" and headers[b"ratelimit"] == b'"fake";r=1;t=1'


def test_a_quarantined_client_is_refused_before_its_body_is_read(
    registry: CollectorRegistry, tmp_path: Path
) -> None:
    guard = engine(registry, tmp_path, quarantine_s=60, detectors=[fixed("block")])
    assert refused(admit(guard, Body(v2_body(FIRE))))[0] == 403
    body = Body(v2_body(CALM))
    assert refused(admit(guard, body))[0] == 403
    assert body.reads == 0
    other = admit(guard, Body(v2_body(CALM)), peer=("198.51.100.1", 1))
    assert passed(other).decision.action is Action.ALLOW


def test_guard_failures_follow_the_failure_mode(
    registry: CollectorRegistry, tmp_path: Path
) -> None:
    broken = [{"type": "test-broken", "params": {"kind": "bug"}}]
    closed = engine(registry, tmp_path, detectors=broken, failure_mode="fail_closed")
    verdict = admit(closed, Body(v2_body(CALM)))
    assert refused(verdict)[:2] == (503, "the service is temporarily unavailable")
    assert not verdict.counted
    assert sample(registry, "guard_requests_total", policy="inference", decision="error") == 1

    reg = CollectorRegistry()
    opened = engine(reg, tmp_path)
    verdict = passed(admit(opened, Body(v2_body(CALM)), peer=5))  # a broken server's peer
    assert verdict.untouched and not verdict.counted
    assert sample(reg, "guard_errors_total", component="internal") == 1


def test_a_client_that_leaves_gets_no_verdict(registry: CollectorRegistry, tmp_path: Path) -> None:
    guard = engine(registry, tmp_path)
    with pytest.raises(ClientDisconnected):
        admit(guard, Body(error=ClientDisconnected()))
    assert sample(registry, "guard_requests_total", policy="inference", decision="invalid") == 0
    assert sample(registry, "guard_errors_total", component="internal") == 0


# ------------------------------------------------------------------ degrade and after


def test_a_degraded_pass_rewrites_the_answer_and_after_counts_it(
    registry: CollectorRegistry, tmp_path: Path
) -> None:
    guard = engine(
        registry,
        tmp_path,
        degrade={"always": False, "decimals": 1, "noise": 0.0},
        detectors=[fixed("degrade")],
    )
    verdict = passed(admit(guard, Body(v2_body(FIRE, FIRE))))
    assert verdict.decision.action is Action.DEGRADE and verdict.rewrite is not None
    reviewed = verdict.review(ANSWER, "application/json")
    assert reviewed.body is not None and reviewed.answer is None  # nothing watches it
    probs = json.loads(reviewed.body)["outputs"][1]["data"]
    assert probs == [0.1, 0.8, 0.1, 0.5, 0.2, 0.2]  # rounded half to even, as numpy does
    asyncio.run(guard.after(verdict, Seen(200, "application/json", ANSWER, reviewed, "degraded")))
    degraded = {"policy": "inference", "outcome": "degraded"}
    assert sample(registry, "guard_degraded_responses_total", **degraded) == 1

    calm = passed(admit(guard, Body(v2_body(CALM))))
    assert calm.rewrite is None  # not degraded, and no rounding for everyone


def test_after_lets_observing_detectors_read_the_answer(
    registry: CollectorRegistry, tmp_path: Path
) -> None:
    guard = engine(registry, tmp_path, detectors=[{"type": "test-observe", "name": "obs"}])
    watcher = guard.policies[0].detectors[0].detector
    assert isinstance(watcher, fakes.ObservingDetector)
    verdict = passed(admit(guard, Body(v2_body(CALM, CALM))))
    assert verdict.watch is not None and verdict.watch.query is not None
    asyncio.run(guard.after(verdict, Seen(200, "application/json", ANSWER)))
    asyncio.run(guard.drain())  # answers reach observers through the observation queue
    (answer,) = watcher.answers
    assert answer.status == 200 and answer.labels is not None
    assert answer.labels.tolist() == [1, 0]
    assert answer.probabilities is not None
    assert np.allclose(answer.probabilities[0], [0.1234567, 0.7654321, 0.1111112])
    # an error answer is not learnt from
    asyncio.run(guard.after(verdict, Seen(500, "application/json", b'{"error": "x"}')))
    asyncio.run(guard.drain())
    assert len(watcher.answers) == 1


def test_settle_counts_a_rewrite_at_once_and_leaves_only_a_watched_answer_to_await(
    registry: CollectorRegistry, tmp_path: Path
) -> None:
    """Admission.settle: after()'s synchronous part, a coroutine only for what remains."""
    guard = engine(registry, tmp_path)  # the defaults: every answer rounded, nothing watched
    verdict = passed(admit(guard, Body(v2_body(CALM))))
    assert verdict.rewrite is not None and verdict.watch is None
    settle = guard.loadout.admission.settle
    assert settle(verdict, Seen(200, "application/json", ANSWER, None, "degraded")) is None
    degraded = {"policy": "inference", "outcome": "degraded"}
    assert sample(registry, "guard_degraded_responses_total", **degraded) == 1

    watching = engine(
        CollectorRegistry(), tmp_path, detectors=[{"type": "test-observe", "name": "obs"}]
    )
    watcher = watching.policies[0].detectors[0].detector
    assert isinstance(watcher, fakes.ObservingDetector)
    watched = passed(admit(watching, Body(v2_body(CALM))))
    rest = watching.loadout.admission.settle(watched, Seen(200, "application/json", ANSWER))
    assert rest is not None and watcher.answers == []  # the detectors read it when awaited
    asyncio.run(rest)
    asyncio.run(watching.drain())  # queued for the detectors, applied in a batch
    assert len(watcher.answers) == 1


def test_an_answer_is_decoded_once_for_rewriting_and_reading(
    registry: CollectorRegistry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    guard = engine(registry, tmp_path, detectors=[{"type": "test-observe", "name": "obs"}])
    watcher = guard.policies[0].detectors[0].detector
    assert isinstance(watcher, fakes.ObservingDetector)
    verdict = passed(admit(guard, Body(v2_body(CALM, CALM))))
    assert verdict.rewrite is not None and verdict.watch is not None  # rounded and observed
    decoded: list[bytes] = []
    real = review_module.load_json_lenient_checked

    def counting(body: bytes, content_type: str | None) -> Any:
        decoded.append(body)
        return real(body, content_type)

    monkeypatch.setattr(review_module, "load_json_lenient_checked", counting)
    reviewed = verdict.review(ANSWER, "application/json")  # what the front end does
    assert reviewed.body is not None and b"0.77" in reviewed.body
    assert reviewed.answer is not None  # read before rounding: the model's own numbers
    asyncio.run(guard.after(verdict, Seen(200, "application/json", ANSWER, reviewed, "degraded")))
    assert decoded == [ANSWER]
    asyncio.run(guard.drain())
    (answer,) = watcher.answers
    assert answer.probabilities is not None
    assert answer.probabilities[0, 0] == pytest.approx(0.1234567)


@pytest.mark.parametrize(
    ("path", "error"),
    [
        ("/v2/models/m/infer", "too many requests; retry later"),
        ("/v1/models/m:predict", "too many requests; retry later"),
        (
            "/v1/chat/completions",
            {
                "message": "too many requests; retry later",
                "type": "rate_limit_error",
                "param": None,
                "code": "rate_limited",
            },
        ),
        (
            "/predict",
            {
                "code": "rate_limited",
                "message": "too many requests; retry later",
                "request_id": "r",
            },
        ),
    ],
    ids=["oip_v2", "kserve_v1", "openai", "other"],
)
def test_refusals_speak_the_routes_protocol(path: str, error: object) -> None:
    verdict = refusal(429, "r", path=path, retry_after=1.0)
    assert json.loads(verdict.body) == {"error": error}
    headers = dict(verdict.headers)
    assert headers[b"x-request-id"] == b"r"
    assert headers[b"content-length"] == str(len(verdict.body)).encode()
