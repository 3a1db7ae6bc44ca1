"""Custom JSON shapes (``payload:``) and unknown formats (``unknown_format:``), in process.

A real Starlette app answers ``{"probabilities": [[...]]}`` to
``{"features": [[...]]}``; the guard in front of it uses real detectors (a
row-cost rate limit, a calibrated envelope) and real capture files. Only the
answer-watching test uses the project's recording detector, to see what a
stateful detector is handed.
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from inference_guard.guard.calibrate import calibrate_rows
from inference_guard.middleware.asgi import GuardMiddleware
from tests.conftest import sample
from tests.middleware.fakes import ObservingDetector

POINTERS = {"rows": "/features", "probabilities": "/probabilities"}
#: what the model answers for each row: more decimals than the output policy lets out
RAW = [0.123456, 0.876544]


class Model:
    """A Starlette app with one custom-shape route; it records every body it receives."""

    def __init__(self, answer: Any = None) -> None:
        self.received: list[Any] = []
        self.answer = answer
        self.app = Starlette(
            routes=[
                Route("/score", self.score, methods=["POST"]),
                Route("/other", self.score, methods=["POST"]),
            ]
        )

    async def score(self, request: Request) -> JSONResponse:
        body = await request.body()
        self.received.append(body)
        if self.answer is not None:
            return JSONResponse(self.answer)
        doc = json.loads(body)
        n = len(doc["features"]) if isinstance(doc, dict) and "features" in doc else 1
        return JSONResponse({"model": "m", "probabilities": [RAW] * n})


def guarded(
    registry: CollectorRegistry,
    model: Model | None = None,
    *,
    detectors: list[dict[str, Any]] | None = None,
    **policy: Any,
) -> tuple[TestClient, GuardMiddleware, Model]:
    model = model or Model()
    pol: dict[str, Any] = {
        "name": "scoring",
        "routes": ["/score", "/other"],
        "payload": POINTERS,
        "detectors": detectors or [],
    }
    pol.update(policy)
    top = pol.pop("top", {})
    config = {"audit": {"enabled": False}, "policies": [pol], **top}
    mw = GuardMiddleware(model.app, config=config, registry=registry)
    return TestClient(mw, client=("203.0.113.7", 5000)), mw, model


def metric(mw: GuardMiddleware, name: str, **labels: str) -> float:
    mw.guard.metrics.tally.flush()
    return sample(mw.registry, name, **labels)


def rate(burst: int) -> dict[str, Any]:
    return {
        "type": "rate",
        "action": "throttle",
        "params": {"cost": "rows", "limits": [{"rate": burst, "per": "1d", "burst": burst}]},
    }


def test_rows_are_charged_to_a_row_cost_rate_limit(registry: CollectorRegistry) -> None:
    client, mw, model = guarded(registry, detectors=[rate(20)])
    refused = client.post("/score", json={"features": [[1.0, 2.0]] * 30})
    assert refused.status_code == 429
    assert "retry-after" in refused.headers
    assert model.received == []
    ok = client.post("/score", json={"features": [[1.0, 2.0]] * 5})
    assert ok.status_code == 200
    assert ";r=15;" in ok.headers["ratelimit"]  # 5 of the 20 rows spent, not 1 request
    assert metric(mw, "guard_rows_total", policy="scoring", decision="throttle") == 30
    assert metric(mw, "guard_rows_total", policy="scoring", decision="allow") == 5
    assert metric(mw, "guard_payloads_total", policy="scoring", format="custom") == 2


def test_more_rows_than_max_rows_get_413(registry: CollectorRegistry) -> None:
    client, mw, model = guarded(registry, top={"limits": {"max_rows": 20}})
    r = client.post("/score", json={"features": [[1.0, 2.0]] * 30})
    assert r.status_code == 413
    assert model.received == []
    assert metric(mw, "guard_invalid_requests_total", policy="scoring", reason="too_many_rows") == 1


@pytest.mark.parametrize(
    ("body", "content_type", "status", "reason"),
    [
        (b'{"features": [[1.0, 1e999]]}', "application/json", 400, "non_finite"),
        (b'{"features": [[1.0, 2.0], [3.0]]}', "application/json", 400, "bad_shape"),
        (b'{"features": [[1.0, "2.0"]]}', "application/json", 400, "bad_type"),
        (b'{"features": [[1.0, null]]}', "application/json", 400, "bad_type"),
        (b'{"features": {"a": 1}}', "application/json", 400, "bad_type"),
        (b'{"features": []}', "application/json", 400, "bad_shape"),
        (b'{"features": [[1, 2, 3, 4]]}', "application/json", 400, "too_many_features"),
        (b'{"instances": [[1.0, 2.0]]}', "application/json", 400, "bad_shape"),
        (b'{"features": [[1.0, 2.0]', "application/json", 400, "invalid_json"),
        (b'{"features": [[[[[1]]]]]}', "application/json", 400, "too_deep"),
        (b'{"features": [[1.0, 2.0]]}', "text/plain", 415, "unsupported_media_type"),
    ],
)
def test_custom_rows_are_validated_like_built_in_formats(
    registry: CollectorRegistry, body: bytes, content_type: str, status: int, reason: str
) -> None:
    client, mw, model = guarded(registry, top={"limits": {"max_features": 3, "max_json_depth": 4}})
    r = client.post("/score", content=body, headers={"content-type": content_type})
    assert r.status_code == status, r.text
    assert model.received == []
    assert metric(mw, "guard_invalid_requests_total", policy="scoring", reason=reason) == 1


def test_a_flat_list_is_one_row(registry: CollectorRegistry) -> None:
    client, _, _ = guarded(registry, detectors=[rate(20)])
    r = client.post("/score", json={"features": [1.0, 2.0, 3.0]})
    assert r.status_code == 200
    assert ";r=19;" in r.headers["ratelimit"]


def test_the_declared_shape_is_authoritative(registry: CollectorRegistry) -> None:
    # a body holding another format's key too is still read at the policy's pointer
    client, mw, _ = guarded(registry, detectors=[rate(20)])
    body = {"features": [[1.0, 2.0]], "instances": [[1.0, 2.0]] * 30}
    r = client.post("/score", json=body)
    assert r.status_code == 200
    assert ";r=19;" in r.headers["ratelimit"]
    assert metric(mw, "guard_payloads_total", policy="scoring", format="custom") == 1
    assert metric(mw, "guard_payloads_total", policy="scoring", format="kserve_v1") == 0


def test_rows_reach_the_anomaly_detector(tmp_path: Path, registry: CollectorRegistry) -> None:
    rng = np.random.default_rng(0)
    calibrate_rows(rng.normal(size=(400, 2)), tmp_path, kinds=["envelope"], target_fpr=0.01)
    client, mw, model = guarded(
        registry,
        detectors=[{"type": "envelope", "action": "flag"}],
        top={"calibration_dir": str(tmp_path)},
    )
    assert client.post("/score", json={"features": [[0.1, -0.2], [0.3, 0.0]]}).status_code == 200
    assert metric(mw, "guard_detections_total", policy="scoring", detector="envelope") == 0
    flagged = client.post("/score", json={"features": [[0.1, -0.2], [40.0, -40.0]]})
    assert flagged.status_code == 200  # flag: answered, counted
    assert len(model.received) == 2
    assert (
        metric(mw, "guard_detections_total", policy="scoring", detector="envelope", action="flag")
        == 1
    )


def test_answers_are_rounded_at_the_probabilities_pointer(registry: CollectorRegistry) -> None:
    client, mw, _ = guarded(registry)  # the default output policy: 2 decimals for everyone
    r = client.post("/score", json={"features": [[1.0, 2.0], [3.0, 4.0]]})
    assert r.status_code == 200
    assert r.json() == {"model": "m", "probabilities": [[0.12, 0.88], [0.12, 0.88]]}
    assert metric(mw, "guard_degraded_responses_total", policy="scoring", outcome="degraded") == 1


def test_nested_pointer_flat_answer_and_labels_only(registry: CollectorRegistry) -> None:
    model = Model(answer={"result": {"scores": RAW, "model": "m"}})
    client, _, _ = guarded(
        registry, model, payload={"rows": "/features", "probabilities": "/result/scores"}
    )
    assert client.post("/score", json={"features": [1.0]}).json() == {
        "result": {"scores": [0.12, 0.88], "model": "m"}
    }
    labels_client, _, _ = guarded(
        CollectorRegistry(),
        model,
        payload={"rows": "/features", "probabilities": "/result/scores"},
        degrade={"labels_only": True, "noise": 0.0},
    )
    assert labels_client.post("/score", json={"features": [1.0]}).json() == {
        "result": {"scores": 1, "model": "m"}
    }


def test_an_answer_without_the_pointer_is_passed_and_counted(registry: CollectorRegistry) -> None:
    client, mw, _ = guarded(registry, Model(answer={"error": "model unavailable"}))
    r = client.post("/score", json={"features": [[1.0, 2.0]]})
    assert r.json() == {"error": "model unavailable"}
    assert metric(mw, "guard_degraded_responses_total", policy="scoring", outcome="unparsed") == 1


def test_stateful_detectors_observe_argmax_labels(
    tmp_path: Path, registry: CollectorRegistry
) -> None:
    capture = tmp_path / "capture.jsonl"
    model = Model(answer={"probabilities": [[0.1, 0.2, 0.7], [0.6, 0.3, 0.1]]})
    client, mw, _ = guarded(
        registry,
        model,
        detectors=[{"type": "test-observe", "name": "watcher"}],
        top={"capture": {"path": str(capture)}},
    )
    assert client.post("/score", json={"features": [[1.0], [2.0]]}).status_code == 200
    watcher = mw.guard.policies[0].detectors[0].detector
    assert isinstance(watcher, ObservingDetector)
    asyncio.run(mw.guard.drain())  # answers reach observers through the observation queue
    (answer,) = watcher.answers
    assert answer.labels is not None and answer.labels.tolist() == [2, 0]
    assert answer.probabilities is not None
    assert answer.probabilities.tolist() == [[0.1, 0.2, 0.7], [0.6, 0.3, 0.1]]
    asyncio_close(mw)
    (line,) = [json.loads(x) for x in capture.read_text().splitlines()]
    assert (line["fmt"], line["n_rows"], line["rows"], line["labels"]) == (
        "custom",
        2,
        [[1.0], [2.0]],
        [2, 0],
    )


def asyncio_close(mw: GuardMiddleware) -> None:
    import asyncio

    asyncio.run(mw.guard.aclose())


def test_texts_pointer_counts_prompts(registry: CollectorRegistry) -> None:
    model = Model(answer={"probabilities": [RAW]})
    client, mw, _ = guarded(
        registry,
        model,
        payload={"texts": "/prompts", "probabilities": "/probabilities"},
        detectors=[rate(20)],
        top={"limits": {"max_text_chars": 10}},
    )
    assert client.post("/score", json={"prompts": ["hi", "there"]}).status_code == 200
    assert metric(mw, "guard_rows_total", policy="scoring", decision="allow") == 2
    assert client.post("/score", json={"prompts": "one"}).status_code == 200
    assert client.post("/score", json={"prompts": ["x" * 11]}).status_code == 413
    assert client.post("/score", json={"prompts": [1]}).status_code == 400
    assert metric(mw, "guard_invalid_requests_total", policy="scoring", reason="text_too_long") == 1
    assert metric(mw, "guard_invalid_requests_total", policy="scoring", reason="bad_type") == 1


def test_a_payload_policy_does_not_take_the_lean_lane(registry: CollectorRegistry) -> None:
    # no detectors on a KServe path: the lean lane would read it as kserve_v1
    model = Model(answer={"probabilities": [RAW]})
    model.app.router.routes.append(Route("/v1/models/m:predict", model.score, methods=["POST"]))
    client, mw, _ = guarded(
        registry,
        model,
        routes=["/v1/models/*:predict"],
        payload={"rows": "/instances", "probabilities": "/probabilities"},
    )
    assert client.post("/v1/models/m:predict", json={"instances": [[1.0, 2.0]]}).status_code == 200
    assert metric(mw, "guard_payloads_total", policy="scoring", format="custom") == 1
    assert metric(mw, "guard_payloads_total", policy="scoring", format="kserve_v1") == 0


# --------------------------------------------------------------------------- unknown formats


def test_unknown_format_refused_when_asked(registry: CollectorRegistry) -> None:
    client, mw, model = guarded(registry, payload=None, unknown_format="refuse")
    json_refused = client.post("/score", json={"features": [[1.0, 2.0]]})
    assert json_refused.status_code == 400
    assert json_refused.json()["error"]["code"] == "invalid_request"
    text_refused = client.post("/score", content=b"1,2", headers={"content-type": "text/csv"})
    assert text_refused.status_code == 415
    assert model.received == []
    assert (
        metric(mw, "guard_invalid_requests_total", policy="scoring", reason="unknown_format") == 2
    )
    # formats the guard knows still pass
    assert client.post("/score", json={"instances": [[1.0, 2.0]]}).status_code == 200


def test_unknown_format_refused_without_validation_or_detectors(
    registry: CollectorRegistry,
) -> None:
    # refusing needs the body: such a policy is not a pass-through one
    client, _, model = guarded(
        registry, payload=None, unknown_format="refuse", validate=False, degrade={"always": False}
    )
    assert client.post("/score", json={"features": [[1.0]]}).status_code == 400
    assert model.received == []


def test_unknown_format_passed_is_warned_once_per_route(
    registry: CollectorRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    client, mw, model = guarded(registry, payload=None)
    with caplog.at_level(logging.WARNING, logger="guard"):
        for path in ("/score", "/score", "/other"):
            assert client.post(path, json={"features": [[1.0, 2.0]]}).status_code == 200
    warnings = [r.getMessage() for r in caplog.records if "no known payload format" in r.message]
    assert len(warnings) == 2
    assert "policy scoring" in warnings[0] and "route /score " in warnings[0]
    assert "route /other " in warnings[1]
    assert len(model.received) == 3
    assert metric(mw, "guard_payloads_total", policy="scoring", format="unknown") == 3


def test_routes_naming_no_protocol_are_logged_at_start_up(
    registry: CollectorRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="guard"):
        guarded(registry, payload=None, detectors=[rate(20)])
        guarded(CollectorRegistry(), detectors=[rate(20)])  # payload: declared, nothing to say
    lines = [r.getMessage() for r in caplog.records if "name no known protocol" in r.message]
    assert lines == [
        "policy scoring: routes /score, /other name no known protocol; requests there are "
        "read by their JSON shape, and one of no known shape is passed unguarded. Declare a "
        "custom shape with payload: {rows: <JSON pointer>, ...}"
    ]
