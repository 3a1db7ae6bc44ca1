"""A careless model server, the fragile app of the hostile-traffic benchmark.

It serves the demo's digits classifier (scikit-learn's ``LogisticRegression``,
64 pixel features) the way many hand-written model servers do: ``json.loads``
the body, ``np.asarray(data, dtype=float).reshape(shape)``, ``predict_proba``,
answer. It validates nothing, so whatever the input does not expect (NaN, a
wrong width or rank, strings, a missing key, nesting past Python's recursion
limit, values whose probabilities overflow) raises, and Starlette answers 500.
It does take every *valid* request of the corpus for a single-input model: the
KServe v1 ``inputs`` form, the MLflow ``/invocations`` forms, ``outputs``
selections (ignored).

Its 500s say what went wrong (``Exception type: message``, as a server left in
debug mode does), so the benchmark can group the requests that crash it.

Factories for ``uvicorn --factory``:

``benchmarks.fragile_app:fragile``
    the app, bare;
``benchmarks.fragile_app:fragile_default``
    behind ``GuardMiddleware`` with the guard's defaults (``GuardConfig.default()``:
    validation on every well-known inference route, answers rounded);
``benchmarks.fragile_app:fragile_signed``
    behind ``GuardMiddleware`` with the defaults plus the model's signature
    (:data:`SIGNATURE`: one FP32 input ``input-0`` of shape ``[-1, 64]``, what the
    demo's model server declares for the same model), which also holds KServe v1
    and MLflow rows;
``benchmarks.fragile_app:fragile_demo``
    behind the demo policy (``guard/demo.yaml``), calibrated as ``guard demo``
    calibrates it.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from inference_guard.middleware.asgi import GuardMiddleware
from inference_guard.middleware.demo import PIXEL_MAX, DigitsModel, train_digits_model
from inference_guard.middleware.types import ASGIApp


def _predict(model: DigitsModel, data: Any, shape: Any = None) -> list[list[float]]:
    X = np.asarray(data, dtype=float)
    if shape is not None:
        X = X.reshape(shape)
    proba: list[list[float]] = model.estimator.predict_proba(X / PIXEL_MAX).tolist()
    return proba


def build_fragile_app(model: DigitsModel | None = None) -> Starlette:
    """The careless digits server: OIP v2, KServe v1 and MLflow routes, no validation."""
    digits = model if model is not None else train_digits_model()

    async def v2_infer(request: Request) -> Response:
        doc = json.loads(await request.body())
        tensor = doc["inputs"][0]
        proba = _predict(digits, tensor["data"], tensor["shape"])
        output = {
            "name": "probabilities",
            "datatype": "FP32",
            "shape": [len(proba), len(proba[0])],
            "data": [p for row in proba for p in row],
        }
        return JSONResponse({"model_name": request.path_params["name"], "outputs": [output]})

    async def v1_predict(request: Request) -> Response:
        doc = json.loads(await request.body())
        rows = doc["instances"] if "instances" in doc else doc["inputs"]
        if isinstance(rows, dict):  # the named-inputs form: a single-input model takes the first
            rows = next(iter(rows.values()))
        return JSONResponse({"predictions": _predict(digits, rows)})

    async def invocations(request: Request) -> Response:
        doc = json.loads(await request.body())
        if "dataframe_split" in doc:
            rows = doc["dataframe_split"]["data"]
        elif "dataframe_records" in doc:
            rows = [list(record.values()) for record in doc["dataframe_records"]]
        else:
            rows = doc["instances"] if "instances" in doc else doc["inputs"]
        return JSONResponse({"predictions": _predict(digits, rows)})

    async def healthz(request: Request) -> Response:
        return PlainTextResponse("ok")

    async def crashed(request: Request, exc: Exception) -> Response:
        # Starlette's ServerErrorMiddleware calls this for any unhandled exception, then
        # re-raises it for the server to log: the client gets a 500 either way
        return PlainTextResponse(f"{type(exc).__name__}: {exc}"[:300], status_code=500)

    return Starlette(
        routes=[
            Route("/v2/models/{name}/infer", v2_infer, methods=["POST"]),
            Route("/v2/models/{name}/versions/{version}/infer", v2_infer, methods=["POST"]),
            Route("/v1/models/{name}:predict", v1_predict, methods=["POST"]),
            Route("/invocations", invocations, methods=["POST"]),
            Route("/healthz", healthz, methods=["GET"]),
        ],
        exception_handlers={Exception: crashed},
    )


def fragile() -> ASGIApp:
    """The careless server, bare."""
    return build_fragile_app()


#: the digits model's signature, as the demo's model server declares it (GET /v2/models/digits)
SIGNATURE = {"inputs": [{"name": "input-0", "datatype": "FP32", "shape": [-1, 64]}]}


def fragile_signed() -> ASGIApp:
    """The careless server behind the guard's defaults and the model's signature."""
    from inference_guard.guard.config import GuardConfig

    default = GuardConfig.default().policies[0]
    config = {
        "policies": [{"name": default.name, "routes": list(default.routes), "signature": SIGNATURE}]
    }
    return GuardMiddleware(build_fragile_app(), config=config)


def fragile_default() -> ASGIApp:
    """The careless server behind the guard's defaults."""
    return GuardMiddleware(build_fragile_app(), config=None)
