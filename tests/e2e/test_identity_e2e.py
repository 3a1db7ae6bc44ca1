"""Swapping or adding credentials escapes neither a quarantine nor a ceiling: real uvicorn.

The guarded demo model in a real uvicorn on 127.0.0.1, on the memory store and
on the real Redis. Each scenario comes from an address of its own, which
uvicorn takes from ``X-Forwarded-For`` (its default ``--proxy-headers`` trusts
127.0.0.1, the test's own address): the guard sees what it would see behind a
proxy.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import run_server
from tests.e2e.test_server import metric
from tests.stores_fixture import REDIS_SKIP, REDIS_URL, delete_prefix

pytestmark = pytest.mark.e2e

V2 = "/v2/models/digits/infer"
BODY = {"inputs": [{"name": "input-0", "shape": [1, 64], "datatype": "FP32", "data": [1.0] * 64}]}
TOKEN = "Bearer the-authenticated-token"


def config(tmp_path: Path, store: str, prefix: str) -> dict[str, Any]:
    return {
        "audit": {"path": str(tmp_path / "audit.jsonl")},
        "state": {"store": store, "key_prefix": prefix},
        "client_identity": {"trusted_proxies": ["127.0.0.1/32"]},
        "policies": [
            {
                "name": "inference",
                "routes": [V2],
                "quarantine_s": 600,
                "detectors": [
                    {  # evidence: a client's third request within the hour is blocked
                        "type": "rate",
                        "name": "abuse",
                        "action": "block",
                        "params": {"limits": [{"rate": 2, "per": "1h", "burst": 2}]},
                    },
                    {
                        "type": "rate",
                        "name": "ip-ceiling",
                        "action": "throttle",
                        "params": {"key": "ip", "limits": [{"rate": 5, "per": "1h", "burst": 5}]},
                    },
                ],
            }
        ],
    }


def post(c: httpx.Client, ip: str, **headers: str) -> httpx.Response:
    return c.post(V2, json=BODY, headers={"x-forwarded-for": ip, **headers})


def fresh_key() -> str:
    return uuid.uuid4().hex


@pytest.mark.parametrize(
    "store",
    [
        pytest.param("memory://", id="memory"),
        pytest.param(REDIS_URL or "", id="redis", marks=[pytest.mark.redis, REDIS_SKIP]),
    ],
)
def test_new_credentials_escape_neither_quarantine_nor_ceiling(tmp_path: Path, store: str) -> None:
    env = {"GUARD_HASH_KEY": "identity-e2e-hash-key-0123456789"}
    prefix = f"guardtest:{uuid.uuid4().hex}:"
    try:
        scenarios(tmp_path, config(tmp_path, store, prefix), env)
    finally:
        if store.startswith("redis://"):
            asyncio.run(delete_prefix(store, prefix))


def scenarios(tmp_path: Path, cfg: dict[str, Any], env: dict[str, str]) -> None:
    with (
        run_server(tmp_path, config=cfg, env=env) as srv,
        httpx.Client(base_url=srv.url, timeout=10) as c,
    ):
        # a bearer client is quarantined; a random x-api-key beside its token is
        # refused, and a key alone, from its address, is still in quarantine
        ip = "203.0.113.10"
        assert [post(c, ip, authorization=TOKEN).status_code for _ in range(3)] == [200, 200, 403]
        both = post(c, ip, authorization=TOKEN, **{"x-api-key": fresh_key()})
        assert both.status_code == 400, both.text
        assert post(c, ip, **{"x-api-key": fresh_key()}).status_code == 403
        assert post(c, "198.51.100.10", **{"x-api-key": fresh_key()}).status_code == 200

        # an address-identified client is quarantined; adding a key does not get it out
        ip = "203.0.113.20"
        assert [post(c, ip).status_code for _ in range(3)] == [200, 200, 403]
        assert post(c, ip, **{"x-api-key": fresh_key()}).status_code == 403

        # a fresh key per request from one address stops at the address's ceiling
        ip = "203.0.113.40"
        answers = [post(c, ip, **{"x-api-key": fresh_key()}) for _ in range(8)]
        assert [r.status_code for r in answers] == [200] * 5 + [429] * 3
        assert int(answers[-1].headers["retry-after"]) >= 1

        text = c.get("/metrics").text
        ceiling = {"policy": "inference", "detector": "ip-ceiling", "action": "throttle"}
        assert metric(text, "guard_detections_total", **ceiling) == 3
        assert metric(text, "guard_quarantines_total", policy="inference") == 2
