"""End to end: a real uvicorn server captures traffic, ``guard replay`` reproduces its decisions.

The same run checks ``exempt:`` over HTTP: the exempt key is never throttled
but is audited with ``"exempt": true``; the others are throttled.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry
from starlette.testclient import TestClient

from inference_guard.middleware.asgi import GuardMiddleware
from inference_guard.middleware.cli import main
from tests.conftest import run_server
from tests.middleware.fakes import EchoApp

V2 = "/v2/models/digits/infer"
ROW = [0.0, 0.0, 5.0, 13.0, 9.0, 1.0, 0.0, 0.0] * 8
MONITOR = "e2e-synthetic-monitor-key"
SECRET_KEYS = ("e2e-user-alpha-key", "e2e-user-beta-key", MONITOR)


def config(tmp_path: Path, burst: int) -> dict[str, Any]:
    return {
        "audit": {"path": str(tmp_path / "audit.jsonl")},
        "capture": {"path": str(tmp_path / "capture.jsonl")},
        "exempt": {"api_keys": ["sha256:" + hashlib.sha256(MONITOR.encode()).hexdigest()]},
        "policies": [
            {
                "name": "inference",
                "routes": ["/v2/models/*/infer"],
                "detectors": [
                    {
                        "type": "rate",
                        "action": "throttle",
                        "params": {"limits": [{"rate": 1, "per": "1h", "burst": burst}]},
                    }
                ],
            }
        ],
    }


def body(n_rows: int, shift: float) -> dict[str, Any]:
    data = [x + shift for _ in range(n_rows) for x in ROW]
    return {"inputs": [{"name": "x", "shape": [n_rows, 64], "datatype": "FP32", "data": data}]}


def read_jsonl(path: Path, count: int, timeout: float = 10.0) -> list[dict[str, Any]]:
    """The file's lines once it holds ``count`` of them (the writer thread is behind a queue)."""
    deadline = time.monotonic() + timeout
    while True:
        lines = path.read_text().splitlines() if path.exists() else []
        if len(lines) >= count or time.monotonic() > deadline:
            return [json.loads(x) for x in lines]
        time.sleep(0.05)


