"""Invalid Unicode in JSON bodies: refused as ``bad_encoding`` on every path, never passed on."""

from __future__ import annotations

import json
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from inference_guard.guard.config import LimitsConfig
from inference_guard.guard.errors import PayloadError
from inference_guard.guard.payload._json import has_lone_surrogate, load_json
from inference_guard.guard.payload.adapters import parse_request
from inference_guard.middleware.asgi import GuardMiddleware
from tests.conftest import sample
from tests.error_bodies import error_message
from tests.middleware.test_fuzz import JSON_CT, V1, V2, Echo, request

#: a plain OIP v2 request whose tensor name is a lone high surrogate (as an escape)
LONE_IN_NAME = (
    b'{"inputs": [{"name": "\\ud800", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}]}'
)
LONE_BODIES = [
    LONE_IN_NAME,
    b'{"instances": [[1, 2]], "note": "\\udc00"}',  # a lone low surrogate
    b'{"instances": [[1, 2]], "note": "\\ud83d\\u0041"}',  # a high one followed by no low one
    b'{"instances": [[1, 2]], "note": "\\ude00\\ud83d"}',  # a pair in the wrong order
    b'{"instances": [[1, 2]], "\\uD800": 1}',  # in a key, upper case
    b'{"prompt": "hi \\\\\\ud800"}',  # an escaped backslash, then the surrogate
]
#: the same escapes where they are fine: a proper pair, or letters after an escaped backslash
GOOD_BODIES = [
    b'{"instances": [[1, 2]], "note": "\\ud83d\\ude00"}',
    b'{"instances": [[1, 2]], "note": "\\uDBFF\\uDFFF"}',
    b'{"instances": [[1, 2]], "note": "\\\\ud800"}',
]


@pytest.mark.parametrize("body", LONE_BODIES)
def test_lone_surrogates_are_refused_as_bad_encoding(body: bytes) -> None:
    json.loads(body)  # the standard library takes every one of them
    with pytest.raises(PayloadError) as err:
        load_json(body, max_depth=32)
    assert (err.value.status, err.value.reason) == (400, "bad_encoding")
    assert has_lone_surrogate(body)


@pytest.mark.parametrize("body", GOOD_BODIES)
def test_surrogate_pairs_and_escaped_backslashes_are_accepted(body: bytes) -> None:
    assert load_json(body, max_depth=32) == json.loads(body)
    assert not has_lone_surrogate(body)


def test_a_lone_surrogate_in_a_body_orjson_refuses_for_another_reason_too() -> None:
    """The standard library reads what orjson refuses: 1e999 with a surrogate is still refused."""
    body = b'{"prompt": "\\ud800", "n": [1e999]}'
    with pytest.raises(PayloadError) as err:
        load_json(body, max_depth=32)
    assert err.value.reason == "bad_encoding"


@pytest.mark.parametrize(
    ("path", "body"),
    [
        (V2, LONE_IN_NAME),
        (V1, LONE_BODIES[1]),
        ("/v1/completions", LONE_BODIES[5]),
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\ud800"}]}'),
    ],
)
def test_parse_request_refuses_lone_surrogates_on_every_format(path: str, body: bytes) -> None:
    with pytest.raises(PayloadError) as err:
        parse_request(
            body, path=path, content_type="application/json", headers={}, limits=LimitsConfig()
        )
    assert err.value.reason == "bad_encoding"


#: validation only, answers untouched: the lean lane's policy
LEAN: dict[str, Any] = {
    "audit": {"enabled": False},
    "policies": [{"name": "inference", "degrade": {"always": False}}],
}
#: a policy with a detector: the full path only
FULL: dict[str, Any] = {
    "audit": {"enabled": False},
    "policies": [
        {
            "name": "inference",
            "degrade": {"always": False},
            "detectors": [
                {"type": "rate", "params": {"limits": [{"rate": 1000, "per": "1m", "burst": 100}]}}
            ],
        }
    ],
}


@pytest.mark.parametrize("config", [LEAN, FULL], ids=["lean_lane", "full_path"])
@pytest.mark.parametrize(("path", "body"), [(V2, LONE_IN_NAME), (V1, LONE_BODIES[1])])
def test_middleware_answers_400_bad_encoding_and_the_app_never_sees_it(
    config: dict[str, Any], path: str, body: bytes
) -> None:
    echo = Echo()
    mw = GuardMiddleware(echo, config=config, registry=CollectorRegistry())
    assert (mw._front.lean_policies == {"inference"}) is (config is LEAN)
    res = request(mw, path, body, headers=[JSON_CT])
    assert res.status == 400
    assert error_message(res.body, path) == "the request body holds a lone surrogate escape"
    assert echo.calls == 0
    reg = mw.registry
    assert (
        sample(reg, "guard_invalid_requests_total", policy="inference", reason="bad_encoding") == 1
    )
    assert sample(reg, "guard_requests_total", policy="inference", decision="invalid") == 1
    # the same request with a proper pair goes through
    good = body.replace(b"\\ud800", b"\\ud83d\\ude00").replace(b"\\udc00", b"\\ud83d\\ude00")
    assert request(mw, path, good, headers=[JSON_CT]).status == 200
    assert echo.calls == 1
