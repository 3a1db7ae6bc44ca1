"""App factories the benchmarks serve with ``uvicorn --factory``.

Each variant wraps the same digits model app, so differences are the wrapper's.
``BENCH_CONFIG`` (a path) overrides the guard config where a variant takes one.

:func:`build_sklearn_app` serves any fitted scikit-learn classifier the way the
demo serves its digits model (Open Inference Protocol v2 JSON, outputs
``label`` and ``probabilities``, the demo's own request parsing and error
answers): the attack benchmark's deployments.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

from prometheus_client import CollectorRegistry

from inference_guard.middleware.asgi import GuardMiddleware
from inference_guard.middleware.demo import build_model_app
from inference_guard.middleware.types import ASGIApp

#: metrics only: no body parsing, no detectors, no degrade; requests are counted
METRICS_ONLY: dict[str, Any] = {
    "policies": [{"name": "inference", "validate": False, "degrade": {"always": False}}],
    "audit": {"enabled": False},
}


#: payload validation on, answers untouched (the 50 µs target's configuration)
VALIDATION: dict[str, Any] = {
    "policies": [{"name": "inference", "degrade": {"always": False}}],
    "audit": {"enabled": False},
}


def build_sklearn_app(
    name: str,
    predict_proba: Callable[[Any], Any],
    classes: Sequence[int],
    n_features: int,
) -> ASGIApp:
    """A bare model server for any classifier: ``POST /v2/models/<name>/infer`` (OIP v2 JSON).

    The request is read and checked as ``middleware.demo`` reads its digits requests
    (one numeric input tensor of shape ``[n, n_features]``, finite values, optional
    ``outputs`` selection); the answer carries ``label`` (INT64, from ``classes``) and
    ``probabilities`` (FP32, ``[n, len(classes)]``), as the demo's does. Also
    ``GET /healthz``.
    """
    import math

    import numpy as np
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    from inference_guard.middleware import demo

    labels_of = np.asarray(classes, dtype=np.int64)
    k = int(labels_of.shape[0])

    def rows(payload: dict[str, Any]) -> Any:
        inputs = payload.get("inputs")
        if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
            raise demo._BadRequest("'inputs' must be a list holding exactly one tensor object")
        tensor = inputs[0]
        if tensor.get("datatype") not in demo._NUMERIC_DATATYPES:
            raise demo._BadRequest("input datatype must be a numeric one")
        shape = tensor.get("shape")
        if (
            not isinstance(shape, list)
            or len(shape) != 2
            or not all(type(d) is int and d >= 0 for d in shape)
            or shape[1] != n_features
            or shape[0] == 0
        ):
            raise demo._BadRequest(f"input shape must be [n, {n_features}] with n >= 1")
        arr = demo._to_array(tensor.get("data"), "input data")
        if arr.size != math.prod(shape):
            raise demo._BadRequest(f"input data has {arr.size} values, shape {shape} needs more")
        arr = arr.reshape(shape)
        if not np.isfinite(arr).all():
            raise demo._BadRequest("input must contain only finite numbers")
        return arr

    async def infer(request: Request) -> Response:
        try:
            payload = await demo._read_object(request)
            X = rows(payload)
            names = demo._v2_output_names(payload)
            with np.errstate(all="ignore"):
                probs = np.asarray(predict_proba(X), dtype=np.float64)
            if not np.isfinite(probs).all():
                raise demo._BadRequest("input values are too large for the model")
        except demo._BadRequest as exc:
            return demo._error(str(exc))
        n = X.shape[0]
        tensors = {
            "label": {
                "name": "label",
                "shape": [n],
                "datatype": "INT64",
                "data": labels_of[np.argmax(probs, axis=1)].tolist(),
            },
            "probabilities": {
                "name": "probabilities",
                "shape": [n, k],
                "datatype": "FP32",
                "data": probs.astype(np.float32).ravel().tolist(),
            },
        }
        return demo._json_response(
            {
                "model_name": name,
                "model_version": "1",
                "id": payload.get("id") if isinstance(payload.get("id"), str) else "",
                "outputs": [tensors[x] for x in names],
            }
        )

    ok = demo._static_json({"status": "ok"})
    routes = [
        Route(f"/v2/models/{name}/infer", infer, methods=["POST"]),
        Route("/healthz", ok, methods=["GET"]),
    ]
    return Starlette(routes=routes, exception_handlers={HTTPException: demo._http_error})


def validation() -> ASGIApp:
    """The guard validating payloads, leaving answers as the model wrote them."""
    return GuardMiddleware(build_model_app(), config=VALIDATION, registry=CollectorRegistry())


def anomaly_config(calibration_dir: str) -> dict[str, Any]:
    """Validation plus the demo's row anomaly detectors, calibrated on the digits split.

    ``envelope``, ``mahalanobis`` and ``knn``, as guard/demo.yaml runs them;
    ``iforest`` (about 33 µs more per row, see the anomaly section) is left out.
    """
    from inference_guard.guard.calibrate import calibrate_digits
    from inference_guard.middleware.demo import train_digits_model

    calibrate_digits(calibration_dir, X=train_digits_model().X_train)
    return {
        "calibration_dir": calibration_dir,
        "audit": {"enabled": False},
        "policies": [
            {
                "name": "inference",
                "degrade": {"always": False},
                "detectors": [
                    {"type": t, "action": "flag"} for t in ("envelope", "mahalanobis", "knn")
                ],
            }
        ],
    }


def full_demo_config(calibration_dir: str) -> dict[str, Any]:
    """The whole demo policy (guard/demo.yaml), its rate limit raised out of the way."""
    from inference_guard.middleware.demo import demo_config

    config = demo_config(calibration_dir)
    config["audit"] = {"enabled": False}
    for det in config["policies"][0]["detectors"]:
        if det["type"] == "rate":
            det["params"]["limits"] = [{"rate": 1e9, "per": "1s", "burst": 1_000_000}]
    return config


def full_demo_shadow_config(calibration_dir: str) -> dict[str, Any]:
    """The whole demo policy (guard/demo.yaml) as shipped, in shadow mode.

    Every detector runs on every request and is counted, nothing is enforced:
    the rate limits, quarantines and degraded answers of the policy are
    decided and left unapplied, so a load generator is never refused and
    every request pays for every detector (issue 15's full-policy figure).
    Answers are still rounded for everyone (``degrade.always``).
    """
    from inference_guard.middleware.demo import demo_config

    config = demo_config(calibration_dir)
    config["audit"] = {"enabled": False}
    config["policies"][0]["shadow"] = True
    return config


#: the demo policy's detectors by what they defend against: ``full_demo-without-<group>``
#: serves the whole policy less one group (``rounding``: answers no longer rounded for
#: everyone), so that each group's own cost is the difference (full_policy.py --marginal)
FULL_DEMO_GROUPS: dict[str, tuple[str, ...]] = {
    "rate": ("rate", "ip-ceiling", "model-ceiling"),
    "anomaly": ("envelope", "mahalanobis", "knn", "anomaly_rate"),
    "extraction": ("near_duplicate", "prada", "boundary"),
    "rounding": (),
}


def full_demo_without(calibration_dir: str, group: str) -> dict[str, Any]:
    """:func:`full_demo_shadow_config` less one of :data:`FULL_DEMO_GROUPS`."""
    config = full_demo_shadow_config(calibration_dir)
    policy = config["policies"][0]
    names = FULL_DEMO_GROUPS[group]
    left = [d for d in policy["detectors"] if d.get("name", d["type"]) not in names]
    if len(left) != len(policy["detectors"]) - len(names):
        raise ValueError(f"the demo policy no longer holds every detector of {group!r}: {names}")
    policy["detectors"] = left
    if group == "rounding":
        policy["degrade"] = {**policy["degrade"], "always": False}
    return config


def anomaly() -> ASGIApp:
    """The guard with the input-anomaly detectors (issue 4's 100 µs target)."""
    config = anomaly_config(tempfile.mkdtemp(prefix="bench-anomaly-"))
    return GuardMiddleware(build_model_app(), config=config, registry=CollectorRegistry())


def full_demo() -> ASGIApp:
    """The guard running the whole demo policy."""
    config = full_demo_config(tempfile.mkdtemp(prefix="bench-demo-"))
    return GuardMiddleware(build_model_app(), config=config, registry=CollectorRegistry())


def bare() -> ASGIApp:
    """The model app with nothing in front."""
    return build_model_app()


def guarded() -> ASGIApp:
    """The guard with payload validation on (the defaults), or ``BENCH_CONFIG``."""
    return GuardMiddleware(
        build_model_app(),
        config=os.environ.get("BENCH_CONFIG") or None,
        registry=CollectorRegistry(),
    )


def metrics_only() -> ASGIApp:
    """The guard counting requests into Prometheus, nothing else."""
    return GuardMiddleware(build_model_app(), config=METRICS_ONLY, registry=CollectorRegistry())


def starlette_exporter() -> ASGIApp:
    """The same app instrumented by starlette_exporter's PrometheusMiddleware."""
    from starlette_exporter import PrometheusMiddleware, handle_metrics

    app = build_model_app()
    app.add_middleware(PrometheusMiddleware, app_name="digits", group_paths=True)
    app.add_route("/metrics", handle_metrics)
    return app


class PrefixRouter:
    """One server, several variants: ``/<variant>/<path>`` goes to ``variants[variant]``.

    The variant sees ``<path>`` (the prefix is cut from ``path`` and ``raw_path``),
    so every variant gets the same dispatch cost. Serving all of them from one
    process is what makes their latencies comparable: two *identical* apps
    served by two uvicorn processes on this machine differed by up to 40 µs at
    the median, more than the guard's whole cost, while inside one process the
    variants share the interpreter, allocator, caches and core.
    """

    def __init__(self, variants: dict[str, ASGIApp], default: str) -> None:
        self.variants = {f"/{name}".encode(): app for name, app in variants.items()}
        self.default = variants[default]

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.default(scope, receive, send)
            return
        raw: bytes = scope.get("raw_path") or scope["path"].encode()
        cut = raw.find(b"/", 1)
        app = self.variants.get(raw[:cut]) if cut > 0 else None
        if app is None:
            await self.default(scope, receive, send)
            return
        scope = dict(scope)
        scope["raw_path"] = raw[cut:]
        scope["path"] = scope["path"][cut:]
        await app(scope, receive, send)


#: ``<WITHOUT><group>``: the demo policy less a group of :data:`FULL_DEMO_GROUPS`
WITHOUT = "full_demo-without-"

#: the variants :func:`side_by_side` serves, each under ``/<name>/`` (and the
#: demo policy less each of :data:`FULL_DEMO_GROUPS`, ``full_demo-without-<group>``)
SIDE_BY_SIDE: tuple[str, ...] = (
    "bare",
    "bare_again",
    "guarded",
    "guarded_defaults",
    "anomaly",
    "full_demo",
    "metrics_only",
    "starlette_exporter",
)


def side_by_side() -> ASGIApp:
    """Overhead variants in one process, each under ``/<variant>/`` (see PrefixRouter).

    ``BENCH_VARIANTS`` (comma-separated names from :data:`SIDE_BY_SIDE`, or
    ``full_demo-without-<group>``) picks which; default all of
    :data:`SIDE_BY_SIDE`. ``bare_again`` is a second, identical bare app: its
    latency against ``bare`` is the method's own noise floor. ``full_demo`` is
    the whole demo policy in shadow mode (:func:`full_demo_shadow_config`).
    """
    from inference_guard.middleware.demo import train_digits_model

    wanted = [v for v in os.environ.get("BENCH_VARIANTS", "").split(",") if v] or list(SIDE_BY_SIDE)
    unknown = set(wanted) - set(SIDE_BY_SIDE) - {f"{WITHOUT}{g}" for g in FULL_DEMO_GROUPS}
    if unknown:
        raise ValueError(f"unknown BENCH_VARIANTS: {sorted(unknown)}")
    model = train_digits_model()

    def build(name: str) -> ASGIApp:
        if name in ("bare", "bare_again"):
            return build_model_app(model)
        if name == "starlette_exporter":
            from starlette_exporter import PrometheusMiddleware

            exporter = build_model_app(model)
            exporter.add_middleware(PrometheusMiddleware, app_name="digits", group_paths=True)
            return exporter
        config: dict[str, Any] | None = {
            "guarded": VALIDATION,
            "guarded_defaults": None,
            "metrics_only": METRICS_ONLY,
        }.get(name)
        if name == "anomaly":
            config = anomaly_config(tempfile.mkdtemp(prefix="bench-anomaly-"))
        if name == "full_demo":
            config = full_demo_shadow_config(tempfile.mkdtemp(prefix="bench-demo-"))
        if name.startswith(WITHOUT):
            group = name.removeprefix(WITHOUT)
            config = full_demo_without(tempfile.mkdtemp(prefix="bench-demo-"), group)
        return GuardMiddleware(build_model_app(model), config=config, registry=CollectorRegistry())

    variants = {name: build(name) for name in wanted}
    return PrefixRouter(variants, default=wanted[0])


def slowapi_rate() -> ASGIApp:
    """The model app behind slowapi's pure-ASGI middleware: one default limit per client IP.

    ``BENCH_SLOWAPI_LIMIT`` is the limit (``10/hour``; default ``10000000/minute``) and
    ``BENCH_SLOWAPI_STORAGE`` the ``limits`` storage URI (default ``memory://``).
    slowapi's defaults otherwise: fixed-window strategy, no rate-limit headers.
    """
    from slowapi import Limiter, _rate_limit_exceeded_handler
    from slowapi.errors import RateLimitExceeded
    from slowapi.middleware import SlowAPIASGIMiddleware
    from slowapi.util import get_remote_address

    limiter = Limiter(
        key_func=get_remote_address,
        default_limits=[os.environ.get("BENCH_SLOWAPI_LIMIT") or "10000000/minute"],
        storage_uri=os.environ.get("BENCH_SLOWAPI_STORAGE") or "memory://",
    )
    app = build_model_app()
    app.state.limiter = limiter
    app.add_exception_handler(RateLimitExceeded, _rate_limit_exceeded_handler)  # type: ignore[arg-type]
    app.add_middleware(SlowAPIASGIMiddleware)
    return app
