"""Payload adapters: every format parsed, every bad input refused with its exact reason."""

from __future__ import annotations

import json
import random
import struct
from collections.abc import Mapping
from typing import Any

import numpy as np
import pytest

from inference_guard.guard.config import LimitsConfig
from inference_guard.guard.errors import PayloadError
from inference_guard.guard.payload._json import json_depth_exceeds
from inference_guard.guard.payload.adapters import (
    ParsedRequest,
    detect_format,
    parse_request,
    parse_response,
)

LIMITS = LimitsConfig()
V2 = "/v2/models/iris/infer"
V1 = "/v1/models/iris:predict"
MLFLOW = "/invocations"
CHAT = "/v1/chat/completions"
COMPLETION = "/v1/completions"
JSON = "application/json"


def parse(
    doc: Any,
    path: str = "/custom",
    *,
    content_type: str | None = JSON,
    headers: Mapping[str, str] | None = None,
    limits: LimitsConfig = LIMITS,
) -> ParsedRequest:
    body = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    return parse_request(
        body, path=path, content_type=content_type, headers=headers or {}, limits=limits
    )


def refused(doc: Any, path: str = "/custom", **kw: Any) -> tuple[int, str]:
    with pytest.raises(PayloadError) as info:
        parse(doc, path, **kw)
    assert info.value.reason in PayloadError.REASONS
    return info.value.status, info.value.reason


def v2(data: Any, shape: Any, datatype: str = "FP32", **more: Any) -> dict[str, Any]:
    return {"inputs": [{"name": "x", "shape": shape, "datatype": datatype, "data": data, **more}]}


# --------------------------------------------------------------------------- format detection


@pytest.mark.parametrize(
    ("path", "fmt"),
    [
        ("/v2/models/iris/infer", "oip_v2"),
        ("/v2/models/iris/versions/3/infer", "oip_v2"),
        ("/serving/v2/models/iris/infer/", "oip_v2"),
        ("/v1/models/iris:predict", "kserve_v1"),
        ("/v1/models/iris:classify", "kserve_v1"),
        ("/v1/models/iris/versions/2:regress", "kserve_v1"),
        ("/invocations", "mlflow"),
        ("/v1/chat/completions", "openai_chat"),
        ("/v1/completions", "openai_completion"),
        ("/v2/models/iris", None),
        ("/v1/models/iris", None),
        ("/healthz", None),
    ],
)
def test_detect_format_by_path(path: str, fmt: str | None) -> None:
    assert detect_format(path) == fmt


@pytest.mark.parametrize(
    ("doc", "fmt"),
    [
        ([1.0, 2.0], "json_array"),
        (v2([1.0], [1, 1]), "oip_v2"),
        ({"instances": [[1.0]]}, "kserve_v1"),
        ({"inputs": {"x": [[1.0]]}}, "tf_columns"),
        ({"dataframe_split": {"columns": ["a"], "data": [[1.0]]}}, "mlflow"),
        ({"dataframe_records": [{"a": 1.0}]}, "mlflow"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "openai_chat"),
        ({"prompt": "hi"}, "openai_completion"),
        ({"something": "else"}, "unknown"),
        ("a string", "unknown"),
        (42, "unknown"),
        ([], "unknown"),
    ],
)
def test_detect_format_by_body(doc: Any, fmt: str) -> None:
    assert parse(doc).fmt == fmt


def test_unknown_shape_counts_one_row() -> None:
    req = parse({"hello": [1, 2, 3]})
    assert (req.fmt, req.rows, req.n_rows, req.texts) == ("unknown", None, 1, ())


def test_non_json_on_a_path_without_protocol_is_unknown() -> None:
    req = parse(b"\x00\x01binary", content_type="image/png")
    assert (req.fmt, req.rows, req.n_rows) == ("unknown", None, 1)


# --------------------------------------------------------------------------- OIP v2


def test_v2_single_row_flat() -> None:
    data = [float(i) / 10 for i in range(64)]
    req = parse(v2(data, [1, 64]), V2)
    assert req.fmt == "oip_v2"
    assert req.n_rows == 1
    assert req.rows is not None
    assert req.rows.shape == (1, 64)
    assert req.rows.dtype == np.float64
    assert req.rows.flags.c_contiguous
    assert req.rows[0, 10] == 1.0
    assert req.extra == {}


def test_v2_batch_flat_row_major() -> None:
    req = parse(v2([1, 2, 3, 4, 5, 6], [3, 2]), V2)
    assert req.rows is not None
    assert req.rows.tolist() == [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]
    assert req.n_rows == 3


def test_v2_nested_data() -> None:
    req = parse(v2([[1, 2, 3], [4, 5, 6]], [2, 3], "FP64"), V2)
    assert req.rows is not None
    assert req.rows.tolist() == [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]
    assert req.n_rows == 2


def test_v2_higher_rank_flattens_features() -> None:
    req = parse(v2(list(range(2 * 2 * 3)), [2, 2, 3], "INT64"), V2)
    assert req.rows is not None
    assert req.rows.shape == (2, 6)
    assert req.rows[1].tolist() == [6.0, 7.0, 8.0, 9.0, 10.0, 11.0]


def test_v2_one_dimensional_tensor_is_one_row() -> None:
    req = parse(v2([1, 2, 3], [3], "UINT8"), V2)
    assert req.rows is not None
    assert req.rows.shape == (1, 3)
    assert req.n_rows == 1


def test_v2_bool_tensor_becomes_floats() -> None:
    req = parse(v2([True, False, True], [1, 3], "BOOL"), V2)
    assert req.rows is not None
    assert req.rows.tolist() == [[1.0, 0.0, 1.0]]


def test_v2_bytes_input_gives_texts() -> None:
    req = parse(v2(["hello", "world"], [2], "BYTES"), V2)
    assert (req.fmt, req.rows, req.texts, req.n_rows) == ("oip_v2", None, ("hello", "world"), 2)


def test_v2_first_numeric_input_gives_rows() -> None:
    doc = {
        "inputs": [
            {"name": "t", "shape": [2], "datatype": "BYTES", "data": ["a", "b"]},
            {"name": "a", "shape": [2, 2], "datatype": "FP32", "data": [1, 2, 3, 4]},
            {"name": "b", "shape": [2, 1], "datatype": "INT32", "data": [7, 8]},
        ]
    }
    req = parse(doc, V2)
    assert req.rows is not None
    assert req.rows.tolist() == [[1.0, 2.0], [3.0, 4.0]]
    assert req.n_rows == 2
    assert req.texts == ("a", "b")


def test_v2_later_inputs_are_validated_too() -> None:
    doc = {
        "inputs": [
            {"name": "a", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]},
            {"name": "b", "shape": [1, 2], "datatype": "FP32", "data": [1, "x"]},
        ]
    }
    assert refused(doc, V2) == (400, "bad_type")


def test_v2_body_shape_detection_and_binary_output_flag() -> None:
    doc = v2([1.0, 2.0], [1, 2], parameters={"content_type": "np"})
    doc["outputs"] = [{"name": "probs", "parameters": {"binary_data": True}}]
    req = parse(doc)
    assert req.fmt == "oip_v2"
    assert req.extra == {"binary_output": True}


