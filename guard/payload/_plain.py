"""Plain requests: the few shapes most clients send, read in a few C calls.

A front end's fast lane (a policy whose verdict is fixed: no detectors, no
quarantine) runs one of these readers and nothing else on a request whose
format the path names. A reader only ever *accepts*: for any other body,
valid or not, it returns ``None`` and the caller runs the full parser
(:func:`guard.payload.adapters.parse_request`), which gives the exact verdict and
refusal reason. Whatever a reader accepts, the full parser accepts too, with
the same row count, no texts and no extras; differential tests over valid,
mutated and damaged bodies hold them to that. The engine reads a plain body
with the same readers for a policy with detectors (:data:`REQUESTS`): what a
reader accepted, made into the request the full parser would give, matrix
included; the same tests hold every field to the full parser's.

Three facts keep the readers short:

* orjson yields finite numbers only (it refuses ``1e999``, ``NaN`` and
  ``Infinity``, and reads integers past 64 bits as floats; a test pins this),
  so numbers-only data is finite data;
* ``sum`` over the data raises ``TypeError`` at the first string, null, list
  or object among the numbers;
* every JSON ``true`` holds an ``r`` and every ``false`` an ``l``, and a plain
  document's keys and numbers hold neither: a body without both bytes holds no
  booleans (an ``int`` operand makes each search one ``memchr``).

Nor does a reader take a body over the parse budget (:mod:`guard.payload._budget`,
checked before decoding, as the full parser checks it) or one whose matrix
holds more than ``max_values`` numbers. Within the budget a reader's cost is
bounded (one ``orjson.loads`` and a sum: a few ms for the largest body the
defaults accept), so it reads on the event loop whatever the body's size:
a worker thread would not free the loop during that one C call, which holds
the GIL, and the full parser it would hand the body to costs twice as much.

And one trap: orjson keeps the last of two equal keys, so the decoded document
need not show all the body holds (``{"instances": [[[...deep...]]],
"instances": [[1]]}`` decodes as plain). A reader therefore counts the body's
opening brackets, which must be exactly those of the document it accepted: no
value it did not see can hide past the nesting limit.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import orjson

from inference_guard.guard.config import LimitsConfig
from inference_guard.guard.payload._binary import NUMPY_DTYPES
from inference_guard.guard.payload._budget import json_budget_exceeded
from inference_guard.guard.payload._oip import MAX_DIMS
from inference_guard.guard.payload._request import ParsedRequest

__all__ = [
    "READERS",
    "REQUESTS",
    "plain_kserve_request",
    "plain_kserve_rows",
    "plain_oip_request",
    "plain_oip_rows",
]

#: the numeric datatypes whose JSON data is numbers only (``BOOL`` may also carry booleans)
_PLAIN_DATATYPES = frozenset(NUMPY_DTYPES) - {"BOOL"}
_PLAIN_DOC_KEYS = frozenset({"inputs", "id"})
_PLAIN_TENSOR_KEYS = frozenset({"name", "shape", "datatype", "data"})
_R, _L = ord("r"), ord("l")
_OPEN_LIST, _OPEN_OBJECT = ord("["), ord("{")


def plain_oip_rows(body: bytes, limits: LimitsConfig) -> int | None:
    """The row count of a plain OIP v2 JSON request, or ``None``: ask the full parser.

    A plain request is a JSON object holding ``inputs`` (and at most a string
    ``id``) whose one input tensor has only ``name`` (a string), ``shape``,
    ``datatype`` (numeric, not ``BOOL``) and ``data``: a flat list of numbers
    matching the shape, under every limit. That is how OIP clients usually send
    a batch. Whatever it accepts, ``parse_request`` on an OIP v2 path accepts
    too, with the same ``n_rows``, no texts and no extras. It never raises.
    """
    found = _read_oip(body, limits)
    return None if found is None else found[0]


def plain_oip_request(body: bytes, limits: LimitsConfig) -> ParsedRequest | None:
    """What ``parse_request`` gives for a plain OIP v2 request (see :func:`plain_oip_rows`),
    its matrix included, or ``None``: ask the full parser.

    For bodies up to ``limits.offload_bytes`` (larger ones are the full parser's,
    in a worker thread). The matrix is the tensor's numbers as float64, one row
    per item of its first axis (a tensor of one axis or none is one row), as
    the full parser shapes it. It never raises.
    """
    if len(body) > limits.offload_bytes:
        return None
    found = _read_oip(body, limits)
    if found is None:
        return None
    n_rows, data, inputs = found
    rows = np.asarray(data, dtype=np.float64).reshape(n_rows, -1)
    return ParsedRequest("oip_v2", rows, (), n_rows, {}, inputs=inputs)


def _read_oip(body: bytes, limits: LimitsConfig) -> tuple[int, list[Any], list[Any]] | None:
    """A plain OIP v2 request's row count, its tensor's data and its ``inputs``."""
    # a plain document nests exactly 4 deep (object, inputs, tensor, data)
    known = _KNOWN
    if known[0] is not limits:
        known = _know(limits)
    if (len(body) >= known[1] and _not_for_the_lane(body, limits)) or known[2] < 4:
        return None
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None  # the full reading classifies the refusal (or accepts what only json reads)
    try:
        if type(doc) is not dict or not _PLAIN_DOC_KEYS.issuperset(doc):
            return None
        inputs = doc.get("inputs")
        if type(inputs) is not list or len(inputs) != 1:
            return None
        tensor = inputs[0]
        if type(tensor) is not dict or not _PLAIN_TENSOR_KEYS.issuperset(tensor):
            return None
        shape = tensor.get("shape")
        if (
            tensor.get("datatype") not in _PLAIN_DATATYPES
            or type(shape) is not list
            or type(tensor.get("name", "")) is not str
            or type(doc.get("id", "")) is not str
            or len(shape) > MAX_DIMS
        ):
            return None
        for dim in shape:
            if type(dim) is not int or dim < 0:
                return None
        count = math.prod(shape)
        data: Any = tensor.get("data")
        if count == 0 or count > limits.max_values:
            return None
        if len(data) != count or _R in body or _L in body:
            return None  # (no booleans: see the module docstring)
        sum(data, 0.0)  # numbers only, hence finite (a float start: the float loop at once)
        # the matrix finish_rows would build: 0-D is one value, 1-D one row, else batch x rest
        n_rows: int = shape[0] if len(shape) >= 2 else 1
        if n_rows > limits.max_rows or count // n_rows > limits.max_features:
            return None
        if body.count(_OPEN_LIST) != 3 or body.count(_OPEN_OBJECT) != 2:
            return None  # brackets the document does not show (see the module docstring)
        return n_rows, data, inputs
    except TypeError:  # an unhashable datatype, a string or object where numbers belong
        return None


def plain_kserve_rows(body: bytes, limits: LimitsConfig) -> int | None:
    """The row count of a plain KServe v1 request, or ``None``: ask the full parser.

    A plain request is ``{"instances": [[...], ...]}`` and nothing else: a
    non-empty list of rows of numbers (or booleans), all of one width, within
    ``max_rows`` and ``max_features``. Whatever it accepts, ``parse_request`` on
    a KServe v1 path accepts too, as ``kserve_v1`` with the same ``n_rows``. It
    never raises.
    """
    found = _read_kserve(body, limits)
    return None if found is None else found[0]


def plain_kserve_request(body: bytes, limits: LimitsConfig) -> ParsedRequest | None:
    """What ``parse_request`` gives for a plain KServe v1 request (see
    :func:`plain_kserve_rows`), its matrix included (the rows as float64, a
    boolean as 1 or 0), or ``None``: ask the full parser. For bodies up to
    ``limits.offload_bytes``, as :func:`plain_oip_request`. It never raises.
    """
    if len(body) > limits.offload_bytes:
        return None
    found = _read_kserve(body, limits)
    if found is None:
        return None
    n_rows, instances = found
    rows = np.asarray(instances, dtype=np.float64)
    return ParsedRequest("kserve_v1", rows, (), n_rows, {}, inputs=instances)


def _read_kserve(body: bytes, limits: LimitsConfig) -> tuple[int, list[Any]] | None:
    """A plain KServe v1 request's row count and its ``instances``."""
    # a plain document nests exactly 3 deep (object, instances, row)
    known = _KNOWN
    if known[0] is not limits:
        known = _know(limits)
    if (len(body) >= known[1] and _not_for_the_lane(body, limits)) or known[2] < 3:
        return None
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    try:
        if type(doc) is not dict or len(doc) != 1:
            return None
        instances: Any = doc.get("instances")
        if type(instances) is not list:
            return None
        # one width for every row (an empty list has none); a row that is not a list
        # of numbers (booleans count as numbers here, as the full parser reads them)
        # makes len or sum raise TypeError
        widths = set(map(len, instances))
        n_rows = len(instances)
        if len(widths) != 1 or n_rows > limits.max_rows:
            return None
        (width,) = widths
        if not 1 <= width <= limits.max_features or n_rows * width > limits.max_values:
            return None
        for row in instances:
            sum(row, 0.0)  # numbers only, hence finite (a float start: the float loop at once)
        if body.count(_OPEN_LIST) != 1 + n_rows or body.count(_OPEN_OBJECT) != 1:
            return None  # brackets the document does not show (see the module docstring)
        return n_rows, instances
    except TypeError:
        return None


def _not_for_the_lane(body: bytes, limits: LimitsConfig) -> bool:
    """Too large, or over the parse budget: the full parser's to refuse."""
    return len(body) > limits.max_body_bytes or json_budget_exceeded(body, limits) is not None


def _know(limits: LimitsConfig) -> tuple[LimitsConfig, int, int]:
    """``limits``, the shortest body :func:`_not_for_the_lane` may refuse, and the depth
    limit; remembered for the next request (one config's limits, as a rule)."""
    global _KNOWN
    shortest = min(
        limits.max_body_bytes + 1,
        limits.max_json_containers,
        limits.max_json_keys,
        limits.max_json_elements,
    )
    _KNOWN = (limits, shortest, limits.max_json_depth)
    return _KNOWN


#: the limits last read by :func:`_know`, and what it made of them
_KNOWN: tuple[LimitsConfig | None, int, int] = (None, 0, 0)


#: the plain reader of each format that has one
READERS = {"oip_v2": plain_oip_rows, "kserve_v1": plain_kserve_rows}
#: the same readers, what they read made into the full parser's request (matrix included)
REQUESTS = {"oip_v2": plain_oip_request, "kserve_v1": plain_kserve_request}
