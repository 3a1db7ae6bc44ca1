"""The parse budget: what a JSON body may cost, counted on its bytes before it is decoded.

Decoding cost follows a body's structure, not its size. A megabyte of floats
decodes in about 10 ms; a megabyte of one-element lists (``[1],[1],...``, 262 000
lists) or of lists nested 27 deep took 30 to 100 times longer, most of it in
allocating the lists and in the garbage collector they wake, and a megabyte of
object keys about twice as long as floats. So before a body reaches the decoder,
three counts are bounded (``limits:`` in the config):

``max_json_containers``
    lists and objects: the ``[`` and ``{`` outside string literals;
``max_json_keys``
    object members: the ``:`` outside string literals;
``max_json_elements``
    values of any kind: each value but the first of its container follows a
    comma, so commas + containers + 1 bounds them from above.

Counting is vectorised (numpy compares and counts a megabyte in about 0.1 ms);
a body shorter than every budget cannot exceed one and is not looked at. A
byte inside a string literal is not structure, but counting it only
overestimates. When that estimate is over a budget, the bytes inside string
literals are counted too (from the quotes' positions), which gives a lower
bound; only when the two bounds disagree are the literals cut out for the
exact count. Past a budget the body is refused with 413
(``too_many_containers``, ``too_many_keys`` or ``too_many_elements``) and is never
decoded.

The matrix a request's numbers make is bounded by ``max_values`` (rows x
features), checked where the shape is first known (:mod:`guard.payload._tensor`,
:mod:`guard.payload._oip`), before numpy converts anything.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from inference_guard.guard.config import LimitsConfig
from inference_guard.guard.payload._request import fail

__all__ = ["check_json_budget", "json_budget_exceeded", "outside_strings"]

_OPEN_LIST, _OPEN_OBJECT, _COMMA, _COLON, _QUOTE = b'[{,:"'
#: every byte but the counted ones and the quote (``bytes.translate(None, delete)``)
_NOT_COUNTED = bytes(b for b in range(256) if b not in b'[{,:"')
#: up to this many quotes, string literals are cut out by slicing rather than by parity
_FEW_QUOTES = 64


def outside_strings(body: bytes, delete: bytes) -> NDArray[np.uint8]:
    """The bytes of the valid JSON text ``body`` not in ``delete`` nor in a string literal.

    ``delete`` must keep the quote. Escaped backslashes, then escaped quotes, are
    dropped first (in valid JSON a backslash always starts an escape, so
    left-to-right pairing is exact); then the quotes pair up left to right.
    When no string holds a kept byte only the quotes go; else a few strings are
    cut out by slicing, many by their parity: a byte is inside
    a string literal exactly when an odd number of quotes precede it (the parity
    of a ``uint8`` running sum survives its overflow).
    """
    arr = _structure(body, delete)
    is_quote = arr == _QUOTE
    quotes = np.flatnonzero(is_quote)
    if not quotes.size:
        return arr
    kept: NDArray[np.uint8]
    if not _inside(arr, quotes):
        kept = arr[~is_quote]  # no string holds a kept byte (keys, say): only the quotes go
        return kept
    if quotes.size <= _FEW_QUOTES:
        ends = [-1, *quotes.tolist(), arr.size]  # (a last quote left open runs to the end)
        return np.concatenate([arr[ends[i] + 1 : ends[i + 1]] for i in range(0, len(ends) - 1, 2)])
    outside = ((np.cumsum(is_quote, dtype=np.uint8) & 1) == 0) & ~is_quote
    kept = arr[outside]
    return kept


def _structure(body: bytes, delete: bytes) -> NDArray[np.uint8]:
    """``body`` without its escaped backslashes and quotes, nor the bytes in ``delete``."""
    if b"\\" in body:
        body = body.replace(b"\\\\", b"").replace(b'\\"', b"")
    return np.frombuffer(body.translate(None, delete), dtype=np.uint8)


def _inside(arr: NDArray[np.uint8], quotes: NDArray[np.intp] | None = None) -> int:
    """How many of ``arr``'s bytes (kept bytes and quotes) lie inside string literals."""
    if quotes is None:
        quotes = np.flatnonzero(arr == _QUOTE)
    if quotes.size % 2:
        quotes = np.append(quotes, arr.size)  # a last string left open runs to the end
    return int((quotes[1::2] - quotes[::2] - 1).sum())


def _counts(arr: NDArray[np.uint8]) -> tuple[int, int, int]:
    """Containers, keys and commas among ``arr``'s bytes."""
    count = np.count_nonzero
    return (
        int(count(arr == _OPEN_LIST) + count(arr == _OPEN_OBJECT)),
        int(count(arr == _COLON)),
        int(count(arr == _COMMA)),
    )


def _over(counts: tuple[int, int, int], limits: LimitsConfig) -> str | None:
    containers, keys, commas = counts
    if containers > limits.max_json_containers:
        return "too_many_containers"
    if keys > limits.max_json_keys:
        return "too_many_keys"
    if commas + containers + 1 > limits.max_json_elements:
        return "too_many_elements"
    return None


def json_budget_exceeded(body: bytes, limits: LimitsConfig) -> str | None:
    """The budget a JSON body exceeds (``too_many_containers``, ``too_many_keys``,
    ``too_many_elements``), or ``None``.

    Examples
    --------
    >>> from inference_guard.guard.config import LimitsConfig
    >>> json_budget_exceeded(b"[[1], [2], [3]]", LimitsConfig(max_json_containers=3))
    'too_many_containers'
    >>> json_budget_exceeded(b'["[[[", 1]', LimitsConfig(max_json_containers=1)) is None
    True
    """
    if len(body) < min(limits.max_json_containers, limits.max_json_keys, limits.max_json_elements):
        return None  # fewer bytes than any budget allows
    upper = _counts(np.frombuffer(body, dtype=np.uint8))
    over = _over(upper, limits)
    if over is None or b'"' not in body:
        return over  # the estimate is an upper bound, and exact when no string holds a byte
    # the counted bytes inside strings make a lower bound: when both bounds say the same,
    # so does the exact count (an attack's strings rarely hold structure)
    inside = _inside(_structure(body, _NOT_COUNTED))
    containers, keys, commas = upper
    lower = (max(0, containers - inside), max(0, keys - inside), max(0, commas - inside))
    if _over(lower, limits) == over:
        return over
    return _over(_counts(outside_strings(body, _NOT_COUNTED)), limits)


def check_json_budget(body: bytes, limits: LimitsConfig) -> None:
    """Refuse (413) a JSON body over its budget (see the module docstring)."""
    reason = json_budget_exceeded(body, limits)
    if reason == "too_many_containers":
        what = f"{limits.max_json_containers} lists and objects"
    elif reason == "too_many_keys":
        what = f"{limits.max_json_keys} object keys"
    elif reason == "too_many_elements":
        what = f"{limits.max_json_elements} values"
    else:
        return
    fail(413, reason, f"the JSON body holds more than {what}")