@pytest.mark.parametrize(
    ("doc", "expected"),
    [
        (v2([1, 2, 3], [2, 2]), (400, "bad_shape")),
        (v2([[1, 2], [3]], [2, 2]), (400, "bad_shape")),
        (v2([[1, 2], 3], [1, 3]), (400, "bad_shape")),
        (v2([1, 2], [1, -2]), (400, "bad_shape")),
        (v2([1, 2], "1,2"), (400, "bad_shape")),
        (v2([1, 2], [1, 2.0]), (400, "bad_shape")),
        (v2([1, 2], [1, True]), (400, "bad_shape")),
        (v2([1, "2"], [1, 2]), (400, "bad_type")),
        (v2([1, None], [1, 2]), (400, "bad_type")),
        (v2([1.0, True], [1, 2]), (400, "bad_type")),
        (v2([1.0, {"a": 1}], [1, 2]), (400, "bad_type")),
        (v2(5, [1]), (400, "bad_type")),
        (v2([1e999, 1.0], [1, 2]), (400, "non_finite")),
        (v2([10**400, 1.0], [1, 2]), (400, "non_finite")),
        (v2([], [0, 4]), (400, "bad_shape")),
        (v2([], [1, 0]), (400, "bad_shape")),
        (v2(["a", "b"], [3], "BYTES"), (400, "bad_shape")),
        ({"inputs": 5}, (400, "bad_shape")),
        ({"inputs": []}, (400, "bad_shape")),
        ({"inputs": [5]}, (400, "bad_type")),
        ({"inputs": [{"name": "x", "shape": [1], "data": [1]}]}, (400, "bad_type")),
        ({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32"}]}, (400, "bad_shape")),
        ([1, 2], (400, "bad_type")),
    ],
)
def test_v2_refusals(doc: Any, expected: tuple[int, str]) -> None:
    assert refused(doc, V2) == expected


def test_v2_row_and_feature_limits() -> None:
    limits = LimitsConfig(max_rows=4, max_features=3)
    assert refused(v2([0.0] * 10, [5, 2]), V2, limits=limits) == (413, "too_many_rows")
    assert refused(v2([0.0] * 8, [2, 4]), V2, limits=limits) == (400, "too_many_features")
    assert refused(v2(["ab"] * 5, [5], "BYTES"), V2, limits=limits) == (413, "too_many_rows")
    assert parse(v2([0.0] * 12, [4, 3]), V2, limits=limits).n_rows == 4


@pytest.mark.parametrize("datatype", ["?", "FP33", "FP8_E4M3", "fp32", ""])
def test_v2_datatypes_outside_the_protocol_are_refused(datatype: str) -> None:
    # hostile_findings.jsonl: "?" and "FP33" reached the model
    assert refused(v2([1, 2], [1, 2], datatype), V2) == (400, "bad_type")


@pytest.mark.parametrize(
    ("data", "shape", "expected"),
    [
        (7, [1], (400, "bad_type")),
        ([1, 2], [2], (400, "bad_type")),
        (["a", 2], [2], (400, "bad_type")),
        ([{"b64": "YQ=="}], [1], (400, "bad_type")),
        ("ab", [2], (400, "bad_shape")),
        (["a", "b"], [3], (400, "bad_shape")),
    ],
    ids=["number", "numbers", "mixed", "object", "one-string-two-elements", "count"],
)
def test_v2_bytes_data_must_be_strings(data: Any, shape: Any, expected: tuple[int, str]) -> None:
    # hostile_findings.jsonl: a number as BYTES data reached the model
    assert refused(v2(data, shape, "BYTES"), V2) == expected
    assert parse(v2(["a", "b"], [1, 2], "BYTES"), V2).texts == ("a", "b")


# --------------------------------------------------------------------------- Triton binary


def binary_request(
    header: dict[str, Any], blobs: list[bytes], *, length: str | None = None
) -> tuple[bytes, dict[str, str]]:
    head = json.dumps(header).encode()
    return head + b"".join(blobs), {"inference-header-content-length": length or str(len(head))}


def binary_input(name: str, shape: list[int], datatype: str, size: int) -> dict[str, Any]:
    return {
        "name": name, "shape": shape, "datatype": datatype,
        "parameters": {"binary_data_size": size},
    }


def test_binary_fp32() -> None:
    values = np.arange(6, dtype="<f4") / 2
    body, headers = binary_request(
        {"inputs": [binary_input("x", [2, 3], "FP32", 24)]}, [values.tobytes()]
    )
    req = parse(body, V2, content_type="application/octet-stream", headers=headers)
    assert req.fmt == "oip_v2"
    assert req.extra == {"binary": True}
    assert req.rows is not None
    assert req.rows.tolist() == [[0.0, 0.5, 1.0], [1.5, 2.0, 2.5]]
    assert req.rows.flags.c_contiguous and req.rows.flags.writeable


def test_binary_mixed_json_and_binary_inputs_and_dtypes() -> None:
    ints = np.array([1, -2], dtype="<i8").tobytes()
    halves = np.array([0.5, 1.5], dtype="<f2").tobytes()
    bf16 = struct.pack("<2H", 0x3F80, 0xC000)  # 1.0, -2.0
    header = {
        "inputs": [
            {"name": "j", "shape": [1, 1], "datatype": "FP32", "data": [9.0]},
            binary_input("a", [1, 2], "INT64", 16),
            binary_input("h", [1, 2], "FP16", 4),
            binary_input("b", [1, 2], "BF16", 4),
            binary_input("s", [1], "BYTES", 9),
        ]
    }
    body, headers = binary_request(header, [ints, halves, bf16, struct.pack("<I", 5) + b"hello"])
    req = parse(body, V2, content_type=None, headers=headers)
    assert req.rows is not None
    assert req.rows.tolist() == [[9.0]]


def test_binary_bf16_values_decoded() -> None:
    bf16 = struct.pack("<2H", 0x3F80, 0xC000)
    body, headers = binary_request({"inputs": [binary_input("b", [1, 2], "BF16", 4)]}, [bf16])
    req = parse(body, V2, content_type="application/octet-stream", headers=headers)
    assert req.rows is not None
    assert req.rows.tolist() == [[1.0, -2.0]]


@pytest.mark.parametrize(
    ("header", "blobs", "length", "expected"),
    [
        ({"inputs": [binary_input("x", [1, 2], "FP32", 8)]}, [b"\0" * 4], None, "bad_shape"),
        ({"inputs": [binary_input("x", [1, 2], "FP32", 8)]}, [b"\0" * 12], None, "bad_shape"),
        ({"inputs": [binary_input("x", [1, 3], "FP32", 8)]}, [b"\0" * 8], None, "bad_shape"),
        ({"inputs": [binary_input("x", [1, 2], "FP32", -8)]}, [b"\0" * 8], None, "bad_shape"),
        (
            {"inputs": [{**binary_input("x", [1, 2], "FP32", 8), "data": [1, 2]}]},
            [b"\0" * 8], None, "bad_shape",
        ),
        (
            {"inputs": [binary_input("x", [1, 2], "FP32", 8)]},
            [np.array([np.nan, 1], dtype="<f4").tobytes()], None, "non_finite",
        ),
        ({"inputs": [binary_input("x", [1, 2], "FP32", 8)]}, [b"\0" * 8], "abc", "bad_header"),
        ({"inputs": [binary_input("x", [1, 2], "FP32", 8)]}, [b"\0" * 8], "0", "bad_header"),
        ({"inputs": [binary_input("x", [1, 2], "FP32", 8)]}, [b"\0" * 8], "99999", "bad_header"),
        ({"inputs": [binary_input("x", [1, 2], "FP32", 8)]}, [b"\0" * 8], "-5", "bad_header"),
        ({"inputs": [binary_input("x", [1, 2], "FP32", 8)]}, [b"\0" * 8], "5", "invalid_json"),
    ],
)
def test_binary_refusals(
    header: dict[str, Any], blobs: list[bytes], length: str | None, expected: str
) -> None:
    body, headers = binary_request(header, blobs, length=length)
    status, reason = refused(body, V2, content_type="application/octet-stream", headers=headers)
    assert (status, reason) == (400, expected)


def test_octet_stream_without_binary_header_is_415() -> None:
    assert refused(b"\0\0\0\0", V2, content_type="application/octet-stream") == (
        415, "unsupported_media_type",
    )


def test_binary_with_foreign_content_type_is_415() -> None:
    body, headers = binary_request({"inputs": [binary_input("x", [1, 1], "FP32", 4)]}, [b"\0" * 4])
    status_reason = refused(body, V2, content_type="text/plain", headers=headers)
    assert status_reason == (415, "unsupported_media_type")


# --------------------------------------------------------------------------- KServe v1 / TF


def test_v1_instances_rows() -> None:
    req = parse({"instances": [[1, 2], [3, 4], [5, 6]]}, V1)
    assert req.fmt == "kserve_v1"
    assert req.rows is not None
    assert req.rows.tolist() == [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]
    assert req.n_rows == 3


def test_v1_instances_of_scalars_are_single_feature_rows() -> None:
    req = parse({"instances": [1.5, 2.5, 3.5]}, V1)
    assert req.rows is not None
    assert req.rows.shape == (3, 1)
    assert req.n_rows == 3


def test_v1_b64_instances_are_opaque() -> None:
    req = parse({"instances": [{"b64": "aGVsbG8="}, {"b64": "d29ybGQ="}]}, V1)
    assert (req.fmt, req.rows, req.n_rows, req.texts) == ("kserve_v1", None, 2, ())


def test_v1_string_instances_are_texts() -> None:
    req = parse({"instances": ["good movie", "bad movie"]}, V1)
    assert (req.rows, req.texts, req.n_rows) == (None, ("good movie", "bad movie"), 2)


def test_tf_column_form_mapping() -> None:
    req = parse({"inputs": {"words": ["a", "b"], "x": [[1, 2], [3, 4]], "y": [5, 6]}}, V1)
    assert req.fmt == "tf_columns"
    assert req.rows is not None
    assert req.rows.tolist() == [[1.0, 2.0], [3.0, 4.0]]
    assert req.n_rows == 2
    assert req.texts == ("a", "b")


def test_tf_column_form_list() -> None:
    req = parse({"inputs": [[1, 2, 3]]}, V1)
    assert (req.fmt, req.n_rows) == ("tf_columns", 1)
    assert req.rows is not None
    assert req.rows.tolist() == [[1.0, 2.0, 3.0]]


def test_v1_examples_are_counted() -> None:
    req = parse({"examples": [{"x": 1}, {"x": 2}]}, "/v1/models/m:classify")
    assert (req.fmt, req.rows, req.n_rows) == ("kserve_v1", None, 2)


@pytest.mark.parametrize(
    ("doc", "expected"),
    [
        ({"instances": [[1, 2], [3]]}, (400, "bad_shape")),
        ({"instances": [[1, 2], 3]}, (400, "bad_shape")),
        ({"instances": [[1, "2"]]}, (400, "bad_type")),
        ({"instances": [[1, None]]}, (400, "bad_type")),
        ({"instances": [[1e400]]}, (400, "non_finite")),
        ({"instances": []}, (400, "bad_shape")),
        ({"instances": [[]]}, (400, "bad_shape")),
        ({"instances": 5}, (400, "bad_type")),
        ({"inputs": 5}, (400, "bad_type")),
        ({"inputs": {"x": None}}, (400, "bad_type")),
        ({"inputs": {"x": [[1, 2], [3]]}}, (400, "bad_shape")),
        ({"signature_name": "serving"}, (400, "bad_shape")),
        ([[1, 2]], (400, "bad_type")),
    ],
)
def test_v1_refusals(doc: Any, expected: tuple[int, str]) -> None:
    assert refused(doc, V1) == expected


def test_v1_row_and_text_limits() -> None:
    limits = LimitsConfig(max_rows=2, max_text_chars=5)
    assert refused({"instances": [[1], [2], [3]]}, V1, limits=limits) == (413, "too_many_rows")
    assert refused({"instances": ["abc", "def"]}, V1, limits=limits) == (413, "text_too_long")


# --------------------------------------------------------------------------- MLflow


def test_mlflow_dataframe_split() -> None:
    doc = {"dataframe_split": {"columns": ["a", "b"], "data": [[1, 2], [3, 4]]}, "params": {}}
    req = parse(doc, MLFLOW)
    assert req.fmt == "mlflow"
    assert req.rows is not None
    assert req.rows.tolist() == [[1.0, 2.0], [3.0, 4.0]]
    assert req.n_rows == 2


def test_mlflow_dataframe_records_in_first_record_order() -> None:
    doc = {"dataframe_records": [{"b": 1, "a": 2}, {"a": 4, "b": 3}]}
    req = parse(doc, MLFLOW)
    assert req.rows is not None
    assert req.rows.tolist() == [[1.0, 2.0], [3.0, 4.0]]


def test_mlflow_mixed_type_frame_is_opaque() -> None:
    req = parse({"dataframe_split": {"columns": ["a", "b"], "data": [[1, "x"], [2, None]]}}, MLFLOW)
    assert (req.fmt, req.rows, req.n_rows) == ("mlflow", None, 2)


def test_mlflow_instances_and_inputs() -> None:
    req = parse({"instances": [[1, 2]]}, MLFLOW)
    assert req.rows is not None
    assert req.rows.tolist() == [[1.0, 2.0]]
    req = parse({"inputs": {"x": [[1, 2], [3, 4]]}}, MLFLOW)
    assert (req.fmt, req.n_rows) == ("mlflow", 2)


@pytest.mark.parametrize(
    ("doc", "expected"),
    [
        ({"params": {}}, (400, "bad_shape")),
        ({"instances": [[1]], "inputs": [[1]]}, (400, "bad_shape")),
        ({"dataframe_records": [{"a": 1, "b": 2}, {"a": 1}]}, (400, "bad_shape")),
        ({"dataframe_records": [{"a": 1}, {"a": 1, "c": 2}]}, (400, "bad_shape")),
        ({"dataframe_records": [{"a": 1}, 5]}, (400, "bad_type")),
        ({"dataframe_records": []}, (400, "bad_shape")),
        ({"dataframe_records": {"a": 1}}, (400, "bad_type")),
        ({"dataframe_split": {"columns": ["a", "b"], "data": [[1, 2], [3]]}}, (400, "bad_shape")),
        ({"dataframe_split": {"columns": ["a"], "data": [[1, 2]]}}, (400, "bad_shape")),
        ({"dataframe_split": {"data": 5}}, (400, "bad_type")),
        ({"dataframe_split": [[1]]}, (400, "bad_type")),
        ({"instances": [["a", 1]]}, (400, "bad_type")),
    ],
)
def test_mlflow_refusals(doc: Any, expected: tuple[int, str]) -> None:
    assert refused(doc, MLFLOW) == expected


def test_mlflow_record_limits() -> None:
    limits = LimitsConfig(max_rows=1, max_features=1)
    assert refused({"dataframe_records": [{"a": 1}, {"a": 2}]}, MLFLOW, limits=limits) == (
        413, "too_many_rows",
    )
    assert refused({"dataframe_records": [{"a": 1, "b": 2}]}, MLFLOW, limits=limits) == (
        400, "too_many_features",
    )


# --------------------------------------------------------------------------- OpenAI


def test_chat_messages_joined() -> None:
    doc = {
        "model": "m",
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [
                {"type": "text", "text": "look at"},
                {"type": "image_url", "image_url": {"url": "data:..."}},
                {"type": "text", "text": "this"},
            ]},
            {"role": "assistant", "content": None, "tool_calls": []},
        ],
        "max_tokens": 256,
        "logprobs": True,
        "top_logprobs": 5,
    }
    req = parse(doc, CHAT)
    assert req.fmt == "openai_chat"
    assert req.texts == ("be brief\nlook at\nthis",)
    assert req.n_rows == 1
    assert req.rows is None
    assert req.extra == {
        "max_tokens": 256, "n": 1, "logprobs": True, "top_logprobs": 5, "stream": False,
    }


