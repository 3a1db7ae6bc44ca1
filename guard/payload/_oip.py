"""Open Inference Protocol (KServe v2, Triton, MLServer) requests.

Every input tensor is validated: its ``shape`` must be non-negative integers whose
product equals the number of data elements, and numeric datatypes must carry
numbers only (``BOOL`` may carry ``true``/``false``). The feature matrix comes
from the **first numeric input** (``FP*``, ``BF16``, ``INT*``, ``UINT*``, ``BOOL``);
the others are validated but not returned. ``BYTES`` inputs must carry strings,
which become texts (in a binary request only their byte count is checked). A
datatype the protocol does not define (``"?"``, ``"FP33"``) is 400 ``bad_type``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numpy.typing import NDArray

from inference_guard.guard.config import OIP_DATATYPES, LimitsConfig
from inference_guard.guard.payload._binary import NUMPY_DTYPES, decode_tensor
from inference_guard.guard.payload._request import ParsedRequest, check_rows, check_texts, fail
from inference_guard.guard.payload._tensor import (
    check_matrix_shape,
    finish_rows,
    finite_sum,
    leaves,
    to_float,
    valid_without_numpy,
)

__all__ = ["parse_oip"]

#: most dimensions an input's shape may have (the plain reader applies it too)
MAX_DIMS = 32
_NUMBER = frozenset({int, float})
_NUMBER_OR_BOOL = frozenset({int, float, bool})


def _dims(shape: object) -> list[int]:
    if not isinstance(shape, list) or len(shape) > MAX_DIMS:
        fail(400, "bad_shape", f"an input's 'shape' must be a list of at most {MAX_DIMS} integers")
    for d in shape:
        if type(d) is not int or d < 0:
            fail(400, "bad_shape", "an input's 'shape' must hold non-negative integers")
    return shape


def _binary_size(tensor: dict[str, Any]) -> int | None:
    params = tensor.get("parameters")
    if not isinstance(params, dict) or "binary_data_size" not in params:
        return None
    size = params["binary_data_size"]
    if type(size) is not int or size < 0:
        fail(400, "bad_shape", "binary_data_size must be a non-negative integer")
    return size


def _json_tensor(
    data: object, dims: list[int], count: int, datatype: str, limits: LimitsConfig
) -> NDArray[np.float64]:
    if not isinstance(data, list):
        fail(400, "bad_type", "an input's 'data' must be a list")
    found = leaves(data)
    if len(found.values) != count:
        fail(400, "bad_shape", "an input's data does not match its shape")
    if count > limits.max_values:
        # before numpy converts it; rows and features first, as finish_rows checks them
        _rows_of(dims, count, limits)
    arr = to_float(data, found, allow_bool=datatype == "BOOL", what=f"a {datatype} input")
    return arr.reshape(dims)


def _json_tensor_rows(
    data: object, dims: list[int], count: int, datatype: str, limits: LimitsConfig
) -> int:
    """Validate a JSON tensor as :func:`_json_tensor` does, without numpy; its row count."""
    if not isinstance(data, list):
        fail(400, "bad_type", "an input's 'data' must be a list")
    allowed = _NUMBER_OR_BOOL if datatype == "BOOL" else _NUMBER
    if len(data) == count and set(map(type, data)) <= allowed and finite_sum(data):
        # the usual encoding, a flat list of finite numbers: decided in three C calls
        return _rows_of(dims, count, limits)
    found = leaves(data)
    if len(found.values) != count:
        fail(400, "bad_shape", "an input's data does not match its shape")
    what = f"a {datatype} input"
    if not valid_without_numpy(data, found, allow_bool=datatype == "BOOL", what=what):
        arr = to_float(data, found, allow_bool=datatype == "BOOL", what=what).reshape(dims)
        return int(finish_rows(arr, limits, one_d_is_row=True, what="an input tensor").shape[0])
    return _rows_of(dims, count, limits)


def _rows_of(dims: list[int], count: int, limits: LimitsConfig) -> int:
    """The row count of a valid tensor, under the limits finish_rows applies."""
    # the shape finish_rows would give: 0-D is one value, 1-D one row, else batch x rest
    n_rows = dims[0] if len(dims) >= 2 else 1
    n_features = count // n_rows if len(dims) >= 2 else count
    check_matrix_shape(n_rows, n_features, limits, "an input tensor")
    return n_rows


def _json_strings(data: object, count: int) -> tuple[str, ...] | None:
    """The strings of a ``BYTES`` input; anything but strings is 400 ``bad_type``."""
    if isinstance(data, str):
        if count != 1:
            fail(400, "bad_shape", "an input's data does not match its shape")
        return (data,)
    if not isinstance(data, list):
        fail(400, "bad_type", "a BYTES input's data must be strings")
    found = leaves(data)
    if len(found.values) != count:
        fail(400, "bad_shape", "an input's data does not match its shape")
    if found.types - {str}:
        fail(400, "bad_type", "a BYTES input's data must be strings")
    return tuple(found.values)


def _asks_binary_output(doc: dict[str, Any]) -> bool:
    params = doc.get("parameters")
    if isinstance(params, dict) and params.get("binary_data_output") is True:
        return True
    outputs = doc.get("outputs")
    return isinstance(outputs, list) and any(
        isinstance(o, dict)
        and isinstance(o.get("parameters"), dict)
        and o["parameters"].get("binary_data") is True
        for o in outputs
    )


def parse_oip(
    doc: object, limits: LimitsConfig, binary: bytes | None = None, *, want_rows: bool = True
) -> ParsedRequest:
    """Parse an OIP v2 request document (``binary``: the tensor section of a binary request).

    With ``want_rows=False`` JSON tensors are validated exactly as otherwise but
    no matrix is built (``rows`` is ``None``, ``n_rows`` is still counted): for
    policies with no detector to look at the rows.
    """
    if not isinstance(doc, dict):
        fail(400, "bad_type", "the request body must be a JSON object")
    inputs = doc.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        fail(400, "bad_shape", "'inputs' must be a non-empty list of tensors")
    rows: NDArray[np.float64] | None = None
    n_rows: int | None = None
    counted = False  # n_rows taken from a numeric input
    texts: list[str] = []
    offset = 0
    for tensor in inputs:
        if not isinstance(tensor, dict):
            fail(400, "bad_type", "each input must be a JSON object")
        datatype = tensor.get("datatype")
        if not isinstance(datatype, str):
            fail(400, "bad_type", "each input needs a string 'datatype'")
        if datatype not in OIP_DATATYPES:
            fail(400, "bad_type", "an input's datatype is not one of the protocol's")
        dims = _dims(tensor.get("shape"))
        count = math.prod(dims)
        if count == 0:
            # numpy cannot reshape an empty buffer to [0, 2**62]; and no rows is no request
            fail(400, "bad_shape", "an input tensor has no elements")
        size = _binary_size(tensor) if binary is not None else None
        numeric = datatype in NUMPY_DTYPES
        arr: NDArray[np.float64] | None = None
        if size is not None:
            assert binary is not None  # _binary_size only runs for binary requests
            if "data" in tensor:
                fail(400, "bad_shape", "an input carries both 'data' and binary data")
            if offset + size > len(binary):
                fail(400, "bad_shape", "binary_data_size runs past the end of the body")
            if numeric:
                arr = decode_tensor(binary, offset, size, datatype, count).reshape(dims)
            offset += size
        elif "data" not in tensor:
            fail(400, "bad_shape", "an input has no 'data'")
        elif numeric and not want_rows:
            tensor_rows = _json_tensor_rows(tensor["data"], dims, count, datatype, limits)
            if not counted:  # the row count comes from the first numeric input, as below
                n_rows, counted = tensor_rows, True
        elif numeric:
            arr = _json_tensor(tensor["data"], dims, count, datatype, limits)
        elif datatype == "BYTES":
            strings = _json_strings(tensor["data"], count)
            texts.extend(strings or ())
        if arr is not None:
            matrix = finish_rows(arr, limits, one_d_is_row=True, what="an input tensor")
            if rows is None and not counted:
                rows, n_rows, counted = matrix, matrix.shape[0], True
        elif n_rows is None:
            n_rows = dims[0] if dims else 1
    if binary is not None and offset != len(binary):
        fail(400, "bad_shape", "the binary data does not match the inputs' binary_data_size")
    assert n_rows is not None  # inputs is non-empty
    if rows is None:
        check_rows(n_rows, limits)
    text_tuple = tuple(texts)
    if text_tuple:
        check_texts(text_tuple, limits)
    extra: dict[str, Any] = {}
    if binary is not None:
        extra["binary"] = True
    if ("parameters" in doc or "outputs" in doc) and _asks_binary_output(doc):
        extra["binary_output"] = True
    return ParsedRequest("oip_v2", rows, text_tuple, n_rows, extra, inputs=inputs)
