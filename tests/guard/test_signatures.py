"""Model signatures: the ``signature:`` config key, the check, the cache (guard.signatures)."""

from __future__ import annotations

import asyncio
import json

import pytest
from prometheus_client import CollectorRegistry

from inference_guard.guard.config import GuardConfig, SignatureConfig, TensorSpec
from inference_guard.guard.errors import ConfigurationError, PayloadError
from inference_guard.guard.pipeline import Guard
from inference_guard.guard.signatures import Signatures, check_inputs, parse_metadata

SPECS = (TensorSpec("x", "FP32", (-1, 4)),)


def policy(signature: object) -> dict[str, object]:
    return {"policies": [{"name": "p", "signature": signature}]}


def test_signature_config_is_read_and_validated() -> None:
    cfg = GuardConfig.from_dict(
        policy({"inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}], "ttl_s": 5})
    )
    assert cfg.policies[0].signature == SignatureConfig(False, 5.0, SPECS)
    assert GuardConfig.from_dict(policy({"learn": True})).policies[0].signature.learn
    assert not GuardConfig.default().policies[0].signature.enabled
    for bad, key in [
        ({"learn": "yes"}, "signature.learn"),
        ({"inputs": [{"name": "x", "datatype": "FP33", "shape": [1]}]}, "datatype"),
        ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [-2]}]}, "shape"),
        ({"inputs": [{"name": "x", "datatype": "FP32"}]}, "shape"),
        ({"learn": True, "inputs": [{"name": "x", "datatype": "FP32", "shape": [1]}]}, "learn"),
        ({"inputs": "x"}, "inputs"),
        ({"colour": 1}, "colour"),
    ]:
        with pytest.raises(ConfigurationError, match=key):
            GuardConfig.from_dict(policy(bad))


def test_metadata_is_parsed_or_refused() -> None:
    doc = {"name": "m", "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}]}
    assert parse_metadata(json.dumps(doc).encode()) == SPECS
    for bad in [b"nope", b"{}", b'{"inputs": []}', b'{"inputs": [{"name": "x"}]}']:
        assert parse_metadata(bad) is None


@pytest.mark.parametrize(
    ("inputs", "reason"),
    [
        ([{"name": "x", "datatype": "FP64", "shape": [2, 4]}], "bad_type"),
        ([{"name": "x", "datatype": "FP32", "shape": [2, 5]}], "bad_shape"),
        ([{"name": "x", "datatype": "FP32", "shape": [8]}], "bad_shape"),
        ([{"name": "y", "datatype": "FP32", "shape": [2, 4]}], "bad_shape"),
        ([], "bad_shape"),
    ],
    ids=["datatype", "size", "rank", "name", "missing"],
)
def test_requests_that_do_not_match_are_refused(inputs: list[object], reason: str) -> None:
    with pytest.raises(PayloadError) as refused:
        check_inputs(inputs, SPECS)
    assert (refused.value.status, refused.value.reason) == (400, reason)


def test_matching_requests_pass() -> None:
    check_inputs([{"name": "x", "datatype": "FP32", "shape": [7, 4]}], SPECS)


def test_learned_signatures_are_cached_for_their_ttl() -> None:
    now = [0.0]
    asked: list[str] = []
    answers = {
        "/v2/models/m": (200, b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}]}'),
        "/v2/models/gone": (404, b'{"error": "no such model"}'),
    }

    async def source(path: str) -> tuple[int, bytes]:
        asked.append(path)
        return answers[path]

    guard = Guard(
        GuardConfig.from_dict(policy({"learn": True, "ttl_s": 10})), registry=CollectorRegistry()
    )
    sig = Signatures(SignatureConfig(learn=True, ttl_s=10), guard.counts, clock=lambda: now[0])
    sig.source = source

    async def run() -> None:
        assert await sig.lookup("/v2/models/m/infer") == SPECS
        assert await sig.lookup("/v2/models/m/infer") == SPECS
        assert await sig.lookup("/v2/models/gone/infer") is None
        assert await sig.lookup("/v2/models/gone/infer") is None
        assert asked == ["/v2/models/m", "/v2/models/gone"]
        now[0] = 11.0
        assert await sig.lookup("/v2/models/m/versions/2/infer") is None
        assert await sig.lookup("/v2/models/m/infer") == SPECS
        assert asked[-1] == "/v2/models/m"

    answers["/v2/models/m/versions/2"] = (500, b"")
    asyncio.run(run())
    guard.metrics.tally.flush()
    errors = guard.metrics.registry.get_sample_value(
        "guard_errors_total", {"component": "signature"}
    )
    assert errors == 2  # "gone" once per TTL, version 2 once


def _parsed(path: str, doc: object) -> object:
    from inference_guard.guard.payload.adapters import parse_request

    cfg = GuardConfig.default()
    return parse_request(
        json.dumps(doc).encode(),
        path=path,
        content_type="application/json",
        headers={},
        limits=cfg.limits,
    )


V1 = "/v1/models/m:predict"


@pytest.mark.parametrize(
    ("path", "doc", "reason"),
    [
        (V1, {"instances": [[1, 2, 3, 4]]}, None),
        (V1, {"instances": [[1, 2, 3]]}, "bad_shape"),  # another width
        (V1, {"instances": [1, 2, 3, 4]}, "bad_shape"),  # a vector: instances of rank 0
        (V1, {"instances": [[[1, 2], [3, 4]]]}, "bad_shape"),  # instances of rank 2
        (V1, {"instances": ["seven", "eight"]}, "bad_type"),  # strings
        (V1, {"instances": [{"a": 1}]}, "bad_type"),  # objects
        ("/v1/models/m:classify", {"examples": [{"a": 1}]}, "bad_type"),
        ("/invocations", {"dataframe_split": {"data": [[1, 2, 3, 4]]}}, None),
        ("/invocations", {"dataframe_split": {"data": [[1, 2, 3, 4, 5]]}}, "bad_shape"),
        ("/invocations", {"instances": [[[1, 2, 3, 4]]]}, "bad_shape"),
        ("/invocations", {"dataframe_records": [{"a": "x", "b": 1}]}, "bad_type"),
    ],
)
def test_untyped_rows_are_held_to_a_one_input_signature(
    path: str, doc: object, reason: str | None
) -> None:
    from inference_guard.guard.signatures import check_rows

    parsed = _parsed(path, doc)
    if reason is None:
        check_rows(parsed, SPECS)  # type: ignore[arg-type]
        return
    with pytest.raises(PayloadError) as refused:
        check_rows(parsed, SPECS)  # type: ignore[arg-type]
    assert (refused.value.status, refused.value.reason) == (400, reason)


def test_rows_are_not_checked_against_what_does_not_say_how_they_map() -> None:
    from inference_guard.guard.signatures import check_rows

    parsed = _parsed(V1, {"instances": ["seven"]})
    check_rows(parsed, (TensorSpec("t", "BYTES", (-1,)),))  # type: ignore[arg-type]
    check_rows(parsed, (*SPECS, TensorSpec("y", "FP32", (-1, 1))))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "doc",
    [
        {"inputs": [[[1, 2], [3, 4]]]},  # column form, a list
        {"inputs": {"x": [[[1, 2], [3, 4]]]}},  # column form, one named column
    ],
)
def test_the_rank_of_column_form_instances_is_checked_too(doc: object) -> None:
    from inference_guard.guard.signatures import check_rows

    with pytest.raises(PayloadError) as refused:
        check_rows(_parsed(V1, doc), SPECS)  # type: ignore[arg-type]
    assert refused.value.reason == "bad_shape"