def test_chat_prefers_max_completion_tokens() -> None:
    doc = {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 9,
           "max_tokens": 100, "n": 3, "stream": True}
    req = parse(doc, CHAT)
    assert req.extra == {"max_tokens": 9, "n": 3, "logprobs": False, "top_logprobs": 0,
                         "stream": True}


def test_completion_prompts() -> None:
    req = parse({"prompt": "once upon", "logprobs": 0}, COMPLETION)
    assert (req.fmt, req.texts, req.n_rows) == ("openai_completion", ("once upon",), 1)
    assert req.extra["logprobs"] is True
    req = parse({"prompt": ["a", "bb", "ccc"]}, COMPLETION)
    assert (req.texts, req.n_rows) == (("a", "bb", "ccc"), 3)
    req = parse({"prompt": [1, 2, 3]}, COMPLETION)
    assert (req.texts, req.n_rows) == ((), 1)
    req = parse({"prompt": [[1, 2], [3]]}, COMPLETION)
    assert (req.texts, req.n_rows) == ((), 2)


@pytest.mark.parametrize(
    ("doc", "path", "expected"),
    [
        ({"messages": []}, CHAT, (400, "bad_shape")),
        ({"messages": "hi"}, CHAT, (400, "bad_shape")),
        ({"messages": ["hi"]}, CHAT, (400, "bad_type")),
        ({"messages": [{"role": "user", "content": 5}]}, CHAT, (400, "bad_type")),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}, CHAT,
         (400, "bad_type")),
        ({"messages": [{"role": "user", "content": "x"}], "max_tokens": "100000"}, CHAT,
         (400, "bad_type")),
        ({"messages": [{"role": "user", "content": "x"}], "max_tokens": -1}, CHAT,
         (400, "bad_type")),
        ({"messages": [{"role": "user", "content": "x"}], "n": 0}, CHAT, (400, "bad_type")),
        ({"messages": [{"role": "user", "content": "x"}], "logprobs": "yes"}, CHAT,
         (400, "bad_type")),
        ({"messages": [{"role": "user", "content": "x"}], "stream": 1}, CHAT, (400, "bad_type")),
        ({"prompt": []}, COMPLETION, (400, "bad_shape")),
        ({"prompt": ["a", 1]}, COMPLETION, (400, "bad_type")),
        ({"prompt": [[1, "a"]]}, COMPLETION, (400, "bad_type")),
        ({"prompt": 5}, COMPLETION, (400, "bad_type")),
        (["hi"], CHAT, (400, "bad_type")),
    ],
)
def test_openai_refusals(doc: Any, path: str, expected: tuple[int, str]) -> None:
    assert refused(doc, path) == expected


