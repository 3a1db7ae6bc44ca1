"""Rate limits across real uvicorn workers sharing a real Redis, and Redis outages.

These need Redis: ``GUARD_TEST_REDIS_URL`` for the shared server (``.ci/run``
exports it), and the ``redis-server`` binary for the outage test, which runs a
Redis of its own so it can stop and restart it without disturbing other tests.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import subprocess
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import redis

from tests.conftest import free_port, run_server
from tests.e2e.test_server import metric
from tests.stores_fixture import REDIS_SKIP, REDIS_URL

pytestmark = [pytest.mark.e2e, pytest.mark.redis]

V2 = "/v2/models/digits/infer"
V1 = "/v1/models/digits:predict"
ROW = [1.0] * 64
V2_BODY = {"inputs": [{"name": "input-0", "shape": [1, 64], "datatype": "FP32", "data": ROW}]}
V1_BODY = {"instances": [ROW]}
HASH_ENV = {"GUARD_HASH_KEY": "e2e-test-secret-hash-key"}


def rate_policy(
    name: str, routes: list[str], limits: list[dict[str, object]], **extra: object
) -> dict[str, object]:
    return {
        "name": name,
        "routes": routes,
        "detectors": [
            {
                "type": "rate",
                "name": f"{name}-rate",
                "action": "throttle",
                "params": {"key": "client", "cost": "rows", "limits": limits},
            }
        ],
        **extra,
    }


def wait_for_fresh_minute(margin: float = 20.0) -> None:
    """Sliding windows are minute-aligned: start early in one so the run stays inside it."""
    into = time.time() % 60
    if into > 60 - margin:
        time.sleep(60 - into + 0.5)


def blast(url: str, n: int, *, key: str, concurrency: int = 100) -> Counter[int]:
    """``n`` requests from one client over ``concurrency`` parallel keep-alive connections.

    Plain threads with http.client: httpx's async pool slows down badly with
    hundreds of connections, which would make this test time out, not fail.
    """
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps(V2_BODY).encode()
    headers = {"content-type": "application/json", "x-api-key": key}
    per_conn = [n // concurrency + (1 if i < n % concurrency else 0) for i in range(concurrency)]
    start = threading.Barrier(concurrency)

    def worker(count: int) -> list[int]:
        conn = http.client.HTTPConnection(host, int(port), timeout=60)
        start.wait()
        out = []
        for _ in range(count):
            conn.request("POST", V2, body=body, headers=headers)
            resp = conn.getresponse()
            resp.read()
            out.append(resp.status)
        conn.close()
        return out

    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        results = list(pool.map(worker, per_conn))
    return Counter(s for r in results for s in r)


@REDIS_SKIP
def test_four_workers_admit_exactly_the_limit(tmp_path: Path) -> None:
    """2 000 concurrent requests from one client against 100/minute: exactly 100 pass."""
    assert REDIS_URL is not None
    prefix = f"guard-e2e-{uuid.uuid4().hex[:8]}:"
    config = {
        "state": {"store": REDIS_URL, "key_prefix": prefix, "timeout_s": 2.0},
        "audit": {"enabled": False},
        "policies": [
            rate_policy(
                "inference", [V2], [{"limit": 100, "per": "1m", "algorithm": "sliding_window"}]
            )
        ],
    }
    try:
        with run_server(tmp_path, config=config, workers=4, env=HASH_ENV) as srv:
            wait_for_fresh_minute()
            started = time.monotonic()
            statuses = blast(srv.url, 2000, key="one-client")
            assert time.monotonic() - started < 15, "too slow to stay inside one minute window"
            assert statuses == Counter({200: 100, 429: 1900}), statuses
            # a different client has its own budget
            other = httpx.post(srv.url + V2, json=V2_BODY, headers={"x-api-key": "another"})
            assert other.status_code == 200
            throttled = httpx.post(srv.url + V2, json=V2_BODY, headers={"x-api-key": "one-client"})
            assert throttled.status_code == 429
            assert int(throttled.headers["retry-after"]) >= 1
            assert "ratelimit" in throttled.headers and "ratelimit-policy" in throttled.headers
        assert "Traceback" not in srv.output()
    finally:
        r = redis.Redis.from_url(REDIS_URL)
        keys = list(r.scan_iter(match=prefix + "*"))
        if keys:
            r.delete(*keys)
        r.close()


class OwnRedis:
    """A redis-server of the test's own on a free port, that can be stopped and restarted."""

    def __init__(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            pytest.fail("redis-server is not installed (.ci/run installs it)")
        self.exe = exe
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                self.exe,
                "--bind",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port)
        deadline = time.monotonic() + 10
        while True:
            try:
                if client.ping():
                    break
            except redis.ConnectionError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("own redis-server did not start")
            time.sleep(0.05)
        client.close()

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None


