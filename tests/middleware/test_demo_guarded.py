"""``guard demo``'s app: the digits model behind the demo policy, calibrated at start-up."""

from __future__ import annotations

import pytest
from starlette.testclient import TestClient

from inference_guard.middleware.demo import build_demo_app, train_digits_model
from tests.e2e.test_server import metric


@pytest.fixture(scope="module")
def client() -> TestClient:
    # from the host itself: metrics.allow_from lets loopback scrape /metrics
    return TestClient(build_demo_app(), client=("127.0.0.1", 50000))


def v2(rows: list[list[float]]) -> dict[str, object]:
    return {
        "inputs": [
            {
                "name": "input-0",
                "shape": [len(rows), 64],
                "datatype": "FP32",
                "data": [x for r in rows for x in r],
            }
        ]
    }


def test_demo_answers_rounded_probabilities(client: TestClient) -> None:
    model = train_digits_model()
    rows = model.X_test[:4].tolist()
    r = client.post("/v2/models/digits/infer", json=v2(rows), headers={"x-api-key": "demo-a"})
    assert r.status_code == 200
    out = {o["name"]: o for o in r.json()["outputs"]}
    assert out["label"]["data"] == model.predict(model.X_test[:4]).tolist()
    probs = out["probabilities"]["data"]
    assert all(round(p, 3) == p for p in probs)
    v1 = client.post(
        "/v1/models/digits:predict", json={"instances": rows[:1]}, headers={"x-api-key": "demo-a"}
    )
    assert v1.status_code == 200 and len(v1.json()["predictions"][0]) == 10


def test_demo_flags_out_of_distribution_rows(client: TestClient) -> None:
    r = client.post(
        "/v2/models/digits/infer", json=v2([[99.0] * 64]), headers={"x-api-key": "demo-b"}
    )
    assert r.status_code == 200  # flag: passes, recorded
    text = client.get("/metrics").text
    for name in ("envelope", "mahalanobis", "knn"):
        assert metric(text, "guard_detections_total", detector=name, action="flag") >= 1


def test_demo_endpoints(client: TestClient) -> None:
    assert client.get("/healthz").status_code == 200
    meta = client.get("/v2/models/digits").json()
    assert meta["inputs"][0]["shape"] == [-1, 64]
    bad = client.post(
        "/v2/models/digits/infer", content=b"[1, NaN]", headers={"content-type": "application/json"}
    )
    assert bad.status_code == 400
