"""KNNOutlier: bounded reference set, float32 search, exact distances.

What all four row detectors share is tested in ``test_outlier_base.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.distance import cdist

from inference_guard.detectors import ood_samples
from inference_guard.detectors.knn import KNNOutlier
from tests.detectors.anomaly_helpers import HIGH, LOW, digits_split, gaussian


@pytest.mark.parametrize("scale", ["std", "range", "none"])
def test_score_is_minus_mean_distance_to_k_nearest(scale: str) -> None:
    X_fit, X_test = digits_split()
    det = KNNOutlier(n_neighbors=7, scale=scale).fit(X_fit)
    probes = np.vstack([X_test, ood_samples.uniform_noise(
        100, 64, low=LOW, high=HIGH, rng=np.random.default_rng(4))])
    z = (probes - det.center_) / det.scale_
    dist = np.sort(cdist(z, det.reference_), axis=1)[:, :7]
    # float32 search: agreement to a millionth of a distance is what it promises
    np.testing.assert_allclose(det.score_samples(probes), -dist.mean(axis=1), rtol=2e-6)


def test_reference_is_capped_and_seeded() -> None:
    X = gaussian(6000, d=8)
    a = KNNOutlier(max_reference=2000, random_state=1).fit(X)
    b = KNNOutlier(max_reference=2000, random_state=1).fit(X)
    c = KNNOutlier(max_reference=2000, random_state=2).fit(X)
    assert a.reference_.shape == (2000, 8)
    assert np.array_equal(a.reference_, b.reference_)
    assert not np.array_equal(a.reference_, c.reference_)


def test_training_scores_leave_each_reference_row_out() -> None:
    # with holdout=0 the threshold comes from the training rows; a reference row
    # must not count itself as its nearest neighbour (distance 0 would make
    # every training score look perfectly normal)
    X = gaussian(500, d=4)
    det = KNNOutlier(n_neighbors=1, holdout=0.0, target_fpr=0.05).fit(X)
    z = (X - det.center_) / det.scale_
    d = cdist(z, det.reference_)
    np.fill_diagonal(d, np.inf)
    assert det.offset_ == pytest.approx(np.sort(-d.min(axis=1))[int(0.05 * 501) - 1], rel=1e-5)
