"""App factories the benchmarks serve with ``uvicorn --factory``.

Each variant wraps the same digits model app, so differences are the wrapper's.
``BENCH_CONFIG`` (a path) overrides the guard config where a variant takes one.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

from prometheus_client import CollectorRegistry

from middleware.asgi import GuardMiddleware
from middleware.demo import build_model_app
from middleware.types import ASGIApp

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


def validation() -> ASGIApp:
    """The guard validating payloads, leaving answers as the model wrote them."""
    return GuardMiddleware(build_model_app(), config=VALIDATION, registry=CollectorRegistry())


def anomaly_config(calibration_dir: str) -> dict[str, Any]:
    """Validation plus the demo's row anomaly detectors, calibrated on the digits split.

    ``envelope``, ``mahalanobis`` and ``knn``, as guard/demo.yaml runs them;
    ``iforest`` (about 33 µs more per row, see the anomaly section) is left out.
    """
    from guard.calibrate import calibrate_digits
    from middleware.demo import train_digits_model

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
    from middleware.demo import demo_config

    config = demo_config(calibration_dir)
    config["audit"] = {"enabled": False}
    for det in config["policies"][0]["detectors"]:
        if det["type"] == "rate":
            det["params"]["limits"] = [{"rate": 1e9, "per": "1s", "burst": 1_000_000}]
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