def test_openai_text_and_prompt_limits() -> None:
    limits = LimitsConfig(max_text_chars=10, max_rows=2)
    long_chat = {"messages": [{"role": "user", "content": "x" * 6}] * 2}
    assert refused(long_chat, CHAT, limits=limits) == (413, "text_too_long")
    assert refused({"prompt": ["a", "b", "c"]}, COMPLETION, limits=limits) == (413, "too_many_rows")
    assert parse({"prompt": "x" * 10}, COMPLETION, limits=limits).texts == ("x" * 10,)


# --------------------------------------------------------------------------- plain JSON arrays


def test_json_array_of_numbers_is_one_row() -> None:
    req = parse([1, 2, 3])
    assert (req.fmt, req.n_rows) == ("json_array", 1)
    assert req.rows is not None
    assert req.rows.tolist() == [[1.0, 2.0, 3.0]]


def test_json_array_of_lists_is_rows() -> None:
    req = parse([[1, 2], [3, 4]])
    assert req.rows is not None
    assert (req.rows.shape, req.n_rows) == ((2, 2), 2)


@pytest.mark.parametrize(
    ("doc", "expected"),
    [
        ([[1, 2], [3]], (400, "bad_shape")),
        ([1, "a"], (400, "bad_type")),
        ([1, None], (400, "bad_type")),
    ],
)
def test_json_array_refusals(doc: Any, expected: tuple[int, str]) -> None:
    assert refused(doc) == expected


def test_json_array_row_limit() -> None:
    limits = LimitsConfig(max_rows=2, max_features=3)
    assert refused([[1], [2], [3]], limits=limits) == (413, "too_many_rows")
    assert refused([1, 2, 3, 4], limits=limits) == (400, "too_many_features")


# --------------------------------------------------------------------------- generic validation


def test_body_too_large() -> None:
    limits = LimitsConfig(max_body_bytes=10)
    assert refused([1, 2, 3, 4, 5, 6], V2, limits=limits) == (413, "body_too_large")


def test_bad_encoding() -> None:
    assert refused(b'{"prompt": "\xff\xfe"}', COMPLETION) == (400, "bad_encoding")
    assert refused('{"prompt": "hi"}'.encode("utf-16"), COMPLETION) == (400, "bad_encoding")


def test_utf8_bom_is_accepted() -> None:
    assert parse(b'\xef\xbb\xbf{"prompt": "hi"}', COMPLETION).texts == ("hi",)


@pytest.mark.parametrize(
    "body", [b"", b"{", b'{"a": 1,}', b"[1, 2] [3]", b"nul", b"{'a': 1}", b"1" * 5000]
)
def test_invalid_json(body: bytes) -> None:
    assert refused(body, V1) == (400, "invalid_json")


@pytest.mark.parametrize(
    "body",
    [b"[NaN]", b"[Infinity]", b"[-Infinity]", b'{"instances": [[1, NaN]]}', b'{"a": NaN}'],
)
def test_non_finite_literals(body: bytes) -> None:
    assert refused(body) == (400, "non_finite")


def test_too_deep() -> None:
    limits = LimitsConfig(max_json_depth=4)
    assert refused(b"[[[[[1]]]]]", limits=limits) == (400, "too_deep")
    assert parse(b"[[[[1]]]]", limits=limits).fmt == "json_array"
    # brackets inside strings do not count
    assert parse({"a": "[[[[[[[[[[", "b": [[[1]]]}, limits=limits).fmt == "unknown"
    assert refused({"a": {"b": {"c": {"d": {"e": 1}}}}}, limits=limits) == (400, "too_deep")


def _depth(value: Any) -> int:
    if isinstance(value, list):
        return 1 + max(map(_depth, value), default=0)
    if isinstance(value, dict):
        return 1 + max(map(_depth, value.values()), default=0)
    return 0


def test_depth_scan_matches_a_recursive_walk() -> None:
    rng = random.Random(1)
    tricky = ['[', ']', '{', '"', "\\", '\\"', '"[', "\\\\", 'a\nb', "{[\"", "\u005b"]
    for _ in range(500):
        doc = _random_json(rng)
        if rng.random() < 0.5:
            doc = {"".join(rng.choices(tricky, k=3)): doc, "s": ["".join(rng.choices(tricky, k=5))]}
        body = json.dumps(doc, ensure_ascii=rng.random() < 0.5).encode()
        depth = _depth(doc)
        for limit in {0, 1, max(depth - 1, 0), depth}:
            assert json_depth_exceeds(body, limit) == (depth > limit), (body, limit)


