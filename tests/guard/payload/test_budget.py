"""The parse budget: dear bodies are refused before they are decoded or converted.

Cost is held by structure, never by a clock: a body over a budget is refused
with its reason while the decoder (``orjson.loads``) or the conversion to a
matrix (``to_float``) is never called, which is what bounds its cost.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest

import inference_guard.guard.payload._json as json_module
import inference_guard.guard.payload._oip as oip_module
import inference_guard.guard.payload._tensor as tensor_module
from inference_guard.guard.config import GuardConfig, LimitsConfig
from inference_guard.guard.errors import ConfigurationError, PayloadError
from inference_guard.guard.payload._budget import json_budget_exceeded, outside_strings
from inference_guard.guard.payload._json import json_depth_exceeds
from inference_guard.guard.payload._plain import plain_kserve_rows, plain_oip_rows
from inference_guard.guard.payload.adapters import ParsedRequest, parse_request

V1 = "/v1/models/m:predict"
V2 = "/v2/models/m/infer"
CAP = LimitsConfig().max_body_bytes


def deep_lists(depth: int = 27, size: int = 950_000) -> bytes:
    """The issue's first body: lists nested ``depth`` deep, filling ``size`` bytes."""
    unit = b"[" * (depth - 1) + b"1" + b"]" * (depth - 1)
    return b'{"instances":[' + b",".join([unit] * (size // (len(unit) + 1))) + b"]}"


def small_lists(n: int = 262_000) -> bytes:
    """The issue's second body: ``n`` one-element lists."""
    return b'{"instances":[' + b",".join([b"[1]"] * n) + b"]}"


def binary_rows(rows: int, width: int) -> tuple[bytes, dict[str, str]]:
    """The issue's third body: Triton binary FP32 rows (``rows`` x ``width``)."""
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "x",
                    "shape": [rows, width],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": rows * width * 4},
                }
            ]
        }
    ).encode()
    data = struct.pack(f"<{rows * width}f", *([0.5] * (rows * width)))
    return header + data, {"inference-header-content-length": str(len(header))}


def parse(
    body: bytes,
    path: str = V1,
    limits: LimitsConfig | None = None,
    headers: dict[str, str] | None = None,
    **kw: Any,
) -> ParsedRequest:
    return parse_request(
        body,
        path=path,
        content_type="application/octet-stream" if headers else "application/json",
        headers=headers or {},
        limits=limits or LimitsConfig(),
        **kw,
    )


def refused(body: bytes, path: str = V1, **kw: Any) -> tuple[int, str]:
    with pytest.raises(PayloadError) as info:
        parse(body, path, **kw)
    return info.value.status, info.value.reason


