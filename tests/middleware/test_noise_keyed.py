"""A degraded client's noise is a keyed function of (client, row): repeats cannot average it."""

from __future__ import annotations

import json
import logging
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry
from starlette.testclient import TestClient

from inference_guard.guard.config import DegradeConfig
from inference_guard.guard.payload.degrade import RowNoise, degrade_response, noise_key, perturb
from inference_guard.middleware.asgi import GuardMiddleware
from inference_guard.middleware.types import Message, Receive, Scope, Send

KEY = bytes(range(64))
SPEC = DegradeConfig(decimals=None, noise=0.1)


# ------------------------------------------------------------------ the noise itself


def test_one_client_one_row_one_draw_at_any_batch_position() -> None:
    rows = np.array([[1.0, 2.0], [3.0, 4.0], [1.0, 2.0]])
    probs = np.array([[0.5, 0.5], [0.5, 0.5], [0.9, 0.1]])  # the model's answer may differ
    z = RowNoise(KEY, "client-a", rows).normals(probs)
    assert z.shape == (3, 2)
    np.testing.assert_array_equal(z[0], z[2])
    assert not np.array_equal(z[0], z[1])
    alone = RowNoise(KEY, "client-a", rows[2:]).normals(probs[2:])
    np.testing.assert_array_equal(alone[0], z[0])
    # -0.0 is the row 0.0, not a fresh draw
    signed = RowNoise(KEY, "client-a", np.array([[-0.0, 2.0]])).normals(probs[:1])
    plain = RowNoise(KEY, "client-a", np.array([[0.0, 2.0]])).normals(probs[:1])
    np.testing.assert_array_equal(signed, plain)


def test_other_clients_and_other_keys_get_other_noise() -> None:
    rows = np.array([[1.0, 2.0]])
    probs = np.array([[0.5, 0.5]])
    a = RowNoise(KEY, "client-a", rows).normals(probs)
    b = RowNoise(KEY, "client-b", rows).normals(probs)
    other_key = RowNoise(bytes(64), "client-a", rows).normals(probs)
    assert not np.array_equal(a, b) and not np.array_equal(a, other_key)


def test_without_matching_rows_the_probability_row_identifies_the_row() -> None:
    probs = np.array([[0.4, 0.6], [0.4000001, 0.5999999], [0.3, 0.7]])
    z = RowNoise(KEY, "c", None).normals(probs)
    np.testing.assert_array_equal(z[0], z[1])  # equal to 6 decimals
    assert not np.array_equal(z[0], z[2])
    # a one-row request with a three-row answer: rows do not line up, so probabilities decide
    mismatched = RowNoise(KEY, "c", np.array([[1.0, 2.0]])).normals(probs)
    np.testing.assert_array_equal(mismatched, z)


def test_the_normals_are_standard_normal() -> None:
    rows = np.arange(20_000, dtype=np.float64).reshape(-1, 1)
    z = RowNoise(KEY, "c", rows).normals(np.full((20_000, 3), 1 / 3)).ravel()
    assert abs(z.mean()) < 0.03 and abs(z.std() - 1.0) < 0.03
    assert abs(np.mean(np.abs(z) < 1.0) - 0.6827) < 0.01
    assert np.isfinite(z).all()


def test_noise_still_flips_near_boundary_answers_and_spares_confident_ones() -> None:
    n = 4000
    rows = np.arange(n, dtype=np.float64).reshape(-1, 1)
    near = np.tile([0.52, 0.48], (n, 1))
    sure = np.tile([0.95, 0.05], (n, 1))
    noise = RowNoise(KEY, "c", rows)
    flipped = np.mean(perturb(near, SPEC, noise).argmax(axis=1) == 1)
    # P(z1 - z2 < -0.04 / 0.1) = Phi(-0.283) = 0.389 for N(0, 0.1^2) noise on each class
    assert 0.35 < flipped < 0.43
    assert np.all(perturb(sure, SPEC, noise).argmax(axis=1) == 0)
    # and the same draw every time: repeating the rows averages nothing away
    np.testing.assert_array_equal(perturb(near, SPEC, noise), perturb(near, SPEC, noise))


