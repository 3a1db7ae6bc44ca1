"""The shipped alerts and dashboard in a real Prometheus, scraping a real ``guard demo``.

Debian's ``prometheus`` package (``.ci/run`` installs it) runs with a 1 s
scrape and evaluation interval, loaded with ``guard/ops/alerts.yaml``, in a
temporary directory on a free port; ``guard demo`` serves on another. Through
Prometheus's HTTP API the test checks that:

* nothing fires, or is even pending, during benign traffic, from a fresh start;
* the first attack (rows of uniform noise, which the demo policy quarantines)
  fires GuardAttackSuspected and GuardClientQuarantined within
  :data:`ALERT_WITHIN_S` seconds of its first request;
* every expression of the Grafana dashboard parses and returns data (the stat
  panels a finite number);
* GuardMetricsAbsent goes pending once the guard is gone.

Without a ``prometheus`` binary the test skips, saying why; in CI
(``CI=true``) it fails instead.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import yaml

from tests.conftest import ROOT, free_port

pytestmark = pytest.mark.e2e

OPS = ROOT / "guard" / "ops"
V2 = "/v2/models/digits/infer"
#: the attack and quarantine alerts must fire within this many seconds of the first attack
ALERT_WITHIN_S = 15.0
#: Grafana's variables, as a dashboard over this short test would set them
GRAFANA_VARS = {
    "$__rate_interval": "10s",
    "$__interval": "1s",
    "$__range": "5m",
    "${DS_PROMETHEUS}": "prometheus",
    "$policy": ".*",
}


def _prometheus() -> str:
    path = shutil.which("prometheus")
    if path is None:
        reason = "prometheus is not on PATH (Debian: apt-get install prometheus; .ci/run does)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true: {reason}")
        pytest.skip(reason)
    return path


def v2(rows: np.ndarray) -> dict[str, Any]:
    return {
        "inputs": [
            {
                "name": "input-0",
                "shape": list(rows.shape),
                "datatype": "FP32",
                "data": [float(x) for x in rows.ravel()],
            }
        ]
    }


class Process:
    """A subprocess with its log, stopped on exit."""

    def __init__(self, cmd: list[str], log: Path, **kw: Any) -> None:
        self.log = log
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, **kw)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_http(self, url: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"exited early:\n{self.output()}")
            try:
                if httpx.get(url, timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url} not ready after {timeout} s:\n{self.output()}")
            time.sleep(0.2)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


class Prom:
    """Prometheus's HTTP API."""

    def __init__(self, url: str) -> None:
        self.http = httpx.Client(base_url=url, timeout=10)

    def query(self, expr: str) -> list[dict[str, Any]]:
        r = self.http.get("/api/v1/query", params={"query": expr})
        body = r.json()
        assert r.status_code == 200 and body["status"] == "success", (expr, body)
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def alerts(self) -> list[dict[str, Any]]:
        body = self.http.get("/api/v1/alerts").json()
        assert body["status"] == "success", body
        alerts: list[dict[str, Any]] = body["data"]["alerts"]
        return alerts

    def evaluations(self) -> int:
        """How many times the rule group has been evaluated so far (by its last time)."""
        groups = self.http.get("/api/v1/rules").json()["data"]["groups"]
        return sum(1 for g in groups if not g["lastEvaluation"].startswith("0001"))


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[tuple[str, Prom, Process]]:
    """``guard demo`` on a free port, and Prometheus scraping it every second."""
    prometheus = _prometheus()
    guard_port, prom_port = free_port(), free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GUARD_FINGERPRINT_SALT": "e2e-" + "s" * 28}
    demo = Process(
        [sys.executable, "-m", "inference_guard.middleware.cli", "demo", "--port", str(guard_port),
         "--log-level", "warning"],
        tmp_path / "demo.log",
        cwd=ROOT,
        env=env,
    )  # fmt: skip
    prom: Process | None = None
    try:
        guard_url = f"http://127.0.0.1:{guard_port}"
        # the first start of the demo calibrates its detectors (cached for later starts)
        demo.wait_http(guard_url + "/healthz", timeout=180)
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(OPS / "alerts.yaml")],
            "scrape_configs": [
                {"job_name": "guard", "static_configs": [{"targets": [f"127.0.0.1:{guard_port}"]}]}
            ],
        }
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
        prom = Process(
            [
                prometheus,
                f"--config.file={tmp_path / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp_path / 'data'}",
                f"--web.listen-address=127.0.0.1:{prom_port}",
                "--log.level=warn",
            ],
            tmp_path / "prometheus.log",
            cwd=tmp_path,
        )
        prom_url = f"http://127.0.0.1:{prom_port}"
        prom.wait_http(prom_url + "/-/ready", timeout=30)
        api = Prom(prom_url)
        try:
            yield guard_url, api, demo
        finally:
            api.http.close()
    finally:
        if prom is not None:
            prom.stop()
        demo.stop()