@pytest.fixture
def decoded(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """The sizes of the bodies the JSON decoder was given."""
    sizes: list[int] = []
    loads = json_module.orjson.loads

    def counting(body: bytes) -> Any:
        sizes.append(len(body))
        return loads(body)

    monkeypatch.setattr(json_module.orjson, "loads", counting)
    yield sizes


@pytest.fixture
def converted(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """The number of values each call of the matrix conversion (``to_float``) was given."""
    counts: list[int] = []
    to_float = tensor_module.to_float

    def counting(data: Any, found: Any, **kw: Any) -> Any:
        counts.append(len(found.values))
        return to_float(data, found, **kw)

    monkeypatch.setattr(tensor_module, "to_float", counting)
    monkeypatch.setattr(oip_module, "to_float", counting)
    yield counts


# ------------------------------------------------------------------ the three bodies


def test_lists_nested_27_deep_are_refused_undecoded(decoded: list[int]) -> None:
    body = deep_lists()
    assert len(body) <= CAP
    assert refused(body) == (413, "too_many_containers")
    assert decoded == []


def test_262_000_small_lists_are_refused_undecoded(decoded: list[int]) -> None:
    body = small_lists()
    assert len(body) <= CAP
    assert refused(body) == (413, "too_many_containers")
    assert decoded == []


def test_wide_binary_rows_are_refused_before_any_matrix(converted: list[int]) -> None:
    body, headers = binary_rows(4, 65_500)  # 1 MB: the 16 rows are over the body cap
    assert len(body) <= CAP
    assert refused(body, V2, headers=headers) == (413, "too_many_values")
    # and under the limit the same rows pass: the budget is the only thing that refused
    limits = LimitsConfig(max_values=4 * 65_500)
    assert parse(body, V2, limits, headers=headers).rows.shape == (4, 65_500)  # type: ignore[union-attr]
    assert converted == []  # binary tensors are never converted from lists


# ------------------------------------------------------------------ each budget, its reason


@pytest.mark.parametrize(
    ("limits", "body", "reason"),
    [
        (LimitsConfig(max_json_containers=10), small_lists(10), "too_many_containers"),
        (
            LimitsConfig(max_json_keys=10),
            json.dumps({"instances": [[1]], **{f"k{i}": 1 for i in range(10)}}).encode(),
            "too_many_keys",
        ),
        (
            LimitsConfig(max_json_elements=100),
            json.dumps({"instances": [[0.5] * 99]}).encode(),
            "too_many_elements",
        ),
    ],
    ids=["containers", "keys", "elements"],
)
def test_each_json_budget_refuses_undecoded_with_its_reason(
    limits: LimitsConfig, body: bytes, reason: str, decoded: list[int]
) -> None:
    assert refused(body, limits=limits) == (413, reason)
    assert decoded == []


@pytest.mark.parametrize(
    ("limits", "body"),
    [
        (LimitsConfig(max_json_containers=12), small_lists(10)),  # 10 rows, a list, an object
        (
            LimitsConfig(max_json_keys=11),
            json.dumps({"instances": [[1]], **{f"k{i}": 1 for i in range(10)}}).encode(),
        ),
        (LimitsConfig(max_json_elements=101), json.dumps({"instances": [[0.5] * 98]}).encode()),
    ],
    ids=["containers", "keys", "elements"],
)
def test_a_body_at_its_budget_is_read(limits: LimitsConfig, body: bytes) -> None:
    assert parse(body, limits=limits).fmt == "kserve_v1"


def test_structure_inside_strings_is_not_counted(decoded: list[int]) -> None:
    # 4 containers, 2 keys, 41 commas outside the strings: 46 elements at most
    limits = LimitsConfig(max_json_containers=4, max_json_keys=2, max_json_elements=46)
    # brackets, commas, colons and escaped quotes inside strings; few strings (cut out
    # by slicing) and many (by parity)
    text = '[{,:\\"' * 50
    few = json.dumps({"instances": [[1, 2]], "note": text}).encode()
    many = json.dumps({"instances": [[1, 2]], "n": [text] * 40}).encode()
    assert many.count(b'"') > 64
    assert json_budget_exceeded(few, limits) is None
    assert json_budget_exceeded(many, limits) is None
    assert json_budget_exceeded(many, replace(limits, max_json_elements=45)) == (
        "too_many_elements"
    )
    assert parse(few, limits=limits).n_rows == 1


def test_outside_strings_pairs_quotes_by_slicing_and_by_parity() -> None:
    keep = bytes(b for b in range(256) if b not in b'[],"')
    few = b'["a[", ["b,"], "c\\"["]'
    assert outside_strings(few, keep).tobytes() == b"[,[],]"
    many = b"[" + b",".join([b'"x[,"'] * 100) + b",[1]]"
    assert outside_strings(many, keep).tobytes() == b"[" + b"," * 100 + b"[]]"


def test_depth_check_ignores_brackets_in_strings() -> None:
    nested = b"[" * 5 + b"]" * 5
    assert json_depth_exceeds(nested, 4)
    assert not json_depth_exceeds(nested, 5)
    in_string = json.dumps({"a": "[" * 100, "b": ["[[[" for _ in range(100)]}).encode()
    assert not json_depth_exceeds(in_string, 2)


def test_a_deep_body_over_budget_still_says_too_deep(decoded: list[int]) -> None:
    body = b"[" * 50_000 + b"]" * 50_000
    assert refused(body, limits=LimitsConfig(max_json_containers=100)) == (400, "too_deep")
    assert decoded == []


# ------------------------------------------------------------------ values: rows x features


def test_wide_kserve_rows_are_refused_before_conversion(converted: list[int]) -> None:
    body = json.dumps({"instances": [[0.5] * 600] * 2}).encode()
    assert refused(body, limits=LimitsConfig(max_values=1000)) == (413, "too_many_values")
    assert converted == []
    assert parse(body, limits=LimitsConfig(max_values=1200)).rows.shape == (2, 600)  # type: ignore[union-attr]
    assert converted == [1200]


@pytest.mark.parametrize("want_rows", [True, False])
def test_a_wide_oip_tensor_is_refused_before_conversion(
    want_rows: bool, converted: list[int]
) -> None:
    doc = {"inputs": [{"name": "x", "shape": [2, 600], "datatype": "FP32", "data": [1] * 1200}]}
    body = json.dumps(doc).encode()
    limits = LimitsConfig(max_values=1000)
    assert refused(body, V2, limits=limits, want_rows=want_rows) == (413, "too_many_values")
    assert converted == []


def test_rows_and_features_are_still_named_first() -> None:
    limits = LimitsConfig(max_values=10, max_rows=2, max_features=100)
    rows = json.dumps({"instances": [[1]] * 3}).encode()
    assert refused(rows, limits=limits) == (413, "too_many_rows")
    doc = {"inputs": [{"name": "x", "shape": [3, 5], "datatype": "FP32", "data": [1] * 15}]}
    assert refused(json.dumps(doc).encode(), V2, limits=limits) == (413, "too_many_rows")


def test_mlflow_and_json_array_matrices_have_the_values_budget() -> None:
    limits = LimitsConfig(max_values=10)
    split = {"dataframe_split": {"columns": list("abcdef"), "data": [[1] * 6] * 2}}
    assert refused(json.dumps(split).encode(), "/invocations", limits=limits) == (
        413,
        "too_many_values",
    )
    assert refused(json.dumps([[1] * 6] * 2).encode(), "/custom", limits=limits) == (
        413,
        "too_many_values",
    )


# ------------------------------------------------------------------ the plain readers


def test_plain_readers_leave_budget_refusals_to_the_full_parser() -> None:
    """A plain body over a budget is not the lane's: ``None``, and the full parser refuses it."""
    kserve = json.dumps({"instances": [[1, 2]] * 20}).encode()
    oip = json.dumps(
        {"inputs": [{"name": "x", "shape": [2, 600], "datatype": "FP32", "data": [1] * 1200}]}
    ).encode()
    loose = LimitsConfig()
    assert plain_kserve_rows(kserve, loose) == 20
    assert plain_oip_rows(oip, loose) == 2
    for limits in (
        LimitsConfig(max_json_containers=20),
        LimitsConfig(max_json_elements=40),
        LimitsConfig(max_values=39),
    ):
        assert plain_kserve_rows(kserve, limits) is None
        assert refused(kserve, limits=limits)[0] == 413
    assert plain_oip_rows(oip, LimitsConfig(max_values=1199)) is None
    assert plain_oip_rows(oip, LimitsConfig(max_json_elements=1000)) is None


def test_plain_readers_take_bodies_over_the_offload_size_within_the_budget() -> None:
    body = json.dumps({"instances": [[1, 2]] * 20}).encode()
    assert plain_kserve_rows(body, LimitsConfig(offload_bytes=0)) == 20


# ------------------------------------------------------------------ config


def test_budget_limits_are_read_from_the_config() -> None:
    limits = GuardConfig.from_dict(
        {
            "limits": {
                "max_json_containers": 100,
                "max_json_keys": 50,
                "max_json_elements": 1000,
                "max_values": 500,
                "offload_bytes": 0,
                "parse_timeout_s": 0.25,
            }
        }
    ).limits
    assert (
        limits.max_json_containers,
        limits.max_json_keys,
        limits.max_json_elements,
        limits.max_values,
        limits.offload_bytes,
        limits.parse_timeout_s,
    ) == (100, 50, 1000, 500, 0, 0.25)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("max_json_containers", 0),
        ("max_json_keys", "many"),
        ("max_json_elements", 1.5),
        ("max_values", -1),
        ("offload_bytes", -1),
        ("parse_timeout_s", 0),
        ("parse_timeout_s", float("inf")),
    ],
)
def test_bad_budget_limits_name_their_key(key: str, value: object) -> None:
    with pytest.raises(ConfigurationError) as info:
        GuardConfig.from_dict({"limits": {key: value}})
    assert info.value.key == f"limits.{key}"
