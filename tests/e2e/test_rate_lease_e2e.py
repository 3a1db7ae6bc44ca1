"""Rate leases across real uvicorn workers sharing a real Redis.

Four workers, each spending leases of 1 % of a 1000-unit budget, and 3 000
concurrent requests from one client: the budget is admitted once and no more,
and Redis sees far fewer scripts than requests.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.conftest import run_server
from tests.e2e.test_rate_e2e import HASH_ENV, V2, blast, rate_policy
from tests.stores_fixture import REDIS_SKIP, REDIS_URL

pytestmark = [pytest.mark.e2e, pytest.mark.redis]


@contextlib.contextmanager
def scripts_under(prefix: str, out: list[int]) -> Iterator[None]:
    """Count the rate scripts clients send for keys under ``prefix`` (``redis-cli monitor``).

    Monitor lines carry the keys, so other clients of the same server (other tests,
    other runs) are not counted; commands a script runs inside Redis are left out.
    """
    exe = shutil.which("redis-cli")
    if exe is None:
        pytest.skip("redis-cli is not on PATH: it counts the scripts")
    assert REDIS_URL is not None
    with tempfile.TemporaryFile() as log:
        monitor = subprocess.Popen([exe, "-u", REDIS_URL, "monitor"], stdout=log)
        try:
            time.sleep(0.5)
            yield
            time.sleep(0.5)
        finally:
            monitor.terminate()
            monitor.wait()
        log.seek(0)
        lines = log.read().decode("utf-8", "replace").splitlines()
    out.append(
        sum(1 for line in lines if '"EVALSHA"' in line and prefix in line and " lua]" not in line)
    )


@REDIS_SKIP
def test_four_workers_with_leases_admit_the_budget_once(tmp_path: Path) -> None:
    assert REDIS_URL is not None
    prefix = f"guard-e2e-lease-{uuid.uuid4().hex[:8]}:"
    # one unit an hour: nothing refills while the test runs
    limits = [{"rate": 1, "per": "1h", "burst": 1000}]
    config = {
        "state": {"store": REDIS_URL, "key_prefix": prefix, "timeout_s": 2.0},
        "audit": {"enabled": False},
        "policies": [rate_policy("inference", [V2], limits)],
    }
    r = redis.Redis.from_url(REDIS_URL)
    try:
        with run_server(tmp_path, config=config, workers=4, env=HASH_ENV) as srv:
            counted: list[int] = []
            with scripts_under(prefix, counted):
                statuses = blast(srv.url, 3000, key="one-client")
            (scripts,) = counted
            assert scripts > 0  # the count sees the guard's scripts at all
            # every leased unit was taken from Redis first: never more than the budget;
            # a lease a worker could not spend before the end is the only shortfall
            assert statuses[200] <= 1000, statuses
            assert statuses[200] >= 1000 - 4 * 10, statuses
            assert statuses == Counter({200: statuses[200], 429: 3000 - statuses[200]})
            # without leases: 3 000 scripts. Half the budget goes in leases of 10 (11 units
            # a script), the rest one by one (about 545 scripts); each worker then repeats a
            # refusal for up to a second, asking again (with whatever is in flight, at most
            # 100 connections' worth) once a second: about 900 in all here
            assert scripts < 2000, scripts
        assert "Traceback" not in srv.output()
    finally:
        keys = list(r.scan_iter(match=prefix + "*"))
        if keys:
            r.delete(*keys)
        r.close()
