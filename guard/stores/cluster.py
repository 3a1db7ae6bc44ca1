"""``redis+cluster://`` / ``rediss+cluster://``: state shared through a Redis Cluster.

The URL lists one or more nodes to discover the cluster from, the way the
``limits`` library spells it::

    redis+cluster://[[user]:password@]host:port[,host:port...][/0][?option=value...]

``rediss+cluster://`` is the same over TLS. Credentials and query options
(``ssl_ca_certs=...``, say) apply to every node, as in a ``redis://`` URL;
database 0 is the only one a cluster has. The client (redis-py's
:class:`~redis.asyncio.cluster.RedisCluster`) learns the slot map from the
first node that answers, sends each command to the master owning its key's
slot, follows ``MOVED``/``ASK`` redirections, and refreshes the map after a
connection error.

Keys and slots: every Lua script runs on one node, so the keys of one script
must hash to one slot. The only multi-key script is the rate check
(``acquire``); the rate detector writes its keys as
``rate:{<detector>:<c|cp|p>:<client or policy>}:<i><g|w>``, and Redis hashes
only the part between the first ``{`` and ``}`` (the *hash tag*), so the limits
of one check always share a slot while different clients spread over the
cluster. :meth:`RedisClusterStore.acquire` refuses keys that would not share a
slot (a ``ValueError``, a caller's bug, not a store failure), and a
``state.key_prefix`` holding a brace is refused, since it would move the tag.
Every other key (quarantine flags, detector standings, anomaly counters) is
read and written one key per command and lands wherever its name hashes.

Failures are those of :class:`~guard.stores.redis.RedisStore`: each operation
has ``state.timeout_s`` in total (waiting for a connection included), any
failure raises :class:`~guard.errors.StateError`, and nothing is retried here;
the circuit breaker (:mod:`guard.stores.resilient`) decides what happens next.
While a master is down, commands for its slots fail at once (connection
refused); once the cluster marks it failed (``cluster-node-timeout``) a replica
takes over, or, with no replica and the default
``cluster-require-full-coverage yes``, every node refuses every command
(``CLUSTERDOWN``) until it is back. A master restarted without a replica comes
back empty: its slots' counters and flags are lost, which the guard reads as
clients with a clean record.

Commands are not pipelined as on a single Redis: each one takes a connection
to its node for one round trip, at most ``max_connections`` at once in the
whole store (more wait their turn, within their time budget).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import Any

from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import parse_url
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.exceptions import NoScriptError, RedisClusterException, RedisError

from inference_guard.detectors.store import RateCheck, RateState
from inference_guard.guard.config import StateConfig
from inference_guard.guard.errors import ConfigurationError, StateError
from inference_guard.guard.stores._batch import Command, Script
from inference_guard.guard.stores.redis import RedisStore

__all__ = ["SCHEMES", "RedisClusterStore", "parse_cluster_url"]

#: the URL schemes of a Redis Cluster store, and the plain scheme each stands for
SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}

_DEFAULT_PORT = 6379


def _node(text: str) -> tuple[str, int]:
    """``host:port``, ``host`` or ``[v6 address]:port``."""
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError("an IPv6 address must be written [address]:port")
        port_text = rest[1:]
    else:
        host, _, port_text = text.partition(":")
    if not host:
        raise ValueError("a node has no host")
    if not port_text:
        return host, _DEFAULT_PORT
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError("a node's port must be a number from 1 to 65535")
    return host, int(port_text)


def parse_cluster_url(url: str) -> tuple[list[tuple[str, int]], dict[str, Any]]:
    """The startup nodes of a ``redis+cluster://`` URL and the options for every node.

    The options (credentials, TLS, query options) are what redis-py reads from a
    ``redis://`` URL with the same credentials and query. Raises ``ValueError``
    whose message never repeats the URL (it may carry a password).
    """
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in SCHEMES:
        raise ValueError("the scheme must be redis+cluster:// or rediss+cluster://")
    end = min((i for i in (rest.find("/"), rest.find("?"), rest.find("#")) if i >= 0), default=-1)
    netloc, tail = (rest, "") if end < 0 else (rest[:end], rest[end:])
    userinfo, at, hosts = netloc.rpartition("@")
    nodes = [_node(item) for item in hosts.split(",")] if hosts else []
    if not nodes:
        raise ValueError("no node is given: write host:port[,host:port...]")
    path, _, _ = tail.partition("?")
    path = path.partition("#")[0]
    if path not in ("", "/", "/0"):
        raise ValueError("a cluster has database 0 only: leave the path empty or write /0")
    # redis-py reads credentials and options from a one-node URL of the plain scheme
    options: dict[str, Any] = dict(parse_url(f"{SCHEMES[scheme]}://{userinfo}{at}localhost{tail}"))
    for name in ("host", "port", "path", "db"):
        options.pop(name, None)
    if options.pop("connection_class", None) is not None:
        options["ssl"] = True  # rediss: redis-py's SSLConnection
    return nodes, options


def _bad_url(exc: Exception) -> ConfigurationError:
    # never echo the URL: it may carry a password
    return ConfigurationError("state.store", f"not a usable Redis Cluster URL: {exc}")


class RedisClusterStore(RedisStore):
    """A store in a Redis Cluster; one instance per process and event loop.

    The same operations, Lua scripts, key layout and failure semantics as
    :class:`~guard.stores.redis.RedisStore`; see the module docstring for what
    differs.
    """

    backend = "redis-cluster"
    # the quarantine index is one key and the quarantine flags are spread over every
    # slot: no script can write both, so a cluster keeps no index (and no count of
    # clients in quarantine: guard_quarantined_clients is absent)
    indexes_quarantines = False

    def __init__(self, config: StateConfig, *, max_connections: int = 32) -> None:
        if "{" in config.key_prefix or "}" in config.key_prefix:
            # a brace in the prefix would become (or break) every key's hash tag
            raise ConfigurationError(
                "state.key_prefix",
                "must not contain '{' or '}' with a Redis Cluster store: the rate keys "
                "carry their own hash tag",
            )
        super().__init__(config, max_connections=max_connections)

    def eviction_policy(self) -> str | None:
        """Not read on a cluster (each node has its own): ``None``; check every node."""
        return None

    def _open(self, config: StateConfig, *, max_connections: int, max_batch: int) -> None:
        try:
            nodes, options = parse_cluster_url(config.store)
        except ValueError as exc:
            raise _bad_url(exc) from None
        self._nodes = nodes
        self._options: dict[str, Any] = {
            "socket_timeout": None,  # the whole operation is timed in _call
            "socket_connect_timeout": config.timeout_s,
            **options,
            "max_connections": max_connections,
        }
        self._max_connections = max_connections
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: RedisCluster | None = None
        self._inflight: asyncio.Semaphore | None = None
        try:
            self._new_client()  # find a bad option now rather than on the first request
        except (TypeError, ValueError, RedisClusterException) as exc:
            raise _bad_url(exc) from None

    def _new_client(self) -> RedisCluster:
        return RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in self._nodes],
            # the cluster may lack slots (a master lost): serve the rest, let Redis decide
            require_full_coverage=False,
            # no retries: a failure is reported at once, the circuit breaker decides
            retry=Retry(NoBackoff(), 0),
            **self._options,
        )

    def _bind(self, loop: asyncio.AbstractEventLoop) -> tuple[RedisCluster, asyncio.Semaphore]:
        # connections belong to the loop they were made on: a new loop gets a new client
        self._loop = loop
        self._client = self._new_client()
        self._inflight = asyncio.Semaphore(self._max_connections)
        return self._client, self._inflight

    async def _call(
        self,
        operation: str,
        command: Command,
        script: Script | None = None,
        *,
        every_master: bool = False,
    ) -> Any:
        loop = asyncio.get_running_loop()
        client, inflight = self._client, self._inflight
        if loop is not self._loop or client is None or inflight is None:
            client, inflight = self._bind(loop)
        name = command[0].decode("ascii")  # redis-py routes by the command's name as str
        options = {"target_nodes": RedisCluster.PRIMARIES} if every_master else {}
        try:
            async with asyncio.timeout(self.timeout), inflight:
                # learn the slot map first (a no-op once known): commands that race the
                # client's own lazy start fail with connection errors (seen with redis-py 8.1)
                await client.initialize()
                try:
                    return await client.execute_command(name, *command[1:], **options)
                except NoScriptError:
                    if script is None:
                        raise
                    # this node has not seen the script (restarted, flushed): EVAL caches it
                    return await client.execute_command("EVAL", script.text, *command[2:])
        except (RedisError, OSError, TimeoutError) as exc:
            # redis-py messages name host and port at most, never credentials or keys
            if isinstance(exc, TimeoutError):
                detail = "timed out"
            else:
                detail = f"{type(exc).__name__}: {exc}"
            raise StateError(self.backend, operation, detail) from exc
        except RedisClusterException as exc:
            # no slot map (no node answered) or a command it could not route; its
            # messages may quote the command, keys included: name the kind only
            raise StateError(self.backend, operation, type(exc).__name__) from exc

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """One ``MGET`` when the keys share a slot; else one ``GET`` per key, all at once
        (each to its own node: the round trips overlap)."""
        prefix = self.prefix
        if len({key_slot((prefix + key).encode("utf-8")) for key in keys}) <= 1:
            return await super().get_many(keys)
        return list(await asyncio.gather(*(self.get(key) for key in keys)))

    async def acquire_lease(
        self, checks: Sequence[RateCheck], *, cost: int, lease: int
    ) -> tuple[tuple[RateState, ...], int]:
        """Check every limit in one Lua script on one node; the keys must share a hash tag."""
        if len(checks) > 1:
            prefix = self.prefix
            slots = {key_slot((prefix + key).encode("utf-8")) for key, _ in checks}
            if len(slots) > 1:
                raise ValueError(
                    "on a Redis Cluster the keys of one acquire must share a hash tag, "
                    "like rate:{client}:0g and rate:{client}:1w"
                )
        return await super().acquire_lease(checks, cost=cost, lease=lease)

    async def ping(self) -> bool:
        """Whether every master answers ``PING`` within the time budget."""
        try:
            reply = await self._call("ping", (b"PING",), every_master=True)
        except StateError:
            return False
        return reply in (b"PONG", "PONG", True)

    async def aclose(self) -> None:
        """Close the connections; the next call (in any event loop) reconnects."""
        client, self._client, self._loop = self._client, None, None
        if client is not None:
            with contextlib.suppress(RedisError, OSError, RedisClusterException):
                await client.aclose()  # closing a broken connection may fail too
