"""Turning decoded JSON lists into validated float64 row matrices.

Type checks run on whole nesting levels at once (``set(map(type, level))``) and the
conversion is one ``np.asarray`` call, so no Python loop touches the scalars. The
types are checked *before* numpy sees the data: numpy would otherwise parse
``"1.5"`` as a number, turn ``null`` into NaN, and size a string array by its
longest element (a memory bomb for a list of many short strings and one long one).
"""

from __future__ import annotations

import math
from itertools import chain
from typing import Any, NamedTuple

import numpy as np
from numpy.typing import NDArray

from inference_guard.guard.config import LimitsConfig
from inference_guard.guard.payload._request import check_rows, check_texts, fail

__all__ = [
    "Classified",
    "Leaves",
    "check_finite",
    "check_matrix_shape",
    "check_values",
    "classify",
    "finish_rows",
    "finite_sum",
    "leaves",
    "to_float",
    "valid_without_numpy",
]

_NUMBER = frozenset({int, float})
_NUMBER_OR_BOOL = frozenset({int, float, bool})


class Leaves(NamedTuple):
    """The innermost level of a nest of lists."""

    #: exact Python types found at the innermost level
    types: set[type]
    #: nesting depth of the lists (a flat list is 1)
    ndim: int
    #: the innermost values, flattened in row-major order
    values: list[Any]


def leaves(data: list[Any]) -> Leaves:
    """Flatten ``data`` level by level; 400 ``bad_shape`` if lists and scalars are mixed."""
    level = data
    ndim = 1
    while True:
        types = set(map(type, level))
        if list not in types:
            return Leaves(types, ndim, level)
        if len(types) != 1:
            fail(400, "bad_shape", "rows mix nested lists with scalars")
        level = list(chain.from_iterable(level))
        ndim += 1


def to_float(data: list[Any], found: Leaves, *, allow_bool: bool, what: str) -> NDArray[np.float64]:
    """Convert numeric nested lists to a finite float64 array of their own shape.

    Raises 400 ``bad_type`` for leaves that are not numbers (bools only when
    ``allow_bool``), ``bad_shape`` for ragged rows, ``non_finite`` for values
    that overflow float64.
    """
    allowed = _NUMBER_OR_BOOL if allow_bool else _NUMBER
    if not found.types <= allowed:
        fail(400, "bad_type", f"{what} must hold numbers only")
    try:
        arr = np.asarray(data, dtype=np.float64)
    except ValueError:
        fail(400, "bad_shape", f"{what} has rows of different lengths")
    except OverflowError:
        fail(400, "non_finite", f"{what} holds a number too large for float64")
    # JSON cannot spell NaN here (the decoder refused it) but 1e999 is +inf; a sum
    # that is not finite gets the exact check
    if finite_sum(found.values):
        return arr
    check_finite(arr, what)
    return arr


def check_finite(arr: NDArray[np.float64], what: str) -> None:
    """400 ``non_finite`` when ``arr`` holds NaN or an infinity (e.g. from ``1e999``)."""
    if not np.isfinite(arr).all():
        fail(400, "non_finite", f"{what} holds NaN or infinite values")


def finish_rows(
    arr: NDArray[np.float64], limits: LimitsConfig, *, one_d_is_row: bool, what: str
) -> NDArray[np.float64]:
    """Shape a numeric array as ``(n_rows, n_features)`` and apply the row/feature limits.

    The first axis is the batch; further axes are flattened into features. A
    1-D array is one row when ``one_d_is_row`` (a plain JSON array, an OIP tensor
    of shape ``[k]``), else a batch of single-feature rows (``instances: [1, 2]``).
    """
    if arr.size == 0:
        fail(400, "bad_shape", "the request carries no values")
    if arr.ndim == 0:
        arr = arr.reshape(1, 1)
    elif arr.ndim == 1:
        arr = arr.reshape(1, -1) if one_d_is_row else arr.reshape(-1, 1)
    elif arr.ndim > 2:
        arr = arr.reshape(arr.shape[0], -1)
    n_rows, n_features = arr.shape
    check_matrix_shape(n_rows, n_features, limits, what)
    return np.ascontiguousarray(arr)


def check_matrix_shape(n_rows: int, n_features: int, limits: LimitsConfig, what: str) -> None:
    """The row and feature limits on a ``(n_rows, n_features)`` matrix (see :func:`finish_rows`)."""
    if n_rows > limits.max_rows:
        fail(413, "too_many_rows", f"the request carries more than {limits.max_rows} rows")
    if n_rows < 1:
        fail(400, "bad_shape", "the request carries no rows")
    if n_features > limits.max_features:
        fail(400, "too_many_features", f"rows are wider than {limits.max_features} features")
    if n_features < 1:
        fail(400, "bad_shape", f"{what} has rows without features")
    check_values(n_rows * n_features, limits)


