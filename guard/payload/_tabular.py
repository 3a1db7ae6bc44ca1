"""Untyped tabular payloads: KServe v1 / TF Serving, MLflow, plain JSON arrays.

These formats carry no datatype, so the leaves decide (see
:func:`guard.payload._tensor.classify`): numbers become rows, flat lists of strings
become texts, objects (``{"b64": ...}``, named instances) are opaque and only
counted. MLflow data frames are the one lenient case: their columns may mix
strings and numbers, so such a frame is opaque rather than an error.
"""

from __future__ import annotations

from typing import Any

from inference_guard.guard.config import LimitsConfig
from inference_guard.guard.payload._request import ParsedRequest, check_rows, check_texts, fail
from inference_guard.guard.payload._tensor import Classified, classify

__all__ = ["parse_json_array", "parse_kserve", "parse_mlflow"]

_MLFLOW_KEYS = ("dataframe_split", "dataframe_records", "instances", "inputs")


def _object(doc: object) -> dict[str, Any]:
    if not isinstance(doc, dict):
        fail(400, "bad_type", "the request body must be a JSON object")
    return doc


def _list(value: object, what: str) -> list[Any]:
    if not isinstance(value, list):
        fail(400, "bad_type", f"{what} must be a list")
    return value


def _instances(value: object, limits: LimitsConfig, what: str) -> Classified:
    return classify(_list(value, what), limits, one_d_is_row=False, strict=True, what=what)


def _columns(value: object, limits: LimitsConfig) -> Classified:
    """TF column form: ``inputs`` is a tensor (list) or a mapping of name to tensor.

    Rows come from the first numeric column; every column is validated.
    """
    if isinstance(value, list):
        return _instances(value, limits, "'inputs'")
    if not isinstance(value, dict) or not value:
        fail(400, "bad_type", "'inputs' must be a list or a non-empty object")
    first: Classified | None = None
    numeric: Classified | None = None
    texts: list[str] = []
    for column in value.values():
        if isinstance(column, list):
            c = _instances(column, limits, "an input column")
        elif isinstance(column, str):
            c = Classified(None, (column,), 1)
        elif isinstance(column, dict):
            c = Classified(None, (), 1)
        elif type(column) in (int, float):
            c = _instances([column], limits, "an input column")
        else:
            fail(400, "bad_type", "an input column must be a list, a number or a string")
        texts.extend(c.texts)
        if first is None:
            first = c
        if numeric is None and c.rows is not None:
            numeric = c
    assert first is not None  # value is non-empty
    chosen = numeric or first
    return Classified(chosen.rows, tuple(texts), chosen.n_rows)


def _one_column(columns: object) -> object:
    """The instances of a TF column-form ``inputs``: the list itself, or a lone column's."""
    if isinstance(columns, dict) and len(columns) == 1:
        return next(iter(columns.values()))
    return columns if isinstance(columns, list) else None


def _result(
    fmt: str, c: Classified, limits: LimitsConfig, instances: object = None
) -> ParsedRequest:
    """``instances``: the decoded list the rows came from, kept for the signature check
    (the rank of an instance, which the row matrix no longer shows)."""
    check_texts(c.texts, limits)
    return ParsedRequest(fmt, c.rows, c.texts, c.n_rows, inputs=instances)


def parse_kserve(doc: object, limits: LimitsConfig) -> ParsedRequest:
    """KServe v1 / TF Serving: ``instances`` (row form), ``inputs`` (column form), ``examples``."""
    body = _object(doc)
    if "instances" in body:
        instances = body["instances"]
        return _result("kserve_v1", _instances(instances, limits, "'instances'"), limits, instances)
    if "inputs" in body:
        columns = body["inputs"]
        return _result("tf_columns", _columns(columns, limits), limits, _one_column(columns))
    if "examples" in body:
        examples = _list(body["examples"], "'examples'")
        check_rows(len(examples), limits)
        if not all(isinstance(e, dict) for e in examples):
            fail(400, "bad_type", "each of 'examples' must be an object of features")
        return ParsedRequest("kserve_v1", None, (), len(examples))
    fail(400, "bad_shape", "expected 'instances' or 'inputs'")


def _records(value: object, limits: LimitsConfig) -> Classified:
    records = _list(value, "'dataframe_records'")
    check_rows(len(records), limits)
    if not all(isinstance(r, dict) for r in records):
        fail(400, "bad_type", "'dataframe_records' must be a list of objects")
    keys = list(records[0])
    if len(keys) > limits.max_features:
        fail(400, "too_many_features", f"rows are wider than {limits.max_features} features")
    first = records[0].keys()
    if any(r.keys() != first for r in records):
        fail(400, "bad_shape", "records do not all have the same columns")
    matrix = [[r[k] for k in keys] for r in records]
    return classify(matrix, limits, one_d_is_row=False, strict=False, what="'dataframe_records'")


def _split(value: object, limits: LimitsConfig) -> Classified:
    if not isinstance(value, dict):
        fail(400, "bad_type", "'dataframe_split' must be an object")
    data = _list(value.get("data"), "'dataframe_split.data'")
    check_rows(len(data), limits)
    if not all(isinstance(r, list) for r in data):
        fail(400, "bad_shape", "'dataframe_split.data' must be a list of rows")
    widths = set(map(len, data))
    columns = value.get("columns")
    if len(widths) != 1 or (isinstance(columns, list) and widths != {len(columns)}):
        fail(400, "bad_shape", "'dataframe_split' rows differ in length (or from 'columns')")
    return classify(data, limits, one_d_is_row=False, strict=False, what="'dataframe_split.data'")


def parse_mlflow(doc: object, limits: LimitsConfig) -> ParsedRequest:
    """MLflow ``/invocations``: exactly one of the four input keys (``params`` may ride along)."""
    body = _object(doc)
    present = [k for k in _MLFLOW_KEYS if k in body]
    if len(present) != 1:
        fail(400, "bad_shape", "expected exactly one of " + ", ".join(_MLFLOW_KEYS))
    key = present[0]
    value = body[key]
    if key == "dataframe_split":
        c = _split(value, limits)
    elif key == "dataframe_records":
        c = _records(value, limits)
    elif key == "instances":
        c = _instances(value, limits, "'instances'")
    else:
        c = _columns(value, limits)
    instances = value if key == "instances" else _one_column(value) if key == "inputs" else None
    return _result("mlflow", c, limits, instances)


def parse_json_array(doc: list[Any], limits: LimitsConfig) -> ParsedRequest:
    """A plain JSON array: a list of numbers is one row, a list of lists is rows."""
    if not doc:
        return ParsedRequest("unknown", None)
    c = classify(doc, limits, one_d_is_row=True, strict=True, what="the JSON array")
    return _result("json_array", c, limits)
