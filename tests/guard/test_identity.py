"""Client identity: keyed hashes, bearer tokens, trusted proxies, spoofing."""

from __future__ import annotations

import pytest

from inference_guard.guard.config import IdentityConfig
from inference_guard.guard.errors import PayloadError
from inference_guard.guard.identity import ClientIdentifier

SECRET = b"test-secret"


def ident(**kw: object) -> ClientIdentifier:
    return ClientIdentifier(IdentityConfig(**kw), secret=SECRET)  # type: ignore[arg-type]


def test_api_key_is_hashed_with_the_secret() -> None:
    c = ident().identify({b"x-api-key": b"sk-live-abc"}, "1.2.3.4")
    assert c.source == "api_key"
    assert "sk-live-abc" not in c.id and len(c.id) == 32
    assert c.id == ident().identify({b"x-api-key": b"sk-live-abc"}, "9.9.9.9").id
    other = ClientIdentifier(IdentityConfig(), secret=b"other").identify(
        {b"x-api-key": b"sk-live-abc"}, None
    )
    assert other.id != c.id


def test_bearer_token_and_same_key_in_header_agree() -> None:
    a = ident().identify({b"authorization": b"Bearer tok123"}, None)
    b = ident().identify({b"x-api-key": b"tok123"}, None)
    assert a.source == "bearer" and a.id == b.id


def test_falls_back_to_ip() -> None:
    c = ident().identify({}, "203.0.113.5")
    assert c.source == "ip" and c.id == ident().hash("ip", "203.0.113.5")


@pytest.mark.parametrize("value", [b"", b"x" * 5000, "schlüssel".encode()])
def test_malformed_credentials_are_refused(value: bytes) -> None:
    with pytest.raises(PayloadError) as info:
        ident().identify({b"x-api-key": value}, None)
    assert info.value.status == 400 and info.value.reason == "bad_header"


def test_forwarded_for_needs_a_trusted_peer() -> None:
    with pytest.raises(PayloadError):
        ident().identify({b"x-forwarded-for": b"1.1.1.1"}, "203.0.113.5")
    lenient = ident(reject_untrusted_forwarded=False)
    assert lenient.client_ip({b"x-forwarded-for": b"1.1.1.1"}, "203.0.113.5") == "203.0.113.5"


def test_forwarded_chain_takes_rightmost_untrusted_hop() -> None:
    i = ident(trusted_proxies=("10.0.0.0/8",))
    headers = {b"x-forwarded-for": b"6.6.6.6, 192.0.2.1, 10.1.1.1"}
    # 6.6.6.6 could be forged by the client; 192.0.2.1 is what our proxy saw
    assert i.client_ip(headers, "10.0.0.2") == "192.0.2.1"
    assert i.client_ip({b"x-forwarded-for": b"10.2.2.2"}, "10.0.0.2") == "10.2.2.2"
    with pytest.raises(PayloadError):
        i.client_ip({b"x-forwarded-for": b"1.2.3.4, garbage"}, "10.0.0.2")


def test_chain_the_server_already_resolved_gives_the_peer() -> None:
    """uvicorn's --proxy-headers leaves the header and puts the chain's client in the peer."""
    i = ident(trusted_proxies=["127.0.0.1/32"])
    applied = {"forwarded_applied": True}
    # the server took 203.0.113.5 from the chain: it is the peer now, and one of the chain's
    xff = b"x-forwarded-for"
    assert i.client_ip({xff: b"203.0.113.5"}, "203.0.113.5", **applied) == "203.0.113.5"
    assert i.client_ip({xff: b"198.51.100.1, 203.0.113.5"}, "203.0.113.5", **applied) == (
        "203.0.113.5"
    )
    assert i.client_ip({xff: b"2001:db8::1"}, "2001:db8:0::1", **applied) == "2001:db8:0::1"
    # without the server's word, a peer found in the chain is no proof: an unconfigured
    # proxy passes on whatever its client wrote, its own address included
    with pytest.raises(PayloadError):
        i.client_ip({xff: b"10.0.0.5, 203.0.113.5"}, "10.0.0.5")
    # a chain without the peer, from an untrusted peer, is still a spoof
    with pytest.raises(PayloadError):
        i.client_ip({xff: b"198.51.100.1"}, "203.0.113.5", **applied)
    with pytest.raises(PayloadError):
        i.client_ip({xff: b"203.0.113.5, garbage"}, "203.0.113.5", **applied)
    # whatever the chain says, the identity is the peer's
    assert i.identify({xff: b"10.9.9.9, 203.0.113.5"}, "203.0.113.5", **applied) == (
        i.identify({}, "203.0.113.5")
    )


