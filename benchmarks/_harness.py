"""Shared benchmark plumbing: servers, a lean HTTP client, wrk, and RESULTS.md sections."""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import http.client
import os
import platform
import random
import re
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "RESULTS.md"


def machine() -> str:
    return (
        f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"{platform.system()} {platform.release()}"
    )


def today() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


def post_scope(path: str, body: bytes) -> dict[str, Any]:
    """The ASGI scope of a JSON ``POST`` of ``body`` to ``path`` from 127.0.0.1, for
    in-process calls (a fresh dict each time: a middleware may rewrite it)."""
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "client": ("127.0.0.1", 40000),
        "server": ("127.0.0.1", 8000),
        "headers": [
            (b"host", b"127.0.0.1"),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ],
    }


#: uvicorn's HTTP implementations a benchmark may ask for (``--http``)
HTTP_IMPLEMENTATIONS = ("h11", "httptools")


def add_http_argument(parser: argparse.ArgumentParser, section: str) -> None:
    """``--http``: uvicorn's HTTP implementation (``h11`` by default; ``httptools`` writes
    the section ``<section>-httptools``)."""
    parser.add_argument(
        "--http",
        choices=HTTP_IMPLEMENTATIONS,
        default="h11",
        help="uvicorn's HTTP implementation (default h11, the one the project installs; "
        f"httptools writes the section {section}-httptools)",
    )


def http_implementation(name: str) -> str:
    """``name`` checked: ``httptools`` must be importable (``pip install httptools``).

    uvicorn takes ``httptools`` when it is installed and ``h11`` otherwise, and
    the project installs only ``h11`` (uvicorn's own dependency): a benchmark
    names the one it measures so that its figures say which.
    """
    if name not in HTTP_IMPLEMENTATIONS:
        raise SystemExit(f"--http must be one of {', '.join(HTTP_IMPLEMENTATIONS)}")
    if name == "httptools":
        try:
            import httptools  # noqa: F401
        except ImportError:
            raise SystemExit(
                "--http httptools needs httptools (uvicorn's C HTTP parser, what "
                "uvicorn[standard] installs): pip install httptools"
            ) from None
    return name


def free_port() -> int:
    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def pinned(cpu: int | None) -> Iterator[None]:
    """Run the block (a server's start: the child inherits it) on one CPU."""
    if cpu is None:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


