"""``exempt:`` through the middleware: exempt clients are audited, never refused."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry
from starlette.testclient import TestClient

from inference_guard.middleware.asgi import GuardMiddleware
from tests.conftest import sample
from tests.middleware.fakes import EchoApp

V2 = "/v2/models/m/infer"
MONITOR = "synthetic-monitor-key"


def body(value: float) -> dict[str, Any]:
    return {"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [value, 0.0]}]}


def build(tmp_path: Path, registry: CollectorRegistry) -> tuple[TestClient, GuardMiddleware, Path]:
    audit = tmp_path / "audit.jsonl"
    cfg = {
        "audit": {"path": str(audit)},
        "exempt": {
            "api_keys": ["sha256:" + hashlib.sha256(MONITOR.encode()).hexdigest()],
            "cidrs": ["198.51.100.0/24"],
        },
        "policies": [
            {
                "name": "inference",
                "routes": ["/v2/models/*/infer"],
                "quarantine_s": 600,
                "degrade": {"always": False},
                "detectors": [
                    {
                        "type": "rate",
                        "action": "throttle",
                        "params": {"limits": [{"rate": 1, "per": "1h", "burst": 3}]},
                    },
                    {"type": "test-fixed", "action": "block", "params": {"fire_at": 5}},
                ],
            }
        ],
    }
    import tests.middleware.fakes  # noqa: F401 - registers test-fixed

    mw = GuardMiddleware(EchoApp(), config=cfg, registry=registry)
    return TestClient(mw, client=("203.0.113.7", 5000)), mw, audit


def lines(mw: GuardMiddleware, audit: Path) -> list[dict[str, Any]]:
    mw.guard.audit.close()
    return [json.loads(x) for x in audit.read_text().splitlines()] if audit.exists() else []


def test_an_exempt_key_is_never_throttled_blocked_or_quarantined_but_is_audited(
    tmp_path: Path, registry: CollectorRegistry
) -> None:
    client, mw, audit = build(tmp_path, registry)
    monitor = {"x-api-key": MONITOR}
    user = {"x-api-key": "ordinary-user"}
    assert [client.post(V2, json=body(1.0), headers=monitor).status_code for _ in range(6)] == [
        200
    ] * 6
    assert client.post(V2, json=body(9.0), headers=monitor).status_code == 200
    assert client.post(V2, json=body(1.0), headers=monitor).status_code == 200  # no quarantine
    assert [client.post(V2, json=body(1.0), headers=user).status_code for _ in range(4)] == [
        200,
        200,
        200,
        429,
    ]
    assert client.post(V2, json=body(9.0), headers=user).status_code == 403
    assert client.post(V2, json=body(1.0), headers=user).status_code == 403  # quarantined
    got = lines(mw, audit)
    mine = [x for x in got if x["exempt"]]
    theirs = [x for x in got if not x["exempt"]]
    assert [(x["decision"], x["enforced"]) for x in mine] == [("throttle", "allow")] * 3 + [
        ("block", "allow"),
        ("throttle", "allow"),
    ]
    assert not any(x["quarantined"] for x in mine)
    assert [(x["decision"], x["enforced"]) for x in theirs] == [
        ("throttle", "throttle"),
        ("block", "block"),
        ("block", "block"),
    ]
    assert len({x["client"] for x in mine}) == 1 and MONITOR not in audit.read_text()
    assert sample(registry, "guard_exempt_requests_total", policy="inference") == 8
    assert sample(registry, "guard_quarantines_total", policy="inference") == 1


def test_a_client_in_an_exempt_network_is_not_refused(
    tmp_path: Path, registry: CollectorRegistry
) -> None:
    _, mw, audit = build(tmp_path, registry)
    inside = TestClient(mw, client=("198.51.100.20", 5000))
    outside = TestClient(mw, client=("203.0.113.7", 5000))
    assert [inside.post(V2, json=body(1.0)).status_code for _ in range(5)] == [200] * 5
    assert [outside.post(V2, json=body(1.0)).status_code for _ in range(5)] == [200] * 3 + [429] * 2
    got = lines(mw, audit)
    assert sum(x["exempt"] for x in got) == 2 and sum(not x["exempt"] for x in got) == 2
