"""Config loading and validation: every problem named by its key path."""

from __future__ import annotations

from pathlib import Path

import pytest

from inference_guard.guard.config import DEFAULT_ROUTES, GuardConfig
from inference_guard.guard.decisions import Action, FailureMode
from inference_guard.guard.errors import ConfigurationError
from inference_guard.guard.policy import compile_routes


def problems(data: object) -> dict[str, str]:
    with pytest.raises(ConfigurationError) as info:
        GuardConfig.from_dict(data)  # type: ignore[arg-type]
    return dict(info.value.problems)


def test_defaults_are_safe() -> None:
    cfg = GuardConfig.load(None)
    assert cfg.failure_mode is FailureMode.FAIL_OPEN
    assert cfg.limits.max_body_bytes == 1 << 20
    assert cfg.policies[0].validate is True
    assert cfg.policies[0].routes == DEFAULT_ROUTES
    assert cfg.metrics.path == "/metrics"
    # scrapes from loopback and private networks only: the metrics name what fired
    assert "127.0.0.0/8" in cfg.metrics.allow_from and "0.0.0.0/0" not in cfg.metrics.allow_from
    assert cfg.state.store == "memory://"


def test_full_config_parses() -> None:
    cfg = GuardConfig.from_dict(
        {
            "failure_mode": "fail_closed",
            "client_identity": {"api_key_headers": ["X-Key"], "trusted_proxies": ["10.0.0.0/8"]},
            "limits": {"max_rows": 10, "max_json_depth": 8},
            "audit": {"path": "/tmp/a.jsonl"},
            "policies": [
                {
                    "name": "p1",
                    "routes": ["/a/*"],
                    "methods": ["post", "put"],
                    "shadow": True,
                    "quarantine_s": 3600,
                    "degrade": {"decimals": 3, "top_k": 2},
                    "detectors": [
                        "rate",
                        {"type": "knn", "name": "k1", "action": "block", "params": {"k": 5}},
                    ],
                }
            ],
        }
    )
    p = cfg.policies[0]
    assert cfg.failure_mode is FailureMode.FAIL_CLOSED
    assert cfg.client_identity.api_key_headers == ("x-key",)
    assert p.methods == ("POST", "PUT")
    assert p.degrade.decimals == 3 and p.degrade.top_k == 2
    assert [(d.type, d.name, d.action) for d in p.detectors] == [
        ("rate", "rate", Action.FLAG),
        ("knn", "k1", Action.BLOCK),
    ]
    assert p.detectors[1].params == {"k": 5}
    assert p.detectors[1].key == "policies[0].detectors[1]"


def test_unknown_keys_and_wrong_types_are_named_by_key_path() -> None:
    found = problems(
        {
            "limits": {"max_rows": "many", "max_bodybytes": 5},
            "policies": [
                {"name": "ok", "detectors": [{"type": "rate", "action": "deny"}, {"name": "x"}]},
                {"name": "bad name!", "routes": ["no-slash"], "shadow": "yes"},
            ],
            "client_identity": {"trusted_proxies": ["300.1.2.3/8"]},
            "metrics": {"allow_from": ["10.0.0.0/8", "everyone"]},
            "failure_mode": "sometimes",
            "extra": 1,
        }
    )
    assert set(found) == {
        "limits.max_rows",
        "limits.max_bodybytes",
        "policies[0].detectors[0].action",
        "policies[0].detectors[1].type",
        "policies[1].name",
        "policies[1].routes[0]",
        "policies[1].shadow",
        "client_identity.trusted_proxies[0]",
        "metrics.allow_from[1]",
        "failure_mode",
        "extra",
    }
    assert "integer" in found["limits.max_rows"]
    assert "unknown key" in found["extra"]


def test_identity_sources_and_address_layers() -> None:
    ident = GuardConfig.load(None).client_identity
    # without source, the credentials the legacy keys enable, then the address
    assert ident.source == ("api_key", "bearer", "ip")
    assert (ident.subnet_ipv4, ident.subnet_ipv6) == (24, 64)
    legacy = GuardConfig.from_dict({"client_identity": {"bearer": False}})
    assert legacy.client_identity.source == ("api_key", "ip")
    none = GuardConfig.from_dict({"client_identity": {"api_key_headers": [], "bearer": False}})
    assert none.client_identity.source == ("ip",)
    # one name or a list; ip is implied last
    one = GuardConfig.from_dict({"client_identity": {"source": "bearer"}})
    assert one.client_identity.source == ("bearer", "ip")
    listed = GuardConfig.from_dict({"client_identity": {"source": ["bearer", "api_key", "ip"]}})
    assert listed.client_identity.source == ("bearer", "api_key", "ip")
    policy = GuardConfig.load(None).policies[0]
    assert policy.quarantine_address == "ip" and policy.quarantine_address_s is None
    off = GuardConfig.from_dict(
        {"policies": [{"name": "p", "quarantine_address": False, "quarantine_address_s": 30}]}
    ).policies[0]
    assert (off.quarantine_address, off.quarantine_address_s) == ("off", 30.0)


