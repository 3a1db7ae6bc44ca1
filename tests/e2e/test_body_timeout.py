"""A stalled request body through a real uvicorn: cut with a 408, the connection closed."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import run_server
from tests.e2e.test_server import metric

pytestmark = pytest.mark.e2e

V1 = "/v1/models/digits:predict"
RATE = {"type": "rate", "params": {"limits": [{"rate": 1000, "per": "1m", "burst": 100}]}}


def stalled_request(port: int, head: bytes, partial: bytes) -> bytes:
    """Send the head and part of the body, then nothing; what the server sends until it closes.

    The socket's own timeout bounds the test: a server that never answers fails
    it (no answer) rather than hanging it.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        sock.sendall(head + partial)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return data


@pytest.mark.parametrize("detectors", [[], [RATE]], ids=["lean_lane", "full_path"])
def test_stalled_body_is_cut_with_408_over_real_http(
    tmp_path: Path, detectors: list[dict[str, Any]]
) -> None:
    config: dict[str, Any] = {
        "audit": {"enabled": False},
        "limits": {"body_timeout_s": 0.5},
        "policies": [{"name": "inference", "routes": [V1], "detectors": detectors}],
    }
    with run_server(tmp_path, config=config) as srv:
        head = (
            f"POST {V1} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            "Content-Length: 1000\r\n\r\n"
        ).encode()
        for partial in (b"", b'{"instances": [[1, 2'):
            answer = stalled_request(srv.port, head, partial)
            status_line = answer.split(b"\r\n", 1)[0]
            assert status_line == b"HTTP/1.1 408 Request Timeout", answer[:300]
            assert b"body_timeout" not in answer  # the reason is a metric label, not an answer
            assert b"did not arrive within 0.5 s" in answer
        # the server is still serving, and counted both refusals
        with httpx.Client(base_url=srv.url, timeout=10) as c:
            ok = c.post(V1, json={"instances": [[0.0] * 64]})
            assert ok.status_code == 200, ok.text
            text = c.get("/metrics").text
        assert metric(text, "guard_invalid_requests_total", reason="body_timeout") == 2
        assert metric(text, "guard_requests_total", decision="invalid") == 2
        assert metric(text, "guard_requests_total", decision="allow") == 1
