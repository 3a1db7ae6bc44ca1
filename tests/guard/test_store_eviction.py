"""A Redis that may evict the guard's keys is said so at start-up (log and metric).

Against the real Redis at ``GUARD_TEST_REDIS_URL``: the test sets the server's
``maxmemory-policy`` and puts the old value back afterwards.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from prometheus_client import CollectorRegistry

from inference_guard.guard.config import GuardConfig
from inference_guard.guard.pipeline import Guard
from inference_guard.guard.stores.base import EvictionPolicy
from tests.conftest import sample
from tests.stores_fixture import REDIS_SKIP, REDIS_URL

pytestmark = [pytest.mark.redis, REDIS_SKIP]


@pytest.fixture
def server_policy() -> Iterator[redis.Redis]:
    """A client of the test Redis; its maxmemory-policy is restored afterwards."""
    assert REDIS_URL is not None
    client = redis.Redis.from_url(REDIS_URL)
    before = client.config_get("maxmemory-policy")["maxmemory-policy"]
    try:
        yield client
    finally:
        client.config_set("maxmemory-policy", before)
        client.close()


def start(tmp_path: Path, registry: CollectorRegistry, monkeypatch: pytest.MonkeyPatch) -> Guard:
    monkeypatch.setenv("GUARD_HASH_KEY", "eviction-test-hash-key-0123456789")
    config = GuardConfig.from_dict(
        {
            "audit": {"path": str(tmp_path / "audit.jsonl")},
            "state": {"store": REDIS_URL, "key_prefix": "guardtest:eviction:"},
        }
    )
    return Guard(config, registry=registry)


@pytest.mark.parametrize(
    ("policy", "evicts"),
    [("allkeys-lru", True), ("volatile-ttl", True), ("noeviction", False)],
)
def test_an_evicting_maxmemory_policy_is_warned_about_and_exported(
    server_policy: redis.Redis,
    policy: str,
    evicts: bool,
    tmp_path: Path,
    registry: CollectorRegistry,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    server_policy.config_set("maxmemory-policy", policy)
    with caplog.at_level(logging.WARNING, logger="guard"):
        start(tmp_path, registry, monkeypatch)
    warned = [r.getMessage() for r in caplog.records if "maxmemory-policy" in r.getMessage()]
    labels = {"backend": "redis", "policy": policy}
    assert registry.get_sample_value("guard_store_eviction_policy", labels) == float(evicts)
    if evicts:
        assert len(warned) == 1 and f"maxmemory-policy is {policy}" in warned[0]
        assert "noeviction" in warned[0]
    else:
        assert warned == []


def test_the_memory_store_exports_no_policy(registry: CollectorRegistry, tmp_path: Path) -> None:
    Guard(
        GuardConfig.from_dict({"audit": {"path": str(tmp_path / "audit.jsonl")}}),
        registry=registry,
    )
    assert sample(registry, "guard_store_eviction_policy", backend="memory", policy="") == 0
    text = [m.name for m in registry.collect() if m.samples]
    assert "guard_store_eviction_policy" not in text


def test_every_policy_but_noeviction_evicts() -> None:
    assert not EvictionPolicy.evicts("noeviction")
    for policy in ("allkeys-lru", "allkeys-lfu", "allkeys-random", "volatile-lru", "volatile-ttl"):
        assert EvictionPolicy.evicts(policy)
