"""IsolationForestOutlier: sklearn fits, numpy scores, and the two agree.

What all four row detectors share is tested in ``test_outlier_base.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.ensemble import IsolationForest

from inference_guard.detectors import ood_samples
from inference_guard.detectors.iforest import (
    IsolationForestOutlier,
    average_path_length,
    flatten_forest,
)
from tests.detectors.anomaly_helpers import HIGH, LOW, digits_split, flagged_share, gaussian


def test_average_path_length_matches_definition() -> None:
    n = np.array([0, 1, 2, 3, 10, 256])
    c = average_path_length(n)
    assert c[0] == c[1] == 0.0 and c[2] == 1.0
    def harmonic(m: int) -> float:
        return sum(1.0 / i for i in range(1, m + 1))

    # c(n) = 2 H(n-1) - 2 (n-1)/n, with H(i) ~ ln(i) + gamma
    assert c[5] == pytest.approx(2 * harmonic(255) - 2 * 255 / 256, rel=1e-3)


def _probes(X_test: np.ndarray) -> np.ndarray:
    rng = np.random.default_rng(7)
    return np.vstack([
        X_test,
        ood_samples.uniform_noise(200, X_test.shape[1], low=LOW, high=HIGH, rng=rng),
        ood_samples.out_of_range(X_test[:100], n_features=3, low=LOW, high=HIGH, rng=rng),
        rng.normal(0.0, 100.0, size=(50, X_test.shape[1])),
        X_test[:50] + 1e-7,  # values next to the split thresholds
    ])


@pytest.mark.parametrize(
    "params",
    [{}, {"max_features": 0.5}, {"max_samples": 64, "n_estimators": 37}, {"random_state": 11}],
)
def test_numpy_scores_equal_sklearn(params: dict[str, object]) -> None:
    X_fit, X_test = digits_split()
    det = IsolationForestOutlier(**params).fit(X_fit)  # type: ignore[arg-type]
    probes = _probes(X_test)
    np.testing.assert_allclose(
        det.score_samples(probes), det.estimator_.score_samples(probes), rtol=0, atol=1e-9
    )


def test_values_one_ulp_past_a_split_follow_sklearn() -> None:
    # scikit-learn compares float32(x) with the float64 threshold; a value just
    # above a threshold can round down onto it, and must go left as in sklearn
    X_fit, X_test = digits_split()
    jitter = 0.5 * np.random.default_rng(0).random(X_fit.shape)
    det = IsolationForestOutlier(n_estimators=50).fit(X_fit + jitter)
    flat = det.forest_
    probes = np.repeat(X_test[:1], flat.roots.size, axis=0)
    for i, root in enumerate(flat.roots):
        probes[i, flat.feature[root]] = np.nextafter(flat.threshold[root], np.inf)
    rounds_down = probes[np.arange(flat.roots.size), flat.feature[flat.roots]].astype(np.float32)
    assert (rounds_down <= flat.threshold[flat.roots]).any()  # the case is exercised
    np.testing.assert_allclose(
        det.score_samples(probes), det.estimator_.score_samples(probes), rtol=0, atol=1e-9
    )


def test_flatten_matches_an_independent_forest() -> None:
    X = gaussian(600, d=6)
    forest = IsolationForest(n_estimators=25, random_state=3).fit(X)
    from inference_guard.detectors.iforest import score_flat

    probes = np.vstack([X, gaussian(100, d=6, seed=9) * 3])
    np.testing.assert_allclose(
        score_flat(flatten_forest(forest, 6), probes), forest.score_samples(probes), atol=1e-9
    )


def test_hot_path_does_not_use_sklearn() -> None:
    X_fit, X_test = digits_split()
    det = IsolationForestOutlier(n_estimators=30).fit(X_fit)
    expected = det.score_samples(X_test)
    del det.estimator_  # scoring needs only the flat arrays
    np.testing.assert_array_equal(det.score_samples(X_test), expected)


@pytest.fixture(scope="module")
def digits_det() -> tuple[IsolationForestOutlier, np.ndarray]:
    X_fit, X_test = digits_split()
    return IsolationForestOutlier(target_fpr=0.01, holdout=0.25).fit(X_fit), X_test


def test_out_of_range_is_a_known_blind_spot(
    digits_det: tuple[IsolationForestOutlier, np.ndarray],
) -> None:
    # trees cannot tell "just past the largest value" from "far past it": a few
    # pushed features go unnoticed. The envelope covers this (layer them).
    det, X_test = digits_det
    rng = np.random.default_rng(3)
    pushed = ood_samples.out_of_range(X_test, n_features=3, low=LOW, high=HIGH, rng=rng)
    assert flagged_share(det, pushed) < 0.2
