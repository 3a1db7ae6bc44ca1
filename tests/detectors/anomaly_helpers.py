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


def flagged_share(det: Any, X: FloatArray) -> float:
    """Share of rows ``det`` flags at its calibrated threshold."""
    return float(np.mean(det.predict(X) == -1))
