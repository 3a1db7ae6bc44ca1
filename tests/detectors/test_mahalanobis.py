"""MahalanobisOutlier: shrinkage covariance, numpy scoring."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.covariance import OAS, EmpiricalCovariance, LedoitWolf

from detectors import ood_samples
from detectors.mahalanobis import MahalanobisOutlier
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
    check_contract(MahalanobisOutlier, {"shrinkage": "empirical"})
    check_contract(MahalanobisOutlier, {"target_fpr": 0.0})
    check_contract(MahalanobisOutlier, {"holdout": 1.5})


@pytest.mark.parametrize(("shrinkage", "estimator"), [("ledoit_wolf", LedoitWolf), ("oas", OAS)])
def test_score_is_minus_squared_mahalanobis(shrinkage: str, estimator: type) -> None:
    X = gaussian(1000, d=8)
    det = MahalanobisOutlier(shrinkage=shrinkage, holdout=0.0).fit(X)
    ref = estimator().fit(X)
    assert det.shrinkage_ == pytest.approx(ref.shrinkage_)
    probe = gaussian(50, d=8, seed=3) * 1.5
    np.testing.assert_allclose(det.score_samples(probe), -ref.mahalanobis(probe), rtol=1e-8)


def test_singular_covariance_is_handled() -> None:
    # digits have constant pixels: the sample covariance is singular, the shrunk one is not
    X_fit, X_test = digits_split()
    assert np.linalg.matrix_rank(EmpiricalCovariance().fit(X_fit).covariance_) < 64
    det = MahalanobisOutlier().fit(X_fit)
    assert np.isfinite(det.score_samples(X_test)).all()
    # a half-intensity value in an always-zero pixel is flagged (shrinkage gives
    # the pixel a small variance, so it is not infinitely far: the envelope is)
    probe = X_test[:1].copy()
    assert det.predict(probe)[0] == 1
    probe[0, 0] = 8.0
    assert det.predict(probe)[0] == -1


def test_all_constant_features_refused() -> None:
    with pytest.raises(ValueError, match="constant"):
        MahalanobisOutlier().fit(np.ones((100, 3)))


@pytest.mark.parametrize("target", [0.01, 0.05])
def test_fpr_on_heldout_digits(target: float) -> None:
    X_fit, X_test = digits_split()
    check_fpr(MahalanobisOutlier(target_fpr=target, holdout=0.25), X_fit, X_test)


@pytest.mark.parametrize("shrinkage", ["ledoit_wolf", "oas"])
def test_fpr_on_heldout_gaussian(shrinkage: str) -> None:
    det = MahalanobisOutlier(shrinkage=shrinkage, target_fpr=0.01, holdout=0.5)
    check_fpr(det, gaussian(4000), gaussian(5000, seed=1))


@pytest.fixture(scope="module")
def digits_det() -> tuple[MahalanobisOutlier, np.ndarray]:
    X_fit, X_test = digits_split()
    return MahalanobisOutlier(target_fpr=0.01, holdout=0.25).fit(X_fit), X_test


def test_flags_uniform_noise(digits_det: tuple[MahalanobisOutlier, np.ndarray]) -> None:
    det, _ = digits_det
    noise = ood_samples.uniform_noise(500, 64, low=LOW, high=HIGH, rng=np.random.default_rng(1))
    assert flagged_share(det, noise) >= 0.99


def test_flags_cross_dataset_rows(digits_det: tuple[MahalanobisOutlier, np.ndarray]) -> None:
    det, _ = digits_det
    for mode in ("tile", "pad"):
        rows = ood_samples.cross_dataset_rows(64, low=LOW, high=HIGH, mode=mode)
        assert flagged_share(det, rows) >= 0.99, mode


def test_flags_gaussian_corrupted(digits_det: tuple[MahalanobisOutlier, np.ndarray]) -> None:
    det, X_test = digits_det
    rng = np.random.default_rng(2)
    noisy = ood_samples.gaussian_corrupted(X_test, sigma=4.0, low=LOW, high=HIGH, rng=rng)
    assert flagged_share(det, noisy) >= 0.95


def test_flags_out_of_range(digits_det: tuple[MahalanobisOutlier, np.ndarray]) -> None:
    det, X_test = digits_det
    rng = np.random.default_rng(3)
    pushed = ood_samples.out_of_range(X_test, n_features=3, low=LOW, high=HIGH, rng=rng)
    assert flagged_share(det, pushed) >= 0.85
