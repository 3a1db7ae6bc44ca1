"""``guard proxy`` over real HTTP: headers, paths, streaming, and upstream failures.

Every server is real and on 127.0.0.1: the proxy is the ``guard proxy``
command, the upstreams are uvicorn apps (tests/e2e/upstream_apps.py) or, for
broken HTTP, a plain socket server.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import Server, free_port, run_server
from tests.e2e.model_servers import run_proxy
from tests.e2e.test_server import metric

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def echo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("echo")
    with run_server(tmp, app="tests.e2e.upstream_apps:echo_app") as srv:
        yield srv


@pytest.fixture(scope="module")
def proxy(echo: Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("proxy")
    with run_proxy(tmp, echo.url) as srv:
        yield srv


def raw_request(
    srv: Server, method: str, target: str, headers: list[tuple[str, str]], body: bytes = b""
) -> tuple[int, list[tuple[str, str]], bytes]:
    """Send exactly these headers (http.client adds only Host when none is given)."""
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)
    try:
        names = {k.lower() for k, _ in headers}
        conn.putrequest(method, target, skip_host="host" in names, skip_accept_encoding=True)
        for name, value in headers:
            conn.putheader(name, value)
        if body or method == "POST":
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body or None)
        response = conn.getresponse()
        return response.status, response.getheaders(), response.read()
    finally:
        conn.close()


def seen_headers(answer: bytes) -> dict[str, list[str]]:
    """What the echo upstream saw, by lower-case header name."""
    out: dict[str, list[str]] = {}
    for name, value in json.loads(answer)["headers"]:
        out.setdefault(name.lower(), []).append(value)
    return out


def echoed(echo: Server) -> int:
    return int(httpx.get(echo.url + "/count", timeout=5).json()["echoed"])


def test_hop_by_hop_headers_are_dropped_both_ways(proxy: Server) -> None:
    status, headers, body = raw_request(
        proxy,
        "GET",
        "/anything",
        [
            ("Connection", "keep-alive, X-Hop-Named"),
            ("X-Hop-Named", "connection-scoped"),
            ("Keep-Alive", "timeout=5"),
            ("Proxy-Authorization", "Basic c2VjcmV0"),
            ("Proxy-Connection", "keep-alive"),
            ("TE", "trailers"),
            ("Trailer", "x-checksum"),
            ("Upgrade", "h2c"),
            ("X-End-To-End", "kept"),
            ("User-Agent", "test-client/1"),
        ],
    )
    assert status == 200, body
    seen = seen_headers(body)
    for hop in (
        "x-hop-named",
        "keep-alive",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "upgrade",
    ):
        assert hop not in seen, (hop, seen)
    # the connection header the upstream sees (if any) is the proxy's own, never the client's
    assert all("x-hop-named" not in v.lower() for v in seen.get("connection", []))
    assert seen["x-end-to-end"] == ["kept"]
    assert seen["user-agent"] == ["test-client/1"]

    answer = {name.lower(): value for name, value in headers}
    for hop in ("x-upstream-hop", "keep-alive", "proxy-authenticate", "trailer", "upgrade"):
        assert hop not in answer, (hop, headers)
    assert "x-upstream-hop" not in answer.get("connection", "")
    assert answer["x-upstream-keep"] == "1"
    assert answer["x-request-id"]  # the guard's, on every answer


def test_the_proxy_adds_no_headers_of_its_own(proxy: Server) -> None:
    status, _, body = raw_request(proxy, "GET", "/bare", [])
    assert status == 200
    seen = seen_headers(body)
    # no User-Agent, Accept or Accept-Encoding the client did not send: an
    # Accept-Encoding would get answers compressed past the guard's rounding
    for name in ("user-agent", "accept", "accept-encoding"):
        assert name not in seen, (name, seen)


def test_forwarded_headers(proxy: Server, echo: Server) -> None:
    status, _, body = raw_request(
        proxy,
        "GET",
        "/fwd",
        [
            ("Host", "models.example"),
            ("X-Forwarded-For", "203.0.113.7"),
            ("X-Forwarded-For", "198.51.100.2"),
            ("X-Forwarded-Proto", "https"),
            ("X-Forwarded-Host", "spoofed.example"),
        ],
    )
    assert status == 200
    seen = seen_headers(body)
    # the client's chain is kept and the peer appended, in one header
    assert seen["x-forwarded-for"] == ["203.0.113.7, 198.51.100.2, 127.0.0.1"]
    # what the proxy saw replaces what the client claimed
    assert seen["x-forwarded-proto"] == ["http"]
    assert seen["x-forwarded-host"] == ["models.example"]
    assert seen["host"] == [f"127.0.0.1:{echo.port}"]

    _, _, body = raw_request(proxy, "GET", "/fwd", [])
    seen = seen_headers(body)
    assert seen["x-forwarded-for"] == ["127.0.0.1"]
    assert seen["x-forwarded-host"] == [f"127.0.0.1:{proxy.port}"]


def test_path_and_query_pass_verbatim(proxy: Server) -> None:
    target = "/v2/models/a%2Fb/x;p=1//y?z=%20&y=a+b&flag&u=%C3%A9"
    status, _, body = raw_request(proxy, "GET", target, [])
    assert status == 200, body
    seen = json.loads(body)
    assert seen["raw_path"] == "/v2/models/a%2Fb/x;p=1//y"
    assert seen["query"] == "z=%20&y=a+b&flag&u=%C3%A9"
    assert seen["method"] == "GET"


@pytest.mark.parametrize(
    "target", ["/x/../v2/models/m/infer", "/x/%2e%2e/v2/models/m/infer", "/v2/./models"]
)
def test_dot_segments_are_refused(proxy: Server, echo: Server, target: str) -> None:
    # the guard matched "/x/../v2/models/m/infer" (no policy); an upstream that
    # resolved the dots would serve the inference route unguarded
    before = echoed(echo)
    status, _, body = raw_request(proxy, "POST", target, [], b"{}")
    assert status == 400
    message = "the request path is not in normal form"
    if "/v2/models/" in target:  # the OIP's {"error": "<message>"}
        assert json.loads(body) == {"error": message}
    else:
        assert json.loads(body) == {"error": {"code": "invalid_request", "message": message}}
    assert echoed(echo) == before


def test_request_body_is_streamed_upstream(proxy: Server) -> None:
    def chunks() -> Iterator[bytes]:
        for _ in range(20):
            yield b"x" * 10_000

    r = httpx.post(proxy.url + "/upload", content=chunks(), timeout=10)
    assert r.status_code == 200
    assert r.json()["body_bytes"] == 200_000
    assert r.json()["method"] == "POST"


def test_streamed_answer_is_not_buffered(tmp_path: Path) -> None:
    with (
        run_server(tmp_path, app="tests.e2e.upstream_apps:stream_app") as upstream,
        run_proxy(tmp_path, upstream.url) as proxy,
    ):
        body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
        with (
            httpx.Client(timeout=10) as client,
            client.stream("POST", proxy.url + "/v1/chat/completions", json=body) as r,
        ):
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/event-stream")
            events = r.iter_lines()
            # the upstream holds its second event until /release: the first one
            # can only be here if the proxy (and the guard) passed it on unbuffered
            first = next(line for line in events if line)
            assert "first" in first
            assert httpx.get(upstream.url + "/release", timeout=5).status_code == 200
            rest = [line for line in events if line]
        assert "second" in rest[0]
        assert rest[-1] == "data: [DONE]"


def test_a_client_that_leaves_cancels_the_upstream_exchange(tmp_path: Path) -> None:
    with (
        run_server(tmp_path, app="tests.e2e.upstream_apps:stream_app") as upstream,
        run_proxy(tmp_path, upstream.url) as proxy,
    ):
        body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
        with (
            httpx.Client(timeout=10) as client,
            client.stream("POST", proxy.url + "/v1/chat/completions", json=body) as r,
        ):
            assert "first" in next(line for line in r.iter_lines() if line)
        # the client is gone mid-stream: the proxy closes its upstream connection, so
        # the upstream stops (an LLM server stops generating) instead of running on
        deadline = time.monotonic() + 5
        while httpx.get(upstream.url + "/status", timeout=5).json()["disconnected"] != 1:
            assert time.monotonic() < deadline, "the upstream never saw the client leave"
            time.sleep(0.1)


def test_timeout_is_a_504(echo: Server, tmp_path: Path) -> None:
    with run_proxy(tmp_path, echo.url, args=("--read-timeout", "0.5")) as proxy:
        started = time.monotonic()
        r = httpx.get(proxy.url + "/slow?s=5", timeout=10)
        elapsed = time.monotonic() - started
        assert r.status_code == 504
        assert r.json()["error"] == {
            "code": "gateway_timeout",
            "message": "the model server did not answer in time",
            "reason": "timeout",
        }
        assert r.headers["x-request-id"]
        assert elapsed < 4.0
        text = httpx.get(proxy.url + "/metrics", timeout=5).text
        assert metric(text, "guard_upstream_errors_total", reason="timeout") == 1
        assert metric(text, "guard_upstream_errors_total", reason="connect") == 0


def test_refused_connection_is_a_502(tmp_path: Path) -> None:
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with run_proxy(tmp_path, closed) as proxy:
        r = httpx.post(
            proxy.url + "/v2/models/m/infer",
            json={"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}]},
            timeout=10,
        )
        assert r.status_code == 502
        # an OIP route: the protocol's {"error": "<message>"}
        assert r.json() == {"error": "the model server could not be reached"}
        text = httpx.get(proxy.url + "/metrics", timeout=5).text
        assert metric(text, "guard_upstream_errors_total", reason="connect") == 1
        # the guard saw and let the request through before the upstream failed
        assert metric(text, "guard_requests_total", policy="inference", decision="allow") == 1


@contextlib.contextmanager
def broken_upstream(behaviour: str) -> Iterator[str]:
    """A socket server on 127.0.0.1 that reads a request and then misbehaves.

    ``reset``: closes with a TCP reset; ``garbage``: answers bytes that are not
    HTTP; ``partial``: sends headers promising 1000 bytes, 10 of them, and closes.
    """
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    port = listener.getsockname()[1]
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except (TimeoutError, OSError):
                continue
            with conn:
                conn.settimeout(5)
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                if behaviour == "reset":
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                elif behaviour == "garbage":
                    conn.sendall(b"SURPRISE\r\n\r\n")
                else:
                    conn.sendall(
                        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                        b"content-length: 1000\r\n\r\n" + b'{"partial"'
                    )
                    time.sleep(0.1)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        stop.set()
        thread.join(5)
        listener.close()


@pytest.mark.parametrize("behaviour", ["reset", "garbage"])
def test_broken_upstream_is_a_502(behaviour: str, tmp_path: Path) -> None:
    with broken_upstream(behaviour) as upstream, run_proxy(tmp_path, upstream) as proxy:
        r = httpx.get(proxy.url + "/anything", timeout=10)
        assert r.status_code == 502
        assert r.json()["error"]["reason"] == "reset"
        text = httpx.get(proxy.url + "/metrics", timeout=5).text
        assert metric(text, "guard_upstream_errors_total", reason="reset") == 1


def test_failure_mid_answer_aborts_the_connection(tmp_path: Path) -> None:
    with broken_upstream("partial") as upstream, run_proxy(tmp_path, upstream) as proxy:
        # the status has gone out already: the client must see a broken answer,
        # never a complete-looking one
        with pytest.raises(httpx.HTTPError):
            httpx.get(proxy.url + "/anything", timeout=10).raise_for_status()
        text = httpx.get(proxy.url + "/metrics", timeout=5).text
        assert metric(text, "guard_upstream_errors_total", reason="reset") == 1


def test_several_workers_share_their_metrics(tmp_path: Path) -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    with run_proxy(tmp_path, closed, args=("--workers", "2"), timeout=60) as proxy:
        statuses: list[int] = []
        for _ in range(10):
            # a connection per request, so that both workers get some
            with httpx.Client(timeout=10) as c:
                statuses.append(c.get(proxy.url + "/anything").status_code)
        assert statuses == [502] * 10
        deadline = time.monotonic() + 5
        while True:  # each worker applies its counts within a second
            text = httpx.get(proxy.url + "/metrics", timeout=5).text
            if metric(text, "guard_upstream_errors_total", reason="connect") == 10:
                break
            assert time.monotonic() < deadline, text
            time.sleep(0.2)
        assert metric(text, "guard_upstream_errors_total", reason="timeout") == 0


@contextlib.contextmanager
def in_thread(app: object) -> Iterator[str]:
    """A real uvicorn server for ``app`` in a thread of this process, on 127.0.0.1."""
    import uvicorn

    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def test_a_full_pool_is_a_503_counted_in_the_guards_registry() -> None:
    from inference_guard.middleware.proxy import ProxyTimeouts, build_proxy_app
    from tests.e2e.upstream_apps import echo_app

    with in_thread(echo_app()) as upstream:
        app = build_proxy_app(upstream, timeouts=ProxyTimeouts(pool_s=0.3), max_connections=1)
        with in_thread(app) as proxy:
            statuses: list[int] = []

            def slow() -> None:
                with httpx.Client(timeout=10) as c:
                    statuses.append(c.get(proxy + "/slow?s=2").status_code)

            holder = threading.Thread(target=slow)
            holder.start()
            time.sleep(0.5)  # the one pooled connection is busy for 2 s
            with httpx.Client(timeout=10) as c:
                r = c.get(proxy + "/anything")
                holder.join(10)
                scraped = c.get(proxy + "/metrics").text
        assert statuses == [200]
        assert r.status_code == 503
        assert r.json()["error"]["reason"] == "pool"
        # the proxy's counter lives in the registry the guard exports
        assert app.registry.get_sample_value("guard_upstream_errors_total", {"reason": "pool"}) == 1
        assert metric(scraped, "guard_upstream_errors_total", reason="pool") == 1
