"""Mahalanobis distance under a shrinkage covariance estimate.

The sample covariance of ``d`` features from a few thousand rows is noisy and
often singular (constant pixels, collinear columns). Ledoit-Wolf and OAS shrink
it towards a scaled identity with a data-driven weight, which keeps it
invertible and well conditioned. At fit time the inverse is factored once into
a whitening matrix ``W`` (``precision = W @ W.T``), so scoring a row is one
matrix-vector product: ``d²(x) = ||(x - mu) @ W||²``.
"""

from __future__ import annotations

from typing import Any, Self

import numpy as np
from numpy.typing import NDArray
from sklearn.covariance import OAS, LedoitWolf

from inference_guard.detectors.outlier_base import FloatArray, RowOutlierBase

__all__ = ["MahalanobisOutlier"]

_SHRINKAGE = ("ledoit_wolf", "oas")


class MahalanobisOutlier(RowOutlierBase):
    """Squared Mahalanobis distance to the reference mean, shrinkage covariance.

    ``score_samples`` is ``-d²`` (as in scikit-learn's ``EllipticEnvelope``):
    higher is more normal.

    Parameters
    ----------
    shrinkage : {"ledoit_wolf", "oas"}, default="ledoit_wolf"
        Covariance estimator: :class:`sklearn.covariance.LedoitWolf` or
        :class:`sklearn.covariance.OAS`.
    target_fpr : float, default=0.01
        False-positive rate at which ``offset_`` is set on the held-out rows.
    holdout : float, default=0.2
        Fraction of the rows given to ``fit`` that is held out to set ``offset_``.
    random_state : int or None, default=0
        Seed of the held-out split.

    Attributes
    ----------
    location_ : ndarray of shape (n_features,)
        Mean of the training rows.
    covariance_ : ndarray of shape (n_features, n_features)
        Shrunk covariance.
    shrinkage_ : float
        The estimator's shrinkage weight.
    whitener_ : ndarray of shape (n_features, n_features)
        ``W`` with ``inv(covariance_) = W @ W.T``.
    offset_ : float
        Threshold: rows scoring below it are anomalous.
    n_features_in_ : int

    Examples
    --------
    >>> import numpy as np
    >>> from inference_guard.detectors.mahalanobis import MahalanobisOutlier
    >>> rng = np.random.default_rng(0)
    >>> X = rng.normal(size=(2000, 3)) @ np.array([[1.0, 0.9, 0], [0, 0.4, 0], [0, 0, 1]])
    >>> det = MahalanobisOutlier(target_fpr=0.01).fit(X)
    >>> det.predict([[0.0, 0.0, 0.0], [1.0, -1.0, 0.0]]).tolist()
    [1, -1]
    """

    kind = "mahalanobis"

    def __init__(
        self,
        *,
        shrinkage: str = "ledoit_wolf",
        target_fpr: float = 0.01,
        holdout: float = 0.2,
        random_state: int | None = 0,
    ) -> None:
        self.shrinkage = shrinkage
        self.target_fpr = target_fpr
        self.holdout = holdout
        self.random_state = random_state

    def _validate_params(self) -> None:
        if self.shrinkage not in _SHRINKAGE:
            raise ValueError(
                f"shrinkage must be one of {', '.join(_SHRINKAGE)}, got {self.shrinkage!r}"
            )

    def _fit(self, X: FloatArray) -> None:
        if not (X.max(axis=0) > X.min(axis=0)).any():
            raise ValueError("every feature is constant: no covariance to estimate")
        estimator = LedoitWolf() if self.shrinkage == "ledoit_wolf" else OAS()
        estimator.fit(X)
        self.location_ = np.asarray(estimator.location_, dtype=np.float64)
        self.covariance_ = np.asarray(estimator.covariance_, dtype=np.float64)
        self.shrinkage_ = float(estimator.shrinkage_)
        self.whitener_ = _whitener(self.covariance_)

    def _score(self, X: FloatArray) -> FloatArray:
        if X.shape[0] == 1:
            return np.array([self._score_row(X[0])])
        z = (X - self.location_) @ self.whitener_
        scores: FloatArray = -np.einsum("ij,ij->i", z, z)
        return scores

    def _score_row(self, x: FloatArray) -> float:
        """Score of one validated row (a vector): three numpy calls."""
        z = (x - self.location_) @ self.whitener_
        return -float(z @ z)

    def export_state(self) -> dict[str, NDArray[Any]]:
        return {
            **self._common_state(),
            "location_": self.location_,
            "covariance_": self.covariance_,
            "shrinkage_": np.asarray(self.shrinkage_, dtype=np.float64),
        }

    @classmethod
    def from_state(cls, params: dict[str, Any], state: dict[str, NDArray[Any]]) -> Self:
        model = cls(**params)
        model._validate_params()
        loc = state["location_"].astype(np.float64)
        cov = state["covariance_"].astype(np.float64)
        d = loc.shape[0] if loc.ndim == 1 else 0
        if d < 1 or cov.shape != (d, d) or not np.allclose(cov, cov.T):
            raise ValueError("mahalanobis state: location_/covariance_ shapes are inconsistent")
        model.location_ = loc
        model.covariance_ = cov
        model.shrinkage_ = float(state["shrinkage_"])
        # the whitener is derived, not stored: a file cannot smuggle in a
        # matrix that disagrees with the covariance it claims
        model.whitener_ = _whitener(cov)
        model.n_features_in_ = d
        model._restore_common(state)
        return model


def _whitener(covariance: FloatArray) -> FloatArray:
    """``W`` with ``inv(covariance) = W @ W.T``, from a symmetric eigendecomposition.

    ``eigh`` rather than Cholesky: a shrunk covariance is positive definite in
    exact arithmetic, but eigenvalues near the floor can come out as tiny
    negatives; clipping them at a relative floor keeps ``W`` finite.
    """
    eigval, eigvec = np.linalg.eigh(covariance)
    top = float(eigval.max())
    if not top > 0:
        raise ValueError("covariance has no positive eigenvalue")
    floor = top * 1e-12
    whitener: FloatArray = np.ascontiguousarray(eigvec / np.sqrt(np.maximum(eigval, floor)))
    return whitener
