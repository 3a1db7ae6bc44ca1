"""The rate detector through the middleware, on the bounded memory store."""

from __future__ import annotations

from prometheus_client import CollectorRegistry
from starlette.testclient import TestClient

from inference_guard.guard.stores.memory import MemoryStore
from inference_guard.middleware.asgi import GuardMiddleware
from tests.conftest import sample
from tests.middleware.fakes import EchoApp

V1 = "/v1/models/m:predict"


def guarded(
    registry: CollectorRegistry, limits: list[dict[str, object]], **state: object
) -> TestClient:
    config = {
        "audit": {"enabled": False},
        "state": {"store": "memory://", **state},
        "policies": [
            {
                "name": "inference",
                "routes": [V1],
                "detectors": [
                    {
                        "type": "rate",
                        "name": "rl",
                        "action": "throttle",
                        "params": {"limits": limits},
                    }
                ],
            }
        ],
    }
    return TestClient(GuardMiddleware(EchoApp(), config=config, registry=registry))


def test_rows_not_requests_are_counted(registry: CollectorRegistry) -> None:
    client = guarded(registry, [{"rate": 10, "per": "1h", "burst": 10}])
    # one batch of 8 rows leaves room for 2 more rows, not 9 more requests
    assert client.post(V1, json={"instances": [[1.0, 2.0]] * 8}).status_code == 200
    assert client.post(V1, json={"instances": [[1.0, 2.0]] * 3}).status_code == 429
    assert client.post(V1, json={"instances": [[1.0, 2.0]] * 2}).status_code == 200
    r = client.post(V1, json={"instances": [[1.0, 2.0]]})
    assert r.status_code == 429
    assert int(r.headers["retry-after"]) >= 1
    assert r.headers["ratelimit-policy"].startswith('"rl";q=10')
    assert sample(registry, "guard_rows_total", policy="inference", decision="allow") == 10
    assert (
        sample(
            registry, "guard_detections_total", policy="inference", detector="rl", action="throttle"
        )
        == 2
    )


def test_flood_of_client_ids_stays_within_the_memory_cap(registry: CollectorRegistry) -> None:
    client = guarded(registry, [{"rate": 5, "per": "1m", "burst": 5}], max_keys=50)
    for i in range(500):
        r = client.post(V1, json={"instances": [[1.0]]}, headers={"x-api-key": f"key-{i}"})
        assert r.status_code == 200
    guard = client.app.guard  # type: ignore[attr-defined]
    store = guard.store
    assert isinstance(store, MemoryStore)
    assert len(store) <= 50
    assert store.evictions >= 450
    assert sample(registry, "guard_store_evictions_total", backend="memory") == store.evictions
