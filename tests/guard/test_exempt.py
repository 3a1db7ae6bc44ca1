"""``exempt:``: hashed keys and networks that are counted and logged, never enforced against."""

from __future__ import annotations

import asyncio
import hashlib
import io
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from detectors.base import Query
from guard.config import ExemptConfig, GuardConfig, IdentityConfig
from guard.decisions import Action
from guard.errors import ConfigurationError, PayloadError
from guard.identity import ClientIdentifier
from guard.pipeline import Guard
from middleware.cli import main
from tests.conftest import sample

MONITOR_KEY = "monitor-key-0123456789"
MONITOR_HASH = "sha256:" + hashlib.sha256(MONITOR_KEY.encode()).hexdigest()


# ------------------------------------------------------------------ config


def test_hashed_keys_and_cidrs_are_accepted_and_normalised() -> None:
    upper = "sha256:" + hashlib.sha256(b"other").hexdigest().upper()
    cfg = GuardConfig.from_dict(
        {"exempt": {"api_keys": [MONITOR_HASH, upper, MONITOR_HASH], "cidrs": ["10.1.0.0/16"]}}
    )
    assert cfg.exempt.api_keys == (
        MONITOR_HASH.removeprefix("sha256:"),
        hashlib.sha256(b"other").hexdigest(),
    )
    assert cfg.exempt.cidrs == ("10.1.0.0/16",)
    assert cfg.exempt.enabled
    assert not GuardConfig.default().exempt.enabled


def test_a_raw_key_is_refused_without_echoing_it_and_every_problem_is_named() -> None:
    with pytest.raises(ConfigurationError) as info:
        GuardConfig.from_dict(
            {
                "exempt": {
                    "api_keys": [MONITOR_HASH, "sk-live-SECRET-raw-key"],
                    "cidrs": ["not-a-network"],
                    "keys": [],
                }
            }
        )
    problems = dict(info.value.problems)
    assert set(problems) == {"exempt.api_keys[1]", "exempt.cidrs[0]", "exempt.keys"}
    message = problems["exempt.api_keys[1]"]
    assert "guard hash-key" in message and "sha256sum" in message
    assert "SECRET" not in str(info.value)


def test_hash_key_prints_what_exempt_expects(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(MONITOR_KEY.encode() + b"\n")))
    assert main(["hash-key"]) == 0
    printed = capsys.readouterr().out.strip()
    assert printed == MONITOR_HASH
    GuardConfig.from_dict({"exempt": {"api_keys": [printed]}})  # accepted as printed

    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"\n")))
    assert main(["hash-key"]) == 1


# ------------------------------------------------------------------ identity


def identifier(**exempt: Any) -> ClientIdentifier:
    return ClientIdentifier(
        IdentityConfig(trusted_proxies=("192.0.2.1/32",)),
        secret=b"s",
        exempt=ExemptConfig(
            api_keys=tuple(k.removeprefix("sha256:") for k in exempt.get("api_keys", ())),
            cidrs=tuple(exempt.get("cidrs", ())),
        ),
    )


def test_a_listed_key_or_bearer_token_is_exempt_with_the_same_client_id() -> None:
    ident = identifier(api_keys=[MONITOR_HASH])
    plain = ClientIdentifier(IdentityConfig(), secret=b"s")
    by_header = ident.identify({b"x-api-key": MONITOR_KEY.encode()}, "203.0.113.9")
    by_bearer = ident.identify({b"authorization": b"Bearer " + MONITOR_KEY.encode()}, "203.0.113.9")
    assert by_header.exempt and by_bearer.exempt
    # exemption changes nothing about who the client is
    assert by_header.id == plain.identify({b"x-api-key": MONITOR_KEY.encode()}, "1.2.3.4").id
    assert by_header.source == "api_key" and by_bearer.source == "bearer"
    other = ident.identify({b"x-api-key": b"someone-else"}, "203.0.113.9")
    assert not other.exempt
    assert not ident.identify({}, "203.0.113.9").exempt


