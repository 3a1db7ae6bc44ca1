"""Row flags are counted, not audited: the client-level ``anomaly_rate`` writes the line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry
from starlette.testclient import TestClient

from inference_guard.detectors.mahalanobis import MahalanobisOutlier
from inference_guard.detectors.persist import save_model
from inference_guard.guard.decisions import Action, Decision
from inference_guard.middleware.asgi import GuardMiddleware
from tests.conftest import sample
from tests.middleware.fakes import EchoApp

V2 = "/v2/models/m/infer"
D = 4


def body(row: list[float]) -> dict[str, Any]:
    return {"inputs": [{"name": "x", "shape": [1, D], "datatype": "FP64", "data": row}]}


@pytest.fixture
def guarded(tmp_path: Path, registry: CollectorRegistry) -> tuple[GuardMiddleware, Path]:
    rng = np.random.default_rng(0)
    calibration = tmp_path / "calibration"
    calibration.mkdir()
    model = MahalanobisOutlier().fit(rng.normal(size=(2000, D)))
    save_model(model, calibration / "mahalanobis.npz")
    audit = tmp_path / "audit.jsonl"
    cfg = {
        "calibration_dir": str(calibration),
        "audit": {"path": str(audit)},
        "policies": [
            {
                "name": "inference",
                "routes": ["/v2/models/*/infer"],
                "degrade": {"always": False},
                "detectors": [
                    {"type": "mahalanobis", "action": "flag", "params": {"track_rate": True}},
                    {
                        "type": "anomaly_rate",
                        "action": "flag",
                        "params": {
                            "source": "mahalanobis",
                            "window_s": 60,
                            "max_rate": 0.3,
                            "min_rows": 10,
                        },
                    },
                ],
            }
        ],
    }
    return GuardMiddleware(EchoApp(), config=cfg, registry=registry), audit


def audit_lines(mw: GuardMiddleware, audit: Path) -> list[dict[str, Any]]:
    mw.guard.audit.close()
    return [json.loads(x) for x in audit.read_text().splitlines()] if audit.exists() else []


def test_a_few_anomalous_rows_are_counted_but_write_no_audit_line(
    guarded: tuple[GuardMiddleware, Path], registry: CollectorRegistry
) -> None:
    mw, audit = guarded
    client = TestClient(mw, client=("203.0.113.7", 5000))
    rng = np.random.default_rng(1)
    far = [12.0, -12.0, 12.0, -12.0]
    statuses = []
    for i in range(40):
        row = far if i in (5, 20, 33) else [float(x) for x in rng.normal(size=D) * 0.5]
        statuses.append(client.post(V2, json=body(row), headers={"x-api-key": "ordinary"}))
    assert all(r.status_code == 200 for r in statuses)
    assert audit_lines(mw, audit) == []
    # the metrics still hold every flagged row
    labels = {"policy": "inference", "detector": "mahalanobis", "action": "flag"}
    assert sample(registry, "guard_detections_total", **labels) == 3
    assert sample(registry, "guard_requests_total", policy="inference", decision="flag") == 3
    assert sample(registry, "guard_rows_total", policy="inference", decision="flag") == 3


def test_a_client_whose_anomaly_rate_fires_gets_audit_lines(
    guarded: tuple[GuardMiddleware, Path],
) -> None:
    mw, audit = guarded
    client = TestClient(mw, client=("203.0.113.7", 5000))
    far = [12.0, -12.0, 12.0, -12.0]
    for _ in range(15):
        assert client.post(V2, json=body(far), headers={"x-api-key": "fuzzer"}).status_code == 200
    got = audit_lines(mw, audit)
    # the first nine are row flags only (fewer than min_rows rows so far); then the rate fires
    assert len(got) == 15 - 9
    assert all("anomaly_rate" in x["fired"] and "mahalanobis" in x["fired"] for x in got)
    assert all(x["decision"] == "flag" and x["rows"] == 1 for x in got)


def test_the_engine_decides_what_is_audited() -> None:
    def decision(intended: Action, *, row_only: bool, quarantined: bool = False) -> Decision:
        return Decision(
            action=intended,
            intended=intended,
            policy="p",
            row_flags_only=row_only,
            quarantined=quarantined,
        )

    assert not decision(Action.FLAG, row_only=True).recorded
    assert decision(Action.FLAG, row_only=False).recorded
    assert decision(Action.FLAG, row_only=True, quarantined=True).recorded
    assert not decision(Action.ALLOW, row_only=False).recorded
