"""Identity the app authenticates, ceilings above the client, quarantine at the address.

The attacks these close (issue 13): a quarantined bearer client that adds a
random ``x-api-key``, an address-identified client that adds one, and a client
that rotates fresh keys to reset every per-client budget. Each runs through the
engine (``Guard.admit``) with real detectors, on the memory store and on the
real Redis, and each has a control that shows what the defence changes.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from inference_guard.guard.config import GuardConfig
from inference_guard.guard.engine import Pass, Refusal, Request, Verdict
from inference_guard.guard.pipeline import Guard
from inference_guard.guard.stores.memory import MemoryStore
from tests.conftest import sample
from tests.stores_fixture import Backend

pytestmark = pytest.mark.anyio

BACKENDS = pytest.mark.parametrize("backend", ["memory", "redis"], indirect=True)

V2 = "/v2/models/m/infer"
BODY = json.dumps(
    {"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1.0, 1.0]}]}
).encode()
TOKEN = (b"authorization", b"Bearer the-authenticated-token")

#: evidence: a client's third request in an hour is blocked, and a block quarantines
ABUSE = {
    "type": "rate",
    "name": "abuse",
    "action": "block",
    "params": {"key": "client", "limits": [{"rate": 2, "per": "1h", "burst": 2}]},
}


def ceiling(key: str, n: int) -> dict[str, Any]:
    return {
        "type": "rate",
        "name": f"{key}-ceiling",
        "action": "throttle",
        "params": {"key": key, "limits": [{"rate": n, "per": "1h", "burst": n}]},
    }


class Body:
    async def read(self, declared: bytes | None) -> bytes:
        return BODY


def build(
    backend: Backend,
    registry: CollectorRegistry,
    tmp_path: Path,
    *,
    detectors: list[dict[str, Any]],
    identity: dict[str, Any] | None = None,
    exempt: dict[str, Any] | None = None,
    **policy: Any,
) -> Guard:
    data: dict[str, Any] = {
        "audit": {"path": str(tmp_path / "audit.jsonl")},
        "policies": [
            {"name": "inference", "routes": [V2], "quarantine_s": 600, "detectors": detectors}
        ],
    }
    data["policies"][0].update(policy)
    if identity is not None:
        data["client_identity"] = identity
    if exempt is not None:
        data["exempt"] = exempt
    return Guard(
        GuardConfig.from_dict(data),
        registry=registry,
        clock=backend.clock or time.monotonic,
        store=backend.store,
        identity_secret=b"layered-identity-test",
    )


async def send(guard: Guard, ip: str, *headers: tuple[bytes, bytes]) -> Verdict:
    policy = guard.match("POST", V2)
    assert policy is not None
    all_headers = [(b"content-type", b"application/json"), *headers]
    return await guard.admit(Request(policy, "POST", V2, all_headers, (ip, 5000), "rid", Body()))


async def status(guard: Guard, ip: str, *headers: tuple[bytes, bytes]) -> int:
    verdict = await send(guard, ip, *headers)
    if isinstance(verdict, Refusal):
        return verdict.status
    assert isinstance(verdict, Pass)
    return 200


def random_key() -> tuple[bytes, bytes]:
    return (b"x-api-key", uuid.uuid4().hex.encode())


@BACKENDS
async def test_a_quarantined_bearer_client_cannot_escape_by_adding_a_key(
    backend: Backend, registry: CollectorRegistry, tmp_path: Path
) -> None:
    guard = build(backend, registry, tmp_path, detectors=[ABUSE])
    ip = "203.0.113.10"
    assert [await status(guard, ip, TOKEN) for _ in range(3)] == [200, 200, 403]
    assert await status(guard, ip, TOKEN) == 403
    # the token beside a random key: two credentials, refused before anything is read
    assert await status(guard, ip, TOKEN, random_key()) == 400
    # the key alone, dropping the token: a new client, but at a quarantined address
    assert await status(guard, ip, random_key()) == 403
    # the control: the same kind of key from an address with no evidence passes
    assert await status(guard, "198.51.100.10", random_key()) == 200

    # an app that authenticates only bearer tokens: a key beside the token is not read
    bearer_only = build(
        backend,
        CollectorRegistry(),
        tmp_path,
        detectors=[ABUSE],
        identity={"source": ["bearer"]},
        quarantine_address="off",
    )
    ip, token = "203.0.113.11", (b"authorization", b"Bearer another-token")
    assert [await status(bearer_only, ip, token) for _ in range(3)] == [200, 200, 403]
    assert await status(bearer_only, ip, token, random_key()) == 403


@BACKENDS
async def test_a_quarantined_address_client_cannot_escape_by_adding_a_credential(
    backend: Backend, registry: CollectorRegistry, tmp_path: Path
) -> None:
    guard = build(backend, registry, tmp_path, detectors=[ABUSE])
    ip = "203.0.113.20"
    assert [await status(guard, ip) for _ in range(3)] == [200, 200, 403]
    assert await status(guard, ip, random_key()) == 403
    assert await status(guard, ip, (b"authorization", b"Bearer fresh")) == 403
    # the control: with the address layer off, a key is a way out (the escape it closes)
    open_layer = build(
        backend, CollectorRegistry(), tmp_path, detectors=[ABUSE], quarantine_address="off"
    )
    ip = "203.0.113.21"
    assert [await status(open_layer, ip) for _ in range(3)] == [200, 200, 403]
    assert await status(open_layer, ip, random_key()) == 200


@BACKENDS
async def test_a_subnet_quarantine_refuses_the_neighbours_for_its_own_time(
    backend: Backend, registry: CollectorRegistry, tmp_path: Path
) -> None:
    guard = build(
        backend,
        registry,
        tmp_path,
        detectors=[ABUSE],
        quarantine_address="subnet",
        quarantine_address_s=1,
    )
    key = random_key()
    assert [await status(guard, "203.0.113.30", key) for _ in range(3)] == [200, 200, 403]
    assert await status(guard, "203.0.113.31", random_key()) == 403
    assert await status(guard, "203.0.114.31", random_key()) == 200
    # one quarantine counted; two flags, the key's and its subnet's, kept (in the memory
    # store) in the flag table that a flood of fresh ids does not evict
    assert sample(registry, "guard_quarantines_total", policy="inference") == 1
    if isinstance(backend.store, MemoryStore):
        assert backend.store.flag_keys == 2
    await backend.advance(1.2)
    # the subnet's time is up; the key's is not
    assert await status(guard, "203.0.113.31", random_key()) == 200
    assert await status(guard, "203.0.113.32", key) == 403


@BACKENDS
async def test_key_rotation_stops_at_the_address_ceiling(
    backend: Backend, registry: CollectorRegistry, tmp_path: Path
) -> None:
    guard = build(backend, registry, tmp_path, detectors=[ABUSE, ceiling("ip", 5)])
    ip = "203.0.113.40"
    verdicts = [await send(guard, ip, random_key()) for _ in range(8)]
    statuses = [v.status if isinstance(v, Refusal) else 200 for v in verdicts]
    assert statuses == [200] * 5 + [429] * 3
    refusal = verdicts[-1]
    assert isinstance(refusal, Refusal)
    headers = dict(refusal.headers)
    assert int(headers[b"retry-after"]) >= 1 and b'"ip-ceiling";r=0' in headers[b"ratelimit"]
    # counted under the ceiling's own name
    detections = {"policy": "inference", "detector": "ip-ceiling", "action": "throttle"}
    assert sample(registry, "guard_detections_total", **detections) == 3
    # the ceiling is the address's: another address, and another subnet's, start afresh
    assert await status(guard, "203.0.113.41", random_key()) == 200
    subnet = build(backend, CollectorRegistry(), tmp_path, detectors=[ceiling("subnet", 3)])
    neighbours = [f"198.51.100.{i}" for i in range(1, 6)]
    assert [await status(subnet, n, random_key()) for n in neighbours] == [200] * 3 + [429] * 2
    assert await status(subnet, "198.51.101.1", random_key()) == 200


@BACKENDS
async def test_exempt_clients_stay_exempt_from_the_ceiling(
    backend: Backend, registry: CollectorRegistry, tmp_path: Path
) -> None:
    guard = build(
        backend,
        registry,
        tmp_path,
        detectors=[ceiling("ip", 2)],
        exempt={"cidrs": ["192.0.2.0/24"]},
    )
    assert [await status(guard, "192.0.2.7", random_key()) for _ in range(4)] == [200] * 4
    assert [await status(guard, "203.0.113.50", random_key()) for _ in range(3)] == [
        200,
        200,
        429,
    ]


@BACKENDS
async def test_keys_the_app_does_not_authenticate_share_one_budget(
    backend: Backend, registry: CollectorRegistry, tmp_path: Path
) -> None:
    """source: [bearer]: keys are not read, so rotating them is one client, the address."""
    limit = {**ABUSE, "name": "per-client", "action": "throttle"}
    guard = build(backend, registry, tmp_path, detectors=[limit], identity={"source": ["bearer"]})
    assert [await status(guard, "203.0.113.60", random_key()) for _ in range(3)] == [
        200,
        200,
        429,
    ]
    # the control: where keys are a listed source, each fresh key is a fresh client
    keyed = build(backend, CollectorRegistry(), tmp_path, detectors=[limit])
    assert [await status(keyed, "203.0.113.61", random_key()) for _ in range(3)] == [200] * 3
