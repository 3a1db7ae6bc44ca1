"""Triton binary answers read and rewritten like JSON ones (guard.payload._binary_answer)."""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from inference_guard.guard.config import DegradeConfig
from inference_guard.guard.payload.degrade import RowNoise
from inference_guard.guard.payload.review import review_answer

PROBS = np.array([[0.1234567, 0.8765433], [0.61111, 0.38889]], dtype=np.float32)
LABELS = np.array([1, 0], dtype="<i8")


def binary_answer(*outputs: tuple[dict[str, Any], bytes | None]) -> tuple[bytes, int]:
    """An answer: each output with its raw tensor (``None``: a JSON output)."""
    meta, blobs = [], []
    for out, blob in outputs:
        if blob is not None:
            out = {**out, "parameters": {"binary_data_size": len(blob)}}
            blobs.append(blob)
        meta.append(out)
    header = json.dumps({"model_name": "m", "outputs": meta}).encode()
    return header + b"".join(blobs), len(header)


def split(body: bytes, n: int) -> tuple[dict[str, Any], bytes]:
    return json.loads(body[:n]), body[n:]


PROB_OUT = {"name": "probabilities", "datatype": "FP32", "shape": [2, 2]}
LABEL_OUT = {"name": "label", "datatype": "INT64", "shape": [2]}


def review(body: bytes, n: int, spec: DegradeConfig, **kw: Any) -> Any:
    return review_answer(
        body, "application/octet-stream", fmt="oip_v2", spec=spec, binary_header=n, **kw
    )


def test_binary_probabilities_are_rounded_and_sizes_fixed() -> None:
    body, n = binary_answer((LABEL_OUT, LABELS.tobytes()), (PROB_OUT, PROBS.tobytes()))
    got = review(body, n, DegradeConfig(decimals=2, noise=0.0), read=True)
    assert got.body is not None and got.header_length is not None
    header, blob = split(got.body, got.header_length)
    sizes = [o["parameters"]["binary_data_size"] for o in header["outputs"]]
    assert sizes == [16, 16] and len(blob) == 32
    assert blob[:16] == LABELS.tobytes()  # the labels pass as they came
    assert np.frombuffer(blob[16:], "<f4").tolist() == np.float32([0.12, 0.88, 0.61, 0.39]).tolist()
    # read before rewriting: the model's own probabilities
    assert got.answer is not None
    assert np.allclose(got.answer.probabilities, PROBS.astype(np.float64))


def test_labels_only_drops_the_binary_probabilities() -> None:
    body, n = binary_answer((PROB_OUT, PROBS.tobytes()))
    got = review(body, n, DegradeConfig(labels_only=True, noise=0.0))
    header, blob = split(got.body, got.header_length)
    assert blob == b""
    assert header["outputs"] == [
        {"name": "label", "datatype": "INT64", "shape": [2], "data": [1, 0]}
    ]


def test_top_k_and_a_json_output_beside_binary_ones() -> None:
    body, n = binary_answer(({**LABEL_OUT, "data": [1, 0]}, None), (PROB_OUT, PROBS.tobytes()))
    got = review(body, n, DegradeConfig(top_k=1, decimals=2, noise=0.0))
    header, blob = split(got.body, got.header_length)
    assert header["outputs"][0]["data"] == [1, 0]
    assert np.frombuffer(blob, "<f4").tolist() == np.float32([0.0, 0.88, 0.61, 0.0]).tolist()


def test_noise_rewrites_binary_labels_and_probabilities_alike() -> None:
    body, n = binary_answer((LABEL_OUT, LABELS.tobytes()), (PROB_OUT, PROBS.tobytes()))
    spec = DegradeConfig(decimals=2, noise=0.5)
    noise = RowNoise(b"k" * 64, "client", np.ones((2, 2)))
    got = review(body, n, spec, noise=noise)
    _, blob = split(got.body, got.header_length)
    labels = np.frombuffer(blob[:16], "<i8")
    probs = np.frombuffer(blob[16:], "<f4").reshape(2, 2)
    assert (labels == probs.argmax(axis=1)).all() or (probs[0, 0] == probs[0, 1])
    assert not np.allclose(probs, np.round(PROBS, 2))


def test_bytes_outputs_are_carried_as_they_came() -> None:
    raw = b"\x03\x00\x00\x00cat"
    bytes_out = {"name": "names", "datatype": "BYTES", "shape": [1]}
    body, n = binary_answer((bytes_out, raw), (PROB_OUT, PROBS.tobytes()))
    got = review(body, n, DegradeConfig(decimals=2, noise=0.0))
    header, blob = split(got.body, got.header_length)
    assert header["outputs"][0]["parameters"] == {"binary_data_size": len(raw)}
    assert blob[: len(raw)] == raw and len(blob) == len(raw) + 16


def test_answers_that_do_not_add_up_are_not_rewritten() -> None:
    body, n = binary_answer((PROB_OUT, PROBS.tobytes()))
    spec = DegradeConfig(decimals=2, noise=0.0)
    for bad_body, bad_n in [(body + b"x", n), (body[:-1], n), (body, n + 5), (body, 0)]:
        assert review(bad_body, bad_n, spec).body is None
