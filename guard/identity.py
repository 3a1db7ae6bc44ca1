"""Client identity: who is asking, as a keyed hash.

A client is the credential its app authenticates or, failing that, its IP
address. ``client_identity.source`` names those credentials: ``api_key`` (the
``api_key_headers``), ``bearer`` (``Authorization: Bearer``), then ``ip``. The
rule:

- A credential the list does not name is never read: adding one to a request
  changes nothing, so it never makes a new identity.
- A request that presents one listed credential is that credential's client; one
  that presents none is its address's client.
- A request that presents two *different* listed credentials (an ``x-api-key``
  beside a bearer token, or two API-key headers) is refused, 400 ``bad_header``.
  The guard cannot know which of the two the app will authenticate, and any
  fixed preference would let a client pick the unauthenticated one: a
  quarantined bearer client would add a random ``x-api-key`` and be someone
  new. The same value in two places is one credential.

Whatever the credential, every client also carries its address's identity
(:attr:`ClientId.ip`, the id an address-identified client has) and its
subnet's (:attr:`ClientId.subnet`, the address cut to ``subnet_ipv4`` /
``subnet_ipv6`` bits): the layers above the client that rate ceilings
(``key: ip | subnet``) and address quarantine key on, so that a new key
changes neither.

The raw key never leaves this module: it is turned at once into
``HMAC-SHA256(secret, kind + ":" + value)``, truncated to 128 bits. The secret
comes from the environment variable named by ``client_identity.hash_key_env``;
it must be the same on every worker and replica that share state, and if it is
unset a random per-process secret is used (with a warning), which is right for
a single process only.

``X-Forwarded-For`` is honoured only when the TCP peer is a configured trusted
proxy; the client is then the right-most address in the chain that is not
itself a trusted proxy. A peer that is not trusted but sends the header is
spoofing (or an unconfigured proxy) and, by default, gets a 400, unless the
server reports that it has resolved the chain itself (uvicorn's
``--proxy-headers``) and the peer is indeed one of the chain's addresses.

Exempt clients (``exempt:`` in the config: monitors, load tests) are marked
here: a presented key whose SHA-256 is listed, or a resolved address in a
listed network. Everything is prepared at start-up; per request an exemption
costs one SHA-256 of a presented key, and only when keys are listed.

Headers come in as the ``(name, value)`` byte pairs a server hands over, names
lower-case; :meth:`ClientIdentifier.read_headers` joins repeated ones, and
refuses two different values of an identity header (two credentials in one
request). A peer is what a server reports: ``(host, port)``, or ``None``.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import os
import secrets
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

from inference_guard.guard.config import (
    MIN_HASH_KEY_BYTES,
    ExemptConfig,
    IdentityConfig,
    short_hash_key,
)
from inference_guard.guard.errors import ConfigurationError, PayloadError

__all__ = ["ClientId", "ClientIdentifier", "forwarded_applied", "peer_host"]

log = logging.getLogger("guard.identity")

_MAX_KEY_LEN = 4096
_MEMO_SIZE = 4096
_MAX_FORWARDED_LEN = 2048
_TWO_CREDENTIALS = "two different credentials in one request"
#: headers that may carry an identity whatever the config names (see ``header_names``)
_CREDENTIAL_LIKE = (b"authorization", b"x-forwarded-for")

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class ClientId(NamedTuple):
    """A client, as the rest of the guard knows it (immutable; a tuple, cheap to make)."""

    #: hex keyed hash; safe for logs and state-store keys (never a metric label)
    id: str
    #: where the identity came from: ``api_key``, ``bearer`` or ``ip`` (a metric label)
    source: str
    #: listed in ``exempt:``: detected and recorded, never enforced against
    exempt: bool = False
    #: keyed hash of the client's address, whatever credential it presented (the
    #: ``id`` of an address-identified client); ``""`` when not known
    ip: str = ""
    #: keyed hash of the client's subnet (``client_identity.subnet_ipv4``/``subnet_ipv6``)
    subnet: str = ""


class ClientIdentifier:
    """Turns request headers and the peer address into a :class:`ClientId`."""

    def __init__(
        self,
        config: IdentityConfig,
        *,
        secret: bytes | None = None,
        exempt: ExemptConfig | None = None,
    ) -> None:
        self.config = config
        if secret is None:
            env = os.environ.get(config.hash_key_env, "")
            if env:
                secret = env.encode("utf-8")
                if len(secret) < MIN_HASH_KEY_BYTES:
                    raise ConfigurationError(
                        "client_identity.hash_key_env", short_hash_key(config.hash_key_env)
                    )
            else:
                log.warning(
                    "%s is not set: client ids are hashed with a random per-process secret, "
                    "so workers and replicas will not agree on them; set it when state is shared",
                    config.hash_key_env,
                )
                secret = secrets.token_bytes(32)
        self._secret = secret
        # hashing costs microseconds; clients repeat, so keep a bounded memo of recent
        # ids, oldest out first: an OrderedDict, whose popitem(last=False) stays O(1)
        # under churn (deleting a plain dict's first key makes the next lookup of the
        # first key scan past every slot deleted before it)
        self._memo: OrderedDict[tuple[str, bytes | str], str] = OrderedDict()
        # address -> its subnet's id (parsing an address costs more than the lookup)
        self._subnets: OrderedDict[str, str] = OrderedDict()
        # the identity of a client that presents no credential nor forwarded header, by
        # its peer address (bounded like the memos above)
        self._peers: OrderedDict[str | None, ClientId] = OrderedDict()
        self._headers = tuple(h.encode("latin-1") for h in config.api_key_headers)
        #: the credentials read, in the configured order (``ip`` is the fallback)
        self._sources = tuple(
            s
            for s in config.source
            if (s == "api_key" and self._headers) or (s == "bearer" and config.bearer)
        )
        self._forwarded = config.forwarded_header.encode("latin-1")
        #: every header that carries (or may carry) an identity: the configured key
        #: headers, the forwarded header, ``authorization`` and ``x-forwarded-for``
        self.header_names = frozenset((*self._headers, *_CREDENTIAL_LIKE, self._forwarded))
        self._trusted: tuple[IPNetwork, ...] = tuple(
            ipaddress.ip_network(c, strict=False) for c in config.trusted_proxies
        )
        exempt = exempt or ExemptConfig()
        self._exempt_keys = frozenset(bytes.fromhex(h) for h in exempt.api_keys)
        self._exempt_nets: tuple[IPNetwork, ...] = tuple(
            ipaddress.ip_network(c, strict=False) for c in exempt.cidrs
        )

    def hash(self, kind: str, value: str | bytes) -> str:
        """``HMAC-SHA256(secret, kind:value)``, hex, truncated to 128 bits."""
        memo_key = (kind, value)
        cached = self._memo.get(memo_key)
        if cached is not None:
            return cached
        raw = value.encode("utf-8", "surrogateescape") if isinstance(value, str) else value
        digest = hmac.new(self._secret, kind.encode() + b":" + raw, hashlib.sha256).hexdigest()
        memo = self._memo
        if len(memo) >= _MEMO_SIZE:
            # bounded: drop the oldest entry (dicts keep insertion order)
            memo.popitem(last=False)
        memo[memo_key] = digest[:32]
        return digest[:32]

    def read_headers(self, raw: Iterable[tuple[bytes, bytes]]) -> dict[bytes, bytes]:
        """Headers by name; repeated ones joined with ``", "`` (in linear time).

        A repeated identity header (:attr:`header_names`) must repeat the same
        value: two different credentials (or forwarding chains) in one request
        are refused, 400 ``bad_header``. Malformed pairs raise what unpacking
        them raises.
        """
        if type(raw) is list:
            headers = dict(raw)
            if len(headers) == len(raw):  # nothing repeated, the usual case: nothing to join
                return headers
        headers = {}
        repeated: dict[bytes, list[bytes]] = {}
        identity = self.header_names
        for name, value in raw:
            if name in headers:
                if name in identity:
                    if headers[name] != value:
                        raise PayloadError(
                            400, "bad_header", f"conflicting {name.decode()} headers"
                        )
                    continue
                # joined once at the end: joining as they come copies the value each time
                parts = repeated.get(name)
                if parts is None:
                    repeated[name] = [headers[name], value]
                else:
                    parts.append(value)
                continue
            headers[name] = value
        for name, parts in repeated.items():
            headers[name] = b", ".join(parts)
        return headers

    def identify(
        self, headers: Mapping[bytes, bytes], peer: str | None, *, forwarded_applied: bool = False
    ) -> ClientId:
        """Identify the client; raise PayloadError(400, "bad_header") for spoofed or bad headers.

        ``headers`` maps lower-case header names to values; repeated headers must
        already be joined (the middleware rejects conflicting repeats).
        ``forwarded_applied``: the server says it took ``peer`` from the forwarded
        header itself (see :meth:`client_ip`). Two different listed credentials
        are refused (the rule in the module docstring).
        """
        key, source = self._credential(headers) if self._sources else (None, "ip")
        if key is None:
            if self._forwarded not in headers:
                # the peer is the client (client_ip), and its identity a function of it
                known = self._peers.get(peer)
                if known is not None:
                    return known
            ip = self.client_ip(headers, peer, forwarded_applied=forwarded_applied)
            ip_id = self.hash("ip", ip)
            exempt = bool(self._exempt_nets) and self._in_exempt_net(ip)
            client = ClientId(ip_id, "ip", exempt, ip_id, self.subnet_id(ip))
            if self._forwarded not in headers:
                peers = self._peers
                if len(peers) >= _MEMO_SIZE:
                    peers.popitem(last=False)
                peers[peer] = client
            return client
        # a keyed client's forwarded header decides only its address layers, so one
        # spoofed by an untrusted peer costs no 400 here: that peer is the address.
        # A trusted proxy's chain that does not parse is refused as for anyone: its
        # peer, the proxy, would hand the client a shared, unquarantined address
        try:
            ip = self.client_ip(headers, peer, forwarded_applied=forwarded_applied)
            sure = True
        except PayloadError:
            if self._is_trusted(peer or "unknown"):
                raise
            ip, sure = peer or "unknown", False
        exempt = False
        if self._exempt_keys or self._exempt_nets:
            # a doubtful address never exempts
            exempt = hashlib.sha256(key).digest() in self._exempt_keys or (
                sure and bool(self._exempt_nets) and self._in_exempt_net(ip)
            )
        return ClientId(
            self.hash("key", key), source, exempt, self.hash("ip", ip), self.subnet_id(ip)
        )

    def _credential(self, headers: Mapping[bytes, bytes]) -> tuple[bytes | None, str]:
        """The one listed credential the request presents, and its source; ``(None, "ip")``."""
        found: bytes | None = None
        found_source = "ip"
        for source in self._sources:
            if source == "api_key":
                for name in self._headers:
                    value = headers.get(name)
                    if value is not None:
                        key = self._check_key(value, name.decode())
                        if found is None:
                            found, found_source = key, source
                        elif key != found:
                            raise PayloadError(400, "bad_header", _TWO_CREDENTIALS)
            else:
                auth = headers.get(b"authorization")
                if auth is not None and auth[:7].lower() == b"bearer ":
                    key = self._check_key(auth[7:].strip(), "authorization")
                    if found is None:
                        found, found_source = key, source
                    elif key != found:
                        raise PayloadError(400, "bad_header", _TWO_CREDENTIALS)
        return found, found_source

    def subnet_id(self, ip: str) -> str:
        """The keyed hash of the subnet ``ip`` lies in (an IPv4-mapped address as IPv4)."""
        cached = self._subnets.get(ip)
        if cached is not None:
            return cached
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            net = ip  # not an address (a unix socket's "unknown"): its own subnet
        else:
            if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
                addr = addr.ipv4_mapped
            bits = (
                self.config.subnet_ipv4
                if isinstance(addr, ipaddress.IPv4Address)
                else self.config.subnet_ipv6
            )
            net = str(ipaddress.ip_network((addr, bits), strict=False))
        subnet = self.hash("subnet", net)
        subnets = self._subnets
        if len(subnets) >= _MEMO_SIZE:
            subnets.popitem(last=False)
        subnets[ip] = subnet
        return subnet

    def _in_exempt_net(self, ip: str) -> bool:
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return False
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        return any(addr in net for net in self._exempt_nets)

    def client_ip(
        self, headers: Mapping[bytes, bytes], peer: str | None, *, forwarded_applied: bool = False
    ) -> str:
        """The client's address: the peer, or from the forwarded chain of a trusted proxy.

        With ``forwarded_applied`` the server reports that it has already taken
        ``peer`` from the chain (uvicorn's ``--proxy-headers`` marks such a
        client with port 0): if ``peer`` is indeed one of the chain's addresses,
        it is the client, and the header is not a spoof. The server's own list
        of trusted proxies made that call.
        """
        peer_ip = peer or "unknown"
        forwarded = headers.get(self._forwarded)
        if forwarded is None:
            return peer_ip
        if not self._is_trusted(peer_ip):
            if forwarded_applied and self._in_chain(forwarded, peer_ip):
                return peer_ip
            if self.config.reject_untrusted_forwarded:
                raise PayloadError(
                    400,
                    "bad_header",
                    f"{self.config.forwarded_header} is not accepted from this peer",
                )
            return peer_ip
        addrs = self._chain(forwarded)
        # walk from the nearest hop back; the first untrusted address is the client
        for addr in reversed(addrs):
            if not any(addr in net for net in self._trusted):
                return str(addr)
        return str(addrs[0]) if addrs else peer_ip

    def _chain(self, forwarded: bytes) -> list[IPAddress]:
        if len(forwarded) > _MAX_FORWARDED_LEN:
            raise PayloadError(400, "bad_header", f"{self.config.forwarded_header} is too long")
        try:
            return [ipaddress.ip_address(p.strip()) for p in forwarded.decode("ascii").split(",")]
        except (UnicodeDecodeError, ValueError):
            raise PayloadError(
                400, "bad_header", f"{self.config.forwarded_header} is not a list of IP addresses"
            ) from None

    def _in_chain(self, forwarded: bytes, peer_ip: str) -> bool:
        try:
            peer = ipaddress.ip_address(peer_ip)
            return peer in self._chain(forwarded)
        except (PayloadError, ValueError):
            return False

    def _is_trusted(self, ip: str) -> bool:
        if not self._trusted:
            return False
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return False
        return any(addr in net for net in self._trusted)

    @staticmethod
    def _check_key(value: bytes, header: str) -> bytes:
        if not value or len(value) > _MAX_KEY_LEN or not value.isascii():
            raise PayloadError(400, "bad_header", f"malformed credential in {header}")
        return value


def peer_host(peer: Any) -> str | None:
    """The host of the peer a server reports (``(host, port)``), or ``None`` (a unix socket).

    A malformed peer (a broken server's) raises ``TypeError`` or ``IndexError``.
    """
    return str(peer[0]) if peer else None


def forwarded_applied(peer: Any) -> bool:
    """Whether the server took this client address from ``X-Forwarded-For`` itself.

    uvicorn's proxy-headers middleware, having lost the real peer's port,
    gives such a client port 0, which no TCP peer has.
    """
    try:
        return len(peer) > 1 and peer[1] == 0
    except TypeError:
        return False
