"""A real uvicorn server stopped gracefully applies the answers still queued for observation.

With a Redis store the extraction detectors share what they learn from answers
with the other workers and replicas. An answer waiting in the observation queue
when the process is told to stop (a rolling restart: SIGTERM) would take that
evidence with it; the lifespan shutdown applies it first, so it reaches the
shared store.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import httpx
import pytest
import redis

from tests.conftest import run_server
from tests.middleware.test_shutdown_drain import shutdown_config
from tests.stores_fixture import REDIS_SKIP, REDIS_URL, delete_prefix

pytestmark = [pytest.mark.e2e, pytest.mark.redis, REDIS_SKIP]

V2 = "/v2/models/digits/infer"
ROW = [float(i % 17) for i in range(64)]
BODY = {"inputs": [{"name": "input-0", "shape": [1, 64], "datatype": "FP32", "data": ROW}]}


def evidence_keys(prefix: str) -> list[bytes]:
    assert REDIS_URL is not None
    client = redis.Redis.from_url(REDIS_URL)
    try:
        return [k for k in client.scan_iter(match=f"{prefix}*evidence*") if client.exists(k)]
    finally:
        client.close()


def test_a_graceful_shutdown_sends_the_queued_answers_evidence_to_the_shared_store(
    tmp_path: Path,
) -> None:
    assert REDIS_URL is not None
    prefix = f"ig-test-shutdown-{uuid.uuid4().hex[:8]}:"
    env = {"GUARD_HASH_KEY": "shutdown-e2e-hash-key-not-secret"}
    try:
        with run_server(
            tmp_path,
            config=shutdown_config(V2, state={"store": REDIS_URL, "key_prefix": prefix}),
            env=env,
        ) as srv:
            answer = httpx.post(srv.url + V2, json=BODY, timeout=30)
            assert answer.status_code == 200
            assert "probabilities" in answer.text
            # the answer waits in the queue: nothing of it has reached the store yet
            assert evidence_keys(prefix) == []
        # run_server sent SIGTERM and waited: uvicorn shut down gracefully (and, as it
        # does, raised the signal again on its way out), running the lifespan shutdown
        assert evidence_keys(prefix), f"no evidence under {prefix!r}:\n{srv.output()}"
    finally:
        asyncio.run(delete_prefix(REDIS_URL, prefix))
