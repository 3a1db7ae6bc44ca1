"""Distance to the k nearest rows of a bounded reference sample.

A non-parametric density proxy: a row far from every reference row is unlike
the reference data, whatever shape that data has (several clusters, curved
manifolds) where a single Gaussian (Mahalanobis) would not fit. The reference
set is capped (``max_reference`` rows drawn with a seed), so memory and the
cost per row are bounded whatever the size of the reference data.

Scoring uses ``||a - b||² = ||a||² + ||b||² - 2 a·b``: one matrix-vector product
against the reference in float32 (half the memory traffic of float64, which is
what a single row's cost is made of) and a partial sort for the ``k``
smallest. Features are always centred on the training mean (translation does
not change distances), so the norms stay small and float32 cancellation costs
about 1e-6 of a typical neighbour distance.
"""

from __future__ import annotations

import math
from typing import Any, Self

import numpy as np
from numpy.typing import NDArray

from inference_guard.detectors.outlier_base import FloatArray, RowOutlierBase, check_int

__all__ = ["KNNOutlier"]

_SCALES = ("std", "range", "none")
#: rows scored per block: bounds the (block, n_reference) distance matrix
_BLOCK = 256


class KNNOutlier(RowOutlierBase):
    """Minus the mean Euclidean distance to the ``n_neighbors`` nearest reference rows.

    Parameters
    ----------
    n_neighbors : int, default=5
        ``k``.
    max_reference : int, default=2000
        Cap on the reference rows kept (a seeded sample of the training rows).
    scale : {"std", "range", "none"}, default="std"
        Per-feature scaling before distances: divide by the standard deviation
        or the range of the training rows (constant features by 1), or nothing.
    target_fpr : float, default=0.01
        False-positive rate at which ``offset_`` is set on the held-out rows.
    holdout : float, default=0.2
        Fraction of the rows given to ``fit`` that is held out to set ``offset_``.
    random_state : int or None, default=0
        Seed of the held-out split and of the reference sample.

    Attributes
    ----------
    reference_ : ndarray of shape (n_reference, n_features)
        The scaled reference rows.
    center_, scale_ : ndarray of shape (n_features,)
        Scaling: ``z = (x - center_) / scale_`` (``center_`` is the training mean).
    offset_ : float
        Threshold: rows scoring below it are anomalous.
    n_features_in_ : int

    Examples
    --------
    >>> import numpy as np
    >>> from inference_guard.detectors.knn import KNNOutlier
    >>> rng = np.random.default_rng(0)
    >>> X = np.vstack([rng.normal(-3, 1, (500, 2)), rng.normal(3, 1, (500, 2))])
    >>> det = KNNOutlier(n_neighbors=5, target_fpr=0.01).fit(X)
    >>> det.predict([[-3.0, -3.0], [3.0, 3.0], [0.0, 0.0]]).tolist()
    [1, 1, -1]
    """

    kind = "knn"

    def __init__(
        self,
        *,
        n_neighbors: int = 5,
        max_reference: int = 2000,
        scale: str = "std",
        target_fpr: float = 0.01,
        holdout: float = 0.2,
        random_state: int | None = 0,
    ) -> None:
        self.n_neighbors = n_neighbors
        self.max_reference = max_reference
        self.scale = scale
        self.target_fpr = target_fpr
        self.holdout = holdout
        self.random_state = random_state

    def _validate_params(self) -> None:
        check_int("n_neighbors", self.n_neighbors, minimum=1)
        check_int("max_reference", self.max_reference, minimum=2)
        if self.scale not in _SCALES:
            raise ValueError(f"scale must be one of {', '.join(_SCALES)}, got {self.scale!r}")
        if self.n_neighbors >= self.max_reference:
            raise ValueError("n_neighbors must be smaller than max_reference")

    def _fit(self, X: FloatArray) -> None:
        n, d = X.shape
        k = int(self.n_neighbors)
        if n <= k:
            raise ValueError(f"need more than n_neighbors={k} training rows, got {n}")
        center = X.mean(axis=0)
        if self.scale == "std":
            spread = X.std(axis=0)
        elif self.scale == "range":
            spread = X.max(axis=0) - X.min(axis=0)
        else:
            spread = np.ones(d)
        self.center_ = center
        self.scale_ = np.where(spread > 0, spread, 1.0)
        cap = int(self.max_reference)
        rng = np.random.default_rng(self.random_state)
        # the held-out split uses its own generator; a second draw here only picks the sample
        chosen = np.sort(rng.choice(n, size=cap, replace=False)) if n > cap else np.arange(n)
        self._reference_rows = chosen  # training-row index of each reference row (fit only)
        self.reference_ = (X[chosen] - center) / self.scale_
        self._prepare()

    def _prepare(self) -> None:
        self._inv_scale = 1.0 / self.scale_
        self._ref32 = np.ascontiguousarray(self.reference_, dtype=np.float32)
        # ranking by ||r||²/2 - z·r is ranking by distance (||z||² is common to all)
        self._half_sq = 0.5 * np.einsum("ij,ij->i", self._ref32, self._ref32)
        self._k = int(self.n_neighbors)

    def _score(self, X: FloatArray) -> FloatArray:
        if X.shape[0] == 1:
            return np.array([self._score_row(X[0])])
        if X.shape[0] <= _BLOCK:
            return self._score_block(X, None)
        return np.concatenate(
            [self._score_block(X[i : i + _BLOCK], None) for i in range(0, X.shape[0], _BLOCK)]
        )

    def _score_row(self, x: FloatArray) -> float:
        """Score of one validated row (a vector): the block computation for one row.

        The same float32 products and float64 arithmetic as :meth:`_score_block`
        (so the same score), with an in-place partial sort and the ``k``
        distances summed as Python floats.
        """
        t = x - self.center_
        t *= self._inv_scale
        z = t.astype(np.float32)
        half = self._half_sq - self._ref32 @ z
        k = self._k
        half.partition(k - 1)
        zz = float(np.einsum("i,i->", z, z))
        total = 0.0
        for h in half[:k].tolist():
            d2 = 2.0 * h + zz
            if d2 > 0.0:
                total += math.sqrt(d2)
        return -(total / k)

    def _score_block(self, X: FloatArray, exclude: NDArray[np.intp] | None) -> FloatArray:
        z = ((X - self.center_) * self._inv_scale).astype(np.float32)
        half = self._half_sq - z @ self._ref32.T  # (||z - r||² - ||z||²) / 2
        k = self._k
        if exclude is not None:  # leave-one-out: a row is not its own neighbour
            has = exclude >= 0
            half[np.flatnonzero(has), exclude[has]] = np.inf
        nearest = np.partition(half, k - 1, axis=1)[:, :k]
        d2 = 2.0 * nearest.astype(np.float64) + np.einsum("ij,ij->i", z, z)[:, None]
        # rounding can leave a tiny negative where the true distance is 0
        scores: FloatArray = -np.sqrt(np.maximum(d2, 0.0)).mean(axis=1)
        return scores

    def _training_scores(self, X: FloatArray) -> FloatArray:
        # in-sample: each reference row would find itself at distance 0
        pos = np.full(X.shape[0], -1, dtype=np.intp)
        pos[self._reference_rows] = np.arange(self._reference_rows.size)
        return np.concatenate(
            [
                self._score_block(X[i : i + _BLOCK], pos[i : i + _BLOCK])
                for i in range(0, X.shape[0], _BLOCK)
            ]
        )

    def export_state(self) -> dict[str, NDArray[Any]]:
        return {
            **self._common_state(),
            "reference_": self.reference_,
            "center_": self.center_,
            "scale_": self.scale_,
        }

    @classmethod
    def from_state(cls, params: dict[str, Any], state: dict[str, NDArray[Any]]) -> Self:
        model = cls(**params)
        model._validate_params()
        ref = state["reference_"].astype(np.float64)
        if ref.ndim != 2 or ref.shape[0] <= int(model.n_neighbors) or ref.shape[1] < 1:
            raise ValueError("knn state: reference_ must be (n > n_neighbors, d)")
        d = ref.shape[1]
        for name in ("center_", "scale_"):
            if state[name].shape != (d,):
                raise ValueError(f"knn state: {name} must have shape ({d},)")
        model.reference_ = ref
        model.center_ = state["center_"].astype(np.float64)
        model.scale_ = state["scale_"].astype(np.float64)
        if not (model.scale_ > 0).all() or not np.isfinite(ref).all():
            raise ValueError("knn state: scales must be positive and rows finite")
        model.n_features_in_ = d
        model._prepare()
        model._restore_common(state)
        return model
