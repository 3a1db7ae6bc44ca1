"""``GUARD_HASH_KEY``: required with every shared store, and long enough to be a secret."""

from __future__ import annotations

import pytest

from inference_guard.guard.config import GuardConfig, IdentityConfig
from inference_guard.guard.errors import ConfigurationError
from inference_guard.guard.identity import ClientIdentifier

SHARED = [
    "redis://localhost:6379/0",
    "rediss://localhost:6380/0",
    "unix:///run/redis.sock?db=0",
    "redis+cluster://10.0.0.1:7000,10.0.0.2:7000",
    "rediss+cluster://10.0.0.1:7000",
]


@pytest.mark.parametrize("store", SHARED)
def test_every_shared_store_requires_the_hash_key(
    monkeypatch: pytest.MonkeyPatch, store: str
) -> None:
    monkeypatch.delenv("GUARD_HASH_KEY", raising=False)
    with pytest.raises(ConfigurationError) as err:
        GuardConfig.from_dict({"state": {"store": store}})
    assert err.value.key == "client_identity.hash_key_env"
    assert "GUARD_HASH_KEY must be set" in err.value.problem
    monkeypatch.setenv("GUARD_HASH_KEY", "x" * 32)
    assert GuardConfig.from_dict({"state": {"store": store}}).state.store == store


@pytest.mark.parametrize("store", ["memory://", *SHARED])
def test_a_short_hash_key_is_refused_without_showing_it(
    monkeypatch: pytest.MonkeyPatch, store: str
) -> None:
    secret = "fifteen-bytes!!"
    assert len(secret) == 15
    monkeypatch.setenv("GUARD_HASH_KEY", secret)
    with pytest.raises(ConfigurationError) as err:
        GuardConfig.from_dict({"state": {"store": store}})
    assert err.value.key == "client_identity.hash_key_env"
    assert "GUARD_HASH_KEY must hold at least 16 bytes" in str(err.value)
    assert secret not in str(err.value)
    monkeypatch.setenv("GUARD_HASH_KEY", secret + "!")  # 16 bytes
    GuardConfig.from_dict({"state": {"store": store}})


def test_the_identifier_refuses_a_short_key_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("GUARD_HASH_KEY", "short")
    with pytest.raises(ConfigurationError) as err:
        ClientIdentifier(IdentityConfig())
    assert "GUARD_HASH_KEY" in str(err.value) and "short" not in str(err.value)
    # a secret handed over in code is the caller's business (tests, tools)
    assert ClientIdentifier(IdentityConfig(), secret=b"k").hash("ip", "1.2.3.4")
