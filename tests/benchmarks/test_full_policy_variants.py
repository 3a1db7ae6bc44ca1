"""The variants full_policy.py --marginal serves: the demo policy less one group at a time."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.apps import FULL_DEMO_GROUPS, full_demo_shadow_config, full_demo_without
from inference_guard.guard.config import GuardConfig


@pytest.fixture(scope="module")
def calibration(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("calibration")


def _names(config: dict[str, object]) -> list[str]:
    policy = GuardConfig.from_dict(config).policies[0]
    return [spec.name for spec in policy.detectors]


def test_each_group_leaves_out_exactly_its_detectors(calibration: Path) -> None:
    whole = _names(full_demo_shadow_config(str(calibration)))
    grouped = [name for names in FULL_DEMO_GROUPS.values() for name in names]
    assert sorted(grouped) == sorted(whole)  # every detector of the demo is in one group
    for group, names in FULL_DEMO_GROUPS.items():
        config = full_demo_without(str(calibration), group)
        assert _names(config) == [n for n in whole if n not in names]
        policy = GuardConfig.from_dict(config).policies[0]
        assert policy.shadow
        assert policy.degrade.always is (group != "rounding")


def test_a_group_the_demo_no_longer_holds_is_an_error(
    calibration: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(FULL_DEMO_GROUPS, "rate", ("rate", "no-such-detector"))
    with pytest.raises(ValueError, match="no longer holds"):
        full_demo_without(str(calibration), "rate")