@pytest.mark.e2e
def test_live_decisions_are_captured_and_replayed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    live_cfg = config(tmp_path, burst=5)
    statuses: dict[str, list[int]] = {}
    with run_server(tmp_path, config=live_cfg, env={"GUARD_HASH_KEY": "e2e-capture-key1"}) as srv:
        with httpx.Client(base_url=srv.url, timeout=10.0) as http:
            plan = [("e2e-user-alpha-key", 1)] * 8 + [(MONITOR, 1)] * 8
            plan += [("e2e-user-beta-key", 2)] * 3
            for i, (key, n_rows) in enumerate(plan):
                response = http.post(V2, json=body(n_rows, i * 0.01), headers={"x-api-key": key})
                statuses.setdefault(key, []).append(response.status_code)
        assert statuses["e2e-user-alpha-key"] == [200] * 5 + [429] * 3
        assert statuses[MONITOR] == [200] * 8  # exempt: never throttled
        assert statuses["e2e-user-beta-key"] == [200, 200, 429]  # 6 rows > burst 5
        capture = tmp_path / "capture.jsonl"
        lines = read_jsonl(capture, len(plan))
        audit = read_jsonl(tmp_path / "audit.jsonl", 3 + 3 + 1)

    # the capture: one line per request, private, no raw key, answers where there were any
    assert len(lines) == len(plan)
    assert stat.S_IMODE(os.stat(capture).st_mode) == 0o600
    raw = capture.read_text()
    assert not any(key in raw for key in SECRET_KEYS)
    by_status = Counter(x["status"] for x in lines)
    assert by_status == {200: 15, 429: 4}
    for x in lines:
        assert len(x["rows"]) == x["n_rows"] and all(len(r) == 64 for r in x["rows"])
        assert x["route"] == V2 and x["policy"] == "inference" and x["fmt"] == "oip_v2"
        if x["status"] == 200:
            assert len(x["probabilities"]) == x["n_rows"] and len(x["labels"]) == x["n_rows"]
        else:
            assert x["decision"] == "throttle" and "probabilities" not in x
    assert lines[0]["rows"][0] == pytest.approx(ROW)
    exempt_clients = {x["client"] for x in lines if x["exempt"]}
    assert len(exempt_clients) == 1 and len({x["client"] for x in lines}) == 3

    # the audit log: the exempt client's would-be throttles, marked; the others' enforced
    mon = [x for x in audit if x["exempt"]]
    others = [x for x in audit if not x["exempt"]]
    assert [(x["decision"], x["enforced"]) for x in mon] == [("throttle", "allow")] * 3
    assert [(x["decision"], x["enforced"]) for x in others] == [("throttle", "throttle")] * 4
    assert {x["client"] for x in mon} == exempt_clients

    # replay through the same config reproduces every live decision
    cfg_a = tmp_path / "a.json"
    cfg_a.write_text(json.dumps(live_cfg))
    assert main(["replay", str(capture), "--config", str(cfg_a), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    live = Counter((x["client"], "allow" if x["status"] == 200 else "throttle") for x in lines)
    replayed = Counter(
        {
            (c["client"], action): n
            for c in report["clients"]
            for action, n in c["decisions"].items()
        }
    )
    assert replayed == live
    rows_to_first = {c["client"]: c["first_enforcing_row"] for c in report["clients"]}
    assert sorted(rows_to_first.values(), key=str) == [6, 6, None]
    exempt_report = next(c for c in report["clients"] if c["exempt"])
    assert exempt_report["intended"] == {"allow": 5, "throttle": 3}
    assert report["enforced_clients"] == 2 and report["audited_clients"] == 3

    # a looser candidate config: the diff names the two clients it would stop throttling
    cfg_b = tmp_path / "b.json"
    cfg_b.write_text(json.dumps(config(tmp_path, burst=50)))
    assert main(["replay", str(capture), "--config", str(cfg_a), "--compare", str(cfg_b)]) == 0
    out = capsys.readouterr().out
    enforced_by_a = {c for c, row in rows_to_first.items() if row is not None}
    for client in enforced_by_a:
        assert f"{client}: enforced by {cfg_a} only" in out
        assert f"{client}: first enforcing row 6 -> never" in out
    assert "totals: enforced 2 -> 0, audited 3 -> 0" in out


def test_capture_turns_the_lean_lane_off_and_records_every_parsed_request(
    tmp_path: Path, registry: CollectorRegistry
) -> None:
    """A policy without detectors takes the lean lane, which reads no client: not with capture."""
    capture = tmp_path / "capture.jsonl"
    cfg = {"audit": {"enabled": False}, "capture": {"path": str(capture)}}
    mw = GuardMiddleware(EchoApp(), config=cfg, registry=registry)
    assert not mw._front.lean_policies
    client = TestClient(mw, client=("203.0.113.7", 5000))
    for i in range(3):
        response = client.post("/v2/models/m/infer", json=body(2, float(i)))
        assert response.status_code == 200
    assert client.post("/v2/models/m/infer", content=b"{bad").status_code == 400
    assert mw.guard.capture is not None
    mw.guard.capture.close()
    lines = [json.loads(x) for x in capture.read_text().splitlines()]
    assert [x["n_rows"] for x in lines] == [2, 2, 2]  # the refused request is not recorded
    assert lines[2]["rows"][0][0] == pytest.approx(ROW[0] + 2.0)
    assert lines[0]["probabilities"] == [[0.1234567, 0.7654321, 0.1111112], [0.5, 0.25, 0.25]]
    assert lines[0]["client"] and lines[0]["exempt"] is False
    without = GuardMiddleware(EchoApp(), config={"audit": {"enabled": False}})
    assert without._front.lean_policies  # the same policy without capture keeps its lane
