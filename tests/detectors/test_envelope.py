"""FeatureEnvelope: per-feature ranges and type checks."""

from __future__ import annotations

import numpy as np
import pytest

from detectors import ood_samples
from detectors.envelope import FeatureEnvelope
from tests.detectors.anomaly_helpers import (
    HIGH,
    LOW,
    check_contract,
    check_fpr,
    digits_split,
    flagged_share,
    gaussian,
)


def test_outlier_contract() -> None:
    check_contract(FeatureEnvelope, {"margin": -1.0})
    check_contract(FeatureEnvelope, {"check_integer": "yes"})


def test_inside_scores_zero_and_outside_counts_range_units() -> None:
    X = np.array([[0.0, 10.0, 5.0], [4.0, 20.0, 5.0], [2.0, 15.0, 5.0]] * 10)
    env = FeatureEnvelope(margin=0.0, holdout=0.0).fit(X)
    assert env.score_samples([[1.0, 12.0, 5.0]])[0] == 0.0
    # feature 0 range is 4: 2 above the max is half a range
    assert env.score_samples([[6.0, 12.0, 5.0]])[0] == pytest.approx(-0.5)
    # feature 1 range is 10: 5 below the min is half a range, and 7.5 is no integer
    assert env.score_samples([[1.0, 7.5, 5.0]])[0] == pytest.approx(-0.25 - 1.0)
    # constant feature: any change is a type violation plus its distance in max(|c|, 1) units
    assert env.score_samples([[1.0, 12.0, 6.0]])[0] == pytest.approx(-(1.0 / 5.0) - 1.0)


def test_margin_widens_bounds() -> None:
    X = np.linspace(0.0, 10.0, 101)[:, None]
    env = FeatureEnvelope(margin=0.1, check_integer=False, holdout=0.0).fit(X)
    assert env.low_[0] == pytest.approx(-1.0) and env.high_[0] == pytest.approx(11.0)
    assert env.score_samples([[10.9]])[0] == 0.0
    assert env.score_samples([[12.0]])[0] == pytest.approx(-0.1)


def test_integer_check_can_be_disabled() -> None:
    X = np.arange(100, dtype=float)[:, None]
    assert FeatureEnvelope(holdout=0.0).fit(X).integer_.all()
    env = FeatureEnvelope(check_integer=False, holdout=0.0).fit(X)
    assert env.score_samples([[3.5]])[0] == 0.0


@pytest.mark.parametrize("target", [0.01, 0.05])
def test_fpr_on_heldout_digits(target: float) -> None:
    X_fit, X_test = digits_split()
    check_fpr(FeatureEnvelope(target_fpr=target, holdout=0.25), X_fit, X_test, ties=True)


def test_fpr_on_heldout_gaussian() -> None:
    check_fpr(FeatureEnvelope(target_fpr=0.01, holdout=0.5), gaussian(4000), gaussian(5000, seed=1),
              ties=True)


@pytest.fixture(scope="module")
def digits_envelope() -> tuple[FeatureEnvelope, np.ndarray]:
    X_fit, X_test = digits_split()
    return FeatureEnvelope(target_fpr=0.01, holdout=0.25).fit(X_fit), X_test


def test_flags_uniform_noise(digits_envelope: tuple[FeatureEnvelope, np.ndarray]) -> None:
    env, _ = digits_envelope
    noise = ood_samples.uniform_noise(500, 64, low=LOW, high=HIGH, rng=np.random.default_rng(1))
    assert flagged_share(env, noise) >= 0.99


def test_flags_cross_dataset_rows(digits_envelope: tuple[FeatureEnvelope, np.ndarray]) -> None:
    env, _ = digits_envelope
    assert flagged_share(env, ood_samples.cross_dataset_rows(64, low=LOW, high=HIGH)) >= 0.99


def test_flags_gaussian_corrupted(digits_envelope: tuple[FeatureEnvelope, np.ndarray]) -> None:
    env, X_test = digits_envelope
    rng = np.random.default_rng(2)
    noisy = ood_samples.gaussian_corrupted(X_test, sigma=4.0, low=LOW, high=HIGH, rng=rng)
    assert flagged_share(env, noisy) >= 0.99


def test_flags_every_out_of_range_row(digits_envelope: tuple[FeatureEnvelope, np.ndarray]) -> None:
    env, X_test = digits_envelope
    rng = np.random.default_rng(3)
    pushed = ood_samples.out_of_range(X_test, n_features=1, low=LOW, high=HIGH, rng=rng)
    assert flagged_share(env, pushed) == 1.0
