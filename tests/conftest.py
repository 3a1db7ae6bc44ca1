"""Shared fixtures: metric registries, tiny ASGI apps, real uvicorn servers, a Redis Cluster."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry

# one local Redis Cluster per session, for every suite that runs on it
from tests.stores_fixture import redis_cluster

__all__ = ["redis_cluster"]

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def registry() -> CollectorRegistry:
    """A fresh Prometheus registry per test."""
    return CollectorRegistry()


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    """The value of one sample, 0.0 when it was never set."""
    value = registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """A real uvicorn server in a subprocess on 127.0.0.1."""

    def __init__(self, port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.port = port
        self.proc = proc
        self.log = log
        self.url = f"http://127.0.0.1:{port}"

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@contextlib.contextmanager
def run_server(
    tmp_path: Path,
    *,
    config: dict[str, Any] | None = None,
    app: str = "tests.e2e.apps:demo_app",
    workers: int = 1,
    env: dict[str, str] | None = None,
    ready_path: str = "/healthz",
    timeout: float = 30.0,
    uvicorn_args: tuple[str, ...] = (),
) -> Iterator[Server]:
    """Start ``uvicorn --factory APP`` with ``config`` (written as YAML-compatible JSON).

    ``uvicorn_args`` go on uvicorn's command line (``--no-proxy-headers``, say).
    """
    port = free_port()
    cfg_path = tmp_path / f"guard-{port}.json"
    cfg_path.write_text(json.dumps(config or {}))
    log = tmp_path / f"uvicorn-{port}.log"
    full_env = {**os.environ, "GUARD_TEST_CONFIG": str(cfg_path), "PYTHONPATH": str(ROOT)}
    full_env.update(env or {})
    cmd = [
        sys.executable,
        "-m",
        "uvicorn",
        app,
        "--factory",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        str(workers),
        "--log-level",
        "warning",
        *uvicorn_args,
    ]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=out, stderr=subprocess.STDOUT)
    server = Server(port, proc, log)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"uvicorn exited early:\n{server.output()}")
            try:
                if httpx.get(server.url + ready_path, timeout=1.0).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"uvicorn did not become ready:\n{server.output()}")
            time.sleep(0.1)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
