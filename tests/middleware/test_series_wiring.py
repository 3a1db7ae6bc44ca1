"""The middleware declares its series at start-up and counts the app's answers by status class.

Both are what the shipped alerts and dashboard read: a detection or quarantine
series that appears only at its first event hides that event from
``increase()``, and "model answers by status class" is the app's own health.
"""

from __future__ import annotations

import json
from typing import Any

from prometheus_client import CollectorRegistry
from starlette.testclient import TestClient

from inference_guard.middleware.asgi import GuardMiddleware
from inference_guard.middleware.types import Receive, Scope, Send
from tests.middleware.fakes import EchoApp

V2 = "/v2/models/m/infer"
BODY = {"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP64", "data": [1.0, 2.0, 3.0]}]}


class StatusApp:
    """Answers every request with the status the path's last segment names (``/s/503``)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        status = int(scope["path"].rsplit("/", 1)[-1]) if scope["path"].startswith("/s/") else 200
        body = json.dumps({"outputs": []}).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})


def config(**policy: Any) -> dict[str, Any]:
    return {"audit": {"enabled": False},
            "policies": [{"name": "inference", "routes": [V2, "/s/*"], **policy}]}


def sample(mw: GuardMiddleware, name: str, **labels: str) -> float | None:
    mw.guard.metrics.tally.flush()
    return mw.guard.metrics.registry.get_sample_value(name, labels)


def test_detection_and_quarantine_series_exist_at_zero_before_any_request() -> None:
    mw = GuardMiddleware(
        EchoApp(),
        config=config(
            quarantine_s=60,
            detectors=[{"type": "rate", "action": "throttle",
                        "params": {"limits": [{"rate": 1, "per": "1s"}]}}],
        ),
        registry=CollectorRegistry(),
    )
    assert sample(mw, "guard_detections_total",
                  policy="inference", detector="rate", action="throttle") == 0.0
    assert sample(mw, "guard_quarantines_total", policy="inference") == 0.0
    assert sample(mw, "guard_upstream_responses_total", policy="inference", code_class="5xx") == 0.0
    info = [s for f in mw.guard.metrics.registry.collect() if f.name == "guard_build_info"
            for s in f.samples]
    assert len(info) == 1 and info[0].labels["config_sha"]


def test_answers_are_counted_by_status_class_on_the_fast_lane_and_the_watched_path() -> None:
    # validation only: the fast lane; degrade.always: the answer is watched and rewritten
    for policy in ({"degrade": {"always": False}}, {"degrade": {"always": True, "decimals": 2}}):
        mw = GuardMiddleware(StatusApp(), config=config(**policy), registry=CollectorRegistry())
        client = TestClient(mw)  # no lifespan: the stand-in app has none
        for path in (V2, V2, "/s/503", "/s/404"):
            client.post(path, json=BODY)
        counts = {c: sample(mw, "guard_upstream_responses_total", policy="inference",
                            code_class=c) for c in ("2xx", "4xx", "5xx")}
        assert counts == {"2xx": 2.0, "4xx": 1.0, "5xx": 1.0}, policy


def test_a_refused_request_is_not_an_answer_of_the_app() -> None:
    mw = GuardMiddleware(StatusApp(), config=config(), registry=CollectorRegistry())
    assert TestClient(mw).post(V2, content=b"{not json").status_code == 400
    assert sample(mw, "guard_upstream_responses_total", policy="inference",
                  code_class="2xx") == 0.0
    assert sample(mw, "guard_upstream_responses_total", policy="inference",
                  code_class="4xx") == 0.0
