"""POST /-/reload and the SIGHUP handler, in process (the e2e test runs them under uvicorn)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from starlette.testclient import TestClient

import tests.middleware.fakes  # noqa: F401 - registers the test detectors
from inference_guard.middleware.asgi import GuardMiddleware
from inference_guard.middleware.reload import RELOAD_PATH, SighupReload
from tests.conftest import sample
from tests.middleware.fakes import EchoApp

V2 = "/v2/models/m/infer"
OPERATOR = ("127.0.0.1", 5000)
OUTSIDER = ("203.0.113.7", 5000)


def cfg(fire_at: float) -> dict[str, Any]:
    return {
        "policies": [
            {
                "name": "inference",
                "routes": [V2],
                "degrade": {"always": False},
                "detectors": [
                    {"type": "test-fixed", "name": "a", "action": "block",
                     "params": {"fire_at": fire_at}},
                ],
            }
        ],
        "audit": {"enabled": False},
    }


def body(first: float) -> dict[str, Any]:
    return {"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [first, 0.0]}]}


def served(tmp_path: Path, registry: CollectorRegistry) -> tuple[GuardMiddleware, EchoApp, Path]:
    path = tmp_path / "guard.yaml"
    path.write_text(json.dumps(cfg(10.0)))
    echo = EchoApp()
    return GuardMiddleware(echo, config=str(path), registry=registry), echo, path


def test_reload_from_an_allowed_address_applies_the_new_config(
    tmp_path: Path, registry: CollectorRegistry
) -> None:
    mw, _, path = served(tmp_path, registry)
    client = TestClient(mw, client=OPERATOR)
    assert client.post(V2, json=body(5.0)).status_code == 200
    path.write_text(json.dumps(cfg(3.0)))
    answer = client.post(RELOAD_PATH)
    assert answer.status_code == 200, answer.text
    assert answer.json()["reloaded"] is True and answer.json()["built"] == ["inference/a"]
    assert answer.headers["content-type"] == "application/json"
    assert client.post(V2, json=body(5.0)).status_code == 403  # the new threshold decides
    assert mw.config is mw.guard.config  # the running config, once a request has seen it
    assert sample(registry, "guard_config_reloads_total", result="ok") == 1


def test_reload_from_elsewhere_finds_no_endpoint(
    tmp_path: Path, registry: CollectorRegistry
) -> None:
    mw, echo, path = served(tmp_path, registry)
    path.write_text(json.dumps(cfg(3.0)))
    answer = TestClient(mw, client=OUTSIDER).post(RELOAD_PATH)
    # as if there were no endpoint: the request went on to the app, nothing reloaded
    assert answer.status_code == 200 and len(echo.bodies) == 1
    assert "reloaded" not in answer.text
    assert sample(registry, "guard_config_reloads_total", result="ok") == 0
    assert TestClient(mw, client=OUTSIDER).post(V2, json=body(5.0)).status_code == 200


def test_only_post_reloads(tmp_path: Path, registry: CollectorRegistry) -> None:
    mw, echo, _ = served(tmp_path, registry)
    TestClient(mw, client=OPERATOR).get(RELOAD_PATH)
    assert len(echo.bodies) == 1  # the app's
    assert sample(registry, "guard_config_reloads_total", result="ok") == 0


def test_a_bad_file_answers_422_and_keeps_the_config(
    tmp_path: Path, registry: CollectorRegistry
) -> None:
    mw, _, path = served(tmp_path, registry)
    client = TestClient(mw, client=OPERATOR)
    path.write_text(json.dumps({**cfg(3.0), "metrics": {"path": "/elsewhere"}}))
    answer = client.post(RELOAD_PATH)
    assert answer.status_code == 422
    assert answer.json()["problems"][0]["key"] == "metrics"
    assert client.post(V2, json=body(5.0)).status_code == 200  # the old threshold still
    assert sample(registry, "guard_config_reloads_total", result="error") == 1


def test_a_guard_from_a_mapping_answers_409(registry: CollectorRegistry) -> None:
    mw = GuardMiddleware(EchoApp(), config=cfg(10.0), registry=registry)
    answer = TestClient(mw, client=OPERATOR).post(RELOAD_PATH)
    assert answer.status_code == 409
    assert "no config file" in answer.json()["error"]


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="no SIGHUP on this platform")
def test_sighup_reloads_once_the_handler_is_installed() -> None:
    calls: list[int] = []

    async def reload() -> None:
        calls.append(1)

    async def scenario() -> None:
        sighup = SighupReload(reload)
        sighup.install()
        sighup.install()  # idempotent
        try:
            os.kill(os.getpid(), signal.SIGHUP)
            for _ in range(100):
                if calls:
                    break
                await asyncio.sleep(0.01)
        finally:
            sighup.remove()

    asyncio.run(scenario())
    assert calls == [1]


def test_the_lifespan_startup_installs_the_handler(
    tmp_path: Path, registry: CollectorRegistry
) -> None:
    mw, _, _ = served(tmp_path, registry)
    installed: list[str] = []
    assert mw._sighup is not None
    mw._sighup.install = lambda: installed.append("install")  # type: ignore[method-assign]
    mw._sighup.remove = lambda: installed.append("remove")  # type: ignore[method-assign]

    async def scenario() -> None:
        messages = iter([{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}])

        async def receive() -> dict[str, Any]:
            return next(messages)

        async def send(message: Any) -> None:
            pass

        async def app(scope: Any, receive: Any, send: Any) -> None:
            await receive()
            await receive()

        mw.app = app
        await mw({"type": "lifespan"}, receive, send)

    asyncio.run(scenario())
    assert installed == ["install", "remove"]
