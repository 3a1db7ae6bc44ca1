"""Middleware mode: the guard learns the demo model's signature from the app it wraps."""

from __future__ import annotations

import json
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from inference_guard.middleware.asgi import GuardMiddleware
from inference_guard.middleware.demo import build_model_app
from tests.error_bodies import error_message
from tests.middleware.test_fuzz import JSON_CT, request, total

V2 = "/v2/models/digits/infer"


@pytest.fixture(scope="module")
def model() -> Any:
    return build_model_app()


def guard(model: Any, signature: dict[str, Any], registry: CollectorRegistry) -> GuardMiddleware:
    config = {
        "audit": {"enabled": False},
        "policies": [
            {"name": "inference", "routes": ["/v2/models/*/infer"], "signature": signature}
        ],
    }
    return GuardMiddleware(model, config=config, registry=registry)


def body(name: str = "input-0", datatype: str = "FP32", shape: tuple[int, int] = (2, 64)) -> bytes:
    n = shape[0] * shape[1]
    return json.dumps(
        {"inputs": [{"name": name, "datatype": datatype, "shape": list(shape), "data": [0.0] * n}]}
    ).encode()


@pytest.mark.parametrize(
    ("request_body", "reason", "text"),
    [
        (body(datatype="FP64"), "bad_type", "must be FP32"),
        (body(shape=(1, 63)), "bad_shape", "must have shape [-1, 64]"),
        (body(name="x"), "bad_shape", "no input named 'x'"),
    ],
    ids=["datatype", "shape", "name"],
)
def test_requests_off_the_learned_signature_are_refused_before_the_model(
    model: Any, request_body: bytes, reason: str, text: str
) -> None:
    registry = CollectorRegistry()
    mw = guard(model, {"learn": True}, registry)
    res = request(mw, V2, request_body, headers=[JSON_CT])
    assert res.status == 400
    assert text in error_message(res.body, V2)
    assert total(registry, "guard_invalid_requests", reason=reason) == 1
    ok = request(mw, V2, body(), headers=[JSON_CT])
    assert ok.status == 200, ok.body
    assert total(registry, "guard_errors", component="signature") == 0


def test_a_given_signature_needs_no_metadata(model: Any) -> None:
    registry = CollectorRegistry()
    given = {"inputs": [{"name": "input-0", "datatype": "FP32", "shape": [1, 64]}]}
    mw = guard(model, given, registry)
    assert request(mw, V2, body(shape=(1, 64)), headers=[JSON_CT]).status == 200
    refused = request(mw, V2, body(shape=(2, 64)), headers=[JSON_CT])
    assert refused.status == 400 and "[1, 64]" in error_message(refused.body, V2)


def test_no_metadata_endpoint_leaves_the_guard_working(
    model: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # the demo model has no metadata for "other": its 404 leaves the guard without a
    # signature for that model, counted and logged once; the model answers itself
    registry = CollectorRegistry()
    mw = guard(model, {"learn": True}, registry)
    other = "/v2/models/other/infer"
    for _ in range(3):
        res = request(mw, other, body(datatype="FP64"), headers=[JSON_CT])
        assert res.status == 404
    assert total(registry, "guard_errors", component="signature") == 1
    warned = [r for r in caplog.records if "/v2/models/other" in r.getMessage()]
    assert len(warned) == 1


def test_kserve_v1_rows_are_held_to_the_signature_learned_for_the_model(model: Any) -> None:
    """A KServe v1 route's model is looked up by name on the OIP v2 metadata endpoint; its
    one FP32 input of shape [-1, 64] then says what rows it takes."""
    registry = CollectorRegistry()
    config = {
        "audit": {"enabled": False},
        "policies": [
            {
                "name": "inference",
                "routes": ["/v2/models/*/infer", "/v1/models/*"],
                "signature": {"learn": True},
            }
        ],
    }
    mw = GuardMiddleware(model, config=config, registry=registry)
    v1 = "/v1/models/digits:predict"
    ok = request(mw, v1, json.dumps({"instances": [[0.0] * 64]}).encode(), headers=[JSON_CT])
    assert ok.status == 200, ok.body
    for doc, reason in [
        ({"instances": [[0.0] * 32]}, "bad_shape"),
        ({"instances": [[[0.0] * 8] * 8]}, "bad_shape"),
        ({"instances": ["seven"]}, "bad_type"),
    ]:
        before = total(registry, "guard_invalid_requests", reason=reason)
        res = request(mw, v1, json.dumps(doc).encode(), headers=[JSON_CT])
        assert res.status == 400, (doc, res.body)
        assert total(registry, "guard_invalid_requests", reason=reason) == before + 1
    assert total(registry, "guard_invalid_requests", reason="bad_shape") == 2
    assert total(registry, "guard_invalid_requests", reason="bad_type") == 1
    assert total(registry, "guard_errors", component="signature") == 0
