"""The ASGI layer: the guard middleware and the metrics endpoint (the engine is in ``guard/``)."""

from __future__ import annotations

from inference_guard.middleware.asgi import GuardMiddleware
from inference_guard.middleware.metrics_endpoint import metrics_app

__all__ = ["GuardMiddleware", "metrics_app"]
