"""Answers in Triton's binary tensor extension, read and rewritten like JSON ones.

Such an answer is ``Inference-Header-Content-Length`` bytes of JSON, then the
raw little-endian tensors of every output whose ``parameters.binary_data_size``
is set, in output order, back to back. The numeric binary outputs are decoded
into the header as JSON ``data``, the answer is read and coarsened exactly as
a JSON OIP v2 answer is (:func:`~guard.payload.degrade.degrade_doc`), and each
output that was binary is encoded back in its own datatype with its new
``binary_data_size``. An output the rewrite adds (``labels_only``'s ``label``)
is JSON, which the extension allows beside binary ones. ``BYTES`` and ``BF16``
outputs are carried as they came.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from inference_guard.detectors.base import Answer
from inference_guard.guard.config import DegradeConfig
from inference_guard.guard.payload._binary import NUMPY_DTYPES
from inference_guard.guard.payload._json import dump_compact
from inference_guard.guard.payload.adapters import read_answer_doc
from inference_guard.guard.payload.degrade import RowNoise, degrade_doc

__all__ = ["review_binary"]

#: output id -> (the output, its numpy dtype when decoded, its raw bytes when not)
_Binaries = dict[int, tuple[dict[str, Any], "np.dtype[Any] | None", bytes | None]]


def review_binary(
    body: bytes,
    header_length: int,
    *,
    fmt: str,
    spec: DegradeConfig | None,
    noise: RowNoise | None,
    read: bool,
) -> tuple[bytes | None, int | None, Answer | None]:
    """Read and rewrite a binary answer: (new body, its header length, what it says).

    The new body is ``None`` when the answer was not rewritten (not asked, or
    not an answer the guard understands). Never raises.
    """
    try:
        decoded = _decode(body, header_length)
    except Exception:  # an odd answer is neither read nor rewritten, never a 500
        return None, None, None
    if decoded is None:
        return None, None, None
    doc, binaries = decoded
    answer = None
    if read:
        try:
            answer = read_answer_doc(doc, fmt)
        except Exception:
            answer = None
    if spec is None:
        return None, None, answer
    try:
        changed = degrade_doc(doc, "oip_v2", spec, noise)
        if changed is None:
            return None, None, answer
        if not changed:
            return body, header_length, answer
        new, length = _encode(doc, binaries)
    except Exception:  # an odd answer is passed through, never turned into a 500
        return None, None, answer
    return new, length, answer


def _decode(body: bytes, header_length: int) -> tuple[dict[str, Any], _Binaries] | None:
    """The header with its numeric binary outputs decoded into ``data``; ``None``: not one."""
    if not 0 < header_length <= len(body):
        return None
    doc = json.loads(body[:header_length])
    outputs = doc.get("outputs") if isinstance(doc, dict) else None
    if not isinstance(outputs, list) or not all(isinstance(o, dict) for o in outputs):
        return None
    offset = header_length
    binaries: _Binaries = {}
    for out in outputs:
        params = out.get("parameters")
        if not isinstance(params, dict) or "binary_data_size" not in params:
            continue
        size = params["binary_data_size"]
        if type(size) is not int or size < 0 or offset + size > len(body):
            return None
        raw = body[offset : offset + size]
        offset += size
        datatype = out.get("datatype")
        dtype = NUMPY_DTYPES.get(datatype) if isinstance(datatype, str) else None
        if dtype is None or datatype == "BF16" or size % dtype.itemsize:
            binaries[id(out)] = (out, None, raw)
            continue
        out["data"] = np.frombuffer(raw, dtype).tolist()
        del params["binary_data_size"]
        binaries[id(out)] = (out, dtype, None)
    if offset != len(body):
        return None
    return doc, binaries


def _encode(doc: dict[str, Any], binaries: _Binaries) -> tuple[bytes, int]:
    """The answer with every output that came binary encoded back; its header length."""
    blobs = []
    for out in doc["outputs"]:
        entry = binaries.get(id(out))
        if entry is None or entry[0] is not out:
            continue
        _, dtype, raw = entry
        if raw is None:
            raw = np.asarray(out.pop("data"), dtype=dtype).tobytes()
        params = out.get("parameters")
        if not isinstance(params, dict):
            params = out["parameters"] = {}
        params["binary_data_size"] = len(raw)
        blobs.append(raw)
    header = dump_compact(doc)
    return header + b"".join(blobs), len(header)
