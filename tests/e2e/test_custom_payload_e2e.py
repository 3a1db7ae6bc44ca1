"""End to end: a model with its own JSON shape, guarded through ``payload:`` pointers.

A real uvicorn on 127.0.0.1 serves ``tests.e2e.apps:custom_shape_app``
(``{"features": [[...]]}`` in, ``{"probabilities": [[...]]}`` out) behind the
guard, with a row-cost rate limit of burst 20 and an ``envelope`` detector
calibrated into a temporary directory. Before ``payload:`` existed such a route
was ``format="unknown"``: one request cost 1, nothing was detected, nothing
rounded.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import pytest

from inference_guard.guard.calibrate import calibrate_rows
from tests.conftest import run_server
from tests.e2e.test_server import metric

pytestmark = pytest.mark.e2e

WIDTH = 4


def config(calibration_dir: Path) -> dict[str, object]:
    return {
        "calibration_dir": str(calibration_dir),
        "audit": {"enabled": False},
        "policies": [
            {
                "name": "scoring",
                "routes": ["/score"],
                "payload": {"rows": "/features", "probabilities": "/probabilities"},
                "detectors": [
                    {
                        "type": "rate",
                        "name": "rows-per-client",
                        "action": "throttle",
                        # 20 rows a day: nothing refills while the test runs
                        "params": {
                            "cost": "rows",
                            "limits": [{"rate": 20, "per": "1d", "burst": 20}],
                        },
                    },
                    {"type": "envelope", "action": "flag"},
                ],
            }
        ],
    }


def test_custom_shape_is_counted_detected_and_rounded(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    benign = rng.normal(size=(500, WIDTH))
    calibrate_rows(benign, tmp_path / "calibration", kinds=["envelope"], target_fpr=0.01)
    headers = {"x-api-key": "client-a"}
    with (
        run_server(
            tmp_path, app="tests.e2e.apps:custom_shape_app", config=config(tmp_path / "calibration")
        ) as srv,
        httpx.Client(base_url=srv.url, timeout=10, headers=headers) as c,
    ):
        # 30 rows against a 20-row burst: refused by the row-cost limit, never reaches the model
        thirty = c.post("/score", json={"features": benign[:30].tolist()})
        assert thirty.status_code == 429
        assert thirty.json()["error"]["code"] == "rate_limited"
        assert int(thirty.headers["retry-after"]) >= 1
        assert c.get("/received").json() == {"requests": 0, "rows": 0}

        # two benign rows: answered, probabilities rounded to 2 decimals, 2 rows charged
        ok = c.post("/score", json={"features": benign[:2].tolist()})
        assert ok.status_code == 200
        probs = ok.json()["probabilities"]
        assert len(probs) == 2 and all(len(p) == 2 for p in probs)
        assert all(v == round(v, 2) for p in probs for v in p)
        assert any(v not in (0.0, 1.0) for p in probs for v in p)
        assert ";r=18;" in ok.headers["ratelimit"]

        # a row far outside the calibrated envelope: flagged (answered), counted
        odd = c.post("/score", json={"features": [[40.0] * WIDTH]})
        assert odd.status_code == 200
        assert ";r=17;" in odd.headers["ratelimit"]
        assert c.get("/received").json() == {"requests": 2, "rows": 3}

        text = c.get("/metrics").text
    assert metric(text, "guard_detections_total", policy="scoring", detector="envelope") == 1
    assert (
        metric(
            text,
            "guard_detections_total",
            policy="scoring",
            detector="rows-per-client",
            action="throttle",
        )
        == 1
    )
    assert metric(text, "guard_rows_total", policy="scoring", decision="throttle") == 30
    assert metric(text, "guard_rows_total", policy="scoring", decision="allow") == 2
    assert metric(text, "guard_rows_total", policy="scoring", decision="flag") == 1
    assert metric(text, "guard_payloads_total", policy="scoring", format="custom") == 3
    assert metric(text, "guard_payloads_total", format="unknown") == 0
    assert metric(text, "guard_degraded_responses_total", policy="scoring", outcome="degraded") == 2
    assert "Traceback" not in srv.output()
