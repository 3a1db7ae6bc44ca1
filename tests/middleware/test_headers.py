"""Repeated request headers: joined in linear time, conflicting credentials refused."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from inference_guard.middleware.asgi import GuardMiddleware
from tests.conftest import sample
from tests.middleware.test_fuzz import JSON_CT, V1, Echo, request


def guard() -> GuardMiddleware:
    return GuardMiddleware(
        Echo(), config={"audit": {"enabled": False}}, registry=CollectorRegistry()
    )


def test_repeated_headers_are_joined_in_order() -> None:
    mw = guard()
    scope = {
        "headers": [
            (b"accept", b"a"),
            (b"x-api-key", b"k"),
            (b"accept", b"b"),
            (b"x-api-key", b"k"),  # the same credential twice: kept once
            (b"accept", b"c"),
            (b"via", b"1.1 p"),
        ]
    }
    assert mw.guard.identifier.read_headers(scope["headers"]) == {
        b"accept": b"a, b, c",
        b"x-api-key": b"k",
        b"via": b"1.1 p",
    }


def test_many_repeated_headers_are_joined_whole() -> None:
    """40 000 copies of a 100-byte header: 4 MB joined once (joined as they came, 80 GB copied)."""
    mw = guard()
    value = b"v" * 100
    joined = mw.guard.identifier.read_headers([(b"x-junk", value)] * 40_000)[b"x-junk"]
    assert joined == b", ".join([value] * 40_000)


def test_conflicting_credentials_are_still_refused() -> None:
    mw = guard()
    headers = [JSON_CT, (b"x-api-key", b"a"), (b"accept", b"x"), (b"x-api-key", b"b")]
    res = request(mw, V1, b'{"instances": [[1, 2]]}', headers=headers)
    assert res.status == 400
    reg = mw.registry
    assert sample(reg, "guard_invalid_requests_total", policy="inference", reason="bad_header") == 1