# ------------------------------------------------------------------ client_identity.source

BEARER = {b"authorization": b"Bearer the-authenticated-token"}


def test_two_different_listed_credentials_are_refused() -> None:
    """A bearer client that adds an x-api-key must not become someone new: 400."""
    for headers in (
        {**BEARER, b"x-api-key": b"random-1"},
        {b"x-api-key": b"k1", b"api-key": b"k2"},
    ):
        with pytest.raises(PayloadError) as info:
            ident(api_key_headers=("x-api-key", "api-key")).identify(headers, "203.0.113.5")
        assert info.value.status == 400 and info.value.reason == "bad_header"
        assert "two different credentials" in info.value.message
    # the same credential in two places is one credential
    same = ident().identify({**BEARER, b"x-api-key": b"the-authenticated-token"}, None)
    assert same.id == ident().identify(BEARER, None).id


def test_a_source_not_listed_never_makes_an_identity() -> None:
    bearer_only = ident(source=("bearer", "ip"))
    base = bearer_only.identify(BEARER, "203.0.113.5")
    assert base.source == "bearer"
    # an x-api-key beside the token changes nothing, whatever it holds (even malformed)
    for key in (b"random-1", b"random-2", b""):
        c = bearer_only.identify({**BEARER, b"x-api-key": key}, "203.0.113.5")
        assert c == base
    # keys alone are not read: the address is the client, however many keys it rotates
    by_ip = {bearer_only.identify({b"x-api-key": k}, "203.0.113.5") for k in (b"a", b"b", b"c")}
    assert by_ip == {bearer_only.identify({}, "203.0.113.5")}
    assert next(iter(by_ip)).source == "ip"
    # source: ip reads no credential at all
    ip_only = ident(source=("ip",))
    assert ip_only.identify({**BEARER, b"x-api-key": b"k"}, "203.0.113.5").source == "ip"
    # bearer: false (the legacy switch) leaves bearer out of the default list
    no_bearer = ident(bearer=False)
    assert no_bearer.identify({**BEARER, b"x-api-key": b"k"}, None).source == "api_key"


def test_every_client_carries_its_address_layers() -> None:
    i = ident()
    by_ip = i.identify({}, "203.0.113.5")
    keyed = i.identify({b"x-api-key": b"k1"}, "203.0.113.5")
    other_key = i.identify({b"x-api-key": b"k2"}, "203.0.113.5")
    # a key changes the client, not its address: the address layer is the id an
    # address-identified client there has
    assert keyed.id != other_key.id
    assert keyed.ip == other_key.ip == by_ip.ip == by_ip.id
    neighbour = i.identify({}, "203.0.113.200")
    elsewhere = i.identify({}, "198.51.100.5")
    assert neighbour.ip != by_ip.ip and neighbour.subnet == by_ip.subnet == keyed.subnet
    assert elsewhere.subnet != by_ip.subnet
    # IPv6 by /64; an IPv4-mapped address is its IPv4 address's subnet
    v6 = i.identify({}, "2001:db8:1:2::1")
    assert v6.subnet == i.identify({}, "2001:db8:1:2:ffff::9").subnet
    assert v6.subnet != i.identify({}, "2001:db8:1:3::1").subnet
    assert i.identify({}, "::ffff:203.0.113.9").subnet == by_ip.subnet
    # the prefix lengths are configured
    wide = ident(subnet_ipv4=16)
    assert wide.identify({}, "203.0.1.1").subnet == wide.identify({}, "203.0.200.1").subnet
    assert i.identify({}, "203.0.1.1").subnet != i.identify({}, "203.0.200.1").subnet


