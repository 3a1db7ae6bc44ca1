"""Finding labels and class probabilities in a model's decoded JSON answer.

Shared by :func:`guard.payload.adapters.parse_response` (which reads them) and
:mod:`guard.payload.degrade` (which rewrites them), so both agree on what counts
as probabilities. A float matrix counts when its name says so (``*prob*``,
``*score*``) or, unnamed, when it is ``(n, k >= 2)`` with every value in
``[0, 1]``: a regression output is not coarsened by mistake. Labels are
integer class indices; string labels are left alone.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np
from numpy.typing import NDArray

__all__ = [
    "FLOAT_TYPES",
    "INT_TYPES",
    "Found",
    "from_list",
    "from_named",
    "from_v2_outputs",
    "is_label_name",
    "is_prob_name",
    "label_vector",
    "prob_matrix",
]

FLOAT_TYPES = frozenset({"FP16", "FP32", "FP64", "BF16"})
INT_TYPES = frozenset({"INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64"})
_LABEL_NAMES = frozenset(
    {
        "label",
        "labels",
        "class",
        "classes",
        "class_ids",
        "predictions",
        "prediction",
        "predicted_label",
        "output_label",
        "predict",
    }
)


class Found(NamedTuple):
    """Where the probabilities and labels of an answer are."""

    probs: NDArray[np.float64] | None = None
    labels: NDArray[np.int64] | None = None
    #: index (v2 outputs) or key (records, named columns) of the probabilities
    prob_at: Any = None
    #: index or key of the labels
    label_at: Any = None


def is_prob_name(name: object) -> bool:
    """``probabilities``, ``probs``, ``output_probability``, ``scores``, ..."""
    if not isinstance(name, str):
        return False
    low = name.lower()
    return "prob" in low or "score" in low


def is_label_name(name: object) -> bool:
    """``label``, ``labels``, ``predictions``, ``class_ids``, ..."""
    return isinstance(name, str) and name.lower() in _LABEL_NAMES


def prob_matrix(value: object, *, named: bool, shape: object = None) -> NDArray[np.float64] | None:
    """``value`` as a finite ``(n, k >= 2)`` float matrix, else ``None``.

    ``shape`` (OIP) reshapes flat data first. Unnamed matrices must lie in ``[0, 1]``.
    """
    if not isinstance(value, list) or not value:
        return None
    try:
        arr = np.asarray(value, dtype=np.float64)
        if isinstance(shape, list) and len(shape) == 2 and math.prod(shape) == arr.size:
            arr = arr.reshape(shape)
    except (ValueError, TypeError, OverflowError):
        return None
    if arr.ndim != 2 or arr.shape[0] < 1 or arr.shape[1] < 2:
        return None
    if named and type(value[0]) is float:
        # a flat list of numbers (asarray took it): their sum is finite exactly when
        # every one is (a NaN or an infinity carries into it), unless a finite sum
        # overflows, which the array check below then settles (an answer's usual
        # few probabilities: a tenth of the ufunc and reduction's cost)
        try:
            total: float = sum(value)
        except TypeError:  # numeric strings, which asarray converted
            total = math.nan
        if total - total == 0.0:
            return arr
    # NaN fails both comparisons, so the range check also rules out non-finite values
    ok = np.isfinite(arr).all() if named else ((arr >= 0.0) & (arr <= 1.0)).all()
    return arr if ok else None


def label_vector(value: object) -> NDArray[np.int64] | None:
    """``value`` as a 1-D vector of integer class indices (``(n, 1)`` flattened), or ``None``."""
    if not isinstance(value, list) or not value:
        return None
    flat = value
    if len(value) == 1:  # one row's label (the usual answer): no generator to run
        first = value[0]
        if type(first) is int:
            try:
                return np.array((first,), dtype=np.int64)
            except OverflowError:
                return None
        if isinstance(first, list) and len(first) == 1:
            flat = first
    elif all(isinstance(v, list) and len(v) == 1 for v in value):
        flat = [v[0] for v in value]
    if any(type(v) is not int for v in flat):
        return None
    try:
        return np.asarray(flat, dtype=np.int64)
    except OverflowError:
        return None


def from_v2_outputs(outputs: list[Any]) -> Found:
    """The first probability output and the first label output of an OIP v2 answer."""
    probs = labels = prob_at = label_at = None
    for i, out in enumerate(outputs):
        if not isinstance(out, dict):
            continue
        name, datatype, data = out.get("name"), out.get("datatype"), out.get("data")
        if probs is None and datatype in FLOAT_TYPES:
            probs = prob_matrix(data, named=is_prob_name(name), shape=out.get("shape"))
            prob_at = i if probs is not None else None
        if labels is None and (datatype in INT_TYPES or is_label_name(name)):
            labels = label_vector(data)
            label_at = i if labels is not None else None
    return Found(probs, labels, prob_at, label_at)


def from_list(value: list[Any]) -> Found:
    """A list of predictions: class indices, probability vectors, or records.

    Records (``[{"label": 1, "probabilities": [...]}, ...]``) report the key
    names as ``prob_at`` and ``label_at``.
    """
    if not value:
        return Found()
    if all(isinstance(r, dict) for r in value):
        first: dict[str, Any] = value[0]
        prob_key = next((k for k in first if is_prob_name(k)), None)
        label_key = next((k for k in first if is_label_name(k)), None)
        probs = labels = None
        if prob_key is not None:
            probs = prob_matrix([r.get(prob_key) for r in value], named=True)
        if label_key is not None:
            labels = label_vector([r.get(label_key) for r in value])
        return Found(
            probs,
            labels,
            prob_key if probs is not None else None,
            label_key if labels is not None else None,
        )
    if isinstance(value[0], list):
        return Found(probs=prob_matrix(value, named=False))
    return Found(labels=label_vector(value))


def from_named(value: dict[str, Any]) -> Found:
    """Named columns (TF ``outputs`` mapping, an MLflow dict of predictions)."""
    probs = labels = prob_at = label_at = None
    for key, column in value.items():
        if probs is None and is_prob_name(key):
            probs = prob_matrix(column, named=True)
            prob_at = key if probs is not None else None
        if labels is None and is_label_name(key):
            labels = label_vector(column)
            label_at = key if labels is not None else None
    return Found(probs, labels, prob_at, label_at)
