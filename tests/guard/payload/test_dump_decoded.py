"""``dump_decoded``: orjson's bytes only where they are ``dump_compact``'s, byte for byte.

The rewritten answer a client gets must not change with the encoder: every
document here, decoded by orjson as answers are, is encoded both ways and
compared, as is every answer :func:`review_answer` rewrites.
"""

from __future__ import annotations

import json
import math
import random
import struct
from typing import Any

import orjson
import pytest

from inference_guard.guard.config import DegradeConfig
from inference_guard.guard.payload._json import (
    dump_compact,
    dump_decoded,
    load_json_lenient,
    load_json_lenient_checked,
)
from inference_guard.guard.payload._probabilities import is_prob_name
from inference_guard.guard.payload.degrade import _round_v2_fast, degrade_doc
from inference_guard.guard.payload.review import review_answer

_STRINGS = [
    "",
    "digits",
    "a-e-b",  # holds a marker: json's encoder, same bytes
    "0.00001",
    "null",
    "caf\u00e9",
    "\u2603 snow",
    "\U0001f600",
    "tab\there",
    'quote"back\\slash/',
    "".join(chr(i) for i in range(128)),
    "\x7f",
    "1e-05",
]


def _float(r: random.Random) -> float:
    kind = r.randrange(6)
    if kind == 0:
        x = struct.unpack("<d", r.randbytes(8))[0]
        return x if math.isfinite(x) else 0.5
    if kind == 1:
        return r.random() * 10 ** r.uniform(-12, 20)
    if kind == 2:
        return round(r.random(), r.randint(0, 6))
    if kind == 3:
        return r.choice([0.0, -0.0, 1.0, 1e-4, 1e16, 9.999999999999999e15, 5e-324, 1e-05, 1e-7])
    if kind == 4:
        return -r.random() * 10 ** r.uniform(-6, 17)
    return float(r.randint(-(10**17), 10**17))


def _value(r: random.Random, depth: int = 0) -> Any:
    kind = r.randrange(9 if depth < 4 else 6)
    if kind == 0:
        return _float(r)
    if kind == 1:
        return r.choice([0, 1, -1, 2**63 - 1, -(2**63), 2**64 - 1, r.randint(-(10**9), 10**9)])
    if kind == 2:
        return r.choice(_STRINGS)
    if kind == 3:
        return r.choice([True, False, None])
    if kind == 4:
        return [_float(r) for _ in range(r.randint(0, 12))]
    if kind == 5:
        return [round(r.random(), 2) for _ in range(r.randint(1, 12))]
    if kind == 6:
        return [_value(r, depth + 1) for _ in range(r.randint(0, 4))]
    return {r.choice(_STRINGS) + str(i): _value(r, depth + 1) for i in range(r.randint(0, 4))}


@pytest.mark.parametrize("seed", range(4))
def test_dump_decoded_is_dump_compact_on_decoded_documents(seed: int) -> None:
    r = random.Random(seed)
    took_orjson = 0
    for _ in range(3000):
        doc = orjson.loads(json.dumps(_value(r)).encode())  # as an answer is decoded
        expected = json.dumps(doc, separators=(",", ":")).encode()
        assert dump_compact(doc) == expected
        assert dump_decoded(doc) == expected, doc
        took_orjson += orjson.dumps(doc) == expected
    assert took_orjson > 500  # the comparison covers both encoders


@pytest.mark.parametrize(
    "doc",
    [
        {"n": 2**64},  # past orjson's integers
        {"s": "\ud800"},  # a lone surrogate (json's lenient reading makes them)
        {"x": float("nan"), "y": float("inf"), "z": -float("inf")},
        {"x": 1e-05, "y": 1e16, "z": -1e-300},
        {"s": "\x7f\u00e9"},
    ],
)
def test_what_orjson_would_write_otherwise_is_left_to_json(doc: dict[str, Any]) -> None:
    assert dump_decoded(doc) == json.dumps(doc, separators=(",", ":")).encode()