def test_a_client_in_a_listed_network_is_exempt_as_resolved() -> None:
    ident = identifier(cidrs=["10.1.0.0/16"])
    assert ident.identify({}, "10.1.2.3").exempt
    assert ident.identify({}, "::ffff:10.1.2.3").exempt
    assert not ident.identify({}, "10.2.0.1").exempt
    # a keyed client is exempt by its address too
    assert ident.identify({b"x-api-key": b"load-test-7"}, "10.1.9.9").exempt
    # behind a trusted proxy, the forwarded address decides
    via_proxy = {b"x-forwarded-for": b"10.1.4.4"}
    assert ident.identify(via_proxy, "192.0.2.1").exempt
    assert not ident.identify({b"x-forwarded-for": b"10.9.4.4"}, "192.0.2.1").exempt
    # a keyed client's spoofed header neither exempts it nor costs it a 400
    spoofed = {b"x-api-key": b"k", b"x-forwarded-for": b"10.1.4.4"}
    assert not ident.identify(spoofed, "203.0.113.9").exempt
    # a client identified by address still gets the 400 for a spoofed header
    with pytest.raises(PayloadError):
        ident.identify({b"x-forwarded-for": b"10.1.4.4"}, "203.0.113.9")


# ------------------------------------------------------------------ engine


def engine_config(tmp_path: Path, **extra: Any) -> dict[str, Any]:
    return {
        "audit": {"path": str(tmp_path / "audit.jsonl")},
        "policies": [
            {
                "name": "inference",
                "quarantine_s": 3600,
                "detectors": [
                    {
                        "type": "rate",
                        "action": "throttle",
                        "params": {"limits": [{"rate": 1, "per": "1h", "burst": 2}]},
                    },
                    {"type": "test-fixed", "action": "block", "params": {"fire_at": 5}},
                ],
            }
        ],
        **extra,
    }


def query(client: str, value: float) -> Query:
    return Query(client, "inference", np.array([[value, 0.0]]), n_rows=1, now=0.0)


def test_exempt_decisions_run_every_detector_but_enforce_nothing(
    tmp_path: Path, registry: CollectorRegistry
) -> None:
    import tests.middleware.fakes  # noqa: F401 - registers test-fixed

    guard = Guard(GuardConfig.from_dict(engine_config(tmp_path)), registry=registry)
    policy = guard.policies[0]

    async def go() -> None:
        decisions = [await guard.decide(policy, query("mon", 1.0), exempt=True) for _ in range(4)]
        assert [d.action for d in decisions] == [Action.ALLOW] * 4
        assert [d.intended for d in decisions] == [Action.ALLOW] * 2 + [Action.THROTTLE] * 2
        assert all(d.exempt for d in decisions) and decisions[3].retry_after is None
        blocked = await guard.decide(policy, query("mon", 9.0), exempt=True)
        assert (blocked.action, blocked.intended) == (Action.ALLOW, Action.BLOCK)
        assert not blocked.quarantined and blocked.recorded
        # never quarantined, and an existing quarantine does not refuse it
        assert await guard.check_quarantine(policy, "mon") is None
        await guard.quarantine(policy, "mon")
        assert await guard.check_quarantine(policy, "mon") is not None
        assert await guard.check_quarantine(policy, "mon", exempt=True) is None
        # the same requests from a client that is not exempt are enforced
        plain = [await guard.decide(policy, query("user", 1.0)) for _ in range(3)]
        assert plain[2].action is Action.THROTTLE
        assert (await guard.decide(policy, query("user", 9.0))).quarantined

    asyncio.run(go())
    assert sample(registry, "guard_exempt_requests_total", policy="inference") == 5
    assert sample(registry, "guard_requests_total", policy="inference", decision="allow") == 7
    # detections are counted for exempt clients as for everyone
    assert (
        sample(
            registry,
            "guard_detections_total",
            policy="inference",
            detector="rate",
            action="throttle",
        )
        == 5
    )
    assert sample(registry, "guard_quarantines_total", policy="inference") == 2
