"""App factories for the end-to-end tests (``uvicorn --factory``).

The guard config comes from the file named by ``GUARD_TEST_CONFIG``.
"""

from __future__ import annotations

import os
from typing import Any

from inference_guard.middleware.asgi import GuardMiddleware
from inference_guard.middleware.demo import build_model_app
from inference_guard.middleware.types import ASGIApp, Receive, Scope, Send


def _config() -> str | None:
    return os.environ.get("GUARD_TEST_CONFIG") or None


def demo_app() -> ASGIApp:
    """The digits demo model behind the guard."""
    return GuardMiddleware(build_model_app(), config=_config())


def stream_app() -> ASGIApp:
    """An SSE endpoint that emits events slowly, behind the guard."""
    import asyncio

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        if scope["path"] == "/healthz":
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-type", b"text/plain")],
                }
            )
            await send({"type": "http.response.body", "body": b"ok"})
            return
        while True:  # drain the request body
            msg = await receive()
            if not msg.get("more_body"):
                break
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream")],
            }
        )
        for i in range(3):
            await send(
                {"type": "http.response.body", "body": f"data: {i}\n\n".encode(), "more_body": True}
            )
            await asyncio.sleep(0.3)
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})

    return GuardMiddleware(app, config=_config())


def custom_shape_app() -> ASGIApp:
    """A Starlette model with its own JSON shape, behind the guard.

    ``POST /score`` takes ``{"features": [[...], ...]}`` and answers
    ``{"probabilities": [[p, 1 - p], ...]}`` at full precision;
    ``GET /received`` says how many rows the model was given so far.
    """
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, PlainTextResponse
    from starlette.routing import Route

    received: list[int] = []

    async def score(request: Request) -> JSONResponse:
        rows = (await request.json())["features"]
        received.append(len(rows))
        probs = [1.0 / (1.0 + 2.718281828459045 ** -(sum(r) / 7.0)) for r in rows]
        return JSONResponse({"probabilities": [[p, 1.0 - p] for p in probs]})

    async def rows_received(request: Request) -> JSONResponse:
        return JSONResponse({"requests": len(received), "rows": sum(received)})

    async def healthz(request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    app = Starlette(
        routes=[
            Route("/score", score, methods=["POST"]),
            Route("/received", rows_received),
            Route("/healthz", healthz),
        ]
    )
    return GuardMiddleware(app, config=_config())


WINE_FEATURES = 13


def wine_model() -> tuple[Any, Any]:
    """A wine classifier (13 features, 3 classes) and the rows it was fitted on; deterministic."""
    import numpy as np
    from sklearn.datasets import load_wine
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    X, y = load_wine(return_X_y=True)
    X_train, _, y_train, _ = train_test_split(X, y, test_size=0.3, stratify=y, random_state=0)
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000))
    model.fit(X_train, y_train)
    return model, np.asarray(X_train, dtype=np.float64)


def wine_app() -> ASGIApp:
    """Another model than the demo's, over OIP v2, behind the guard.

    ``POST /v2/models/wine/infer`` takes ``(n, 13)`` rows and answers one output
    ``predict_proba`` (FP32, ``(n, 3)``): another width, route and output name than
    the demo's. ``GET /v2/models/wine`` is its metadata.
    """
    import numpy as np
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, PlainTextResponse
    from starlette.routing import Route

    model, _ = wine_model()
    metadata = {
        "name": "wine",
        "platform": "sklearn",
        "inputs": [{"name": "input-0", "datatype": "FP32", "shape": [-1, WINE_FEATURES]}],
        "outputs": [{"name": "predict_proba", "datatype": "FP32", "shape": [-1, 3]}],
    }

    async def infer(request: Request) -> JSONResponse:
        tensor = (await request.json())["inputs"][0]
        X = np.asarray(tensor["data"], dtype=np.float64).reshape(-1, WINE_FEATURES)
        proba = model.predict_proba(X)
        out = {"name": "predict_proba", "datatype": "FP32", "shape": list(proba.shape),
               "data": [float(v) for v in proba.ravel()]}
        return JSONResponse({"model_name": "wine", "outputs": [out]})

    async def meta(request: Request) -> JSONResponse:
        return JSONResponse(metadata)

    async def healthz(request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    app = Starlette(
        routes=[
            Route("/v2/models/wine/infer", infer, methods=["POST"]),
            Route("/v2/models/wine", meta),
            Route("/healthz", healthz),
        ]
    )
    return GuardMiddleware(app, config=_config())


def model_app() -> ASGIApp:
    """The bare digits demo model (no guard): an upstream for ``guard proxy``."""
    return build_model_app()