def _v2_answer(r: random.Random) -> bytes:
    k = r.randint(2, 12)
    probs = [
        _float(r) if r.random() < 0.1 else r.random() * r.choice([1, 1e-3, 1e-6]) for _ in range(k)
    ]
    doc = {
        "model_name": r.choice(_STRINGS),
        "id": r.randbytes(16).hex(),
        "outputs": [
            {"name": "label", "shape": [1], "datatype": "INT64", "data": [r.randrange(k)]},
            {"name": "probabilities", "shape": [1, k], "datatype": "FP32", "data": probs},
        ],
    }
    if r.random() < 0.3:
        doc["outputs"].append(
            {
                "name": "logits",
                "shape": [1, k],
                "datatype": "FP32",
                "data": [_float(r) for _ in range(k)],
            }
        )
    body = json.dumps(doc, ensure_ascii=r.random() < 0.5).encode()
    if r.random() < 0.1:
        body = body.replace(b'"data": [' + json.dumps(probs[0]).encode(), b'"data": [NaN', 1)
    return body


@pytest.mark.parametrize("decimals", [0, 2, 3, 6])
def test_reviewed_answers_are_the_bytes_json_would_write(decimals: int) -> None:
    r = random.Random(decimals)
    spec = DegradeConfig(decimals=decimals, noise=0.0)
    for _ in range(1500):
        body = _v2_answer(r)
        doc = load_json_lenient(body, "application/json")
        try:  # the general route may fail on extreme values: review_answer then gives None
            changed = degrade_doc(doc, "oip_v2", spec, None)
        except Exception:
            changed = None
        if changed is None:
            expected = None
        else:
            expected = json.dumps(doc, separators=(",", ":")).encode() if changed else body
        got = review_answer(body, "application/json", fmt="oip_v2", spec=spec, read=True)
        assert got.body == expected, body


def test_only_what_orjson_decoded_is_marked_strict() -> None:
    assert load_json_lenient_checked(b'{"a": [1.5]}', None) == ({"a": [1.5]}, True)
    doc, strict = load_json_lenient_checked(b'{"a": [NaN]}', "application/json")
    assert math.isnan(doc["a"][0]) and not strict
    assert load_json_lenient_checked(b"{", None) == (None, False)
    assert load_json_lenient_checked(b"{}", "text/plain") == (None, False)


def _old_round_v2_fast(outputs: list[Any], spec: DegradeConfig) -> bool:
    """The per-element checks ``_round_v2_fast`` made before it made them in C."""
    for out in outputs:
        if not is_prob_name(out.get("name")):
            continue
        data = out.get("data")
        if not isinstance(data, list) or not data:
            return False
        if not all(type(x) is float or type(x) is int for x in data):
            return False
        if not all(0.0 <= x <= 1.0 for x in data):
            return False
        assert spec.decimals is not None
        out["data"] = [round(x, spec.decimals) + 0.0 for x in data]
        return True
    return False


_ODD = [
    float("nan"),
    float("inf"),
    -float("inf"),
    -0.0,
    1.0,
    0.0,
    1,
    0,
    True,
    False,
    None,
    "0.5",
    [0.5],
    -1e-9,
    1.0000001,
    2,
]


@pytest.mark.parametrize("seed", range(3))
def test_rounding_fast_path_takes_exactly_what_it_took(seed: int) -> None:
    r = random.Random(seed)
    spec = DegradeConfig(decimals=2, noise=0.0)
    taken = 0
    for _ in range(4000):
        data = [r.random() for _ in range(r.randint(0, 6))]
        for _ in range(r.choice([0, 0, 1, 2])):
            data.insert(r.randint(0, len(data)), r.choice(_ODD))
        outputs = [{"name": "probabilities", "data": data}]
        copies = [{"name": "probabilities", "data": list(data)}]
        new = _round_v2_fast(outputs, spec)
        assert new == _old_round_v2_fast(copies, spec), data
        assert repr(outputs) == repr(copies)
        taken += new
    assert 1000 < taken < 3900
