"""Rate limits across real uvicorn workers sharing the session's local Redis Cluster.

The same check as ``test_rate_e2e.py`` runs against one Redis, through the whole
guard: ``state.store: redis+cluster://...`` from the config file, four worker
processes, each with its own cluster client.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from pathlib import Path

import httpx
import pytest

from tests.conftest import run_server
from tests.e2e.test_rate_e2e import HASH_ENV, V2, V2_BODY, blast, rate_policy, wait_for_fresh_minute
from tests.redis_cluster import LocalCluster
from tests.stores_fixture import delete_prefix

pytestmark = [pytest.mark.e2e, pytest.mark.redis]


def test_four_workers_on_a_cluster_admit_exactly_the_limit(
    tmp_path: Path, redis_cluster: LocalCluster
) -> None:
    """2 000 concurrent requests from one client against 100/minute: exactly 100 pass."""
    prefix = f"guard-e2e-{uuid.uuid4().hex[:8]}:"
    config = {
        "state": {"store": redis_cluster.url, "key_prefix": prefix, "timeout_s": 2.0},
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
            other = httpx.post(srv.url + V2, json=V2_BODY, headers={"x-api-key": "another"})
            assert other.status_code == 200
        assert "Traceback" not in srv.output()
        # the two clients' keys: one each, on the masters their hash tags chose
        keys = [
            key
            for port in redis_cluster.ports
            for key in redis_cluster.client(port).scan_iter(match=prefix + "*")
        ]
        assert len(keys) == 2 and all(b"rate:{inference-rate:c:" in key for key in keys), keys
    finally:
        asyncio.run(delete_prefix(redis_cluster.url, prefix))
