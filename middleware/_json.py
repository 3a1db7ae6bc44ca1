"""Bounded JSON decoding for untrusted bodies.

``json.loads`` is safe to call on hostile input as long as three of its habits are
handled: it accepts ``NaN``/``Infinity`` (rejected here through ``parse_constant``),
it recurses per nesting level (``RecursionError`` on very deep input, caught here),
and it auto-detects UTF-16/32 when given bytes (we decode UTF-8 ourselves first).
The nesting limit is then enforced on the raw bytes, so that no Python code walks
the scalars one by one.
"""

from __future__ import annotations

import json
import re
from typing import Any

import numpy as np

from middleware._request import fail

__all__ = ["is_json_media_type", "json_depth_exceeds", "load_json", "load_json_lenient"]

_BOM = b"\xef\xbb\xbf"
#: a JSON string literal (valid JSON only), unrolled so that it never backtracks
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_OPEN = (ord("["), ord("{"))
_CLOSE = (ord("]"), ord("}"))


class _NonFinite(Exception):
    """Raised from ``parse_constant``; deliberately not a ``ValueError``."""


def _reject_constant(_name: str) -> Any:
    raise _NonFinite


_STRICT = json.JSONDecoder(parse_constant=_reject_constant)
_LENIENT = json.JSONDecoder()


def is_json_media_type(content_type: str | None) -> bool:
    """True for a missing content type, ``application/json`` and ``application/*+json``."""
    if content_type is None:
        return True
    media = content_type.partition(";")[0].strip().lower()
    if not media:
        return True
    return media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    )


def json_depth_exceeds(body: bytes, limit: int) -> bool:
    """True when the (valid) JSON document ``body`` nests deeper than ``limit``.

    Depth counts containers: ``[[1]]`` has depth 2. When the document holds no
    more brackets than ``limit`` the answer is known without looking further;
    otherwise string literals are cut out with one regex pass and the bracket
    depth is a cumulative sum in numpy.
    """
    if body.count(b"[") + body.count(b"{") <= limit:
        return False
    stripped = _STRING.sub(b"", body) if b'"' in body else body
    arr = np.frombuffer(stripped, dtype=np.uint8)
    opens = (arr == _OPEN[0]) | (arr == _OPEN[1])
    closes = (arr == _CLOSE[0]) | (arr == _CLOSE[1])
    idx = np.flatnonzero(opens | closes)
    steps = np.where(opens[idx], 1, -1).astype(np.int64)
    return bool(steps.size) and int(np.cumsum(steps).max()) > limit


def load_json(body: bytes, *, max_depth: int) -> Any:
    """Decode an untrusted request body; raise :class:`PayloadError` on anything wrong.

    Parameters
    ----------
    body
        The raw bytes, already known to be within the body-size limit.
    max_depth
        Deepest container nesting accepted.

    Returns
    -------
    Any
        The decoded document (``dict``, ``list``, or a scalar).
    """
    if body.startswith(_BOM):
        body = body[len(_BOM):]
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        fail(400, "bad_encoding", "the request body is not valid UTF-8")
    try:
        doc = _STRICT.decode(text)
    except _NonFinite:
        fail(400, "non_finite", "NaN and Infinity are not accepted")
    except RecursionError:
        fail(400, "too_deep", f"JSON nesting deeper than {max_depth} levels")
    except ValueError:
        # JSONDecodeError, and int literals past sys.get_int_max_str_digits()
        fail(400, "invalid_json", "the request body is not valid JSON")
    if json_depth_exceeds(body, max_depth):
        fail(400, "too_deep", f"JSON nesting deeper than {max_depth} levels")
    return doc


def load_json_lenient(body: bytes, content_type: str | None) -> Any | None:
    """Decode a model's answer; ``None`` for anything that is not a JSON document."""
    if not is_json_media_type(content_type):
        return None
    try:
        return _LENIENT.decode(body.decode("utf-8-sig"))
    except (ValueError, RecursionError, MemoryError):
        return None
