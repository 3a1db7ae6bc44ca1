"""Guard.reload: the swap of policies and detectors, what is kept, what is refused, the counts."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

import tests.middleware.fakes as fakes
from inference_guard.guard.config import GuardConfig
from inference_guard.guard.decisions import Action
from inference_guard.guard.engine import Pass, Refusal, Request
from inference_guard.guard.errors import ConfigurationError
from inference_guard.guard.metrics import config_sha
from inference_guard.guard.pipeline import Guard
from tests.conftest import sample

V2 = "/v2/models/m/infer"
JSON_CT = (b"content-type", b"application/json")
PEER = ("203.0.113.7", 5000)
SECRET_URI = "redis://:hunter2-secret@127.0.0.1:6399/15"


def config(*detectors: dict[str, Any], **top: Any) -> dict[str, Any]:
    return {
        "policies": [{"name": "inference", "routes": [V2], "detectors": list(detectors)}],
        "audit": {"enabled": False},
        **top,
    }


def fixed(name: str, fire_at: float, action: str = "block") -> dict[str, Any]:
    return {"type": "test-fixed", "name": name, "action": action, "params": {"fire_at": fire_at}}


def write(path: Path, cfg: dict[str, Any]) -> Path:
    path.write_text(json.dumps(cfg))
    return path


def started(tmp_path: Path, cfg: dict[str, Any], registry: CollectorRegistry) -> tuple[Guard, Path]:
    path = write(tmp_path / "guard.yaml", cfg)
    return Guard(GuardConfig.load(path), registry=registry, source=path), path


def detectors(guard: Guard) -> dict[str, Any]:
    return {a.detector.name: a.detector for p in guard.policies for a in p.detectors}


def reload(guard: Guard) -> Any:
    return asyncio.run(guard.reload())


class Body:
    def __init__(self, body: bytes) -> None:
        self.body = body

    async def read(self, declared: bytes | None) -> bytes:
        return self.body


def v2(first: float) -> Body:
    row = [first, 0.0, 0.0]
    return Body(
        json.dumps(
            {"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": row}]}
        ).encode()
    )


def build_info(registry: CollectorRegistry) -> list[dict[str, str]]:
    text = generate_latest(registry).decode()
    return [
        s.labels
        for fam in text_string_to_metric_families(text)
        if fam.name == "guard_build_info"
        for s in fam.samples
    ]


def test_unchanged_detectors_are_kept_and_changed_ones_built_anew(
    tmp_path: Path, registry: CollectorRegistry
) -> None:
    guard, path = started(tmp_path, config(fixed("a", 5.0), fixed("b", 5.0)), registry)
    before = detectors(guard)
    before["a"].seen.append("state")  # stands in for per-client windows, fingerprints
    # a: same identity and parameters, a new action; b: a new parameter; c: new
    write(path, config(fixed("a", 5.0, "flag"), fixed("b", 7.0), fixed("c", 1.0)))
    result = reload(guard)
    after = detectors(guard)
    assert after["a"] is before["a"] and after["a"].seen == ["state"]
    assert after["b"] is not before["b"] and after["b"].fire_at == 7.0
    assert result.kept == ("inference/a",)
    assert result.built == ("inference/b", "inference/c")
    assert result.dropped == ()
    # the kept detector answers with its new action
    assert guard.policies[0].detectors[0].action is Action.FLAG
    assert sample(registry, "guard_config_reloads_total", result="ok") == 1
    assert sample(registry, "guard_config_reloads_total", result="error") == 0


def test_a_detector_whose_type_changes_under_the_same_name_is_built_anew(
    tmp_path: Path, registry: CollectorRegistry
) -> None:
    guard, path = started(tmp_path, config(fixed("a", 5.0)), registry)
    write(path, config({"type": "test-observe", "name": "a"}))
    result = reload(guard)
    assert result.built == ("inference/a",) and result.kept == ()
    assert type(detectors(guard)["a"]) is fakes.ObservingDetector


def test_a_removed_detector_is_dropped_and_the_new_limit_decides(
    tmp_path: Path, registry: CollectorRegistry
) -> None:
    guard, path = started(tmp_path, config(fixed("a", 5.0), fixed("b", 100.0)), registry)
    policy = guard.match("POST", V2)
    assert policy is not None
    request = Request(policy, "POST", V2, [JSON_CT], PEER, "r1", v2(3.0))
    assert isinstance(asyncio.run(guard.admit(request)), Pass)
    write(path, config(fixed("a", 2.0)))
    result = reload(guard)
    assert result.dropped == ("inference/b",)
    new = guard.match("POST", V2)
    assert new is not None and new is not policy
    request = Request(new, "POST", V2, [JSON_CT], PEER, "r2", v2(3.0))
    refused = asyncio.run(guard.admit(request))
    assert isinstance(refused, Refusal) and refused.status == 403


def test_a_request_in_flight_finishes_on_the_loadout_it_started_with(
    tmp_path: Path, registry: CollectorRegistry
) -> None:
    guard, path = started(tmp_path, config(fixed("a", 5.0)), registry)
    old = guard.loadout
    policy = old.match("POST", V2)
    assert policy is not None
    # the new config renames the policy: the old one no longer exists
    cfg = config(fixed("a", 5.0))
    cfg["policies"][0]["name"] = "renamed"
    write(path, cfg)
    reload(guard)
    assert guard.loadout is not old and guard.policies[0].name == "renamed"
    request = Request(policy, "POST", V2, [JSON_CT], PEER, "r1", v2(3.0))
    verdict = asyncio.run(old.admit(request))
    assert isinstance(verdict, Pass) and verdict.policy is policy


@pytest.mark.parametrize(
    "content",
    [
        "policies: [",  # not YAML
        json.dumps({"policies": [{"name": "inference", "bogus": 1}]}),  # unknown key
        json.dumps(config({"type": "no-such-detector"})),  # a detector that cannot be built
        json.dumps(config({"type": "rate", "params": {"limits": "lots"}})),  # bad parameters
    ],
    ids=["yaml", "unknown-key", "unknown-type", "bad-params"],
)
def test_a_bad_file_keeps_the_running_config_and_is_counted(
    tmp_path: Path, registry: CollectorRegistry, content: str, caplog: pytest.LogCaptureFixture
) -> None:
    guard, path = started(tmp_path, config(fixed("a", 5.0)), registry)
    loadout, cfg = guard.loadout, guard.config
    sha = build_info(registry)
    path.write_text(content)
    with caplog.at_level(logging.ERROR, logger="guard"), pytest.raises(ConfigurationError):
        reload(guard)
    assert guard.loadout is loadout and guard.config is cfg
    assert build_info(registry) == sha
    assert sample(registry, "guard_config_reloads_total", result="error") == 1
    assert sample(registry, "guard_config_reloads_total", result="ok") == 0
    assert "running config is kept" in caplog.text


def test_a_missing_file_keeps_the_running_config(
    tmp_path: Path, registry: CollectorRegistry
) -> None:
    guard, path = started(tmp_path, config(fixed("a", 5.0)), registry)
    loadout = guard.loadout
    path.unlink()
    with pytest.raises(ConfigurationError):
        reload(guard)
    assert guard.loadout is loadout
    assert sample(registry, "guard_config_reloads_total", result="error") == 1


@pytest.mark.parametrize(
    ("section", "change"),
    [
        (
            "state",
            {
                "state": {"store": SECRET_URI},
                "client_identity": {"hash_key_env": "GUARD_RELOAD_TEST_KEY"},
            },
        ),
        ("metrics", {"metrics": {"path": "/other-metrics"}}),
        ("limits", {"limits": {"max_rows": 7}}),
        ("audit", {"audit": {"enabled": True}}),
        ("exempt", {"exempt": {"cidrs": ["10.0.0.0/8"]}}),
    ],
)
def test_a_section_that_cannot_change_is_refused_whole_naming_it_without_values(
    tmp_path: Path,
    registry: CollectorRegistry,
    section: str,
    change: dict[str, Any],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("GUARD_RELOAD_TEST_KEY", "a-reload-test-secret-key")
    guard, path = started(tmp_path, config(fixed("a", 5.0)), registry)
    loadout = guard.loadout
    # a detector change too: nothing of the file may be half applied
    write(path, {**config(fixed("a", 9.0)), **change})
    with caplog.at_level(logging.ERROR, logger="guard"), pytest.raises(ConfigurationError) as err:
        reload(guard)
    assert err.value.key == section
    assert guard.loadout is loadout and detectors(guard)["a"].fire_at == 5.0
    assert "hunter2" not in caplog.text and "hunter2" not in str(err.value)


def test_build_info_carries_the_new_config_sha_in_one_series(
    tmp_path: Path, registry: CollectorRegistry
) -> None:
    guard, path = started(tmp_path, config(fixed("a", 5.0)), registry)
    assert [b["config_sha"] for b in build_info(registry)] == [config_sha(guard.config)]
    new = config(fixed("a", 5.0))
    new["policies"].append({"name": "second", "routes": ["/v1/**"]})
    write(path, new)
    result = reload(guard)
    assert result.config_sha == config_sha(GuardConfig.load(path)) == config_sha(guard.config)
    assert [b["config_sha"] for b in build_info(registry)] == [result.config_sha]
    # the new policy's series exist at 0
    assert sample(registry, "guard_requests_total", policy="second", decision="allow") == 0


def test_a_guard_built_from_a_mapping_has_nothing_to_reload(registry: CollectorRegistry) -> None:
    guard = Guard(GuardConfig.from_dict(config(fixed("a", 5.0))), registry=registry)
    assert guard.source is None
    with pytest.raises(ConfigurationError, match="no config file"):
        reload(guard)
    assert sample(registry, "guard_config_reloads_total", result="error") == 1


def test_concurrent_reloads_run_one_after_the_other(
    tmp_path: Path, registry: CollectorRegistry
) -> None:
    guard, path = started(tmp_path, config(fixed("a", 5.0)), registry)
    write(path, config(fixed("a", 6.0)))

    async def both() -> list[Any]:
        return list(await asyncio.gather(guard.reload(), guard.reload()))

    first, second = asyncio.run(both())
    assert first.built == ("inference/a",) and second.kept == ("inference/a",)
    assert sample(registry, "guard_config_reloads_total", result="ok") == 2


def test_a_reloaded_config_learns_signatures_from_the_same_source(
    tmp_path: Path, registry: CollectorRegistry
) -> None:
    def with_signature(ttl: float) -> dict[str, Any]:
        cfg = config()
        cfg["policies"][0]["signature"] = {"learn": True, "ttl_s": ttl}
        return cfg

    guard, path = started(tmp_path, with_signature(300), registry)

    async def source(path: str) -> tuple[int, bytes]:  # never called here
        raise AssertionError("not asked")

    guard.set_metadata_source(source)
    before = guard.signatures["inference"]
    assert before.source is source
    write(path, with_signature(60))
    assert reload(guard).config_sha != config_sha(GuardConfig.from_dict(with_signature(300)))
    after = guard.signatures["inference"]
    assert after is not before  # built for the new config
    assert after.source is source  # and reads the metadata the front end gave