def test_recursion_error_becomes_too_deep() -> None:
    body = b"[" * 100_000 + b"]" * 100_000
    assert refused(body, limits=LimitsConfig(max_body_bytes=1 << 20)) == (400, "too_deep")


@pytest.mark.parametrize(
    "content_type",
    ["application/json", "application/json; charset=utf-8", "Application/JSON",
     "application/vnd.kserve+json", None],
)
def test_json_content_types_accepted(content_type: str | None) -> None:
    assert parse({"instances": [[1]]}, V1, content_type=content_type).fmt == "kserve_v1"


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x", "text/json"])
def test_other_content_types_refused_on_protocol_paths(content_type: str) -> None:
    assert refused({"instances": [[1]]}, V1, content_type=content_type) == (
        415, "unsupported_media_type",
    )


def test_messages_never_echo_the_payload() -> None:
    secret = "SECRET-TOKEN-123"
    for doc in ({"instances": [[1, secret]]}, {"inputs": [{"name": secret, "shape": [1],
                                                           "datatype": "FP32", "data": [secret]}]}):
        with pytest.raises(PayloadError) as info:
            parse(doc, V1 if "instances" in doc else V2)
        assert secret not in str(info.value)


# --------------------------------------------------------------------------- fuzz

_KEYS = ["inputs", "instances", "data", "shape", "datatype", "name", "messages", "content",
         "prompt", "dataframe_split", "dataframe_records", "columns", "parameters",
         "binary_data_size", "type", "text", "b64", "max_tokens", "n", "logprobs"]
_SCALARS: list[Any] = [0, 1, -1, 2, 3.5, 1e308, -0.0, True, False, None, "", "x", "FP32", "BYTES",
                       "BOOL", "INT64", "text", 10**30, [], {}]


def _random_json(rng: random.Random, depth: int = 0) -> Any:
    roll = rng.random()
    if depth > 5 or roll < 0.35:
        return rng.choice(_SCALARS)
    if roll < 0.7:
        return [_random_json(rng, depth + 1) for _ in range(rng.randint(0, 5))]
    return {rng.choice(_KEYS): _random_json(rng, depth + 1) for _ in range(rng.randint(0, 5))}


def _structured(rng: random.Random) -> Any:
    """Near-valid documents with one random part, to reach deep into the parsers."""
    leaf = _random_json(rng, 3)
    shape = rng.choice([[1, 2], [2], [0], [2, 1], leaf])
    return rng.choice([
        {"inputs": [{"name": "x", "shape": shape, "datatype": rng.choice(_SCALARS), "data": leaf}]},
        {"inputs": [{"name": "x", "shape": shape, "datatype": "FP32", "data": [1, leaf]}]},
        {"instances": [leaf, leaf]},
        {"instances": leaf},
        {"inputs": {"a": leaf, "b": [1, 2]}},
        {"dataframe_split": {"columns": ["a"], "data": [[leaf]]}},
        {"dataframe_records": [{"a": leaf}, {"a": 1}]},
        {"messages": [{"role": "user", "content": leaf}]},
        {"messages": [leaf]},
        {"prompt": leaf, "max_tokens": rng.choice(_SCALARS)},
        [leaf, leaf],
        [[1, leaf]],
    ])


PATHS = ["/custom", V2, V1, MLFLOW, CHAT, COMPLETION, "/v1/models/m:classify"]


def _check(body: bytes, path: str, content_type: str | None, headers: dict[str, str]) -> None:
    try:
        req = parse_request(
            body, path=path, content_type=content_type, headers=headers, limits=LIMITS
        )
    except PayloadError as exc:
        assert exc.reason in PayloadError.REASONS
        assert exc.status in (400, 413, 415)
        return
    assert isinstance(req, ParsedRequest)
    assert req.n_rows >= 1
    if req.rows is not None:
        assert req.rows.ndim == 2 and req.rows.dtype == np.float64
        assert req.rows.flags.c_contiguous
        assert np.isfinite(req.rows).all()


def test_fuzz_random_json_only_payload_errors() -> None:
    rng = random.Random(20240601)
    for _ in range(3000):
        doc = _structured(rng) if rng.random() < 0.6 else _random_json(rng)
        body = json.dumps(doc).encode()
        _check(body, rng.choice(PATHS), rng.choice([JSON, None]), {})


def test_fuzz_random_bytes_only_payload_errors() -> None:
    rng = random.Random(7)
    alphabet = b'{}[]",:0123456789.eE-+ truefalsnNaIiy\\u\xff\x00'
    for _ in range(3000):
        n = rng.randint(0, 60)
        if rng.random() < 0.5:
            body = bytes(rng.choice(alphabet) for _ in range(n))
        else:
            body = rng.randbytes(n)
        headers = {}
        if rng.random() < 0.2:
            headers["inference-header-content-length"] = str(rng.randint(-2, 70))
        ctype = rng.choice([JSON, None, "application/octet-stream", "text/plain"])
        _check(body, rng.choice(PATHS), ctype, headers)


def test_fuzz_mutated_binary_requests() -> None:
    rng = random.Random(11)
    for _ in range(1000):
        header = {"inputs": [binary_input("x", rng.choice([[1, 2], [2], [0], [3, 1]]),
                                          rng.choice(["FP32", "FP16", "INT8", "BOOL", "BYTES",
                                                      "BF16", "UINT64", "FP64"]),
                                          rng.randint(0, 24))]}
        body, headers = binary_request(header, [rng.randbytes(rng.randint(0, 24))])
        _check(body, V2, "application/octet-stream", headers)


# --------------------------------------------------------------------------- parse_response


def answer(doc: Any, fmt: str = "unknown", content_type: str | None = JSON) -> Any:
    body = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    return parse_response(body, fmt=fmt, content_type=content_type)


def test_response_v2_probabilities_and_labels() -> None:
    doc = {
        "model_name": "iris", "id": "1",
        "outputs": [
            {"name": "label", "shape": [2], "datatype": "INT64", "data": [1, 0]},
            {"name": "probabilities", "shape": [2, 3], "datatype": "FP32",
             "data": [0.1, 0.7, 0.2, 0.6, 0.3, 0.1]},
        ],
    }
    ans = answer(doc, "oip_v2")
    assert ans.status == 200
    assert ans.labels.dtype == np.int64
    assert ans.labels.tolist() == [1, 0]
    assert ans.probabilities.tolist() == [[0.1, 0.7, 0.2], [0.6, 0.3, 0.1]]


@pytest.mark.parametrize(
    ("data", "read"),
    [
        ([0.25, 0.75], [[0.25, 0.75]]),
        ([0.25, float("nan")], None),  # one NaN: not probabilities
        ([float("inf"), 0.5], None),
        ([1e308, 1e308], [[1e308, 1e308]]),  # finite, though their sum overflows
        ([0.25, True], [[0.25, 1.0]]),
    ],
)
def test_response_v2_named_probabilities_finite_check(data: list[Any], read: Any) -> None:
    # one row's named probabilities (the usual answer) take a short cut past numpy's
    # check: it must accept and refuse exactly what the array check does
    from inference_guard.guard.payload._probabilities import prob_matrix

    found = prob_matrix(data, named=True, shape=[1, 2])
    assert (None if found is None else found.tolist()) == read
    if read is not None:  # and so does a whole answer that holds them
        doc = {"outputs": [{"name": "probabilities", "shape": [1, 2], "datatype": "FP64",
                            "data": data}]}
        assert answer(doc, "oip_v2").probabilities.tolist() == read


