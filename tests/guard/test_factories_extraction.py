"""The ``prada``, ``near_duplicate`` and ``boundary`` factories: params, errors, salt."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import numpy as np
import pytest

from inference_guard.detectors.anomaly_rate import AnomalyRateTracker
from inference_guard.detectors.base import Query
from inference_guard.detectors.boundary import DEFAULT_BASELINE, BoundaryDetector
from inference_guard.detectors.fingerprint import NearDuplicateDetector
from inference_guard.detectors.prada import PradaDetector
from inference_guard.guard.config import DetectorSpec, GuardConfig
from inference_guard.guard.errors import ConfigurationError
from inference_guard.guard.extraction_factories import DEFAULT_SALT_ENV
from inference_guard.guard.registry import BuildContext, build_detector, registered
from inference_guard.guard.stores.memory import MemoryStore

KEY = "policies[0].detectors[2]"
SALT = "a salt of at least sixteen bytes"


#: explicit overrides of what calibration would set, so each detector builds without it
OVERRIDES: dict[str, dict[str, Any]] = {
    "prada": {"delta": 0.9},
    "boundary": {"threshold": -6.0},
    "near_duplicate": {},  # its tests pass feature_range themselves
}


def build(type_name: str, params: dict[str, Any], *, raw: bool = False, **ctx: Any) -> Any:
    if not raw:
        params = {**OVERRIDES[type_name], **params}
    spec = DetectorSpec(type=type_name, name=f"my-{type_name}", params=params, key=KEY)
    return build_detector(spec, BuildContext(store=MemoryStore(), **ctx))


@pytest.fixture
def salt(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv(DEFAULT_SALT_ENV, SALT)
    return SALT


def test_the_three_types_are_registered() -> None:
    assert {"prada", "near_duplicate", "boundary"} <= set(registered())


@pytest.mark.parametrize(
    ("type_name", "override"),
    [("prada", "delta"), ("near_duplicate", "feature_range"), ("boundary", "threshold")],
)
def test_an_uncalibrated_detector_is_an_error_that_says_what_to_run(
    salt: str, type_name: str, override: str, tmp_path: Any
) -> None:
    """No profile and no explicit override: the config names the detector and the fix."""
    for ctx in ({}, {"calibration_dir": tmp_path}):
        with pytest.raises(ConfigurationError) as info:
            build(type_name, {}, raw=True, **ctx)
        assert info.value.key == f"{KEY}.params.{override}"
        message = str(info.value)
        assert "not calibrated" in message and "guard calibrate --config" in message


def test_explicit_overrides_build_each_detector_with_its_technique(salt: str) -> None:
    prada = build("prada", {}, seed=7)
    nd = build("near_duplicate", {"feature_range": [0, 16]})
    boundary = build("boundary", {})
    assert isinstance(prada, PradaDetector) and prada.seed == 7 and prada.delta == 0.90
    assert isinstance(nd, NearDuplicateDetector) and nd.threshold == 0.7
    assert isinstance(boundary, BoundaryDetector) and boundary.threshold == -6.0
    assert boundary.anomaly_rate is None and boundary.low is None  # coverage off by default
    assert (prada.technique, boundary.technique, nd.technique) == (
        "AML.T0024.002",
        "AML.T0024.002",
        "AML.T0043",
    )
    assert prada.observes_answers and boundary.observes_answers and not nd.observes_answers
    assert prada.name == "my-prada"


def test_params_reach_the_detectors(salt: str) -> None:
    prada = build(
        "prada",
        {
            "delta": 0.95,
            "min_distances": 50,
            "proj_dim": 16,
            "max_clients": 10,
            "flag_ttl_s": None,
            "seed": 3,
        },
    )
    assert (prada.delta, prada.min_distances, prada.proj_dim, prada.seed) == (0.95, 50, 16, 3)
    assert prada.clients.max_clients == 10
    nd = build(
        "near_duplicate",
        {
            "feature_range": [-1.0, 1.0],
            "levels": 16,
            "window": 4,
            "threshold": 0.8,
            "max_rows": 1000,
            "bucket_size": 4,
        },
    )
    assert nd.fingerprinter.window == 4 and nd.threshold == 0.8
    assert nd.fingerprinter.inv_step.tolist() == [16 / 2.0]
    boundary = build(
        "boundary",
        {
            "window": 50,
            "feature_range": [0, 16],
            "threshold": -4.5,
            "signals": ["coverage", "low_confidence"],
            "n_classes": 10,
            "baseline": {"coverage": [0.5, 0.02]},
        },
    )
    assert boundary.window == 50 and (boundary.low, boundary.high) == (0.0, 16.0)
    assert boundary._classes_seen == 10
    assert boundary.baseline == {
        "coverage": (0.5, 0.02),
        "low_confidence": DEFAULT_BASELINE["low_confidence"],
    }


def test_boundary_reads_the_anomaly_rate_of_a_named_row_detector() -> None:
    boundary = build(
        "boundary", {"anomaly_rate_source": "mahalanobis", "anomaly_rate_window_s": 30}
    )
    assert isinstance(boundary.anomaly_rate, AnomalyRateTracker)
    assert boundary.anomaly_rate.namespace == "mahalanobis"
    assert boundary.anomaly_rate.window_s == 30.0


@pytest.mark.parametrize(
    ("type_name", "params", "bad"),
    [
        ("prada", {"bogus": 1}, "bogus"),
        ("prada", {"delta": 1.5}, "delta"),
        ("prada", {"delta": "0.9"}, "delta"),
        ("prada", {"min_distances": 2}, "min_distances"),
        ("prada", {"min_distances": 500, "max_distances": 400}, "max_distances"),
        ("prada", {"proj_dim": True}, "proj_dim"),
        ("prada", {"flag_ttl_s": -1}, "flag_ttl_s"),
        ("prada", {"seed": -1}, "seed"),
        ("near_duplicate", {}, "feature_range"),
        ("near_duplicate", {"feature_range": [16, 0]}, "feature_range"),
        ("near_duplicate", {"feature_range": [0, 16], "bucket_size": 6}, "bucket_size"),
        ("near_duplicate", {"feature_range": [0, 16], "window": 40}, "window"),
        ("near_duplicate", {"feature_range": [0, 16], "match_fraction": 0}, "match_fraction"),
        ("near_duplicate", {"feature_range": [0, 16], "max_rows": 1 << 21}, "max_rows"),
        ("near_duplicate", {"feature_range": [0, 16], "salt": "inline"}, "salt"),
        ("boundary", {"window": 1}, "window"),
        ("boundary", {"threshold": "low"}, "threshold"),
        ("boundary", {"signals": ["coverage", "vibes"]}, "signals"),
        ("boundary", {"signals": []}, "signals"),
        ("boundary", {"baseline": {"coverage": [0.5]}}, "baseline.coverage"),
        ("boundary", {"baseline": {"vibes": [0.5, 0.1]}}, "baseline.vibes"),
        ("boundary", {"baseline": [1, 2]}, "baseline"),
        ("boundary", {"anomaly_rate_source": "a:b"}, "anomaly_rate_source"),
        ("boundary", {"feature_range": "0..16"}, "feature_range"),
        ("boundary", {"n_classes": 1}, "n_classes"),
    ],
)
def test_bad_params_name_their_key(
    salt: str, type_name: str, params: dict[str, Any], bad: str
) -> None:
    with pytest.raises(ConfigurationError) as info:
        build(type_name, params)
    assert info.value.key == f"{KEY}.params.{bad}"


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(ConfigurationError) as info:
        build("prada", {"delta": 2, "test_every": 0, "nope": 1}, raw=True)
    keys = {k for k, _ in info.value.problems}
    assert keys == {f"{KEY}.params.{n}" for n in ("delta", "test_every", "nope")}


def test_the_salt_comes_from_the_environment_and_fixes_the_fingerprints(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rows = np.random.default_rng(0).uniform(0, 16, size=(3, 64))
    monkeypatch.setenv("MY_SALT", SALT)
    a = build("near_duplicate", {"feature_range": [0, 16], "salt_env": "MY_SALT"})
    b = build("near_duplicate", {"feature_range": [0, 16], "salt_env": "MY_SALT"})
    monkeypatch.setenv("MY_SALT", SALT + " but another")
    c = build("near_duplicate", {"feature_range": [0, 16], "salt_env": "MY_SALT"})
    fa, fb, fc = (d.fingerprinter.fingerprints(rows) for d in (a, b, c))
    assert all(np.array_equal(x, y) for x, y in zip(fa, fb, strict=True))
    assert not any(np.array_equal(x, y) for x, y in zip(fa, fc, strict=True))


def test_without_a_salt_each_process_draws_one_and_says_so(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv(DEFAULT_SALT_ENV, raising=False)
    rows = np.random.default_rng(0).uniform(0, 16, size=(2, 64))
    with caplog.at_level(logging.WARNING, logger="guard.extraction_factories"):
        a = build("near_duplicate", {"feature_range": [0, 16]})
        b = build("near_duplicate", {"feature_range": [0, 16]})
    assert DEFAULT_SALT_ENV in caplog.text and "every worker" in caplog.text
    fa, fb = a.fingerprinter.fingerprints(rows), b.fingerprinter.fingerprints(rows)
    assert not np.array_equal(fa[0], fb[0])


def test_a_short_salt_is_refused_without_echoing_it(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv(DEFAULT_SALT_ENV, "tiny-secret")
    with caplog.at_level(logging.DEBUG), pytest.raises(ConfigurationError) as info:
        build("near_duplicate", {"feature_range": [0, 16]})
    assert info.value.key == f"{KEY}.params.salt_env"
    assert "tiny-secret" not in str(info.value) and "tiny-secret" not in caplog.text


def test_a_config_file_with_the_three_detectors_builds_and_runs(salt: str) -> None:
    cfg = GuardConfig.from_dict(
        {
            "policies": [
                {
                    "name": "digits",
                    "detectors": [
                        {"type": "prada", "action": "degrade", "params": {"delta": 0.9}},
                        {
                            "type": "near_duplicate",
                            "action": "degrade",
                            "params": {"feature_range": [0, 16]},
                        },
                        {
                            "type": "boundary",
                            "params": {"feature_range": [0, 16], "threshold": -6.0},
                        },
                    ],
                }
            ],
        }
    )
    store = MemoryStore()
    built = [build_detector(spec, BuildContext(store=store)) for spec in cfg.policies[0].detectors]
    assert [d.name for d in built] == ["prada", "near_duplicate", "boundary"]

    async def run() -> list[bool]:
        query = Query("c", "digits", np.zeros((2, 64)), n_rows=2)
        results = await asyncio.gather(*(d.inspect(query) for d in built))
        return [r.anomalous for r in results]

    assert asyncio.run(run()) == [False, False, False]
