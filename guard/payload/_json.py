"""Bounded JSON decoding for untrusted bodies.

Every body is first given to ``orjson``: a strict RFC 8259 parser (no ``NaN`` or
``Infinity``, UTF-8 validated, nesting capped at 1024) and about nine times
faster than ``json`` on a row of floats, which makes it the cheapest part of the
guard's hot path instead of the dearest. Whatever ``orjson`` refuses is decoded
again by the standard library below, so that the refusal is classified
(``bad_encoding``, ``non_finite``, ``too_deep``, ``invalid_json``) and so that the
few documents only ``json`` accepts are treated exactly as before (``1e999``,
which then fails as non-finite). One thing ``json`` accepts is refused here too:
a lone surrogate escape (``"\\ud800"``) decodes to a Python string that no UTF-8
encoder will take, and crashes apps that re-encode it. I-JSON (RFC 7493) forbids
it, and ``orjson`` refuses it, so the standard library's reading must as well:
400 ``bad_encoding``, like a body that is not UTF-8.

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
import orjson

from inference_guard.guard.payload._request import fail

__all__ = [
    "has_lone_surrogate",
    "is_json_media_type",
    "json_depth_exceeds",
    "load_json",
    "load_json_lenient",
]

_BOM = b"\xef\xbb\xbf"
#: every byte but the brackets and the quote, for ``bytes.translate(None, delete)``
_NOT_STRUCTURE = bytes(b for b in range(256) if b not in b'[]{}"')
#: a string literal once escapes are gone and only structure bytes are left
_STRING = re.compile(rb'"[^"]*"')
_OPEN = (ord("["), ord("{"))
#: in a valid JSON text, left to right: an escaped backslash (skipped), a surrogate
#: pair (skipped), or a surrogate escape that is not part of a pair (lone)
_SURROGATE_ESCAPE = re.compile(
    rb"\\\\"
    rb"|\\u[dD][89abAB][0-9a-fA-F]{2}\\u[dD][c-fC-F][0-9a-fA-F]{2}"
    rb"|(\\u[dD][89a-fA-F][0-9a-fA-F]{2})"
)


class _NonFinite(Exception):
    """Raised from ``parse_constant``; deliberately not a ``ValueError``."""


def _reject_constant(_name: str) -> Any:
    raise _NonFinite


_STRICT = json.JSONDecoder(parse_constant=_reject_constant)
_LENIENT = json.JSONDecoder()


def is_json_media_type(content_type: str | None) -> bool:
    """True for a missing content type, ``application/json`` and ``application/*+json``."""
    if content_type is None or content_type == "application/json":
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
    more brackets than ``limit`` the answer is known without looking further.
    Otherwise every pass is a C loop over the bytes: drop escaped backslashes,
    then escaped quotes (in valid JSON a backslash always starts an escape, so
    left-to-right pairing is exact), keep only brackets and quotes, cut out the
    string literals, and take the running bracket depth in numpy.
    """
    if body.count(b"[") + body.count(b"{") <= limit:
        return False
    if b"\\" in body:
        body = body.replace(b"\\\\", b"").replace(b'\\"', b"")
    structure = body.translate(None, _NOT_STRUCTURE)
    if b'"' in structure:
        structure = _STRING.sub(b"", structure)
    arr = np.frombuffer(structure, dtype=np.uint8)
    if not arr.size:
        return False
    steps = np.where((arr == _OPEN[0]) | (arr == _OPEN[1]), 1, -1)
    return int(np.cumsum(steps).max()) > limit


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
        body = body[len(_BOM) :]
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        doc = _load_json_slow(body, max_depth)
    if json_depth_exceeds(body, max_depth):
        fail(400, "too_deep", f"JSON nesting deeper than {max_depth} levels")
    return doc


def _load_json_slow(body: bytes, max_depth: int) -> Any:
    """The standard library's reading of a body ``orjson`` refused: classify, or accept."""
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
    if b"\\u" in body and has_lone_surrogate(body):
        fail(400, "bad_encoding", "the request body holds a lone surrogate escape")
    return doc


def has_lone_surrogate(body: bytes) -> bool:
    """True when the valid JSON text ``body`` escapes a surrogate that is not in a pair.

    In valid JSON a backslash only ever starts an escape, so scanning escapes
    left to right pairs them exactly: ``\\\\ud800`` is an escaped backslash
    followed by the letters ``ud800``, not a surrogate.
    """
    return any(m.group(1) is not None for m in _SURROGATE_ESCAPE.finditer(body))


def load_json_lenient(body: bytes, content_type: str | None) -> Any | None:
    """Decode a model's answer; ``None`` for anything that is not a JSON document."""
    if not is_json_media_type(content_type):
        return None
    if body.startswith(_BOM):
        body = body[len(_BOM) :]
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        pass  # NaN or Infinity from a model, a lone surrogate, 1e999: the lenient reading
    try:
        return _LENIENT.decode(body.decode("utf-8"))
    except (ValueError, RecursionError, MemoryError):
        return None