@pytest.mark.parametrize(
    ("data", "labels"),
    [([7], [7]), ([[7]], [7]), ([[1], [2]], [1, 2]), ([2**70], None), ([True], None),
     ([1.0], None), ([[1.0]], None), (["cat"], None)],
)
def test_response_label_vector_shapes(data: list[Any], labels: list[int] | None) -> None:
    from inference_guard.guard.payload._probabilities import label_vector

    found = label_vector(data)
    assert (None if found is None else found.tolist()) == labels
    if found is not None:
        assert found.dtype == np.int64


def test_response_v2_probabilities_only_gives_argmax_labels() -> None:
    doc = {"outputs": [{"name": "output_0", "shape": [2, 2], "datatype": "FP64",
                        "data": [[0.9, 0.1], [0.2, 0.8]]}]}
    ans = answer(doc, "oip_v2")
    assert ans.labels.tolist() == [0, 1]
    assert ans.probabilities.shape == (2, 2)


def test_response_v2_labels_only() -> None:
    doc = {"outputs": [{"name": "predict", "shape": [3], "datatype": "INT32", "data": [2, 0, 1]}]}
    ans = answer(doc, "oip_v2")
    assert ans.labels.tolist() == [2, 0, 1]
    assert ans.probabilities is None


def test_response_v2_regression_is_not_recognised() -> None:
    doc = {"outputs": [{"name": "y", "shape": [2, 2], "datatype": "FP32", "data": [3, 4, 5, 6]}]}
    assert answer(doc, "oip_v2") is None


def test_response_v1_predictions() -> None:
    assert answer({"predictions": [1, 0, 2]}, "kserve_v1").labels.tolist() == [1, 0, 2]
    ans = answer({"predictions": [[0.2, 0.8], [0.7, 0.3]]}, "kserve_v1")
    assert ans.labels.tolist() == [1, 0]
    assert ans.probabilities.tolist() == [[0.2, 0.8], [0.7, 0.3]]
    ans = answer({"predictions": [{"label": 2, "probabilities": [0.1, 0.2, 0.7]},
                                  {"label": 0, "probabilities": [0.5, 0.3, 0.2]}]}, "kserve_v1")
    assert ans.labels.tolist() == [2, 0]
    assert ans.probabilities[1].tolist() == [0.5, 0.3, 0.2]


def test_response_tf_outputs_and_mlflow_and_plain_list() -> None:
    ans = answer({"outputs": {"scores": [[0.3, 0.7]], "classes": [1]}}, "tf_columns")
    assert (ans.labels.tolist(), ans.probabilities.tolist()) == ([1], [[0.3, 0.7]])
    ans = answer({"outputs": [[0.6, 0.4]]}, "tf_columns")
    assert ans.labels.tolist() == [0]
    assert answer({"predictions": [0, 1]}, "mlflow").labels.tolist() == [0, 1]
    assert answer([[0.25, 0.75]], "json_array").labels.tolist() == [1]
    assert answer([3, 4], "json_array").labels.tolist() == [3, 4]


def test_response_openai_is_status_only() -> None:
    doc = {"id": "c", "object": "chat.completion",
           "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}]}
    ans = answer(doc, "openai_chat")
    assert (ans.status, ans.labels, ans.probabilities) == (200, None, None)


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (b"not json", JSON),
        (b"\xff\xfe", JSON),
        (b'{"error": "model failed"}', JSON),
        (b'{"predictions": [0.5, 1.5]}', JSON),
        (b'{"predictions": ["cat", "dog"]}', JSON),
        (b'{"predictions": [1, 0]}', "text/event-stream"),
        (b"[" * 50_000 + b"]" * 50_000, JSON),
        (b"42", JSON),
        (b"[]", JSON),
    ],
)
def test_response_unrecognised_is_none(body: bytes, content_type: str) -> None:
    assert parse_response(body, fmt="unknown", content_type=content_type) is None


def test_fuzz_parse_response_never_raises() -> None:
    rng = random.Random(3)
    for _ in range(2000):
        doc = _random_json(rng)
        wrapped = rng.choice([doc, {"predictions": doc}, {"outputs": doc},
                              {"outputs": [{"name": "probs", "datatype": "FP32", "shape": doc,
                                            "data": doc}]}])
        body = json.dumps(wrapped).encode()
        result = parse_response(body, fmt=rng.choice(["oip_v2", "kserve_v1", "unknown"]),
                                content_type=JSON)
        assert result is None or result.status == 200


# --------------------------------------------------------------------------- want_rows=False


def _outcome(body: bytes, *, want_rows: bool) -> tuple[Any, ...]:
    """What parse_request makes of ``body`` on the OIP route, rows left out."""
    try:
        req = parse_request(
            body,
            path="/v2/models/m/infer",
            content_type="application/json",
            headers={},
            limits=LimitsConfig(max_rows=8, max_features=100),
            want_rows=want_rows,
        )
    except PayloadError as exc:
        return ("refused", exc.status, exc.reason)
    return ("parsed", req.fmt, req.n_rows, req.texts, tuple(sorted(req.extra.items())))


