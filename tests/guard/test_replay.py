"""``guard replay``: traffic through the engine offline, on recorded time."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from detectors.base import Answer
from guard.capture import CapturedRequest, CaptureLog
from guard.config import CaptureConfig, GuardConfig
from guard.errors import ConfigurationError
from guard.replay import ReplayError, compare, read_lines, replay
from middleware.cli import main

ROUTE = "/v2/models/m/infer"


def rate_config(burst: int, *, quarantine: bool = False, **extra: Any) -> dict[str, Any]:
    detectors: list[dict[str, Any]] = [
        {
            "type": "rate",
            "action": "throttle",
            "params": {"limits": [{"rate": 1, "per": "10s", "burst": burst}]},
        }
    ]
    if quarantine:
        detectors.append({"type": "test-fixed", "action": "block", "params": {"fire_at": 5}})
    return {
        "policies": [
            {
                "name": "inference",
                "routes": ["/v2/models/*/infer"],
                "quarantine_s": 60 if quarantine else 0,
                "detectors": detectors,
                **extra,
            }
        ],
        # both are replaced by the replay: a shared store and a file are never touched
        "audit": {"path": "/nonexistent/audit.jsonl", "enabled": False},
    }


def line(ts: float, client: str, value: float = 1.0, **extra: Any) -> dict[str, Any]:
    return {"ts": ts, "client": client, "route": ROUTE, "rows": [[value, 0.0]], **extra}


@pytest.fixture(autouse=True)
def _fakes() -> None:
    import tests.middleware.fakes  # noqa: F401 - registers test-fixed, test-observe


def test_time_follows_the_lines_and_rows_are_counted() -> None:
    lines = [line(t, "a") for t in (0.0, 1.0, 2.0, 3.0, 100.0)]
    lines.append({**line(4.0, "b"), "rows": [[1.0, 0.0]] * 3})
    report = replay(lines, rate_config(burst=2))
    a, b = report.clients["a"], report.clients["b"]
    assert dict(a.decisions) == {"allow": 3, "throttle": 2}
    # 0 and 1 pass, 2 and 3 are throttled; at ts 100 the bucket has refilled
    assert a.first_enforcing_row == 3 and a.first_enforcing_action == "throttle"
    assert a.fired == {"rate": 2} and a.audit_lines == 2 and a.audited
    # 3 rows > burst 2: its first request is refused, so its first enforcing row is its 3rd
    assert (b.requests, b.rows, b.first_enforcing_row) == (1, 3, 3)
    assert (report.requests, report.rows) == (6, 8)
    assert report.enforced_clients == ("a", "b")


def test_lines_are_replayed_in_time_order() -> None:
    shuffled = [line(t, "a") for t in (3.0, 0.0, 2.0, 1.0)]
    report = replay(shuffled, rate_config(burst=2))
    assert report.clients["a"].first_enforcing_row == 3


def test_exempt_lines_are_decided_but_never_enforced() -> None:
    lines = [line(float(t), "monitor", exempt=True) for t in range(5)]
    lines.append(line(5.0, "monitor", value=9.0, exempt=True))
    report = replay(lines, rate_config(burst=2, quarantine=True))
    mon = report.clients["monitor"]
    assert mon.exempt and not mon.enforced and not mon.quarantined
    assert dict(mon.decisions) == {"allow": 6}
    assert dict(mon.intended) == {"allow": 2, "throttle": 3, "block": 1}
    assert mon.audit_lines == 4
    both = replay(lines, rate_config(burst=2, quarantine=True), ignore_exempt=True)
    assert both.clients["monitor"].first_enforcing_row == 3
    assert both.clients["monitor"].quarantined


def test_a_quarantine_refuses_the_client_in_recorded_time() -> None:
    lines = [line(0.0, "q", value=9.0), line(30.0, "q"), line(61.0, "q")]
    report = replay(lines, rate_config(burst=5, quarantine=True))
    q = report.clients["q"]
    assert q.quarantined and dict(q.decisions) == {"block": 2, "allow": 1}
    assert q.first_enforcing_row == 1 and q.first_enforcing_action == "block"


def test_answers_reach_observing_detectors() -> None:
    cfg = {
        "policies": [
            {
                "name": "inference",
                "routes": ["/v2/models/*/infer"],
                "detectors": [{"type": "test-observe", "action": "flag", "params": {"fire": True}}],
            }
        ]
    }
    with_answer = line(0.0, "c", labels=[1], probabilities=[[0.2, 0.8]], status=200)
    refused = line(1.0, "c", status=429)
    report = replay([with_answer, refused], cfg)
    c = report.clients["c"]
    assert c.fired == {"test-observe": 1} and c.audit_lines == 1
    assert dict(c.decisions) == {"allow": 2}


def test_compare_names_the_clients_each_config_enforces() -> None:
    lines = [line(float(t), "busy") for t in range(4)] + [line(0.5, "calm")]
    strict, loose = rate_config(burst=2), rate_config(burst=3)
    diff = compare(replay(lines, strict), replay(lines, loose))
    assert diff.enforced_only_a == () and diff.enforced_only_b == ()
    assert diff.first_row_changed == (("busy", 3, 4),)
    lenient = rate_config(burst=10)
    diff = compare(replay(lines, strict), replay(lines, lenient))
    assert diff.enforced_only_a == ("busy",) and diff.first_row_changed == (("busy", 3, None),)


def test_unmatched_routes_and_policy_names() -> None:
    lines = [
        {"ts": 0.0, "client": "x", "route": "/elsewhere", "rows": [[1.0]]},
        {"ts": 1.0, "client": "x", "policy": "inference", "rows": [[1.0, 0.0]]},
    ]
    report = replay(lines, rate_config(burst=2))
    assert report.unmatched == 1 and report.clients["x"].requests == 1


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("{not json", "line 2: not valid JSON"),
        ('{"client": "a", "route": "/x"}', "line 2: ts:"),
        ('{"ts": 1, "route": "/x"}', "line 2: client:"),
        ('{"ts": 1, "client": "a"}', "line 2: needs a route"),
        ('{"ts": 1, "client": "a", "route": "/x", "rows": [[1], [1, 2]]}', "line 2: rows:"),
        ('{"ts": 1, "client": "a", "route": "/x", "exempt": "yes"}', "line 2: exempt:"),
        ("[1, 2]", "line 2: must be a JSON object"),
    ],
)
def test_a_bad_line_is_named(bad: str, message: str) -> None:
    good = json.dumps(line(0.0, "a"))
    with pytest.raises(ReplayError, match=message):
        read_lines([good, bad])


def test_the_command_reports_and_compares(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    traffic = tmp_path / "traffic.jsonl"
    lines = [line(float(t), "busy") for t in range(4)] + [line(0.5, "calm")]
    traffic.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text(yaml.safe_dump(rate_config(burst=2)))
    b.write_text(yaml.safe_dump(rate_config(burst=10)))

    assert main(["replay", str(traffic), "--config", str(a)]) == 0
    out = capsys.readouterr().out
    assert "clients enforced against: 1" in out and "clients with audit lines: 1" in out
    assert "busy" in out and "throttle=2" in out and "3 throttle" in out

    assert main(["replay", str(traffic), "--config", str(a), "--compare", str(b)]) == 0
    out = capsys.readouterr().out
    assert f"busy: enforced by {a} only" in out
    assert "busy: first enforcing row 3 -> never" in out
    assert "totals: enforced 1 -> 0" in out

    assert main(["replay", str(traffic), "--config", str(a), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    busy = next(c for c in doc["clients"] if c["client"] == "busy")
    assert busy["first_enforcing_row"] == 3 and doc["enforced_clients"] == 1


def test_the_command_exits_1_on_bad_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    traffic = tmp_path / "traffic.jsonl"
    traffic.write_text(json.dumps(line(0.0, "a")) + "\n" + "{oops\n")
    cfg = tmp_path / "a.yaml"
    cfg.write_text(yaml.safe_dump(rate_config(burst=2)))
    assert main(["replay", str(traffic), "--config", str(cfg)]) == 1
    assert "line 2: not valid JSON" in capsys.readouterr().err
    assert main(["replay", str(tmp_path / "missing.jsonl"), "--config", str(cfg)]) == 1
    assert "cannot read" in capsys.readouterr().err
    bad_cfg = tmp_path / "bad.yaml"
    bad_cfg.write_text("policies: [{name: x, shadow: maybe}]\n")
    traffic.write_text(json.dumps(line(0.0, "a")) + "\n")
    assert main(["replay", str(traffic), "--config", str(bad_cfg)]) == 1
    assert "policies[0].shadow" in capsys.readouterr().err


# ------------------------------------------------------------------ the capture file


def captured(client: str, rows: Any = None) -> CapturedRequest:
    return CapturedRequest(
        ts=1000.5,
        request_id="rid",
        client=client,
        exempt=False,
        policy="inference",
        route=ROUTE,
        method="POST",
        fmt="oip_v2",
        n_rows=1,
        rows=np.array([[1.0, 2.5]]) if rows is None else rows,
        texts=(),
    )


def test_capture_lines_are_private_and_replayable(tmp_path: Path) -> None:
    path = tmp_path / "capture.jsonl"
    drops: list[int] = []
    log = CaptureLog(CaptureConfig(path=str(path)), on_drop=lambda: drops.append(1))
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    answer = Answer(200, np.array([1]), np.array([[0.25, 0.75]]))
    log.record(captured("c1"), decision="allow", status=200, answer=answer)
    log.record(captured("c1"), decision="throttle", status=429, answer=None)
    log.record(
        captured("c1", rows=np.array([[np.nan, 1.0]])), decision="allow", status=200, answer=None
    )  # cannot be written as JSON: dropped and counted
    log.close()
    docs = [json.loads(x) for x in path.read_text().splitlines()]
    assert len(docs) == 2 and drops == [1]
    assert docs[0] == {
        "ts": 1000.5,
        "request_id": "rid",
        "client": "c1",
        "exempt": False,
        "policy": "inference",
        "route": ROUTE,
        "method": "POST",
        "fmt": "oip_v2",
        "n_rows": 1,
        "rows": [[1.0, 2.5]],
        "decision": "allow",
        "status": 200,
        "labels": [1],
        "probabilities": [[0.25, 0.75]],
    }
    assert "labels" not in docs[1] and docs[1]["status"] == 429
    parsed = read_lines(path)
    assert parsed[0].answer is not None and parsed[0].rows is not None
    assert parsed[0].rows.tolist() == [[1.0, 2.5]]


def test_capture_samples_clients_not_requests(tmp_path: Path) -> None:
    log = CaptureLog(CaptureConfig(path=str(tmp_path / "c.jsonl"), sample=0.25))
    clients = [f"{i * 2654435761 % 2**32:08x}" + "0" * 24 for i in range(4000)]
    picked = [c for c in clients if log.sampled(c)]
    assert 800 < len(picked) < 1200
    assert all(log.sampled(c) for c in picked)  # a sampled client stays sampled
    everyone = CaptureLog(CaptureConfig(path=str(tmp_path / "d.jsonl"), sample=1.0))
    assert all(everyone.sampled(c) for c in clients)


def test_capture_config_is_validated() -> None:
    cfg = GuardConfig.from_dict({"capture": {"path": "/tmp/x.jsonl", "sample": 0.5}})
    assert cfg.capture.enabled and cfg.capture.sample == 0.5
    assert not GuardConfig.default().capture.enabled
    with pytest.raises(ConfigurationError) as info:
        GuardConfig.from_dict({"capture": {"sample": 1.5, "max_queue": 0, "dir": "x"}})
    assert set(dict(info.value.problems)) == {
        "capture.path",
        "capture.sample",
        "capture.max_queue",
        "capture.dir",
    }


def test_shadow_policies_are_replayed_as_enforcing_unless_kept() -> None:
    lines = [line(float(t), "a") for t in range(4)]
    shadowed = rate_config(burst=2, shadow=True)
    assert replay(lines, shadowed).clients["a"].first_enforcing_row == 3
    kept = replay(lines, shadowed, keep_shadow=True).clients["a"]
    assert not kept.enforced and dict(kept.intended) == {"allow": 2, "throttle": 2}