@pytest.fixture
def own_redis() -> Iterator[OwnRedis]:
    if REDIS_URL is None:
        pytest.skip("set GUARD_TEST_REDIS_URL (e.g. redis://127.0.0.1:6379/15) to run Redis tests")
    server = OwnRedis()
    server.start()
    try:
        yield server
    finally:
        server.stop()


def test_redis_outage_follows_failure_mode_and_recovers(
    tmp_path: Path, own_redis: OwnRedis
) -> None:
    """Redis dies mid-load: no 5xx on fail_open, 503 on fail_closed; then it recovers."""
    hourly5 = [{"rate": 5, "per": "1h", "burst": 5}]
    config = {
        "state": {
            "store": own_redis.url,
            "timeout_s": 0.2,
            "breaker_failures": 2,
            "breaker_reset_s": 0.5,
        },
        "audit": {"enabled": False},
        "policies": [
            rate_policy("open", [V2], hourly5),
            rate_policy("closed", [V1], hourly5, failure_mode="fail_closed"),
        ],
    }
    mp = tmp_path / "prom"
    mp.mkdir()
    env = {**HASH_ENV, "PROMETHEUS_MULTIPROC_DIR": str(mp)}
    with (
        run_server(tmp_path, config=config, workers=2, env=env) as srv,
        httpx.Client(base_url=srv.url, timeout=10) as c,
    ):

        def send(path: str, key: str) -> int:
            body = V2_BODY if path == V2 else V1_BODY
            return c.post(path, json=body, headers={"x-api-key": key}).status_code

        # Redis up: the limit holds on both policies
        assert Counter(send(V2, "k1") for _ in range(8)) == Counter({200: 5, 429: 3})
        assert Counter(send(V1, "k1") for _ in range(8)) == Counter({200: 5, 429: 3})

        # background load on the fail_open route that runs across the outage
        stop = threading.Event()
        background: list[int] = []

        def load() -> None:
            with httpx.Client(base_url=srv.url, timeout=10) as lc:
                i = 0
                while not stop.is_set():
                    i += 1
                    r = lc.post(V2, json=V2_BODY, headers={"x-api-key": f"bg-{i}"})
                    background.append(r.status_code)

        loader = threading.Thread(target=load)
        loader.start()
        time.sleep(0.3)

        # Redis down, mid-load: never a 5xx on the fail_open route
        own_redis.stop()
        statuses_open = Counter(send(V2, f"down-{i % 3}") for i in range(30))
        statuses_closed = Counter(send(V1, f"down-{i % 3}") for i in range(30))
        assert statuses_open == Counter({200: 30}), statuses_open
        assert statuses_closed == Counter({503: 30}), statuses_closed

        text = c.get("/metrics").text
        assert metric(text, "guard_errors_total", component="store") >= 60
        assert metric(text, "guard_store_fallback_total") >= 60
        assert metric(text, "guard_store_errors_total") >= 1
        assert metric(text, "guard_requests_total", policy="closed", decision="error") == 30

        # Redis back (empty: it keeps nothing): decisions recover on their own
        own_redis.start()
        time.sleep(0.3)
        stop.set()
        loader.join(30)
        # every background client was new and sent one row: admitted, Redis or not
        assert len(background) > 20 and set(background) == {200}, Counter(background)
        deadline = time.monotonic() + 15
        while send(V1, "probe") == 503:
            if time.monotonic() > deadline:
                pytest.fail("the guard did not recover after Redis came back")
            time.sleep(0.2)
        assert Counter(send(V2, "k2") for _ in range(8)) == Counter({200: 5, 429: 3})
        assert Counter(send(V1, "k2") for _ in range(8)) == Counter({200: 5, 429: 3})
        assert (
            metric(c.get("/metrics").text, "guard_store_breaker_transitions_total", state="closed")
            >= 1
        )
    out = srv.output()
    assert "Traceback" not in out
    assert own_redis.url not in out or "password" not in out
    assert os.path.isdir(mp)
