"""At the lifespan shutdown the middleware applies the answers still queued for observation.

With ``observation.batch`` above 1 an answer waits in the queue until a batch is
complete, the client's next verdict, or the timer. A process that stops in the
meantime (a rolling restart) would lose those answers' evidence, and whatever
they would have written to a shared store, without a count. The middleware
drains the queue when the server sends ``lifespan.shutdown``; a drain that
cannot finish in time counts what it leaves as dropped, and the shutdown goes on.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from inference_guard.detectors.prada import PradaDetector
from inference_guard.middleware import lifespan
from inference_guard.middleware.asgi import GuardMiddleware
from tests.conftest import sample

V2 = "/v2/models/m/infer"
WIDTH = 8


def shutdown_config(route: str, **extra: Any) -> dict[str, Any]:
    """PRADA (it learns from answers) on ``route``, its answers queued; ``extra``: more
    top-level sections (``state``, say). Shared with ``tests/e2e/test_shutdown_e2e.py``."""
    return {
        "audit": {"enabled": False},
        # nothing drains the one answer but the shutdown: no batch completes, no timer fires
        "observation": {"batch": 32, "max_delay_s": 3600.0},
        "policies": [
            {
                "name": "inference",
                "routes": [route],
                "degrade": {"always": False},
                "detectors": [
                    {
                        "type": "prada",
                        "action": "flag",
                        "params": {"delta": 0.96, "min_distances": 40, "seed": 7},
                    }
                ],
            }
        ],
        **extra,
    }


CONFIG = shutdown_config(V2)


def _body(rows: np.ndarray) -> bytes:
    tensor = {"name": "x", "shape": list(rows.shape), "datatype": "FP32"}
    return json.dumps({"inputs": [{**tensor, "data": rows.ravel().tolist()}]}).encode()


_ANSWER = json.dumps(
    {
        "model_name": "m",
        "outputs": [
            {"name": "label", "shape": [1], "datatype": "INT64", "data": [1]},
            {"name": "probabilities", "shape": [1, 3], "datatype": "FP32", "data": [0.1, 0.8, 0.1]},
        ],
    }
).encode()


class App:
    """A model that answers every request alike and takes part in the lifespan protocol."""

    def __init__(self) -> None:
        self.lifespan: list[str] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                self.lifespan.append(message["type"])
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        while (await receive()).get("more_body"):
            pass
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(_ANSWER)).encode()),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": _ANSWER})


async def _request(mw: GuardMiddleware) -> int:
    body = _body(np.arange(WIDTH, dtype=float).reshape(1, WIDTH))
    scope = {
        "type": "http",
        "method": "POST",
        "path": V2,
        "raw_path": V2.encode(),
        "query_string": b"",
        "headers": [(b"content-type", b"application/json"), (b"x-api-key", b"k1")],
        "client": ("127.0.0.1", 5000),
    }
    statuses: list[int] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    await mw(scope, receive, send)
    return statuses[0]


async def _lifespan(mw: GuardMiddleware) -> list[str]:
    messages = iter([{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}])
    sent: list[str] = []

    async def receive() -> dict[str, Any]:
        return next(messages)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message["type"])

    await mw({"type": "lifespan"}, receive, send)
    return sent


def _prada(mw: GuardMiddleware) -> PradaDetector:
    (detector,) = mw.guard.loadout.detectors()
    assert isinstance(detector, PradaDetector)
    return detector


def test_the_shutdown_applies_the_answers_still_queued(registry: CollectorRegistry) -> None:
    app = App()
    mw = GuardMiddleware(app, config=CONFIG, registry=registry)

    async def scenario() -> None:
        assert await _request(mw) == 200
        # the answer waits: the detector has not seen the client yet
        assert len(mw.guard.observations) == 1
        assert len(_prada(mw).clients) == 0
        assert await _lifespan(mw) == ["lifespan.startup.complete", "lifespan.shutdown.complete"]

    asyncio.run(scenario())
    assert app.lifespan == ["lifespan.startup", "lifespan.shutdown"]
    assert len(mw.guard.observations) == 0
    assert len(_prada(mw).clients) == 1  # the answer was applied, not thrown away
    assert sample(registry, "guard_observations_dropped_total", policy="inference") == 0


def test_a_drain_that_cannot_finish_counts_what_it_leaves_and_the_shutdown_goes_on(
    registry: CollectorRegistry, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    app = App()
    mw = GuardMiddleware(app, config=CONFIG, registry=registry)
    monkeypatch.setattr(lifespan, "SHUTDOWN_DRAIN_S", 0.05)

    async def scenario() -> None:
        assert await _request(mw) == 200
        assert await _request(mw) == 200  # the client's second verdict drains the first answer
        assert len(mw.guard.observations) == 1 and len(_prada(mw).clients) == 1

        async def stalled(items: Any) -> None:  # a store that never answers
            await asyncio.Event().wait()

        monkeypatch.setattr(mw.guard.observations, "_apply", stalled)
        assert await _lifespan(mw) == ["lifespan.startup.complete", "lifespan.shutdown.complete"]

    asyncio.run(scenario())
    assert app.lifespan == ["lifespan.startup", "lifespan.shutdown"]
    assert len(mw.guard.observations) == 0
    assert mw.guard.observations.dropped == 1
    warned = "applying 1 queued observations at shutdown failed; 1 dropped"
    assert warned in caplog.messages, caplog.messages
    assert sample(registry, "guard_observations_dropped_total", policy="inference") == 1
