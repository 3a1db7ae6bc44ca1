"""Triton's binary tensor extension: a JSON header, then raw little-endian tensors.

The body is ``Inference-Header-Content-Length`` bytes of JSON followed by the
tensors of every input whose ``parameters.binary_data_size`` is set, in input
order, back to back. Every size is checked against the shape and datatype
before ``np.frombuffer`` reads a byte.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from inference_guard.guard.payload._request import fail
from inference_guard.guard.payload._tensor import check_finite

__all__ = ["NUMPY_DTYPES", "decode_tensor", "split_body"]

#: little-endian numpy dtype of each numeric OIP datatype (BF16 is read as its raw bits)
NUMPY_DTYPES: dict[str, np.dtype[np.generic]] = {
    name: np.dtype(code)
    for name, code in {
        "BOOL": "|u1",
        "INT8": "|i1",
        "INT16": "<i2",
        "INT32": "<i4",
        "INT64": "<i8",
        "UINT8": "|u1",
        "UINT16": "<u2",
        "UINT32": "<u4",
        "UINT64": "<u8",
        "FP16": "<f2",
        "FP32": "<f4",
        "FP64": "<f8",
        "BF16": "<u2",
    }.items()
}
_MAX_HEADER_DIGITS = 19


def split_body(body: bytes, header_length: str) -> tuple[bytes, bytes]:
    """Split ``body`` into its JSON header and its binary section.

    ``header_length`` is the ``Inference-Header-Content-Length`` header value;
    anything but a decimal number within the body is 400 ``bad_header``.
    """
    text = header_length.strip()
    if not (text.isascii() and text.isdigit()) or len(text) > _MAX_HEADER_DIGITS:
        fail(400, "bad_header", "Inference-Header-Content-Length must be a decimal byte count")
    n = int(text)
    if not 0 < n <= len(body):
        fail(400, "bad_header", "Inference-Header-Content-Length does not fit the body")
    return body[:n], body[n:]


def decode_tensor(
    blob: bytes, offset: int, size: int, datatype: str, count: int
) -> NDArray[np.float64]:
    """Read ``count`` elements of ``datatype`` at ``blob[offset:offset + size]`` as float64.

    The caller has checked that the slice lies within ``blob``. A size that is
    not exactly ``count`` elements is 400 ``bad_shape``; NaN or infinite floats
    are 400 ``non_finite``.
    """
    dtype = NUMPY_DTYPES[datatype]
    if size != count * dtype.itemsize:
        fail(400, "bad_shape", "binary_data_size does not match the tensor's shape and datatype")
    if count == 0:
        return np.zeros(0, dtype=np.float64)
    raw = np.frombuffer(blob, dtype=dtype, count=count, offset=offset)
    if datatype == "BF16":
        # bfloat16 is the top half of a float32
        raw = (raw.astype(np.uint32) << 16).view(np.float32)
    elif datatype == "BOOL":
        raw = raw != 0
    arr = raw.astype(np.float64)
    check_finite(arr, "a binary input tensor")
    return arr
