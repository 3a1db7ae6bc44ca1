"""The four calibrated row detectors, one suite: contract, false-positive rate, what they flag.

:class:`~detectors.outlier_base.RowOutlierBase` gives ``envelope``,
``mahalanobis``, ``iforest`` and ``knn`` one contract; each test here runs
against every one of them with one ``parametrize``, so a detector cannot drift
from the others unnoticed. What only one detector does (its scoring formula,
its known blind spot) is tested in ``test_<detector>.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.exceptions import NotFittedError

from inference_guard.detectors import ood_samples
from inference_guard.detectors.envelope import FeatureEnvelope
from inference_guard.detectors.iforest import IsolationForestOutlier
from inference_guard.detectors.knn import KNNOutlier
from inference_guard.detectors.mahalanobis import MahalanobisOutlier
from inference_guard.detectors.outlier_base import RowOutlierBase
from tests.detectors.anomaly_helpers import (
    HIGH,
    LOW,
    FloatArray,
    digits_split,
    flagged_share,
    fpr_interval,
    gaussian,
)


@dataclass(frozen=True)
class Case:
    """One detector and what the suite expects of it."""

    cls: type[RowOutlierBase]
    #: parameter values that ``fit`` must refuse (each is one contract test)
    bad_params: tuple[dict[str, Any], ...]
    #: least share of digits with Gaussian noise (sigma 4) flagged
    corrupted: float
    #: (features pushed out of range, least share flagged); None: see test_<detector>.py
    out_of_range: tuple[int, float] | None
    #: parameters for the contract test (a small forest is quick)
    params: dict[str, Any] = field(default_factory=dict)
    #: scores tie (the envelope scores most rows exactly 0): only the upper FPR bound holds
    ties: bool = False
    #: cross_dataset_rows modes flagged (nearly) always
    cross_modes: tuple[str, ...] = ("tile",)
    #: variants of the held-out Gaussian FPR test
    gaussian_params: tuple[dict[str, Any], ...] = ({},)


CASES = {
    "envelope": Case(
        FeatureEnvelope,
        bad_params=({"margin": -1.0}, {"check_integer": "yes"}),
        corrupted=0.99,
        # one pushed feature is enough: it is what the envelope is for
        out_of_range=(1, 1.0),
        ties=True,
    ),
    "mahalanobis": Case(
        MahalanobisOutlier,
        bad_params=({"shrinkage": "empirical"}, {"target_fpr": 0.0}, {"holdout": 1.5}),
        corrupted=0.95,
        out_of_range=(3, 0.85),
        cross_modes=("tile", "pad"),
        gaussian_params=({"shrinkage": "ledoit_wolf"}, {"shrinkage": "oas"}),
    ),
    "iforest": Case(
        IsolationForestOutlier,
        bad_params=({"n_estimators": 0}, {"max_features": 1.5}),
        params={"n_estimators": 20},
        corrupted=0.5,
        out_of_range=None,  # a known blind spot, tested in test_iforest.py
    ),
    "knn": Case(
        KNNOutlier,
        bad_params=({"n_neighbors": 0}, {"scale": "minmax"}, {"max_reference": 1}),
        corrupted=0.9,
        out_of_range=(3, 0.3),
    ),
}


def _each(attr: str) -> list[Any]:
    """``pytest.param(name, params)`` for every dict of every case's ``attr`` tuple."""
    return [
        pytest.param(name, params, id="-".join([name, *(f"{k}={v}" for k, v in params.items())]))
        for name, case in CASES.items()
        for params in getattr(case, attr)
    ]


# -- scikit-learn's outlier contract -----------------------------------------------------


@pytest.mark.parametrize(("name", "bad"), _each("bad_params"))
def test_outlier_contract(name: str, bad: dict[str, Any]) -> None:
    case = CASES[name]
    X = gaussian(400, d=5)
    det = case.cls(**case.params)
    for method in (det.score_samples, det.decision_function, det.predict):
        with pytest.raises(NotFittedError):
            method(X)
    # parameters are stored as given; validation waits for fit
    refused = case.cls(**{**case.params, **bad})
    for key, value in bad.items():
        assert refused.get_params()[key] == value
    with pytest.raises(ValueError):
        refused.fit(X)
    assert not hasattr(refused, "offset_")
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


# -- the false-positive rate on held-out benign rows -------------------------------------


def check_fpr(det: Any, X_fit: FloatArray, X_test: FloatArray, *, ties: bool = False) -> None:
    """Fit ``det`` (its own held-out split) and check its FPR on ``X_test``.

    The bounds are explained in ``anomaly_helpers``: the central 99.9 % of the
    flagged count of a correctly calibrated threshold.
    """
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


@pytest.mark.parametrize("target", [0.01, 0.05])
@pytest.mark.parametrize("name", CASES)
def test_fpr_on_heldout_digits(name: str, target: float) -> None:
    case = CASES[name]
    X_fit, X_test = digits_split()
    check_fpr(case.cls(target_fpr=target, holdout=0.25), X_fit, X_test, ties=case.ties)


@pytest.mark.parametrize(("name", "params"), _each("gaussian_params"))
def test_fpr_on_heldout_gaussian(name: str, params: dict[str, Any]) -> None:
    case = CASES[name]
    det = case.cls(**params, target_fpr=0.01, holdout=0.5)
    check_fpr(det, gaussian(4000), gaussian(5000, seed=1), ties=case.ties)


# -- what each flags, calibrated on digits at 1 % ----------------------------------------


@pytest.fixture(scope="module", params=list(CASES))
def digits_det(request: pytest.FixtureRequest) -> tuple[str, RowOutlierBase, FloatArray]:
    name: str = request.param
    X_fit, X_test = digits_split()
    return name, CASES[name].cls(target_fpr=0.01, holdout=0.25).fit(X_fit), X_test


def test_flags_uniform_noise(digits_det: tuple[str, RowOutlierBase, FloatArray]) -> None:
    _, det, _ = digits_det
    noise = ood_samples.uniform_noise(500, 64, low=LOW, high=HIGH, rng=np.random.default_rng(1))
    assert flagged_share(det, noise) >= 0.99


def test_flags_cross_dataset_rows(digits_det: tuple[str, RowOutlierBase, FloatArray]) -> None:
    name, det, _ = digits_det
    for mode in CASES[name].cross_modes:
        rows = ood_samples.cross_dataset_rows(64, low=LOW, high=HIGH, mode=mode)
        assert flagged_share(det, rows) >= 0.99, mode


def test_flags_gaussian_corrupted(digits_det: tuple[str, RowOutlierBase, FloatArray]) -> None:
    name, det, X_test = digits_det
    rng = np.random.default_rng(2)
    noisy = ood_samples.gaussian_corrupted(X_test, sigma=4.0, low=LOW, high=HIGH, rng=rng)
    assert flagged_share(det, noisy) >= CASES[name].corrupted


@pytest.mark.parametrize(
    "digits_det", [name for name, case in CASES.items() if case.out_of_range], indirect=True
)
def test_flags_out_of_range(digits_det: tuple[str, RowOutlierBase, FloatArray]) -> None:
    name, det, X_test = digits_det
    n_features, least = CASES[name].out_of_range or (0, 0.0)
    rng = np.random.default_rng(3)
    pushed = ood_samples.out_of_range(X_test, n_features=n_features, low=LOW, high=HIGH, rng=rng)
    assert flagged_share(det, pushed) >= least