def test_degrade_response_uses_the_keyed_noise() -> None:
    answer = json.dumps({"predictions": [[0.51, 0.49]] * 3}).encode()
    rows = np.array([[1.0], [2.0], [1.0]])
    out = [
        json.loads(
            degrade_response(
                answer,
                fmt="kserve_v1",
                content_type="application/json",
                spec=DegradeConfig(decimals=3, noise=0.1),
                noise=RowNoise(KEY, "c", rows),
            )
            or b""
        )
        for _ in range(2)
    ]
    assert out[0] == out[1]
    assert out[0]["predictions"][0] == out[0]["predictions"][2]


def test_the_key_comes_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("GUARD_NOISE_KEY", "shared-by-every-worker")
    shared = noise_key()
    assert shared == noise_key() and len(shared) == 64
    monkeypatch.setenv("GUARD_NOISE_KEY", "another-deployment")
    assert noise_key() != shared
    monkeypatch.delenv("GUARD_NOISE_KEY")
    with caplog.at_level(logging.WARNING, logger="guard"):
        first, second = noise_key(), noise_key()
    assert first == second != shared  # one random key per process
    # warned once per process at most (an earlier test may have had the warning)
    assert sum("GUARD_NOISE_KEY" in r.message for r in caplog.records) <= 1


# ------------------------------------------------------------------ through the middleware


class RowModel:
    """KServe v1: two classes, p = 0.5 + 0.001 * row[1] for each row."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = b""
        while True:
            msg: Message = await receive()
            body += msg.get("body", b"")
            if not msg.get("more_body"):
                break
        rows = json.loads(body)["instances"]
        preds = [[0.5 + 0.001 * r[1], 0.5 - 0.001 * r[1]] for r in rows]
        payload = json.dumps({"predictions": preds}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(payload)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": payload})


@pytest.fixture
def client(monkeypatch: pytest.MonkeyPatch, registry: CollectorRegistry) -> TestClient:
    import tests.middleware.fakes  # noqa: F401 - registers test-fixed

    # both secrets fixed: the client ids, and so the answers, are the same on every run
    monkeypatch.setenv("GUARD_NOISE_KEY", "test-noise-key")
    monkeypatch.setenv("GUARD_HASH_KEY", "test-hash-key-of-16-bytes")
    cfg: dict[str, Any] = {
        "audit": {"enabled": False},
        "policies": [
            {
                "name": "inference",
                "routes": ["/v1/models/*:predict"],
                "degrade": {"decimals": 4, "noise": 0.2},
                "detectors": [
                    {"type": "test-fixed", "action": "degrade", "params": {"fire_at": 5}}
                ],
            }
        ],
    }
    return TestClient(GuardMiddleware(RowModel(), config=cfg, registry=registry))


def predict(client: TestClient, rows: list[list[float]], key: str) -> list[list[float]]:
    response = client.post(
        "/v1/models/m:predict", json={"instances": rows}, headers={"x-api-key": key}
    )
    assert response.status_code == 200
    preds: list[list[float]] = response.json()["predictions"]
    return preds


def test_a_degraded_client_gets_the_same_answer_for_the_same_row(client: TestClient) -> None:
    row = [9.0, 3.0]
    alone = predict(client, [row], "attacker")
    again = predict(client, [row], "attacker")
    batched = predict(client, [[9.0, 1.0], [9.0, 2.0], row], "attacker")
    assert alone == again
    assert batched[2] == alone[0]
    assert batched[0] != batched[1]
    assert alone[0] != [0.503, 0.497]  # it is perturbed
    other = predict(client, [row], "someone-else")
    assert other != alone
    # a client that is not degraded gets the rounded answer only
    assert predict(client, [[1.0, 3.0]], "attacker") == [[0.503, 0.497]]


def test_repeating_a_near_boundary_row_cannot_reveal_its_true_label(client: TestClient) -> None:
    """Fresh noise per answer would let a majority vote over repeats undo it."""
    rows = [[9.0, float(i) / 10] for i in range(200)]  # true p within 0.02 of the tie
    first = predict(client, rows, "prober")
    for _ in range(3):
        assert predict(client, rows, "prober") == first
    flipped = sum(1 for p in first if p[0] < p[1])
    assert 30 < flipped < 170  # the noise flips a good share of them, for good
