"""End to end: the guard in front of the demo model, in a real uvicorn on 127.0.0.1."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.mmap_dict import MmapedDict

from inference_guard.guard.metrics import FLUSH_AFTER_S
from tests.conftest import run_server
from tests.error_bodies import error_message

pytestmark = pytest.mark.e2e

V2 = "/v2/models/digits/infer"


def v2(rows: list[list[float]]) -> dict[str, object]:
    return {
        "inputs": [
            {
                "name": "input-0",
                "shape": [len(rows), len(rows[0])],
                "datatype": "FP32",
                "data": [x for r in rows for x in r],
            }
        ]
    }


def metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_guarded_demo_over_real_http(tmp_path: Path) -> None:
    with run_server(tmp_path) as srv, httpx.Client(base_url=srv.url, timeout=10) as c:
        ok = c.post(V2, json=v2([[0.0] * 64, [8.0] * 64]))
        assert ok.status_code == 200, ok.text
        assert ok.headers["x-request-id"]
        out = {o["name"]: o for o in ok.json()["outputs"]}
        assert out["probabilities"]["shape"] == [2, 10]
        bad = c.post(V2, content=b"{nope", headers={"content-type": "application/json"})
        assert bad.status_code == 400
        assert "JSON" in error_message(bad.content, V2)
        nan = c.post(
            V2,
            content=b'{"inputs":[{"name":"x","shape":[1,1],"datatype":"FP32","data":[NaN]}]}',
            headers={"content-type": "application/json"},
        )
        assert nan.status_code == 400
        big = c.post(
            V2, content=b"[" + b"1," * 600_000 + b"1]", headers={"content-type": "application/json"}
        )
        assert big.status_code == 413
        text = c.get("/metrics").text
        assert metric(text, "guard_requests_total", policy="inference", decision="allow") == 1
        assert metric(text, "guard_rows_total", policy="inference", decision="allow") == 2
        assert metric(text, "guard_invalid_requests_total", reason="invalid_json") == 1
        assert metric(text, "guard_invalid_requests_total", reason="non_finite") == 1
        assert metric(text, "guard_invalid_requests_total", reason="body_too_large") == 1
    assert "Traceback" not in srv.output()


def test_streaming_passes_through_unbuffered(tmp_path: Path) -> None:
    config = {"policies": [{"name": "chat", "routes": ["/v1/chat/completions"]}]}
    with run_server(tmp_path, app="tests.e2e.apps:stream_app", config=config) as srv:
        body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
        started = time.monotonic()
        arrivals: list[float] = []
        with httpx.stream("POST", srv.url + "/v1/chat/completions", json=body, timeout=10) as r:
            assert r.status_code == 200
            for chunk in r.iter_raw():
                if chunk:
                    arrivals.append(time.monotonic() - started)
        # the app sleeps 0.3 s between events: buffering would deliver everything at once
        assert len(arrivals) >= 3
        assert arrivals[-1] - arrivals[0] > 0.5


def test_multiprocess_metrics_aggregate_across_workers(tmp_path: Path) -> None:
    mp = tmp_path / "prom"
    mp.mkdir()
    with run_server(tmp_path, workers=2, env={"PROMETHEUS_MULTIPROC_DIR": str(mp)}) as srv:
        with httpx.Client(base_url=srv.url, timeout=10) as c:
            for _ in range(40):
                # a fresh connection per request so both workers get traffic
                r = httpx.post(srv.url + V2, json=v2([[1.0] * 64]), timeout=10)
                assert r.status_code == 200
            # per-request updates reach the shared files within FLUSH_AFTER_S (guard.metrics
            # Tally): the worker that answers a scrape flushes its own first, the other's
            # timer fires within a second of its last request
            deadline = time.monotonic() + 5 * FLUSH_AFTER_S
            while time.monotonic() < deadline:
                text = c.get("/metrics").text
                if metric(text, "guard_requests_total", decision="allow") == 40:
                    break
                time.sleep(0.1)
            totals = [
                metric(c.get("/metrics").text, "guard_requests_total", decision="allow")
                for _ in range(6)
            ]
        # each worker's own file shows it served some of the 40 requests
        served = {}
        for f in mp.glob("counter_*.db"):
            values = MmapedDict.read_all_values_from_file(str(f))
            served[f.name] = sum(
                v for key, v, *_ in values if '"guard_requests_total"' in key and '"allow"' in key
            )
        assert sum(1 for n in served.values() if n > 0) == 2, served
        assert sum(served.values()) == 40
        # whichever worker answers /metrics, it reports every worker's requests
        assert set(totals) == {40.0}
        # and the families no worker writes to the shared files: build info, and the
        # process metrics summed over both workers
        text = httpx.get(srv.url + "/metrics", timeout=10).text
        assert metric(text, "guard_build_info") == 1.0
        assert metric(text, "process_resident_memory_bytes") > 2 * 20e6
        assert "Summed over the live workers" in text
