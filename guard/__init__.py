"""inference-guard: a security-first runtime guard for model-serving APIs.

This package holds what ties the detectors to the ASGI layer: configuration,
policy, decisions, state stores, the detector registry and the CLI::

    from inference_guard.guard import GuardConfig, register_detector

The middleware itself is in the ASGI layer, which imports this package (never
the other way round)::

    from inference_guard.middleware import GuardMiddleware
"""

from __future__ import annotations

from inference_guard.guard.config import GuardConfig
from inference_guard.guard.decisions import Action, Decision, FailureMode
from inference_guard.guard.errors import (
    ConfigurationError,
    GuardError,
    ModelFileError,
    PayloadError,
    StateError,
)
from inference_guard.guard.registry import register_detector

__all__ = [
    "Action",
    "ConfigurationError",
    "Decision",
    "FailureMode",
    "GuardConfig",
    "GuardError",
    "ModelFileError",
    "PayloadError",
    "StateError",
    "register_detector",
]

__version__ = "0.1.0"
