"""A throwaway Redis Cluster on 127.0.0.1 (real ``redis-server`` processes) for tests, benchmarks.

:class:`LocalCluster` starts ``masters`` nodes (``--cluster-enabled yes``, no
persistence: ``--save "" --appendonly no``) on free ports, each with its
``nodes-<port>.conf`` in one directory, joins them with ``redis-cli --cluster
create ... --cluster-replicas 0`` and waits until every node reports
``cluster_state:ok``. The nodes run in the foreground as our own child
processes (not ``--daemonize yes``), so they are stopped by their process id
even when a test dies half-way.

A node stopped with :meth:`LocalCluster.stop_node` and started again with
:meth:`LocalCluster.start_node` keeps its port and its ``nodes-<port>.conf``, so
it rejoins as the same master of the same slots, with no data (there are no
replicas to copy it from).
"""

from __future__ import annotations

import contextlib
import random
import shutil
import socket
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

__all__ = ["ClusterStartError", "LocalCluster", "missing_binaries"]

#: Redis Cluster's bus listens on the client port plus this
BUS_OFFSET = 10_000


class ClusterStartError(RuntimeError):
    """The local cluster could not be started (the message says why)."""


def missing_binaries() -> list[str]:
    """Which of ``redis-server`` and ``redis-cli`` are not on ``PATH``."""
    return [name for name in ("redis-server", "redis-cli") if shutil.which(name) is None]


def _free(port: int) -> bool:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_ports(count: int) -> list[int]:
    """``count`` ports whose cluster-bus ports are free too."""
    ports: list[int] = []
    rng = random.Random()
    while len(ports) < count:
        port = rng.randrange(20_000, 30_000)
        if port not in ports and _free(port) and _free(port + BUS_OFFSET):
            ports.append(port)
    return ports


class LocalCluster:
    """``masters`` Redis Cluster masters on 127.0.0.1, no replicas, no persistence."""

    def __init__(self, directory: Path, *, masters: int = 3, node_timeout_ms: int = 2000) -> None:
        self.directory = directory
        self.masters = masters
        self.node_timeout_ms = node_timeout_ms
        self.ports: list[int] = []
        self._procs: dict[int, subprocess.Popen[bytes]] = {}

    @property
    def url(self) -> str:
        """The ``redis+cluster://`` URL listing every node."""
        return "redis+cluster://" + ",".join(f"127.0.0.1:{port}" for port in self.ports)

    # -- nodes

    def start_node(self, port: int, *, timeout: float = 10.0) -> None:
        """Start (or restart) the node on ``port`` and wait until it answers."""
        log = (self.directory / f"redis-{port}.log").open("ab")
        try:
            self._procs[port] = subprocess.Popen(
                [
                    "redis-server",
                    "--port", str(port),
                    "--bind", "127.0.0.1",
                    "--cluster-enabled", "yes",
                    "--cluster-config-file", f"nodes-{port}.conf",
                    "--cluster-node-timeout", str(self.node_timeout_ms),
                    "--save", "",
                    "--appendonly", "no",
                    "--dir", str(self.directory),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        while True:
            proc = self._procs[port]
            if proc.poll() is not None:
                raise ClusterStartError(f"redis-server on port {port} exited: {self.log(port)}")
            try:
                if self.client(port).ping():
                    return
            except redis.RedisError:
                pass
            if time.monotonic() > deadline:
                raise ClusterStartError(f"redis-server on port {port} does not answer")
            time.sleep(0.05)

    def stop_node(self, port: int, *, timeout: float = 10.0) -> None:
        """Stop the node on ``port`` at once, losing its data (``SHUTDOWN NOSAVE``)."""
        with contextlib.suppress(redis.RedisError):
            self.client(port).shutdown(nosave=True)
        proc = self._procs.pop(port, None)
        if proc is not None:
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout)

    def client(self, port: int) -> redis.Redis:
        """A plain (non-cluster) client of one node."""
        # no retries: a node that is gone should say so at once
        return redis.Redis(
            host="127.0.0.1", port=port, socket_timeout=5.0, retry=Retry(NoBackoff(), 0)
        )

    def log(self, port: int) -> str:
        """The tail of a node's log."""
        path = self.directory / f"redis-{port}.log"
        return path.read_text(errors="replace")[-2000:] if path.exists() else ""

    # -- the cluster

    def start(self, *, attempts: int = 3) -> LocalCluster:
        """Start the nodes, join them into one cluster, wait until it serves every slot."""
        missing = missing_binaries()
        if missing:
            raise ClusterStartError(f"not on PATH: {', '.join(missing)}")
        problem = ""
        for _ in range(attempts):  # another process may take a port between check and bind
            self.ports = _free_ports(self.masters)
            try:
                for port in self.ports:
                    self.start_node(port)
                self._create()
                self.wait_state("ok")
                return self
            except ClusterStartError as exc:
                problem = str(exc)
                self.close()
                for path in self.directory.glob("nodes-*.conf"):
                    path.unlink()
        raise ClusterStartError(problem)

    def _create(self) -> None:
        nodes = [f"127.0.0.1:{port}" for port in self.ports]
        cmd = ["redis-cli", "--cluster", "create", *nodes]
        cmd += ["--cluster-replicas", "0", "--cluster-yes"]
        done = subprocess.run(cmd, capture_output=True, timeout=60, check=False)
        if done.returncode != 0:
            output = (done.stdout + done.stderr).decode(errors="replace")[-2000:]
            raise ClusterStartError(f"redis-cli --cluster create failed: {output}")

    def wait_state(
        self, state: str, *, ports: Iterable[int] | None = None, timeout: float = 30.0
    ) -> None:
        """Wait until every node in ``ports`` (default: all) reports ``cluster_state:<state>``."""
        ports = list(self.ports if ports is None else ports)
        deadline = time.monotonic() + timeout
        while True:
            seen = {}
            for port in ports:
                try:
                    info = self.client(port).cluster("info")
                except redis.RedisError as exc:
                    seen[port] = type(exc).__name__
                    continue
                seen[port] = str(info.get("cluster_state"))
                if state == "ok" and int(info.get("cluster_known_nodes", 0)) < len(self.ports):
                    seen[port] = "joining"
            if all(value == state for value in seen.values()):
                return
            if time.monotonic() > deadline:
                raise ClusterStartError(f"cluster state is not {state!r} in time: {seen}")
            time.sleep(0.05)

    def master_of(self, slot: int) -> int:
        """The port of the master serving ``slot``."""
        for port in self.ports:
            if port not in self._procs:
                continue
            for start, end, master, *_ in self.client(port).execute_command("CLUSTER SLOTS"):
                if int(start) <= slot <= int(end):
                    return int(master[1])
        raise LookupError(f"no node serves slot {slot}")

    def used_memory(self) -> int:
        """``used_memory`` summed over the running nodes (``INFO memory``)."""
        return sum(int(self.client(port).info("memory")["used_memory"]) for port in self._procs)

    def close(self) -> None:
        """Stop every node (data is not saved)."""
        for port in list(self._procs):
            self.stop_node(port)

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
