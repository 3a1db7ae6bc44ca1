"""What the guard builds from a request, and what goes on the answer, when nothing reads more.

A policy whose detectors only count rows (a rate limit costing ``rows``) gets the
row count without the request's matrix being built; one detector that reads
rows, the capture log, or a degrade action with row-keyed noise brings the
matrix back. A verdict that only adds rate-limit fields to the answer adds them
without capturing the answer, replacing any the app set itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from starlette.testclient import TestClient

from inference_guard.middleware.asgi import GuardMiddleware
from tests.middleware.fakes import EchoApp, FixedDetector

V2 = "/v2/models/m/infer"


def v2_body(n_rows: int, width: int = 4) -> dict[str, Any]:
    data = [float(i % 7) for i in range(n_rows * width)]
    return {"inputs": [{"name": "x", "shape": [n_rows, width], "datatype": "FP32", "data": data}]}


def fixed(name: str, *, reads_rows: bool | None = None, action: str = "flag") -> dict[str, Any]:
    params: dict[str, Any] = {"fire_at": None}
    if reads_rows is not None:
        params["reads_rows"] = reads_rows
    return {"type": "test-fixed", "name": name, "action": action, "params": params}


def build(
    tmp_path: Path, registry: CollectorRegistry, detectors: list[dict[str, Any]], **top: Any
) -> tuple[TestClient, GuardMiddleware]:
    policy = {
        "name": "inference",
        "routes": ["/v2/models/*/infer"],
        "degrade": {"always": False},
        "detectors": detectors,
    }
    cfg = {"policies": [policy], "audit": {"path": str(tmp_path / "audit.jsonl")}, **top}
    mw = GuardMiddleware(EchoApp(), config=cfg, registry=registry)
    return TestClient(mw, client=("203.0.113.7", 5000)), mw


def seen(mw: GuardMiddleware, name: str) -> FixedDetector:
    for policy in mw.guard.policies:
        for armed in policy.detectors:
            if armed.detector.name == name:
                assert isinstance(armed.detector, FixedDetector)
                return armed.detector
    raise AssertionError(f"no detector {name!r}")


def test_detectors_that_only_count_rows_get_the_count_without_the_matrix(
    tmp_path: Path, registry: CollectorRegistry
) -> None:
    client, mw = build(
        tmp_path,
        registry,
        [
            fixed("counter", reads_rows=False),
            {"type": "rate", "params": {"limits": [{"rate": 1000, "per": "1m"}]}},
        ],
    )
    assert client.post(V2, json=v2_body(3)).status_code == 200
    (query,) = seen(mw, "counter").seen
    assert query.n_rows == 3
    assert query.rows is None


@pytest.mark.parametrize(
    ("extra", "top"),
    [
        ([fixed("reader")], {}),  # a detector that does not say: it may read rows
        ([fixed("reader", reads_rows=True)], {}),
        (
            [
                {
                    "type": "rate",
                    "params": {"limits": [{"rate": 1000, "per": "1m"}], "cost": "values"},
                }
            ],
            {},
        ),
        ([fixed("degrader", reads_rows=False, action="degrade")], {}),  # noise keyed by row
        ([], {"capture": {"sample": 1.0}}),
    ],
    ids=["undeclared", "declared", "rate-costing-values", "degrade-with-noise", "capture"],
)
def test_the_matrix_is_built_when_anything_reads_it(
    tmp_path: Path, registry: CollectorRegistry, extra: list[dict[str, Any]], top: dict[str, Any]
) -> None:
    if "capture" in top:
        top = {"capture": {**top["capture"], "path": str(tmp_path / "capture.jsonl")}}
    client, mw = build(tmp_path, registry, [fixed("counter", reads_rows=False), *extra], **top)
    assert client.post(V2, json=v2_body(3)).status_code == 200
    (query,) = seen(mw, "counter").seen
    assert query.n_rows == 3
    assert query.rows is not None
    assert query.rows.shape == (3, 4)


def test_a_rate_limit_counting_rows_still_refuses_a_batch_over_its_burst(
    tmp_path: Path, registry: CollectorRegistry
) -> None:
    rate = {
        "type": "rate",
        "action": "throttle",
        "params": {"limits": [{"rate": 1, "per": "1h", "burst": 20}]},
    }
    client, _ = build(tmp_path, registry, [rate])
    assert client.post(V2, json=v2_body(30)).status_code == 429
    assert client.post(V2, json=v2_body(20)).status_code == 200
    assert client.post(V2, json=v2_body(1)).status_code == 429


class HeaderApp(EchoApp):
    """Answers with rate-limit fields and a request id of its own."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        async def own_headers(message: Any) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [
                    *message["headers"],
                    (b"ratelimit", b'"app";r=0;t=9'),
                    (b"x-request-id", b"app-id"),
                    (b"x-app", b"kept"),
                ]
            await send(message)

        await super().__call__(scope, receive, own_headers)


def test_rate_fields_go_on_the_answer_replacing_the_apps_and_the_body_passes_as_is(
    tmp_path: Path, registry: CollectorRegistry
) -> None:
    policy = {
        "name": "inference",
        "routes": ["/v2/models/*/infer"],
        "degrade": {"always": False},
        "detectors": [{"type": "rate", "params": {"limits": [{"rate": 10, "per": "1m"}]}}],
    }
    app = HeaderApp()
    mw = GuardMiddleware(
        app, config={"policies": [policy], "audit": {"enabled": False}}, registry=registry
    )
    client = TestClient(mw)
    r = client.post(V2, json=v2_body(2))
    assert r.status_code == 200
    assert r.headers.get_list("ratelimit") == ['"rate";r=8;t=12']
    assert r.headers.get_list("ratelimit-policy") == ['"rate";q=10;w=60']
    (rid,) = r.headers.get_list("x-request-id")
    assert rid != "app-id" and len(rid) == 24
    assert r.headers["x-app"] == "kept"
    assert r.json() == app.answer
