"""inference-guard: a security-first runtime guard for model-serving APIs.

The package face::

    from guard import GuardMiddleware, GuardConfig

``GuardMiddleware`` lives in the ASGI layer (``middleware/``) and is re-exported
lazily here, so that nothing under ``guard/`` imports the ASGI layer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from guard.config import GuardConfig
from guard.decisions import Action, Decision, FailureMode
from guard.errors import ConfigurationError, GuardError, ModelFileError, PayloadError, StateError
from guard.registry import register_detector

if TYPE_CHECKING:
    from middleware.asgi import GuardMiddleware

__all__ = [
    "Action",
    "ConfigurationError",
    "Decision",
    "FailureMode",
    "GuardConfig",
    "GuardError",
    "GuardMiddleware",
    "ModelFileError",
    "PayloadError",
    "StateError",
    "register_detector",
]

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name == "GuardMiddleware":
        from middleware.asgi import GuardMiddleware

        return GuardMiddleware
    raise AttributeError(f"module 'guard' has no attribute {name!r}")
