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

from inference_guard.guard.config import LimitsConfig
from inference_guard.guard.payload._budget import (
    check_json_budget,
    json_budget_exceeded,
    outside_strings,
)
from inference_guard.guard.payload._request import fail

__all__ = [
    "dump_compact",
    "dump_decoded",
    "has_lone_surrogate",
    "is_json_media_type",
    "json_depth_exceeds",
    "load_json",
    "load_json_lenient",
    "load_json_lenient_checked",
]

_BOM = b"\xef\xbb\xbf"
#: every byte but the brackets and the quote, for ``bytes.translate(None, delete)``
_NOT_STRUCTURE = bytes(b for b in range(256) if b not in b'[]{}"')
#: each byte's step in nesting depth: +1 for an opener, -1 for a closer
_STEPS = np.zeros(256, dtype=np.int8)
_STEPS[list(b"[{")] = 1
_STEPS[list(b"]}")] = -1
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
#: ``json.dumps(..., separators=(",", ":"))`` builds an encoder per call; one serves all
_COMPACT = json.JSONEncoder(separators=(",", ":"))


def dump_compact(doc: Any) -> bytes:
    """``json.dumps(doc, separators=(",", ":")).encode("utf-8")``, byte for byte."""
    return _COMPACT.encode(doc).encode("utf-8")


#: what appears in orjson's encoding of any float whose ``repr`` it does not match (one
#: in exponent form: nonzero and below 1e-4 or from 1e16 in magnitude), and of NaN and
#: the infinities (``null``); ``\x7f``, which ``json`` escapes and orjson does not
_NOT_AS_JSON = (b"e-", b"e+", b"0.0000", b"null", b"\x7f")


def dump_decoded(doc: Any) -> bytes:
    """:func:`dump_compact` byte for byte, through orjson when that gives the same bytes.

    For a document orjson decoded (its strings valid, its numbers finite, its
    keys strings), perhaps rewritten with Python ints, floats, strings, lists
    and dicts. orjson encodes ASCII strings, ints, ``true``/``false`` and floats
    exactly as ``json`` does, but for four things, each of which this sees in
    orjson's bytes and then takes ``json``'s: non-ASCII text (``json`` escapes
    it), ``\\x7f`` (likewise), a float in exponent form (``json`` writes
    ``1e-05`` and ``1e+16``; orjson ``0.00001`` and ``1e+16``, and whatever the
    form, its bytes hold ``e-``, ``e+`` or ``0.0000``), and NaN or an infinity
    (orjson writes ``null``). Anything orjson refuses (an integer past 64 bits, a
    lone surrogate, another type) is left to ``json`` too. A string that merely
    holds one of those markers costs the slower encoder, never other bytes.
    """
    try:
        out = orjson.dumps(doc)
    except TypeError:  # orjson.JSONEncodeError
        return dump_compact(doc)
    if not out.isascii():
        return dump_compact(doc)
    for marker in _NOT_AS_JSON:
        if marker in out:
            return dump_compact(doc)
    return out


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
    Otherwise it is all vectorised: keep only the brackets outside string literals
    (:func:`guard.payload._budget.outside_strings`) and take their running depth
    in numpy.
    """
    if body.count(b"[") + body.count(b"{") <= limit:
        return False
    arr = outside_strings(body, _NOT_STRUCTURE)
    if not arr.size:
        return False
    return int(np.cumsum(_STEPS.take(arr), dtype=np.int32).max()) > limit


def load_json(body: bytes, *, max_depth: int, budget: LimitsConfig | None = None) -> Any:
    """Decode an untrusted request body; raise :class:`PayloadError` on anything wrong.

    Parameters
    ----------
    body
        The raw bytes, already known to be within the body-size limit.
    max_depth
        Deepest container nesting accepted.
    budget
        Limits whose parse budget (``max_json_containers``, ``max_json_elements``)
        is checked on the bytes before they are decoded (:mod:`guard.payload._budget`).

    Returns
    -------
    Any
        The decoded document (``dict``, ``list``, or a scalar).
    """
    if body.startswith(_BOM):
        body = body[len(_BOM) :]
    if budget is not None and json_budget_exceeded(body, budget) is not None:
        # refused undecoded; a run of openers deeper than the limit says so, the more
        # telling reason (a proof of depth that costs no more than finding it)
        if b"[" * (max_depth + 1) in body and json_depth_exceeds(body, max_depth):
            fail(400, "too_deep", f"JSON nesting deeper than {max_depth} levels")
        check_json_budget(body, budget)
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


def load_json_lenient_checked(body: bytes, content_type: str | None) -> tuple[Any | None, bool]:
    """:func:`load_json_lenient`, and whether orjson decoded it (no NaN, no infinity, no
    lone surrogate in it: what :func:`dump_decoded` takes)."""
    if not is_json_media_type(content_type):
        return None, False
    if body.startswith(_BOM):
        body = body[len(_BOM) :]
    try:
        return orjson.loads(body), True
    except orjson.JSONDecodeError:
        pass  # NaN or Infinity from a model, a lone surrogate, 1e999: the lenient reading
    try:
        return _LENIENT.decode(body.decode("utf-8")), False
    except (ValueError, RecursionError, MemoryError):
        return None, False


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