def _oip_variants(r: random.Random) -> list[Any]:
    """OIP documents around every check the rows-free path must reproduce."""
    big = [r.uniform(0, 16) for _ in range(64)]
    bases = [
        {"inputs": [{"name": "x", "shape": [1, 64], "datatype": "FP32", "data": big}]},
        {
            "inputs": [
                {"name": "x", "shape": [2, 3], "datatype": "FP64", "data": [[1, 2, 3], [4, 5, 6]]}
            ]
        },
        {
            "inputs": [
                {"name": "x", "shape": [2, 3], "datatype": "FP64", "data": [[1, 2, 3], [4, 5]]}
            ]
        },
        {"inputs": [{"name": "x", "shape": [5], "datatype": "INT8", "data": [1, 2, 3, 4, 5]}]},
        {"inputs": [{"name": "x", "shape": [], "datatype": "FP32", "data": [7]}]},
        {
            "inputs": [
                {
                    "name": "x",
                    "shape": [2, 2, 2],
                    "datatype": "FP32",
                    "data": [[[1, 2], [3, 4]], [[5, 6], [7, 8]]],
                }
            ]
        },
        {
            "inputs": [
                {
                    "name": "x",
                    "shape": [2, 2, 2],
                    "datatype": "FP32",
                    "data": [[[1, 2], [3]], [[5, 6], [7, 8, 9]]],
                }
            ]
        },
        {"inputs": [{"name": "x", "shape": [1, 2], "datatype": "BOOL", "data": [True, False]}]},
        {"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [True, 1.0]}]},
        {"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1e308, 1e308]}]},
        {"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [10**400, 1]}]},
        {"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": ["1", 2]}]},
        {"inputs": [{"name": "x", "shape": [9, 1], "datatype": "FP32", "data": list(range(9))}]},
        {"inputs": [{"name": "x", "shape": [1, 101], "datatype": "FP32", "data": [0] * 101}]},
        {"inputs": [{"name": "x", "shape": [3, 0], "datatype": "FP32", "data": []}]},
        {
            "inputs": [
                {"name": "t", "shape": [3], "datatype": "BYTES", "data": ["a", "b", "c"]},
                {"name": "x", "shape": [2, 2], "datatype": "FP32", "data": [1, 2, 3, 4]},
                {"name": "y", "shape": [1, 2], "datatype": "FP32", "data": [1, "x"]},
            ]
        },
        {
            "inputs": [
                {"name": "t", "shape": [3], "datatype": "BYTES", "data": ["a", "b", "c"]},
                {"name": "x", "shape": [2, 2], "datatype": "FP32", "data": [1, 2, 3, 4]},
                {"name": "y", "shape": [4, 1], "datatype": "INT32", "data": [1, 2, 3, 4]},
            ],
            "parameters": {"binary_data_output": True},
        },
    ]
    out: list[Any] = list(bases)
    for base in bases:
        for _ in range(15):
            out.append(_mutated(r, base))
    return out


def _mutated(r: random.Random, doc: Any) -> Any:
    scalars = [0, -1, 1.5, 1e308, 10**30, True, None, "x", [], {}, [1, [2]], 2**64]
    if isinstance(doc, dict) and doc and r.random() < 0.85:
        key = r.choice(list(doc))
        out = dict(doc)
        out[key] = _mutated(r, doc[key]) if r.random() < 0.7 else r.choice(scalars)
        return out
    if isinstance(doc, list) and doc and r.random() < 0.85:
        items = list(doc)
        i = r.randrange(len(items))
        items[i] = _mutated(r, items[i]) if r.random() < 0.7 else r.choice(scalars)
        if r.random() < 0.2:
            items.pop()
        return items
    return r.choice(scalars)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rows_free_oip_parse_reaches_the_same_verdict(seed: int) -> None:
    """``want_rows=False`` (policies without detectors) must accept and refuse exactly alike."""
    r = random.Random(seed)
    verdicts = set()
    for doc in _oip_variants(r):
        body = json.dumps(doc).encode()
        full = _outcome(body, want_rows=True)
        light = _outcome(body, want_rows=False)
        assert light == full, doc
        verdicts.add(full[0] if full[0] == "parsed" else full[2])
    # the corpus exercises acceptance and each refusal the matrix path can give
    assert {"parsed", "bad_type", "bad_shape", "non_finite", "too_many_rows"} <= verdicts
    assert "too_many_features" in verdicts


def test_rows_free_oip_parse_builds_no_matrix() -> None:
    body = json.dumps(
        {"inputs": [{"name": "x", "shape": [2, 3], "datatype": "FP32", "data": [1, 2, 3, 4, 5, 6]}]}
    ).encode()
    kw: dict[str, Any] = dict(
        path="/v2/models/m/infer",
        content_type="application/json",
        headers={},
        limits=LimitsConfig(),
    )
    light = parse_request(body, want_rows=False, **kw)
    full = parse_request(body, **kw)
    assert light.rows is None and light.n_rows == 2
    assert full.rows is not None and full.rows.shape == (2, 3)


# --------------------------------------------------------------------------- plain_rows


def _plain_variants(r: random.Random) -> list[bytes]:
    """Bodies around every check of the lean lane's reading, and byte-level damage."""
    docs = _oip_variants(r)
    flat = {"name": "x", "shape": [2, 3], "datatype": "FP32", "data": [1, 2, 3, 4, 5, 6]}
    docs += [
        {"inputs": [flat]},
        {"inputs": [dict(flat, shape=[3, 2])]},
        {"inputs": [dict(flat, shape=[6])]},
        {"inputs": [dict(flat, shape=[2, 4])]},
        {"inputs": [dict(flat, data=[1, 2, 3, 4, 5])]},
        {"inputs": [dict(flat, shape=[9, 1], data=list(range(9)))]},
        {"inputs": [dict(flat, shape=[1, 101], data=[0.5] * 101)]},
        {"inputs": [dict(flat, shape=[2, -3])]},
        {"inputs": [dict(flat, shape=[-2, -3])]},
        {"inputs": [dict(flat, shape=[2, 3.0])]},
        {"inputs": [dict(flat, shape=[True, 6])]},
        {"inputs": [dict(flat, shape=[1] * 33, data=[1])]},
        {"inputs": [dict(flat, datatype="BOOL", data=[True] * 6)]},
        {"inputs": [dict(flat, datatype="BYTES", data=["a"] * 6)]},
        {"inputs": [dict(flat, datatype="FP8")]},
        {"inputs": [dict(flat, datatype=["FP32"])]},
        {"inputs": [dict(flat, data=[1, 2, 3, 4, 5, True])]},
        {"inputs": [dict(flat, data=[1, 2, 3, 4, 5, None])]},
        {"inputs": [dict(flat, data=[1e308, 1e308, 1, 1, 1, 1])]},
        {"inputs": [dict(flat, parameters={"a": [[[[[[[[1]]]]]]]]})]},
        {"inputs": [dict(flat, deep=[[[[[[[[1]]]]]]]])]},  # no "r" or "l" in these keys
        {"inputs": [dict(flat, name=[[[[[[[[1]]]]]]]])]},
        {"inputs": [flat], "id": [[[[[[[[[1]]]]]]]]]},
        {"inputs": [flat], "id": 7},
        {"inputs": [dict(flat, name=7)]},
        {"inputs": [dict(flat, shape={}, data=[1])]},
        {"inputs": [dict(flat, shape="6")]},
        {"inputs": [dict(flat, data="123456")]},
        {"inputs": [dict(flat, data={"a": 1, "b": 2, "c": 3, "d": 4, "e": 5, "f": 6})]},
        {"inputs": [flat], "id": "r1"},
        {"inputs": [flat], "deep": [[[[[[[[[[[[1]]]]]]]]]]]]},
        {"inputs": [flat], "outputs": [{"name": "y", "parameters": {"binary_data": True}}]},
        {"inputs": [flat], "parameters": {"binary_data_output": True}},
        {"inputs": [flat, flat]},
        {"inputs": []},
        {"inputs": flat},
        [flat],
    ]
    bodies = [json.dumps(d).encode() for d in docs]
    plain = json.dumps({"inputs": [flat]}).encode()
    bodies += [
        b"\xef\xbb\xbf" + plain,
        plain.replace(b"1, 2", b"1e999, 2"),
        plain.replace(b"1, 2", b"NaN, 2"),
        plain.replace(b"1, 2", b"10000000000000000000000000, 2"),
        plain.replace(b'"x"', b'"\\ud800"'),
        plain.replace(b'"x"', b'"\xff"'),
        plain + b" ",
        b" \n" + plain,
        plain[:-1],
        plain.replace(b'"inputs"', b'"inputs": [], "inputs"'),
        # duplicate keys: orjson keeps the last, the depth limit counts them all
        plain.replace(b'{"inputs"', b'{"inputs": ' + b"[" * 12 + b"]" * 12 + b', "inputs"'),
        plain.replace(b'"data"', b'"data": ' + b"[" * 12 + b"]" * 12 + b', "data"'),
        plain.replace(b'"name"', b'"name": ' + b"{" * 5 + b"}" * 5 + b', "name"'),
        plain.replace(b'"name"', b'"name": "x", "name"'),
        plain.replace(b'"x"', b'"x[0]{1}"'),
    ]
    for _ in range(200):
        b = bytearray(plain)
        i = r.randrange(len(b))
        b[i] = r.choice(b'0123456789[]{},."e-+ aTx')
        bodies.append(bytes(b))
    return bodies


@pytest.mark.parametrize("depth", [8, 3])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_plain_rows_only_accepts_what_the_full_parser_accepts(seed: int, depth: int) -> None:
    """The lean lane's reading: an acceptance must be the full parser's, row count included."""
    from inference_guard.guard.payload._plain import plain_oip_request
    from inference_guard.guard.payload._plain import plain_oip_rows as plain_rows

    limits = LimitsConfig(max_rows=8, max_features=100, max_json_depth=depth)
    accepted = refused_by_full = 0
    for body in _plain_variants(random.Random(seed)):
        n_rows = plain_rows(body, limits)
        try:
            full = parse_request(
                body, path="/v2/models/m/infer", content_type=JSON, headers={}, limits=limits
            )
        except PayloadError:
            full = None
        request = plain_oip_request(body, limits)
        if n_rows is None:
            assert request is None, body
            refused_by_full += full is None
            continue
        accepted += 1
        assert full is not None, body
        assert (full.fmt, full.n_rows, full.texts, full.extra) == ("oip_v2", n_rows, (), {}), body
        _same_request(request, full, body)
    # both sides were exercised: plain acceptances, and bodies only the full parser decides
    assert accepted >= (8 if depth >= 4 else 0) and refused_by_full >= 20


def _same_request(plain: ParsedRequest | None, full: ParsedRequest, body: bytes) -> None:
    """The engine's plain reading of ``body`` is the full parser's, field by field."""
    assert plain is not None, body
    fields = ("fmt", "texts", "n_rows", "extra")
    assert [getattr(plain, f) for f in fields] == [getattr(full, f) for f in fields], body
    assert plain.rows is not None and full.rows is not None, body
    assert plain.rows.dtype == full.rows.dtype == np.float64, body
    assert plain.rows.shape == full.rows.shape and plain.rows.flags.c_contiguous, body
    assert np.array_equal(plain.rows, full.rows), body
    assert plain.inputs == full.inputs, body


def test_plain_rows_takes_the_usual_encodings() -> None:
    from inference_guard.guard.payload._plain import plain_oip_rows as plain_rows

    limits = LimitsConfig()
    for shape, n_rows in (([1, 64], 1), ([4, 16], 4), ([64], 1), ([2, 4, 8], 2)):
        for datatype in ("FP32", "FP64", "INT64", "UINT8"):
            data = list(range(64)) if datatype != "FP32" else [x / 3 for x in range(64)]
            doc = {"inputs": [{"name": "in", "shape": shape, "datatype": datatype, "data": data}]}
            assert plain_rows(json.dumps(doc).encode(), limits) == n_rows
    assert plain_rows(b'{"inputs": [{"shape": [1, 2], "datatype": "FP32", "data": [1, 2]}]}',
                      LimitsConfig(max_body_bytes=10)) is None


def test_orjson_yields_finite_numbers_only() -> None:
    """plain_rows skips the finiteness check on orjson's word: hold orjson to it."""
    import math

    import orjson

    for text in (b"[1e999]", b"[-1e400]", b"[NaN]", b"[Infinity]", b"[-Infinity]"):
        with pytest.raises(orjson.JSONDecodeError):
            orjson.loads(text)
    for text in (b"[18446744073709551616]", b"[-9223372036854775809]", b"[" + b"9" * 308 + b"]"):
        (value,) = orjson.loads(text)
        assert math.isfinite(value), text
    # past float64's range an integer is refused, not read as infinity
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(b"[" + b"9" * 400 + b"]")


def _kserve_variants(r: random.Random) -> list[bytes]:
    rows = [[1, 2.5, 3], [4, 5, 6e10]]
    docs: list[Any] = [
        {"instances": rows},
        {"instances": rows[:1]},
        {"instances": [[0.5] * 100]},
        {"instances": [[0.5] * 101]},
        {"instances": [[1.0]] * 8},
        {"instances": [[1.0]] * 9},
        {"instances": [[1, 2], [3]]},
        {"instances": [[]]},
        {"instances": []},
        {"instances": [1, 2, 3]},
        {"instances": [[1, [2]], [3, 4]]},
        {"instances": [[1, "2"], [3, 4]]},
        {"instances": [[1, None], [3, 4]]},
        {"instances": [[1, True], [3, 4]]},
        {"instances": [["a", "b"]]},
        {"instances": [{"b64": "AAAA"}]},
        {"instances": [[1e308, 1e308]]},
        {"instances": [[[1, 2]], [[3, 4]]]},
        {"instances": rows, "parameters": {"x": 1}},
        {"instances": rows, "deep": [[[[[[[[[1]]]]]]]]]},
        {"instances": rows, "id": "r1"},
        {"instances": [{"a": 1, "b": 2}, {"a": 1, "b": 2}]},
        {"instances": ["ab", "cd"]},
        {"instances": [[True, False]]},
        {"inputs": rows},
        {"examples": [1, 2]},
        [[1, 2]],
    ]
    docs += [_mutated(r, d) for d in docs[:6] for _ in range(15)]
    bodies = [json.dumps(d).encode() for d in docs]
    plain = json.dumps({"instances": rows}).encode()
    bodies += [b"\xef\xbb\xbf" + plain, plain.replace(b"2.5", b"1e999"), plain[:-2]]
    # duplicate keys: orjson keeps the last, the depth limit counts them all
    deep = b"[" * 12 + b"1" + b"]" * 12
    bodies += [
        b'{"instances": ' + deep + b', "instances": [[1, 2]]}',
        b'{"instances": [[1, 2]], "instances": [[1, 2]]}',
        b'{"instances": [[1, 2], [3, 4]], "instances": [[1, 2]]}',
    ]
    for _ in range(200):
        b = bytearray(plain)
        b[r.randrange(len(b))] = r.choice(b'0123456789[]{},."e-+ aTx')
        bodies.append(bytes(b))
    return bodies


@pytest.mark.parametrize("depth", [8, 2])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_plain_kserve_rows_only_accepts_what_the_full_parser_accepts(
    seed: int, depth: int
) -> None:
    from inference_guard.guard.payload._plain import plain_kserve_request, plain_kserve_rows

    limits = LimitsConfig(max_rows=8, max_features=100, max_json_depth=depth)
    accepted = refused_by_full = 0
    for body in _kserve_variants(random.Random(seed)):
        n_rows = plain_kserve_rows(body, limits)
        try:
            full = parse_request(
                body, path="/v1/models/m:predict", content_type=JSON, headers={}, limits=limits
            )
        except PayloadError:
            full = None
        request = plain_kserve_request(body, limits)
        if n_rows is None:
            assert request is None, body
            refused_by_full += full is None
            continue
        accepted += 1
        assert full is not None, body
        assert (full.fmt, full.n_rows, full.texts, full.extra) == ("kserve_v1", n_rows, (), {}), (
            body
        )
        _same_request(request, full, body)
    assert accepted >= (5 if depth >= 3 else 0) and refused_by_full >= 20


# --------------------------------------------------------------------------- hostile findings


@pytest.mark.parametrize(
    "instances",
    [[["NaN"], []], [["a", "b"], ["c"]], [[["a"], ["b", "c"]]]],
    ids=["empty-row", "short-row", "deep"],
)
def test_v1_text_instances_are_shape_checked(instances: Any) -> None:
    # hostile_findings.jsonl: {"instances": [[["NaN"], []]]} reached the model
    assert refused({"instances": instances}, "/v1/models/m:predict") == (400, "bad_shape")
    assert parse({"instances": [["a", "b"], ["c", "d"]]}, "/v1/models/m:predict").n_rows == 2


@pytest.mark.parametrize(
    "examples", [[{"text": {}}, {}], ["x", 1], [{"a": 1}]], ids=["objects", "scalars", "one"]
)
def test_v1_examples_are_refused_on_predict(examples: Any) -> None:
    # hostile_findings.jsonl: {"examples": [...]} on :predict reached the model unchecked
    assert refused({"examples": examples}, "/v1/models/m:predict") == (400, "bad_shape")


def test_v1_examples_must_be_objects_on_classify_and_regress() -> None:
    for verb in ("classify", "regress"):
        path = f"/v1/models/m:{verb}"
        assert parse({"examples": [{"a": 1}, {"a": 2}]}, path).n_rows == 2
        assert refused({"examples": ["x", 1]}, path) == (400, "bad_type")
