"""The ASGI layer: the guard middleware, payload adapters and the metrics endpoint."""

from __future__ import annotations

from middleware.asgi import GuardMiddleware
from middleware.metrics_endpoint import metrics_app

__all__ = ["GuardMiddleware", "metrics_app"]
