"""Exceptions raised by inference-guard.

The hierarchy::

    GuardError
    ├── ConfigurationError      a config value is wrong; names the key path
    ├── PayloadError            an inference request is malformed; carries the 4xx status
    ├── StateError              a state store (memory, Redis) failed; wraps the cause
    ├── ModelFileError          a calibration file is missing, tampered with or mismatched
    └── ClientDisconnected      the client left before its request body was complete

Detector results and decisions are values, never exceptions: these are raised only
for conditions the caller must handle (bad config at start-up, bad input, a dead store).
"""

from __future__ import annotations

__all__ = [
    "ClientDisconnected",
    "ConfigurationError",
    "GuardError",
    "ModelFileError",
    "PayloadError",
    "StateError",
]


class GuardError(Exception):
    """Base class of every exception inference-guard raises on purpose."""


class ConfigurationError(GuardError, ValueError):
    """A configuration value is missing, unknown or of the wrong type.

    ``key`` is the dotted key path (``policies[0].detectors[1].threshold``) and
    ``problem`` says what is wrong with it. ``problems`` holds every problem found
    when several were collected at once (``guard check-config`` prints them all).
    """

    def __init__(self, key: str, problem: str, *, problems: list[tuple[str, str]] | None = None):
        self.key = key
        self.problem = problem
        self.problems: list[tuple[str, str]] = (
            problems if problems is not None else [(key, problem)]
        )
        if len(self.problems) > 1:
            text = "; ".join(f"{k}: {p}" for k, p in self.problems)
            super().__init__(f"{len(self.problems)} configuration problems: {text}")
        else:
            super().__init__(f"{key}: {problem}" if key else problem)


class PayloadError(GuardError):
    """An inference request the guard refuses before the model sees it.

    ``status`` is the HTTP status to answer (400, 408, 413 or 415; 503 for a parse
    that ran out of time, ``parse_timeout``), ``reason`` a label
    from a small closed set (used as a metric label) and ``message`` the text the
    client receives. The message never echoes the payload back.
    """

    #: closed set of reasons, so that metric labels stay bounded
    REASONS = frozenset(
        {
            "body_too_large",
            "unsupported_media_type",
            "bad_encoding",
            "invalid_json",
            "too_deep",
            "non_finite",
            "bad_shape",
            "bad_type",
            "too_many_rows",
            "too_many_features",
            "text_too_long",
            "bad_header",
            "unknown_format",
            "body_timeout",
            "too_many_containers",
            "too_many_keys",
            "too_many_elements",
            "too_many_values",
            "parse_timeout",
        }
    )

    def __init__(self, status: int, reason: str, message: str):
        if reason not in self.REASONS:
            raise ValueError(f"unknown PayloadError reason {reason!r}")
        self.status = status
        self.reason = reason
        self.message = message
        super().__init__(f"{status} {reason}: {message}")


class StateError(GuardError):
    """A state store operation failed (connection refused, timeout, script error).

    Raised ``from`` the backend's own exception so the cause stays visible; the
    policy then decides explicitly whether to fail open or closed.
    """

    def __init__(self, backend: str, operation: str, message: str = ""):
        self.backend = backend
        self.operation = operation
        super().__init__(
            f"{backend} store: {operation} failed" + (f": {message}" if message else "")
        )


class ModelFileError(GuardError):
    """A fitted-detector file is missing, corrupt, tampered with or does not match."""

    def __init__(self, path: str, problem: str):
        self.path = path
        self.problem = problem
        super().__init__(f"{path}: {problem}")


class ClientDisconnected(GuardError):
    """The client went away before its request body was complete: there is no one to answer.

    Raised by a front end's body reader (:class:`guard.engine.BodySource`);
    :meth:`guard.pipeline.Guard.admit` lets it through uncounted, and the front
    end sends nothing.
    """