@pytest.mark.parametrize(
    ("identity", "key", "says"),
    [
        ({"source": "cookie"}, "client_identity.source", "must be one of api_key, bearer, ip"),
        ({"source": []}, "client_identity.source", "must be one of api_key, bearer, ip"),
        ({"source": ["ip", "bearer"]}, "client_identity.source[1]", "ip must come last"),
        ({"source": ["bearer", "bearer"]}, "client_identity.source[1]", "listed twice"),
        ({"source": ["bearer"], "bearer": False}, "client_identity.source", "bearer is false"),
        (
            {"source": ["api_key"], "api_key_headers": []},
            "client_identity.source",
            "api_key_headers is empty",
        ),
        ({"subnet_ipv4": 33}, "client_identity.subnet_ipv4", "prefix length of 1 to 32"),
        ({"subnet_ipv6": 0}, "client_identity.subnet_ipv6", "must be >= 1"),
    ],
)
def test_bad_identity_sources_are_named(identity: dict[str, object], key: str, says: str) -> None:
    found = problems({"client_identity": identity})
    assert says in found[key], found


def test_bad_address_quarantine_is_named() -> None:
    found = problems(
        {"policies": [{"name": "p", "quarantine_address": "nat", "quarantine_address_s": -1}]}
    )
    assert "must be one of ip, subnet, off" in found["policies[0].quarantine_address"]
    assert ">= 0" in found["policies[0].quarantine_address_s"]


def test_duplicate_names_are_refused() -> None:
    found = problems({"policies": [{"name": "a", "detectors": ["rate", "rate"]}, {"name": "a"}]})
    assert "policies[0].detectors[1].name" in found
    assert "policies[1].name" in found


def test_negative_and_non_finite_numbers_are_refused() -> None:
    found = problems(
        {
            "limits": {"max_body_bytes": 0},
            "policies": [{"name": "a", "quarantine_s": -1}],
            "state": {"timeout_s": float("inf")},
        }
    )
    assert set(found) == {"limits.max_body_bytes", "policies[0].quarantine_s", "state.timeout_s"}


def test_shared_store_requires_hash_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GUARD_HASH_KEY", raising=False)
    assert "client_identity.hash_key_env" in problems({"state": {"store": "redis://localhost"}})
    monkeypatch.setenv("GUARD_HASH_KEY", "s3cret-of-16-bytes")
    assert GuardConfig.from_dict({"state": {"store": "redis://localhost"}}).state.store


def test_yaml_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="does not exist"):
        GuardConfig.from_file(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("policies: [\n")
    with pytest.raises(ConfigurationError, match="not valid YAML"):
        GuardConfig.from_file(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n")
    with pytest.raises(ConfigurationError, match="mapping"):
        GuardConfig.from_file(listy)


def test_calibration_dir_is_relative_to_the_config_file(tmp_path: Path) -> None:
    f = tmp_path / "conf" / "g.yaml"
    f.parent.mkdir()
    f.write_text("calibration_dir: cal\n")
    assert GuardConfig.from_file(f).calibration_dir == str(tmp_path / "conf" / "cal")


@pytest.mark.parametrize(
    ("pattern", "path", "match"),
    [
        ("/v2/models/*/infer", "/v2/models/digits/infer", True),
        ("/v2/models/*/infer", "/v2/models/a/b/infer", False),
        ("/v2/models/{name}/infer", "/v2/models/digits/infer", True),
        ("/v1/models/*:predict", "/v1/models/digits:predict", True),
        ("/v1/models/*:predict", "/v1/models/digits:explain", False),
        ("/api/**", "/api/a/b/c", True),
        ("/invocations", "/invocations/", True),
        ("/invocations", "/invocationsX", False),
    ],
)
def test_route_patterns(pattern: str, path: str, match: bool) -> None:
    assert (compile_routes((pattern,)).match(path) is not None) is match