@contextlib.contextmanager
def serve(
    factory: str,
    *,
    env: dict[str, str] | None = None,
    workers: int = 1,
    ready: str = "/healthz",
    cwd: Path | None = None,
    http_impl: str = "h11",
) -> Iterator[str]:
    """Run ``uvicorn --factory <factory>`` on 127.0.0.1; yield its base URL.

    ``cwd`` defaults to the repository root, which ``python -m`` puts first on
    ``sys.path``: pass another directory to serve code from elsewhere.
    ``http_impl`` is uvicorn's ``--http``: ``h11`` by default, whatever is installed (uvicorn
    would take ``httptools`` when it is), so that figures never change with the
    environment; ``httptools`` when a benchmark asks for it.
    """
    port = free_port()
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    if not full_env.get("PROMETHEUS_MULTIPROC_DIR"):
        # even an empty value switches prometheus_client into multiprocess mode
        full_env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    cmd = [
        sys.executable,
        "-m",
        "uvicorn",
        factory,
        "--factory",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        str(workers),
        "--log-level",
        "error",
        "--no-access-log",
        "--http",
        http_impl,
    ]
    proc = subprocess.Popen(cmd, cwd=cwd or ROOT, env=full_env)
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{factory} exited with {proc.returncode}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
                conn.request("GET", ready)
                if conn.getresponse().status == 200:
                    conn.close()
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{factory} did not start")
            time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def latencies(
    url: str, path: str, body: bytes, n: int, headers: dict[str, str] | None = None
) -> list[float]:
    """Sequential round trips over one keep-alive connection; seconds each."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    hdrs = {"content-type": "application/json", **(headers or {})}
    out: list[float] = []
    for _ in range(n):
        t0 = time.perf_counter()
        conn.request("POST", path, body=body, headers=hdrs)
        resp = conn.getresponse()
        resp.read()
        out.append(time.perf_counter() - t0)
        if resp.status != 200:
            raise RuntimeError(f"{url}{path} answered {resp.status}")
    conn.close()
    return out


def alternating_latencies(
    url: str, paths: dict[str, str], body: bytes, n: int, headers: dict[str, str] | None = None
) -> dict[str, list[float]]:
    """Sequential round trips that alternate between ``paths``, one keep-alive connection each.

    Each cycle sends one request to every path, in a fresh seeded random order,
    so that every variant follows every other equally often (a fixed rotation
    let ``bare_again`` always follow ``bare`` and find its caches warm, a bias
    of several µs). Machine drift then hits every variant alike, request by
    request. Seconds per round trip.
    """
    host, port = url.removeprefix("http://").split(":")
    conns = {k: http.client.HTTPConnection(host, int(port), timeout=10) for k in paths}
    hdrs = {"content-type": "application/json", **(headers or {})}

    def trip(k: str) -> int:
        conns[k].request("POST", paths[k], body=body, headers=hdrs)
        resp = conns[k].getresponse()
        resp.read()
        return resp.status

    try:
        return _alternate(url, paths, n, trip)
    finally:
        for conn in conns.values():
            conn.close()


def raw_alternating_latencies(
    url: str, paths: dict[str, str], body: bytes, n: int
) -> dict[str, list[float]]:
    """As :func:`alternating_latencies`, from a minimal raw-socket HTTP/1.1 client.

    Each request is pre-built bytes sent with one ``sendall``; the answer is read
    up to its ``content-length``. Between two requests the client spends a few
    µs instead of http.client's ~150, so the server is rarely idle and its
    caches stay warm: the view of a server with steady traffic, where
    :func:`alternating_latencies` shows one that idles between requests.
    """
    host, port = url.removeprefix("http://").split(":")
    requests = {
        k: (
            f"POST {paths[k]} HTTP/1.1\r\nhost: {host}:{port}\r\n"
            f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
        ).encode()
        + body
        for k in paths
    }
    socks = {k: socket.create_connection((host, int(port)), timeout=10) for k in paths}
    for sock in socks.values():
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def trip(k: str) -> int:
        socks[k].sendall(requests[k])
        return _read_response(socks[k])

    try:
        return _alternate(url, paths, n, trip)
    finally:
        for sock in socks.values():
            sock.close()


def _alternate(
    url: str, paths: dict[str, str], n: int, trip: Callable[[str], int]
) -> dict[str, list[float]]:
    """``n`` cycles of one timed ``trip(variant)`` per variant, in a seeded shuffled order."""
    names = list(paths)
    out: dict[str, list[float]] = {k: [] for k in names}
    order = random.Random(len(names) * 1_000_003 + n)
    for _ in range(n):
        for k in order.sample(names, len(names)):
            t0 = time.perf_counter()
            status = trip(k)
            out[k].append(time.perf_counter() - t0)
            if status != 200:
                raise RuntimeError(f"{url}{paths[k]} answered {status}")
    return out


def _read_response(sock: socket.socket) -> int:
    """Read one HTTP/1.1 response with a content-length; its status code."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise RuntimeError("connection closed mid-response")
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    length = next(
        (
            int(v)
            for k, _, v in (x.partition(b":") for x in lines[1:])
            if k.lower() == b"content-length"
        ),
        None,
    )
    if length is None:
        raise RuntimeError("response without content-length")
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise RuntimeError("connection closed mid-body")
        rest += chunk
    return status


def pct(values: Sequence[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def wrk(
    url: str, path: str, body: bytes, *, seconds: int, connections: int, threads: int = 1
) -> tuple[float, float, float] | None:
    """(requests/s, p50 s, p99 s) from wrk, or None when wrk is not installed."""
    exe = shutil.which("wrk")
    if exe is None:
        return None
    script = ROOT / "benchmarks" / ".wrk-post.lua"
    lua_body = body.decode().replace("\\", "\\\\").replace('"', '\\"')
    script.write_text(
        'wrk.method = "POST"\n'
        f'wrk.body = "{lua_body}"\n'
        'wrk.headers["Content-Type"] = "application/json"\n'
    )
    try:
        out = subprocess.run(
            [
                exe,
                f"-t{threads}",
                f"-c{connections}",
                f"-d{seconds}s",
                "--latency",
                "-s",
                str(script),
                url + path,
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    finally:
        script.unlink(missing_ok=True)
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p50 = _wrk_time(re.search(r"50%\s+([\d.]+\w+)", out).group(1))  # type: ignore[union-attr]
    p99 = _wrk_time(re.search(r"99%\s+([\d.]+\w+)", out).group(1))  # type: ignore[union-attr]
    return rps, p50, p99


def _wrk_time(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if m is None:
        raise ValueError(text)
    scale = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}[m.group(2)]
    return float(m.group(1)) * scale


def write_section(name: str, text: str) -> None:
    """Replace (or append) the section between ``<!-- name:start -->`` and ``<!-- name:end -->``."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{text.rstrip()}\n{end}\n"
    current = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n\n"
    if start in current and end in current:
        before, rest = current.split(start, 1)
        after = rest.split(end, 1)[1].lstrip("\n")
        current = before + block + ("\n" + after if after else "")
    else:
        current = current.rstrip("\n") + "\n\n" + block
    RESULTS.write_text(current)
