"""Reloading the config of real uvicorn servers: POST /-/reload, SIGHUP, workers, under load."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import subprocess
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import Server, run_server
from tests.e2e.model_servers import run_proxy
from tests.e2e.test_server import metric

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="no SIGHUP on this platform"),
]

V2 = "/v2/models/digits/infer"
ROW = [1.0] * 64
V2_BODY = {"inputs": [{"name": "input-0", "shape": [1, 64], "datatype": "FP32", "data": ROW}]}


def config(limit: int) -> dict[str, Any]:
    """A rate limit per client, and a stateful detector that only flags (kept across reloads)."""
    return {
        "audit": {"enabled": False},
        "policies": [
            {
                "name": "inference",
                "routes": [V2],
                "detectors": [
                    {
                        "type": "rate",
                        "name": "rate",
                        "action": "throttle",
                        "params": {
                            "key": "client",
                            "limits": [
                                {"limit": limit, "per": "1h", "algorithm": "sliding_window"}
                            ],
                        },
                    },
                    {
                        "type": "near_duplicate",
                        "name": "probes",
                        "action": "flag",
                        "params": {"feature_range": [0, 16]},
                    },
                ],
            }
        ],
    }


def config_file(tmp_path: Path, srv: Server) -> Path:
    return tmp_path / f"guard-{srv.port}.json"


def post(srv: Server) -> int:
    return httpx.post(srv.url + V2, json=V2_BODY, timeout=30).status_code


def reloads(srv: Server, result: str) -> float:
    text = httpx.get(srv.url + "/metrics", timeout=10).text
    return metric(text, "guard_config_reloads_total", result=result)


def test_post_reload_applies_a_new_limit_and_sighup_reloads(tmp_path: Path) -> None:
    with run_server(tmp_path, config=config(3)) as srv:
        path = config_file(tmp_path, srv)
        assert [post(srv) for _ in range(4)] == [200, 200, 200, 429]

        path.write_text(json.dumps(config(100)))
        answer = httpx.post(srv.url + "/-/reload", timeout=30)
        assert answer.status_code == 200, answer.text
        assert answer.json()["built"] == ["inference/rate"]
        assert post(srv) == 200  # the new limit applies
        assert reloads(srv, "ok") == 1

        # a bad file: refused, the running config kept
        path.write_text(json.dumps({**config(2), "metrics": {"path": "/m"}}))
        assert httpx.post(srv.url + "/-/reload", timeout=30).status_code == 422
        assert post(srv) == 200
        assert reloads(srv, "error") == 1

        # SIGHUP: 1 per hour, which this client has used up (the counts are the store's)
        path.write_text(json.dumps(config(1)))
        os.kill(srv.proc.pid, signal.SIGHUP)
        deadline = time.monotonic() + 10
        while reloads(srv, "ok") < 2:
            assert time.monotonic() < deadline, srv.output()
            time.sleep(0.05)
        assert srv.proc.poll() is None  # the signal did not end the server
        assert post(srv) == 429


def test_reloads_under_load_lose_no_request(tmp_path: Path) -> None:
    """400 requests or more, 8 in flight, while the config is reloaded again and again."""
    n, in_flight = 400, 8
    with run_server(tmp_path, config=config(100_000)) as srv:
        path = config_file(tmp_path, srv)
        host, port = srv.url.removeprefix("http://").split(":")
        body = json.dumps(V2_BODY).encode()
        completed = [0]
        lock = threading.Lock()

        reloaded = threading.Event()

        def worker(count: int) -> list[int]:
            # at least ``count`` requests, and on until the last reload was asked for: a
            # reload that takes long on a loaded machine still meets requests in flight
            conn = http.client.HTTPConnection(host, int(port), timeout=60)
            out: list[int] = []
            while len(out) < count or not reloaded.is_set():
                conn.request("POST", V2, body=body, headers={"content-type": "application/json"})
                resp = conn.getresponse()
                resp.read()
                out.append(resp.status)
                with lock:
                    completed[0] += 1
            conn.close()
            return out

        reload_answers: list[int] = []
        during: list[int] = []  # requests completed when each reload was asked for

        def reloader() -> None:
            try:
                reload_six_times()
            finally:
                reloaded.set()  # whatever happened, the workers stop

        def reload_six_times() -> None:
            for i in range(1, 7):
                while completed[0] < i * n // 10:  # the last at 60 %: room to spare
                    time.sleep(0.001)
                # the rate detector changes each time (built anew), the other is kept;
                # the file is replaced whole, as an operator's deploy should
                tmp = path.with_suffix(".tmp")
                tmp.write_text(json.dumps(config(100_000 + i)))
                tmp.replace(path)
                during.append(completed[0])
                if i % 2:
                    reload_answers.append(httpx.post(srv.url + "/-/reload", timeout=30).status_code)
                else:
                    os.kill(srv.proc.pid, signal.SIGHUP)

        with ThreadPoolExecutor(max_workers=in_flight + 1) as pool:
            hup = pool.submit(reloader)
            results = list(pool.map(worker, [n // in_flight] * in_flight))
            hup.result()
        statuses = Counter(s for r in results for s in r)
        sent = sum(len(r) for r in results)
        assert sent >= n and statuses == Counter({200: sent}), statuses
        assert reload_answers == [200, 200, 200]
        assert all(c < sent for c in during), during  # every reload asked for under load
        deadline = time.monotonic() + 10
        while reloads(srv, "ok") < 6:  # the three SIGHUPs too
            assert time.monotonic() < deadline, srv.output()
            time.sleep(0.05)
        assert reloads(srv, "error") == 0
        assert srv.proc.poll() is None


def worker_pids(supervisor: int) -> dict[int, str]:
    """The uvicorn workers of ``supervisor``: its children that run a spawned worker."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == supervisor and "spawn_main" in cmdline:
            out[int(entry.name)] = cmdline
    return out