def wait_for(check: Any, timeout: float, what: str) -> float:
    """Poll ``check()`` every 0.25 s until true; the seconds it took."""
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.25)
    return time.monotonic() - start


def firing(prom: Prom) -> dict[str, str]:
    return {a["labels"]["alertname"]: a["state"] for a in prom.alerts()}


def dashboard_exprs() -> list[tuple[str, str, str]]:
    """(panel title, panel type, expression) for every target of the dashboard."""
    dash = json.loads((OPS / "grafana-dashboard.json").read_text(encoding="utf-8"))
    out = []
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            out.append((panel["title"], panel["type"], target["expr"]))
    return out


def test_alerts_and_dashboard_in_a_real_prometheus(
    stack: tuple[str, Prom, Process], record_property: Any
) -> None:
    guard_url, prom, demo = stack
    started = time.monotonic()
    from sklearn.datasets import load_digits

    natural = np.asarray(load_digits().data, dtype=np.float64)
    rng = np.random.default_rng(0)

    with httpx.Client(base_url=guard_url, timeout=10) as c:
        # a fresh guard, scraped: every series there at 0, nothing pending or firing
        wait_for(lambda: prom.query('up{job="guard"} == 1'), 20, "the guard scraped")
        wait_for(lambda: prom.evaluations() > 0, 10, "the rules evaluated")
        time.sleep(2.5)  # two more scrapes and evaluations on the fresh series
        assert firing(prom) == {}, prom.alerts()
        assert prom.query('guard_quarantines_total{policy="inference"} == 0')
        assert prom.query('guard_detections_total{detector="anomaly_rate",action="block"} == 0')

        # benign traffic from a few clients: natural rows, a few requests a second
        for i in range(40):
            rows = natural[rng.choice(natural.shape[0], size=int(rng.integers(1, 9)))]
            r = c.post(V2, json=v2(rows), headers={"x-api-key": f"benign-{i % 4}"})
            assert r.status_code == 200, r.text
            if i % 4 == 3:
                assert firing(prom) == {}, prom.alerts()
            time.sleep(0.2)
        time.sleep(2.5)  # the last of it scraped and evaluated
        assert firing(prom) == {}, prom.alerts()

        # the first attack: uniform noise over the pixel range, one fresh client
        t0 = time.monotonic()
        statuses = []
        for _ in range(4):
            rows = rng.uniform(0.0, 16.0, size=(32, 64))
            r = c.post(V2, json=v2(rows), headers={"x-api-key": "attacker"})
            statuses.append(r.status_code)
        assert 403 in statuses, statuses  # the demo policy quarantined it

        seen: dict[str, float] = {}

        def both_firing() -> bool:
            for name, state in firing(prom).items():
                if state == "firing" and name not in seen:
                    seen[name] = time.monotonic() - t0
            return {"GuardAttackSuspected", "GuardClientQuarantined"} <= set(seen)

        wait_for(both_firing, ALERT_WITHIN_S, "the attack and quarantine alerts")
        for name, seconds in seen.items():
            record_property(f"{name}_firing_after_s", round(seconds, 2))
        print(
            "\n"
            + ", ".join(f"{n} firing {s:.1f} s" for n, s in sorted(seen.items()))
            + " after the first attack request"
        )
        alerts = {a["labels"]["alertname"]: a for a in prom.alerts()}
        assert alerts["GuardClientQuarantined"]["labels"]["severity"] == "critical"
        assert alerts["GuardAttackSuspected"]["labels"]["detector"] == "anomaly_rate"
        assert set(alerts) == {"GuardAttackSuspected", "GuardClientQuarantined"}, alerts
        # the attacker's key, and its address with it (the demo's quarantine_address: ip)
        wait_for(
            lambda: prom.query('guard_quarantined_clients{policy="inference"} == 2'),
            5,
            "the attacker's key and address in quarantine, read from the store",
        )

    # every dashboard expression parses and returns data; stat panels a finite number
    for title, kind, expr in dashboard_exprs():
        for var, value in GRAFANA_VARS.items():
            expr = expr.replace(var, value)
        expr = expr.replace("$detector", "anomaly_rate")
        result = prom.query(expr)
        assert result, f"panel {title!r}: no data for {expr}"
        if kind == "stat":
            values = [float(r["value"][1]) for r in result]
            assert all(math.isfinite(v) for v in values), (title, expr, values)
            if "round(" in expr:
                assert all(v == int(v) for v in values), (title, values)

    # the guard gone: its metrics are absent, and the rule says so
    demo.stop()
    wait_for(
        lambda: firing(prom).get("GuardMetricsAbsent") in ("pending", "firing"), 10, "absent"
    )
    assert time.monotonic() - started < 100, "the test must stay well under 2 minutes"
