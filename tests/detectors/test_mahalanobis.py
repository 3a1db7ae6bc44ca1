"""MahalanobisOutlier: shrinkage covariance, numpy scoring.

What all four row detectors share is tested in ``test_outlier_base.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.covariance import OAS, EmpiricalCovariance, LedoitWolf

from inference_guard.detectors.mahalanobis import MahalanobisOutlier
from tests.detectors.anomaly_helpers import digits_split, gaussian


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
