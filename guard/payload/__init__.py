"""Wire formats: inference requests parsed into rows or texts, answers read and rewritten.

Nothing here speaks HTTP or ASGI: bodies come in as bytes, with their content
type, and go out as values (:class:`ParsedRequest`, :class:`~detectors.base.Answer`)
or rewritten bytes. The engine (:mod:`guard.pipeline`) parses requests and
handles answers through this package; every front end (the ASGI middleware, a
proxy) only reads bytes off the wire and hands them over.
"""

from __future__ import annotations

from inference_guard.guard.payload.adapters import (
    ParsedRequest,
    detect_format,
    parse_request,
    parse_response,
    pattern_format,
)
from inference_guard.guard.payload.degrade import RowNoise, degrade_response, noise_key
from inference_guard.guard.payload.formats import PayloadFormat, PointerFormat, payload_format

__all__ = [
    "ParsedRequest",
    "PayloadFormat",
    "PointerFormat",
    "RowNoise",
    "degrade_response",
    "detect_format",
    "noise_key",
    "parse_request",
    "parse_response",
    "pattern_format",
    "payload_format",
]