def check_values(n_values: int, limits: LimitsConfig) -> None:
    """413 ``too_many_values`` past ``max_values`` numbers (rows x features) in one matrix.

    Called as soon as the count is known, before numpy converts anything.
    """
    if n_values > limits.max_values:
        fail(413, "too_many_values", f"the request carries more than {limits.max_values} values")


def valid_without_numpy(data: list[Any], found: Leaves, *, allow_bool: bool, what: str) -> bool:
    """Prove, without building an array, that :func:`to_float` would accept ``data``.

    Raises what :func:`to_float` raises for wrong leaf types. Returns ``False``
    when the cheap proof does not go through (ragged nesting, an overflowing
    or non-finite sum): the caller then runs :func:`to_float` itself, which
    gives the exact verdict. Used when no detector will look at the rows, so
    that validation alone costs no numpy call.
    """
    allowed = _NUMBER_OR_BOOL if allow_bool else _NUMBER
    if not found.types <= allowed:
        fail(400, "bad_type", f"{what} must hold numbers only")
    if not finite_sum(found.values):
        return False
    return found.ndim == 1 or _rectangular(data, found.ndim)


def finite_sum(values: list[Any]) -> bool:
    """True when the numbers' sum is finite: then each one is (``False`` may be a false alarm).

    The Python sum is 3x cheaper than ``np.isfinite`` on a row; only inf/-inf, or
    a sum that overflows (huge floats or ints), gives ``False``.
    """
    try:
        return math.isfinite(sum(values))
    except OverflowError:  # a sum of huge ints
        return False


def _rectangular(data: list[Any], ndim: int) -> bool:
    """True when every list at each nesting level has the same length (numpy's rule)."""
    level = data
    for _ in range(ndim - 1):
        if len(set(map(len, level))) != 1:
            return False
        level = list(chain.from_iterable(level))
    return True


class Classified(NamedTuple):
    """What an untyped list (instances, a column, a JSON array) turned out to hold."""

    #: float matrix when every leaf is a number or a bool
    rows: NDArray[np.float64] | None
    #: the strings, when the list is a flat list of strings
    texts: tuple[str, ...]
    #: length of the outer list
    n_rows: int


def _check_regular(data: list[Any], what: str) -> None:
    """400 ``bad_shape`` unless the nested lists are a regular tensor (lists of equal length
    at each level): a string tensor is shape-checked as a numeric one is by numpy."""
    level = data
    while level and isinstance(level[0], list):
        if len({len(x) for x in level}) != 1:
            fail(400, "bad_shape", f"{what} has rows of different lengths")
        level = list(chain.from_iterable(level))


def classify(
    data: list[Any], limits: LimitsConfig, *, one_d_is_row: bool, strict: bool, what: str
) -> Classified:
    """Classify an untyped list: numbers → rows, strings → texts, objects → opaque.

    With ``strict`` (KServe v1 instances, TF columns, JSON arrays) a mixture of
    numbers with strings, nulls or objects is 400 ``bad_type``: a model server's
    lenient coercion (``"1.5"`` → 1.5) must not let rows slip past the detectors.
    Without it (MLflow data frames, whose columns legitimately mix types) such a
    list is opaque: ``rows`` is ``None`` and only the row count is kept.
    """
    if len(data) > limits.max_rows and (isinstance(data[0], list) or not one_d_is_row):
        # fail before converting a huge batch; a flat list that is one row is
        # bounded by max_features instead
        fail(413, "too_many_rows", f"the request carries more than {limits.max_rows} rows")
    found = leaves(data)
    if not found.values:
        fail(400, "bad_shape", f"{what} is empty")
    if found.types <= _NUMBER_OR_BOOL:
        check_values(len(found.values), limits)
        arr = to_float(data, found, allow_bool=True, what=what)
        rows = finish_rows(arr, limits, one_d_is_row=one_d_is_row, what=what)
        return Classified(rows, (), rows.shape[0])
    if found.types == {str}:
        check_rows(len(data), limits)
        if strict and found.ndim > 1:
            _check_regular(data, what)
        texts = tuple(found.values) if found.ndim == 1 else ()
        check_texts(texts, limits)
        return Classified(None, texts, len(data))
    if found.types == {dict} or not strict:
        check_rows(len(data), limits)
        return Classified(None, (), len(data))
    fail(400, "bad_type", f"{what} mixes numbers with strings, nulls or objects")
