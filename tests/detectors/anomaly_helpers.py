"""Shared data and checks for the input-anomaly detector tests.

False-positive tolerance. A detector calibrated on ``n_cal`` benign held-out
scores sets its threshold at the ``j``-th smallest, ``j = floor(t (n_cal + 1))``.
For continuous scores the true false-positive rate of that threshold is
``Beta(j, n_cal + 1 - j)``-distributed (mean ``j / (n_cal + 1)`` <= t), and the
number of the ``n_test`` fresh benign rows it flags is beta-binomial. The
tests accept counts inside the central 99.9% interval of that distribution:
a correct detector fails a given seed with probability 0.1%, while a
threshold that is off by a factor of two or so (e.g. set on training
scores, or at the wrong quantile) falls outside with large ``n``. Ties (the
envelope scores most rows exactly 0) only lower the rate, so for tied scores
only the upper bound applies.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy import stats
from sklearn.datasets import load_digits

FloatArray = NDArray[np.float64]

#: digits pixel range
LOW, HIGH = 0.0, 16.0


def fpr_interval(n_cal: int, n_test: int, target: float, alpha: float = 1e-3) -> tuple[int, int]:
    """Central ``1 - alpha`` interval of the flagged count among ``n_test`` benign rows."""
    j = max(math.floor(target * (n_cal + 1)), 1)
    dist = stats.betabinom(n_test, j, n_cal + 1 - j)
    return int(dist.ppf(alpha / 2)), int(dist.ppf(1 - alpha / 2))


def digits_split(seed: int = 0) -> tuple[FloatArray, FloatArray]:
    """Digits rows shuffled with ``seed``: 1437 to fit (and hold out from), 360 to test."""
    X = np.asarray(load_digits().data, dtype=np.float64)
    order = np.random.default_rng(seed).permutation(X.shape[0])
    return X[order[:1437]], X[order[1437:]]


def gaussian(n: int, d: int = 16, seed: int = 0) -> FloatArray:
    """Correlated Gaussian rows (a fixed random mixing matrix, seed-independent)."""
    mix = np.random.default_rng(12345).normal(size=(d, d)) / math.sqrt(d)
    rows: FloatArray = np.random.default_rng(seed).normal(size=(n, d)) @ mix + 3.0
    return rows


def check_fpr(det: Any, X_fit: FloatArray, X_test: FloatArray, *, ties: bool = False) -> None:
    """Fit ``det`` (its own held-out split) and check its FPR on ``X_test``."""
    det.fit(X_fit)
    flagged = int(np.count_nonzero(det.score_samples(X_test) < det.offset_))
    lo, hi = fpr_interval(det.calibration_size_, X_test.shape[0], det.target_fpr)
    assert flagged <= hi, f"{flagged}/{X_test.shape[0]} benign rows flagged, expected <= {hi}"
    if not ties:
        assert flagged >= lo, f"{flagged}/{X_test.shape[0]} benign rows flagged, expected >= {lo}"
    # predict and decision_function agree with the threshold
    dec = det.decision_function(X_test)
    assert np.array_equal(det.predict(X_test) == -1, dec < 0)
    assert int(np.count_nonzero(dec < 0)) == flagged


def flagged_share(det: Any, X: FloatArray) -> float:
    """Share of rows ``det`` flags at its calibrated threshold."""
    return float(np.mean(det.predict(X) == -1))


def check_contract(cls: type[Any], bad_params: dict[str, Any], **params: Any) -> None:
    """scikit-learn's outlier contract, as STYLE.md states it."""
    import pytest
    from sklearn.base import clone
    from sklearn.exceptions import NotFittedError

    X = gaussian(400, d=5)
    det = cls(**params)
    for method in (det.score_samples, det.decision_function, det.predict):
        with pytest.raises(NotFittedError):
            method(X)
    # parameters are stored as given; validation waits for fit
    bad = cls(**{**params, **bad_params})
    for key, value in bad_params.items():
        assert bad.get_params()[key] == value
    with pytest.raises(ValueError):
        bad.fit(X)
    assert not hasattr(bad, "offset_")
    before = set(vars(det))
    assert det.fit(X) is det
    learned = set(vars(det)) - before
    assert "offset_" in learned and "n_features_in_" in learned
    assert all(a.endswith("_") or a.startswith("_") for a in learned), learned
    assert det.n_features_in_ == 5
    # clone() gives an unfitted copy with the same parameters
    twin = clone(det)
    assert twin.get_params() == det.get_params() and not hasattr(twin, "offset_")
    # same seed, same model
    assert np.array_equal(twin.fit(X).score_samples(X[:50]), det.score_samples(X[:50]))
    # one row at a time equals the batch (the hot path is the single-row call)
    batch = det.score_samples(X[:20])
    singles = np.array([det.score_samples(X[i : i + 1])[0] for i in range(20)])
    # float32 detectors (k-NN) go through different BLAS kernels for one row and a block,
    # which round differently: equal to float32 precision, not to the last bit
    tol = 1e-12 if getattr(det, "_ref32", None) is None else 1e-3
    np.testing.assert_allclose(singles, batch, rtol=tol, atol=tol)
    assert np.array_equal(det.decision_function(X[:20]), batch - det.offset_)
    with pytest.raises(ValueError, match="features"):
        det.score_samples(X[:, :4])
    bad_row = X[:1].copy()
    bad_row[0, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        det.score_samples(bad_row)
    with pytest.raises(ValueError):
        det.set_params(no_such_param=1)
