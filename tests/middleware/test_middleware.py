"""GuardMiddleware in-process: decisions, bad input, identity, failures, metrics."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from starlette.testclient import TestClient

from inference_guard.guard.config import GuardConfig
from inference_guard.middleware.asgi import GuardMiddleware
from tests.conftest import sample
from tests.error_bodies import error_message
from tests.middleware.fakes import EchoApp, ObservingDetector

V2 = "/v2/models/m/infer"


def v2_body(rows: list[list[float]]) -> dict[str, Any]:
    flat = [x for r in rows for x in r]
    return {
        "inputs": [
            {"name": "x", "shape": [len(rows), len(rows[0])], "datatype": "FP32", "data": flat}
        ]
    }


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def make(
    tmp_path: Path,
    registry: CollectorRegistry,
    *,
    policy: dict[str, Any] | None = None,
    app: EchoApp | None = None,
    clock: Clock | None = None,
    **top: Any,
) -> tuple[TestClient, GuardMiddleware, EchoApp, Path]:
    audit = tmp_path / "audit.jsonl"
    # answers untouched unless a test asks for degradation (the default rounds them)
    pol: dict[str, Any] = {
        "name": "inference",
        "routes": ["/v2/models/*/infer", "/v1/models/*:predict"],
        "degrade": {"always": False},
    }
    pol.update(policy or {})
    cfg = {"policies": [pol], "audit": {"path": str(audit)}, **top}
    echo = app or EchoApp()
    mw = GuardMiddleware(echo, config=cfg, registry=registry, clock=clock or Clock())
    return TestClient(mw, client=("203.0.113.7", 5000)), mw, echo, audit


def audit_lines(mw: GuardMiddleware, path: Path) -> list[dict[str, Any]]:
    mw.guard.audit.close()
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_non_http_scope_passes_straight_through(registry: CollectorRegistry) -> None:
    seen: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(scope["type"])

    mw = GuardMiddleware(app, registry=registry)
    asyncio.run(mw({"type": "lifespan"}, None, None))  # type: ignore[arg-type]
    assert seen == ["lifespan"]


def test_unmatched_route_passes_through_with_request_id(
    tmp_path: Path, registry: CollectorRegistry
) -> None:
    client, _, echo, _ = make(tmp_path, registry)
    r = client.post("/other", content=b"not json at all")
    assert r.status_code == 200
    assert echo.bodies == [b"not json at all"]
    assert r.headers["x-request-id"]
    assert sample(registry, "guard_requests_total", policy="inference", decision="allow") == 0


def test_allow_replays_body_unchanged_and_counts_rows(
    tmp_path: Path, registry: CollectorRegistry
) -> None:
    client, _, echo, _ = make(tmp_path, registry)
    raw = json.dumps(v2_body([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])).encode()
    r = client.post(V2, content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 200
    assert echo.bodies == [raw]
    assert r.json() == EchoApp().answer
    assert sample(registry, "guard_requests_total", policy="inference", decision="allow") == 1
    assert sample(registry, "guard_rows_total", policy="inference", decision="allow") == 3
    assert sample(registry, "guard_overhead_seconds_count", policy="inference") == 1


def test_flag_passes_and_is_audited(tmp_path: Path, registry: CollectorRegistry) -> None:
    client, mw, echo, audit = make(
        tmp_path,
        registry,
        policy={
            "detectors": [
                {"type": "test-fixed", "name": "fx", "action": "flag", "params": {"fire_at": 5}}
            ]
        },
        client_identity={"api_key_headers": ["x-api-key"]},
    )
    r = client.post(V2, json=v2_body([[9.0, 1.0]]), headers={"x-api-key": "sk-secret-123"})
    assert r.status_code == 200
    assert len(echo.bodies) == 1
    assert sample(registry, "guard_requests_total", policy="inference", decision="flag") == 1
    assert (
        sample(registry, "guard_detections_total", policy="inference", detector="fx", action="flag")
        == 1
    )
    lines = audit_lines(mw, audit)
    assert len(lines) == 1
    line = lines[0]
    assert line["decision"] == "flag" and line["fired"] == ["fx"]
    assert line["techniques"] == ["AML.T0029"]
    assert line["request_id"] == r.headers["x-request-id"]
    assert line["client_source"] == "api_key"
    assert "sk-secret-123" not in audit.read_text()
    assert line["client"] == mw.guard.identifier.hash("key", "sk-secret-123")


def test_allow_writes_no_audit_line(tmp_path: Path, registry: CollectorRegistry) -> None:
    client, mw, _, audit = make(
        tmp_path,
        registry,
        policy={"detectors": [{"type": "test-fixed", "action": "block", "params": {"fire_at": 5}}]},
    )
    assert client.post(V2, json=v2_body([[1.0]])).status_code == 200
    assert audit_lines(mw, audit) == []


def test_throttle_answers_429_with_retry_after(tmp_path: Path, registry: CollectorRegistry) -> None:
    client, _, echo, _ = make(
        tmp_path,
        registry,
        policy={
            "detectors": [
                {
                    "type": "test-fixed",
                    "name": "rl",
                    "action": "throttle",
                    "params": {"fire_at": 5, "retry_after": 2.2},
                }
            ]
        },
    )
    r = client.post(V2, json=v2_body([[9.0]]))
    assert r.status_code == 429
    assert r.headers["retry-after"] == "3"
    assert r.headers["ratelimit"] == '"fake";r=1;t=1'
    assert error_message(r.content, V2) == "too many requests; retry later"
    assert echo.bodies == []
    assert sample(registry, "guard_requests_total", policy="inference", decision="throttle") == 1


def test_block_answers_403_without_naming_the_detector(
    tmp_path: Path, registry: CollectorRegistry
) -> None:
    client, _, echo, _ = make(
        tmp_path,
        registry,
        policy={
            "detectors": [
                {
                    "type": "test-fixed",
                    "name": "secret-detector",
                    "action": "block",
                    "params": {"fire_at": 5},
                }
            ]
        },
    )
    r = client.post(V2, json=v2_body([[9.0]]))
    assert r.status_code == 403
    assert "secret-detector" not in r.text and "fixed" not in r.text
    assert error_message(r.content, V2) == "the request was refused"
    assert echo.bodies == []
    assert sample(registry, "guard_requests_total", policy="inference", decision="block") == 1


def test_most_severe_action_wins(tmp_path: Path, registry: CollectorRegistry) -> None:
    client, _, _, _ = make(
        tmp_path,
        registry,
        policy={
            "detectors": [
                {"type": "test-fixed", "name": "a", "action": "flag", "params": {"fire_at": 1}},
                {"type": "test-fixed", "name": "b", "action": "block", "params": {"fire_at": 5}},
                {"type": "test-fixed", "name": "c", "action": "throttle", "params": {"fire_at": 1}},
            ]
        },
    )
    assert client.post(V2, json=v2_body([[3.0]])).status_code == 429
    assert client.post(V2, json=v2_body([[7.0]])).status_code == 403


def test_shadow_mode_allows_but_records(tmp_path: Path, registry: CollectorRegistry) -> None:
    client, mw, echo, audit = make(
        tmp_path,
        registry,
        policy={
            "shadow": True,
            "detectors": [
                {"type": "test-fixed", "name": "fx", "action": "block", "params": {"fire_at": 5}}
            ],
        },
    )
    r = client.post(V2, json=v2_body([[9.0]]))
    assert r.status_code == 200
    assert len(echo.bodies) == 1
    lines = audit_lines(mw, audit)
    assert lines[0]["decision"] == "block" and lines[0]["enforced"] == "allow"
    assert lines[0]["shadow"] is True
    assert (
        sample(
            registry, "guard_detections_total", policy="inference", detector="fx", action="block"
        )
        == 1
    )


def test_block_quarantines_client_for_ttl(tmp_path: Path, registry: CollectorRegistry) -> None:
    clock = Clock()
    client, _, echo, _ = make(
        tmp_path,
        registry,
        clock=clock,
        policy={
            "quarantine_s": 60,
            "detectors": [{"type": "test-fixed", "action": "block", "params": {"fire_at": 5}}],
        },
    )
    assert client.post(V2, json=v2_body([[9.0]])).status_code == 403
    # a harmless request from the same client is refused while quarantined
    assert client.post(V2, json=v2_body([[1.0]])).status_code == 403
    assert sample(registry, "guard_quarantines_total", policy="inference") == 1
    other = TestClient(client.app, client=("198.51.100.1", 5000))
    assert other.post(V2, json=v2_body([[1.0]])).status_code == 200
    clock.t += 61
    assert client.post(V2, json=v2_body([[1.0]])).status_code == 200
    assert len(echo.bodies) == 2


def test_degrade_rounds_probabilities(tmp_path: Path, registry: CollectorRegistry) -> None:
    client, _, _, _ = make(
        tmp_path,
        registry,
        policy={
            "degrade": {"decimals": 1, "always": False, "noise": 0.0},
            "detectors": [{"type": "test-fixed", "action": "degrade", "params": {"fire_at": 5}}],
        },
    )
    clean = client.post(V2, json=v2_body([[1.0]])).json()
    assert clean["outputs"][1]["data"][0] == pytest.approx(0.1234567)
    r = client.post(V2, json=v2_body([[9.0]]))
    assert r.status_code == 200
    assert int(r.headers["content-length"]) == len(r.content)
    probs = r.json()["outputs"][1]["data"]
    assert probs[:3] == pytest.approx([0.1, 0.8, 0.1])
    assert (
        sample(registry, "guard_degraded_responses_total", policy="inference", outcome="degraded")
        == 1
    )


def test_always_degrade_applies_to_every_answer(
    tmp_path: Path, registry: CollectorRegistry
) -> None:
    client, _, _, _ = make(tmp_path, registry, policy={"degrade": {"always": True, "decimals": 2}})
    probs = client.post(V2, json=v2_body([[1.0]])).json()["outputs"][1]["data"]
    assert probs[:2] == pytest.approx([0.12, 0.77])


def test_default_output_policy_rounds_everyone_and_adds_noise_only_when_degrading(
    registry: CollectorRegistry,
) -> None:
    """No degrade config: 2 decimals for all; degraded clients also get noise."""
    answer = {"predictions": [[0.5004, 0.4996]] * 400}
    mw = GuardMiddleware(
        EchoApp(answer),
        registry=registry,
        config={
            "audit": {"enabled": False},
            "policies": [
                {
                    "name": "inference",
                    "routes": ["/v1/models/*:predict"],
                    "detectors": [
                        {"type": "test-fixed", "action": "degrade", "params": {"fire_at": 5}}
                    ],
                }
            ],
        },
    )
    client = TestClient(mw)
    plain = client.post("/v1/models/m:predict", json={"instances": [[1.0]]}).json()
    assert plain["predictions"][0] == [0.5, 0.5]
    assert all(p == [0.5, 0.5] for p in plain["predictions"])
    # 400 distinct rows: the noise is a keyed function of (client, row), one draw per row
    rows = [[9.0, float(i)] for i in range(400)]
    flagged = client.post("/v1/models/m:predict", json={"instances": rows}).json()
    firsts = [p[0] for p in flagged["predictions"]]
    # noise (sd 0.1) moves near-ties both ways; rounding alone never would
    assert sum(1 for x in firsts if x > 0.5) > 50 and sum(1 for x in firsts if x < 0.5) > 50


def test_observing_detector_sees_parsed_answer(tmp_path: Path, registry: CollectorRegistry) -> None:
    client, mw, _, audit = make(
        tmp_path,
        registry,
        policy={
            "quarantine_s": 30,
            "detectors": [
                {"type": "test-observe", "name": "obs", "action": "block", "params": {"fire": True}}
            ],
        },
    )
    assert client.post(V2, json=v2_body([[1.0], [2.0]])).status_code == 200
    det = mw.guard.policies[0].detectors[0][0]
    assert isinstance(det, ObservingDetector)
    asyncio.run(mw.guard.drain())  # answers reach observers through the observation queue
    answer = det.answers[0]
    assert answer.labels is not None and answer.labels.tolist() == [1, 0]
    assert answer.probabilities is not None and answer.probabilities.shape == (2, 3)
    # it fired after the answer with action block: the client is now quarantined
    assert client.post(V2, json=v2_body([[1.0]])).status_code == 403
    reasons = [line["reason"] for line in audit_lines(mw, audit) if "reason" in line]
    assert reasons == ["after_answer"]


# ----------------------------------------------------------------------------- bad input

BAD_INPUTS = [
    ("invalid_json", b'{"inputs": [', "application/json", 400),
    ("unsupported_media_type", b"a=1", "application/x-www-form-urlencoded", 415),
    ("bad_encoding", b'{"inputs": "\xff\xfe"}', "application/json", 400),
    (
        "non_finite",
        b'{"inputs":[{"name":"x","shape":[1,2],"datatype":"FP32","data":[1, NaN]}]}',
        "application/json",
        400,
    ),
    (
        "non_finite",
        b'{"inputs":[{"name":"x","shape":[1,2],"datatype":"FP32","data":[1, Infinity]}]}',
        "application/json",
        400,
    ),
    (
        "bad_shape",
        b'{"inputs":[{"name":"x","shape":[2,2],"datatype":"FP32","data":[[1,2],[3]]}]}',
        "application/json",
        400,
    ),
    ("too_deep", b'{"inputs":' + b"[" * 200 + b"]" * 200 + b"}", "application/json", 400),
]


@pytest.mark.parametrize(
    ("reason", "body", "ctype", "status"),
    BAD_INPUTS,
    ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD_INPUTS)],
)
def test_bad_input_gets_4xx_and_is_counted(
    tmp_path: Path, registry: CollectorRegistry, reason: str, body: bytes, ctype: str, status: int
) -> None:
    client, _, echo, _ = make(tmp_path, registry)
    r = client.post(V2, content=body, headers={"content-type": ctype})
    assert r.status_code == status, r.text
    assert error_message(r.content, V2) and r.headers["x-request-id"]
    assert echo.bodies == []
    assert sample(registry, "guard_invalid_requests_total", policy="inference", reason=reason) == 1
    assert sample(registry, "guard_requests_total", policy="inference", decision="invalid") == 1


def test_wrong_width_rows_get_400(tmp_path: Path, registry: CollectorRegistry) -> None:
    client, _, echo, _ = make(tmp_path, registry)
    r = client.post("/v1/models/m:predict", json={"instances": [[1, 2, 3], [1, 2]]})
    assert r.status_code == 400
    assert echo.bodies == []


def test_too_many_rows_get_413(tmp_path: Path, registry: CollectorRegistry) -> None:
    client, _, echo, _ = make(tmp_path, registry, limits={"max_rows": 4})
    r = client.post("/v1/models/m:predict", json={"instances": [[1.0, 2.0]] * 5})
    assert r.status_code == 413
    assert echo.bodies == []
    assert (
        sample(registry, "guard_invalid_requests_total", policy="inference", reason="too_many_rows")
        == 1
    )
    assert (
        client.post("/v1/models/m:predict", json={"instances": [[1.0, 2.0]] * 4}).status_code == 200
    )


def test_body_over_cap_gets_413_by_content_length(
    tmp_path: Path, registry: CollectorRegistry
) -> None:
    client, _, echo, _ = make(tmp_path, registry, limits={"max_body_bytes": 1000})
    r = client.post(
        V2, content=b"[" + b"1," * 2000 + b"1]", headers={"content-type": "application/json"}
    )
    assert r.status_code == 413
    assert echo.bodies == []
    assert (
        sample(
            registry, "guard_invalid_requests_total", policy="inference", reason="body_too_large"
        )
        == 1
    )


def test_body_over_cap_gets_413_when_streamed_without_length(registry: CollectorRegistry) -> None:
    """A chunked body with no content-length is cut off at the cap, not buffered whole."""
    echo = EchoApp()
    mw = GuardMiddleware(echo, config={"limits": {"max_body_bytes": 100}}, registry=registry)
    chunks = [b"[" + b"1," * 40, b"1," * 40, b"1," * 40 + b"1]"]
    consumed: list[int] = []
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        consumed.append(1)
        body = chunks[len(consumed) - 1]
        return {"type": "http.request", "body": body, "more_body": len(consumed) < len(chunks)}

    async def send(msg: dict[str, Any]) -> None:
        sent.append(msg)

    scope = {
        "type": "http",
        "method": "POST",
        "path": V2,
        "headers": [(b"content-type", b"application/json")],
        "client": ("127.0.0.1", 1),
    }
    asyncio.run(mw(scope, receive, send))
    assert sent[0]["status"] == 413
    assert len(consumed) == 2  # stopped reading at the cap
    assert echo.bodies == []


def test_spoofed_forwarded_for_from_untrusted_peer_is_refused(
    tmp_path: Path, registry: CollectorRegistry
) -> None:
    client, _, echo, _ = make(tmp_path, registry)
    r = client.post(V2, json=v2_body([[1.0]]), headers={"x-forwarded-for": "10.0.0.1"})
    assert r.status_code == 400
    assert (
        sample(registry, "guard_invalid_requests_total", policy="inference", reason="bad_header")
        == 1
    )
    assert echo.bodies == []


def test_forwarded_for_from_trusted_proxy_names_the_client(
    tmp_path: Path, registry: CollectorRegistry
) -> None:
    client, mw, _, audit = make(
        tmp_path,
        registry,
        client_identity={"trusted_proxies": ["203.0.113.0/24"]},
        policy={"detectors": [{"type": "test-fixed", "action": "flag", "params": {"fire_at": 5}}]},
    )
    r = client.post(
        V2, json=v2_body([[9.0]]), headers={"x-forwarded-for": "192.0.2.44, 203.0.113.9"}
    )
    assert r.status_code == 200
    line = audit_lines(mw, audit)[0]
    assert line["client"] == mw.guard.identifier.hash("ip", "192.0.2.44")
    bad = client.post(V2, json=v2_body([[1.0]]), headers={"x-forwarded-for": "not-an-ip"})
    assert bad.status_code == 400


def test_conflicting_api_keys_are_refused(tmp_path: Path, registry: CollectorRegistry) -> None:
    client, _, _, _ = make(tmp_path, registry)
    r = client.post(V2, json=v2_body([[1.0]]), headers=[("x-api-key", "a"), ("x-api-key", "b")])  # type: ignore[arg-type]
    assert r.status_code == 400


@pytest.mark.parametrize("kind", ["bug", "store"])
def test_guard_failure_fails_open_by_default(
    tmp_path: Path, registry: CollectorRegistry, kind: str
) -> None:
    client, _, echo, _ = make(
        tmp_path,
        registry,
        policy={"detectors": [{"type": "test-broken", "params": {"kind": kind}}]},
    )
    r = client.post(V2, json=v2_body([[1.0]]))
    assert r.status_code == 200
    assert len(echo.bodies) == 1
    component = "detector" if kind == "bug" else "store"
    assert sample(registry, "guard_errors_total", component=component) == 1


def test_guard_failure_fails_closed_when_configured(
    tmp_path: Path, registry: CollectorRegistry
) -> None:
    client, _, echo, _ = make(
        tmp_path,
        registry,
        failure_mode="fail_closed",
        policy={"detectors": [{"type": "test-broken"}]},
    )
    r = client.post(V2, json=v2_body([[1.0]]))
    assert r.status_code == 503
    assert error_message(r.content, V2) == "the service is temporarily unavailable"
    assert echo.bodies == []
    assert sample(registry, "guard_requests_total", policy="inference", decision="error") == 1


def test_internal_error_fails_open_with_body_replayed(
    tmp_path: Path, registry: CollectorRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    client, mw, echo, _ = make(tmp_path, registry)

    async def boom(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("bug in the guard")

    def boom_sync(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("bug in the guard")

    # with detectors the verdict comes from decide(), without them from allow(),
    # on the fast lane (plain OIP v2 JSON) from the count bound to its route
    monkeypatch.setattr(mw.guard, "decide", boom)
    monkeypatch.setattr(mw.guard, "allow", boom_sync)
    monkeypatch.setattr(mw.guard.counts, "allowed_counter", lambda *a: boom_sync)
    raw = json.dumps(v2_body([[1.0, 2.0]])).encode()
    r = client.post(V2, content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 200
    assert echo.bodies == [raw]
    assert sample(registry, "guard_errors_total", component="internal") == 1


def test_streaming_answer_passes_through_unbuffered(registry: CollectorRegistry) -> None:
    """Each SSE chunk reaches the client before the app produces the next one."""
    events: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream")],
            }
        )
        for i in range(3):
            events.append(f"app:{i}")
            await send(
                {"type": "http.response.body", "body": f"data: {i}\n\n".encode(), "more_body": True}
            )
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    mw = GuardMiddleware(
        app,
        registry=registry,
        config={
            "policies": [
                {"name": "chat", "routes": ["/v1/chat/completions"], "degrade": {"always": True}}
            ]
        },
    )

    async def send(msg: dict[str, Any]) -> None:
        if msg["type"] == "http.response.body" and msg.get("body"):
            events.append("client:" + msg["body"].decode()[6])

    async def receive() -> dict[str, Any]:
        body = json.dumps(
            {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
        ).encode()
        return {"type": "http.request", "body": body, "more_body": False}

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/chat/completions",
        "headers": [(b"content-type", b"application/json")],
        "client": ("127.0.0.1", 1),
    }
    asyncio.run(mw(scope, receive, send))
    assert events == ["app:0", "client:0", "app:1", "client:1", "app:2", "client:2"]


def test_metrics_endpoint_serves_guard_metrics(tmp_path: Path, registry: CollectorRegistry) -> None:
    client, mw, _, _ = make(tmp_path, registry)
    client.post(V2, json=v2_body([[1.0]]))
    scraper = TestClient(mw, client=("127.0.0.1", 5000))  # the host itself
    r = scraper.get("/metrics")
    assert r.status_code == 200
    assert 'guard_requests_total{decision="allow",policy="inference"} 1.0' in r.text


@pytest.mark.parametrize(
    ("peer", "headers", "served"),
    [
        ("127.0.0.1", {}, True),
        ("::1", {}, True),
        ("::ffff:127.0.0.1", {}, True),
        # private ranges are not trusted by default: behind SNAT or a load balancer
        # every client (the watched ones too) arrives from one
        ("192.168.7.8", {}, False),
        ("172.31.0.1", {}, False),
        ("10.0.0.5", {}, False),
        ("fd12:3456::1", {}, False),
        ("203.0.113.7", {}, False),  # a public client: the watched, not the watchers
        ("2001:db8::1", {}, False),
        ("172.32.0.1", {}, False),
        ("testclient", {}, False),  # not an address
        ("127.0.0.1", {"x-forwarded-for": "203.0.113.7"}, False),  # spoofed: untrusted peer
        ("127.0.0.1", {"x-api-key": "a"}, True),
    ],
)
def test_metrics_only_for_allowed_networks(
    tmp_path: Path, registry: CollectorRegistry, peer: str, headers: dict[str, str], served: bool
) -> None:
    _, mw, echo, _ = make(tmp_path, registry)
    r = TestClient(mw, client=(peer, 5000)).get("/metrics", headers=headers)
    if served:
        assert r.status_code == 200 and "guard_requests_total" in r.text
        assert echo.bodies == []
    else:
        # no endpoint for this client: the request goes on to the app like any other
        assert "guard_requests_total" not in r.text
        assert r.status_code == 200 and echo.bodies == [b""]  # the echo app answered


def test_metrics_allow_from_follows_trusted_proxies(
    tmp_path: Path, registry: CollectorRegistry
) -> None:
    _, mw, _, _ = make(
        tmp_path,
        registry,
        client_identity={"trusted_proxies": ["10.0.0.0/8"]},
        metrics={"allow_from": ["192.0.2.0/24"]},
    )
    proxy = TestClient(mw, client=("10.0.0.5", 5000))
    # the proxy's own address is not allowed; the client it names decides
    assert "guard_requests_total" not in proxy.get("/metrics").text
    named = proxy.get("/metrics", headers={"x-forwarded-for": "192.0.2.10"})
    assert "guard_requests_total" in named.text
    public = proxy.get("/metrics", headers={"x-forwarded-for": "198.51.100.1"})
    assert "guard_requests_total" not in public.text


def test_metrics_from_a_unix_socket_and_for_everyone(registry: CollectorRegistry) -> None:
    """No client address (a unix socket behind a proxy): no endpoint; ``0.0.0.0/0`` opens it."""

    async def scrape(mw: GuardMiddleware, client: tuple[str, int] | None) -> bytes:
        sent: list[Any] = []

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: Any) -> None:
            sent.append(message)

        scope = {
            "type": "http",
            "method": "GET",
            "path": "/metrics",
            "headers": [(b"x-forwarded-for", b"203.0.113.5")] if client is None else [],
            "client": client,
        }
        await mw(scope, receive, send)
        return b"".join(m.get("body", b"") for m in sent)

    echo = EchoApp()
    closed = GuardMiddleware(echo, config={"audit": {"enabled": False}}, registry=registry)
    assert b"guard_requests_total" in asyncio.run(scrape(closed, ("127.0.0.1", 1)))
    assert b"guard_requests_total" not in asyncio.run(scrape(closed, None))
    assert b"guard_requests_total" not in asyncio.run(scrape(closed, ("198.51.100.1", 1)))
    opened = GuardMiddleware(
        echo,
        config={"audit": {"enabled": False}, "metrics": {"allow_from": ["0.0.0.0/0", "::/0"]}},
        registry=CollectorRegistry(),
    )
    assert b"guard_requests_total" not in asyncio.run(scrape(opened, None))
    assert b"guard_requests_total" in asyncio.run(scrape(opened, ("198.51.100.1", 1)))


def test_config_path_and_dict_and_object_are_equivalent(tmp_path: Path) -> None:
    path = tmp_path / "g.yaml"
    path.write_text("limits:\n  max_rows: 7\n")
    for source in (
        str(path),
        {"limits": {"max_rows": 7}},
        GuardConfig.from_dict({"limits": {"max_rows": 7}}),
    ):
        mw = GuardMiddleware(EchoApp(), config=source, registry=CollectorRegistry())
        assert mw.config.limits.max_rows == 7


@pytest.mark.parametrize(("below", "status"), [(-0.5, 403), (-2.0, 200)])
def test_escalation_by_score(
    tmp_path: Path, registry: CollectorRegistry, below: float, status: int
) -> None:
    """A firing detector's score (here -1) picks the rung of its escalation ladder."""
    client, _, _, _ = make(
        tmp_path,
        registry,
        policy={
            "detectors": [
                {
                    "type": "test-fixed",
                    "name": "fx",
                    "action": "flag",
                    "params": {"fire_at": 5},
                    "escalate": [{"score_below": below, "action": "block"}],
                }
            ]
        },
    )
    assert client.post(V2, json=v2_body([[9.0]])).status_code == status
    action = "block" if status == 403 else "flag"
    assert (
        sample(registry, "guard_detections_total", policy="inference", detector="fx", action=action)
        == 1
    )


def test_starlette_add_middleware(tmp_path: Path) -> None:
    """``app.add_middleware(GuardMiddleware, config=...)`` works as documented."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def predict(request: Request) -> JSONResponse:
        body = await request.json()
        return JSONResponse({"predictions": [[0.25, 0.75]] * len(body["instances"])})

    cfg = tmp_path / "guard.yaml"
    cfg.write_text("audit: {enabled: false}\nlimits: {max_rows: 2}\n")
    app = Starlette(routes=[Route("/v1/models/m:predict", predict, methods=["POST"])])
    app.add_middleware(GuardMiddleware, config=str(cfg))
    client = TestClient(app, client=("127.0.0.1", 5000))
    ok = client.post("/v1/models/m:predict", json={"instances": [[1.0], [2.0]]})
    assert ok.status_code == 200 and ok.json() == {"predictions": [[0.25, 0.75]] * 2}
    assert ok.headers["x-request-id"]
    assert client.post("/v1/models/m:predict", json={"instances": [[1.0]] * 3}).status_code == 413
    assert "guard_requests_total" in client.get("/metrics").text