def test_a_keyed_clients_spoofed_forwarded_header_costs_no_400() -> None:
    """Its address layer is then the peer that sent it, and it is never exempt by it."""
    i = ident()
    c = i.identify({b"x-api-key": b"k", b"x-forwarded-for": b"1.1.1.1"}, "203.0.113.5")
    assert c.ip == i.hash("ip", "203.0.113.5")
    # a trusted proxy's chain decides the address of a keyed client too, and one that
    # does not parse is refused: the proxy's own address is no client's
    proxied = ident(trusted_proxies=("10.0.0.0/8",))
    chain = {b"x-api-key": b"k", b"x-forwarded-for": b"198.51.100.7, 10.0.0.9"}
    assert proxied.identify(chain, "10.0.0.2").ip == proxied.hash("ip", "198.51.100.7")
    with pytest.raises(PayloadError):
        proxied.identify({b"x-api-key": b"k", b"x-forwarded-for": b"junk, 1.2.3.4"}, "10.0.0.2")


def test_the_id_memos_stay_bounded_and_agree_with_a_fresh_hash_under_churn() -> None:
    """An address flood (every request a new client) keeps the memos at their bound,
    the oldest ids going first, and a memoised id is the one a fresh hash gives."""
    from inference_guard.guard import identity

    c = ident()
    bound = identity._MEMO_SIZE
    first = c.identify({}, "198.51.100.1").id
    for i in range(2 * bound):
        c.identify({}, f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}")
    assert len(c._memo) <= bound and len(c._subnets) <= bound
    assert ("ip", "198.51.100.1") not in c._memo  # the oldest went first
    recent = (
        f"10.{(2 * bound - 1) >> 16 & 255}.{(2 * bound - 1) >> 8 & 255}.{(2 * bound - 1) & 255}"
    )
    assert ("ip", recent) in c._memo
    assert c.identify({}, "198.51.100.1").id == first  # hashed again, the same id


def _outcome(c: ClientIdentifier, headers: dict[bytes, bytes], peer: str | None) -> object:
    try:
        return c.identify(headers, peer)
    except PayloadError as exc:  # a forwarded header from an untrusted peer
        return (exc.status, exc.reason)


@pytest.mark.parametrize("exempt", [None, ["203.0.113.0/28", "2001:db8::/64"]])
def test_a_peer_remembered_is_identified_as_afresh(exempt: list[str] | None) -> None:
    """The memo of address-identified clients gives what identifying anew gives."""
    from inference_guard.guard.config import ExemptConfig

    exempt_config = ExemptConfig(cidrs=exempt) if exempt else None  # type: ignore[arg-type]
    config = IdentityConfig(trusted_proxies=["10.0.0.0/8"])  # type: ignore[arg-type]
    peers = ["203.0.113.5", "203.0.113.77", "2001:db8::1", "::ffff:203.0.113.5", "10.1.2.3", None]
    forwarded = {b"x-forwarded-for": b"198.51.100.9"}
    remembering = ClientIdentifier(config, secret=SECRET, exempt=exempt_config)
    for _ in range(3):  # the first round fills the memo, the others read it
        for peer in peers:
            for headers in ({}, {b"accept": b"*/*"}, forwarded):
                fresh = ClientIdentifier(config, secret=SECRET, exempt=exempt_config)
                expected = _outcome(fresh, headers, peer)
                assert _outcome(remembering, headers, peer) == expected, (peer, headers)
    # a trusted proxy's forwarded client is never taken for the proxy itself
    assert remembering.identify(forwarded, "10.1.2.3").ip == remembering.hash("ip", "198.51.100.9")
    assert remembering.identify({}, "10.1.2.3").ip == remembering.hash("ip", "10.1.2.3")


def test_the_peer_memo_stays_bounded() -> None:
    from inference_guard.guard import identity as identity_module

    c = ident()
    for i in range(identity_module._MEMO_SIZE + 50):
        c.identify({}, f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}")
    assert len(c._peers) == identity_module._MEMO_SIZE
