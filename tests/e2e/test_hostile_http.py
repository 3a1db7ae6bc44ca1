"""Hostile HTTP against the guarded demo model in a real uvicorn on 127.0.0.1.

The in-process fuzzing (tests/middleware/test_fuzz.py) controls every ASGI
message; this checks that the same refusals hold, and the same bugs are
reachable, through a real HTTP server and its own parsing.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import Server, run_server
from tests.e2e.test_server import metric
from tests.error_bodies import error_message

pytestmark = pytest.mark.e2e

V2 = "/v2/models/digits/infer"
V1 = "/v1/models/digits:predict"
ROW = [1.0] * 64
JSON = {"content-type": "application/json"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Path]]:
    tmp = tmp_path_factory.mktemp("hostile")
    audit = tmp / "audit.jsonl"
    config: dict[str, Any] = {
        "audit": {"path": str(audit)},
        "limits": {"max_body_bytes": 65536},
        "policies": [
            {
                "name": "inference",
                "routes": [V2, V1],
                "quarantine_s": 600,
                "detectors": [
                    {
                        "type": "rate",
                        "action": "block",
                        "params": {"limits": [{"rate": 1, "per": "1h", "burst": 2}]},
                    }
                ],
            }
        ],
    }
    # as guard demo runs: the guard, not uvicorn, reads X-Forwarded-For (see the last test)
    with run_server(tmp, config=config, uvicorn_args=("--no-proxy-headers",)) as srv:
        yield srv, audit


def raw_http(srv: Server, request: bytes) -> bytes:
    """Send bytes as they are; return what the server answered before closing."""
    with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as sock:
        sock.sendall(request)
        data = b""
        try:
            while chunk := sock.recv(65536):
                data += chunk
        except TimeoutError:
            pass
    return data


def error_shape(r: httpx.Response) -> None:
    error_message(r.content, r.url.path, r.headers["x-request-id"])


@pytest.mark.parametrize(
    ("body", "headers", "status"),
    [
        (b'{"instances": [[1, NaN]]}', JSON, 400),
        (b'{"instances": [[1, 1e400]]}', JSON, 400),
        (b'{"instances": [["\xe9"]]}', JSON, 400),
        (b"[" * 5000 + b"]" * 5000, JSON, 400),
        (b'{"instances": [[1]]}', {"content-type": "text/plain"}, 415),
        (b'{"instances": [[1]]}', {**JSON, "x-forwarded-for": "10.0.0.1"}, 400),
        (b'{"instances": [[1]]}', {**JSON, "x-api-key": "k" * 5000}, 400),
        (b"[1," * 30000 + b"1]", JSON, 413),
    ],
    ids=["nan", "1e400", "latin-1", "deep", "text-plain", "spoofed-xff", "huge-key", "too-big"],
)
def test_bad_input_over_real_http(
    server: tuple[Server, Path], body: bytes, headers: dict[str, str], status: int
) -> None:
    srv, _ = server
    if "x-forwarded-for" not in headers:
        # keyed, so the refusals do not eat the rate limit of the address (with an API key the
        # forwarded header is ignored rather than refused)
        headers = {"x-api-key": "bad-input", **headers}
    r = httpx.post(srv.url + V1, content=body, headers=headers, timeout=10)
    assert r.status_code == status, r.text
    error_shape(r)


def test_chunked_body_over_the_cap_gets_413(server: tuple[Server, Path]) -> None:
    srv, _ = server

    def chunks() -> Iterator[bytes]:
        yield b'{"instances": ['
        for _ in range(20_000):
            yield b"[1.0],"
        yield b"[1.0]]}"

    r = httpx.post(
        srv.url + V1, content=chunks(), headers={**JSON, "x-api-key": "chunky"}, timeout=10
    )
    assert r.status_code == 413
    error_shape(r)


def test_conflicting_api_keys_over_raw_http(server: tuple[Server, Path]) -> None:
    srv, _ = server
    body = b'{"instances": [[1]]}'
    answer = raw_http(
        srv,
        b"POST " + V1.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"X-Api-Key: a\r\nX-Api-Key: b\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
        % (len(body), body),
    )
    assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
    assert b"x-request-id: " in answer.lower()


def test_guard_counts_refusals_and_no_errors(server: tuple[Server, Path]) -> None:
    srv, _ = server
    httpx.post(srv.url + V1, content=b"{nope", headers={**JSON, "x-api-key": "count"}, timeout=10)
    text = httpx.get(srv.url + "/metrics", timeout=10).text
    assert metric(text, "guard_invalid_requests_total", reason="invalid_json") >= 1
    assert metric(text, "guard_errors_total", component="internal") == 0


def test_quarantine_holds_against_a_zero_element_tensor(server: tuple[Server, Path]) -> None:
    srv, _ = server
    key = {**JSON, "x-api-key": "quarantined-attacker"}
    ok = {"inputs": [{"name": "input-0", "shape": [1, 64], "datatype": "FP32", "data": ROW}]}
    trojan = {
        "inputs": [
            {"name": "pad", "shape": [0, 1, 1], "datatype": "FP32", "data": []},
            *ok["inputs"],
        ]
    }
    with httpx.Client(base_url=srv.url, timeout=10) as c:
        statuses = [c.post(V2, content=json.dumps(ok), headers=key).status_code for _ in range(3)]
        assert statuses == [200, 200, 403]  # burst of 2, then blocked and quarantined
        r = c.post(V2, content=json.dumps(trojan), headers=key)
        errors = metric(c.get("/metrics").text, "guard_errors_total", component="internal")
    assert errors == 0
    assert r.status_code == 403, r.text


def test_trusted_local_proxy_is_honoured_under_uvicorn_defaults(tmp_path: Path) -> None:
    """uvicorn (proxy headers on) has already put the forwarded client in the peer address.

    Each forwarded client must then be its own client: its own quota, and no
    metrics for a public one.
    """
    config = {
        "audit": {"enabled": False},
        "client_identity": {"trusted_proxies": ["127.0.0.1/32"]},
        "policies": [
            {
                "name": "inference",
                "degrade": {"always": False},
                "detectors": [
                    {
                        "type": "rate",
                        "action": "throttle",
                        "params": {"limits": [{"rate": 1, "per": "1h", "burst": 1}]},
                    }
                ],
            }
        ],
    }
    body = {"instances": [ROW]}
    with run_server(tmp_path, config=config) as srv, httpx.Client(base_url=srv.url) as c:

        def post(forwarded: str | None) -> int:
            headers = {"x-forwarded-for": forwarded} if forwarded else {}
            return c.post(V1, json=body, headers=headers, timeout=10).status_code

        statuses = [post("203.0.113.5"), post("203.0.113.5"), post("203.0.113.6"), post(None)]
        scrape_public = c.get("/metrics", headers={"x-forwarded-for": "203.0.113.5"}).text
        scrape_local = c.get("/metrics").text
    assert statuses == [200, 429, 200, 200]
    assert "guard_requests_total" not in scrape_public
    assert metric(scrape_local, "guard_requests_total", decision="throttle") == 1