def catches_sighup(pid: int) -> bool:
    """Whether ``pid`` has a handler for SIGHUP (its ``SigCgt`` mask in /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (signal.SIGHUP - 1) & 1)
    return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc to find the workers")
def test_each_worker_reloads_on_the_sighup_sent_to_it(tmp_path: Path) -> None:
    mp = tmp_path / "metrics"
    mp.mkdir()
    env = {"PROMETHEUS_MULTIPROC_DIR": str(mp)}
    with run_server(tmp_path, config=config(100), workers=2, env=env) as srv:
        path = config_file(tmp_path, srv)
        deadline = time.monotonic() + 20
        while len(workers := worker_pids(srv.proc.pid)) < 2:
            assert time.monotonic() < deadline, (workers, srv.output())
            time.sleep(0.1)
        assert len(workers) == 2
        # each worker installs its handler at its lifespan startup (before that, SIGHUP
        # would end it, as it ends any process without a handler)
        while not all(map(catches_sighup, workers)):
            assert time.monotonic() < deadline, srv.output()
            time.sleep(0.1)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(config(101)))
        tmp.replace(path)
        if shutil.which("pkill"):  # the README's command
            cmd = ["pkill", "-HUP", "-P", str(srv.proc.pid), "-f", "spawn_main"]
            subprocess.run(cmd, check=True)
        else:
            for pid in workers:
                os.kill(pid, signal.SIGHUP)
        deadline = time.monotonic() + 10
        while reloads(srv, "ok") < 2:  # one per worker, summed over the workers' files
            assert time.monotonic() < deadline, srv.output()
            time.sleep(0.05)
        assert worker_pids(srv.proc.pid) == workers  # reloaded in place, not restarted
        assert srv.proc.poll() is None


def build_sha(srv: Server) -> str:
    for line in httpx.get(srv.url + "/metrics", timeout=10).text.splitlines():
        if line.startswith("guard_build_info{"):
            return line.split('config_sha="', 1)[1].split('"', 1)[0]
    raise AssertionError("no guard_build_info")


def test_guard_proxy_reloads_its_config_file(tmp_path: Path) -> None:
    with (
        run_server(tmp_path, app="tests.e2e.upstream_apps:echo_app") as echo,
        run_proxy(tmp_path, echo.url, config={"audit": {"enabled": False}}) as proxy,
    ):
        path = next(tmp_path.glob(f"proxy-{proxy.port}.yaml"))
        first = build_sha(proxy)
        path.write_text(json.dumps({"audit": {"enabled": False}, "failure_mode": "fail_closed"}))
        os.kill(proxy.proc.pid, signal.SIGHUP)
        deadline = time.monotonic() + 10
        while reloads(proxy, "ok") < 1:
            assert time.monotonic() < deadline, proxy.output()
            time.sleep(0.05)
        second = build_sha(proxy)
        assert second != first
        answer = httpx.post(proxy.url + "/-/reload", timeout=30)
        assert answer.status_code == 200 and answer.json()["config_sha"] == second
        assert proxy.proc.poll() is None
