"""The base classes and threshold rule of the calibrated outlier detectors.

Every detector built on :class:`OutlierBase` (``envelope``, ``mahalanobis``,
``iforest``, ``knn``, ``text``) follows scikit-learn's outlier contract
(``sklearn/ensemble/_iforest.py``, ``sklearn/covariance/_elliptic_envelope.py``):

* ``__init__`` stores keyword-only parameters as given; ``fit`` validates them,
  learns attributes ending in ``_`` and returns ``self``;
* ``score_samples``: higher is more normal; ``decision_function`` is
  ``score_samples - offset_`` (negative is anomalous); ``predict`` gives +1/-1;
* scoring before ``fit`` raises :class:`sklearn.exceptions.NotFittedError`.

Unlike scikit-learn's ``contamination``, ``offset_`` is set from a *target
false-positive rate* on held-out reference data (see :func:`threshold_at_fpr`).
"""

from __future__ import annotations

import inspect
import math
from abc import ABC, abstractmethod
from typing import Any, ClassVar, Generic, Self, TypeVar

import numpy as np
from numpy.typing import ArrayLike, NDArray
from sklearn.exceptions import NotFittedError

__all__ = [
    "FloatArray",
    "OutlierBase",
    "RowOutlierBase",
    "as_matrix",
    "check_int",
    "check_number",
    "threshold_at_fpr",
]

InputT = TypeVar("InputT")
FloatArray = NDArray[np.float64]


def threshold_at_fpr(scores: ArrayLike, target_fpr: float) -> float:
    """The threshold that flags about ``target_fpr`` of new benign inputs.

    ``scores`` are the scores of held-out benign data (higher is more normal);
    an input is anomalous when its score is *strictly below* the threshold.

    The threshold is the ``j``-th smallest held-out score ``s_(j)`` with
    ``j = floor(target_fpr * (n + 1))``. A new benign input, exchangeable with
    the held-out ones, has a uniform rank among the ``n + 1`` scores, so
    ``P(score < s_(j)) = j / (n + 1) <= target_fpr`` (the split-conformal
    argument; ties only lower it). When ``n + 1 < 1 / target_fpr`` the held-out
    set cannot resolve the target: the threshold is then the smallest score and
    the expected rate ``1 / (n + 1)`` exceeds the target; callers should say so
    (``guard calibrate`` does).
    """
    s = np.sort(np.asarray(scores, dtype=np.float64).ravel())
    if s.size == 0:
        raise ValueError("cannot calibrate a threshold on zero scores")
    if not np.isfinite(s).all():
        raise ValueError("calibration scores contain NaN or infinity")
    if not 0.0 < target_fpr < 1.0:
        raise ValueError(f"target_fpr must be in (0, 1), got {target_fpr!r}")
    j = math.floor(target_fpr * (s.size + 1))
    return float(s[max(j - 1, 0)])


def as_matrix(X: ArrayLike, what: str = "X") -> FloatArray:
    """``X`` as a finite 2-D float64 matrix, or ``ValueError``."""
    arr = np.asarray(X, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"{what} must be 2-D (n_samples, n_features), got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{what} is empty (shape {arr.shape})")
    if not np.isfinite(arr).all():
        raise ValueError(f"{what} contains NaN or infinity")
    return arr


def check_fraction(name: str, value: object, *, low: float, high: float, open_low: bool) -> float:
    """Validate ``low <= value < high`` (``low < value`` when ``open_low``)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number, got {value!r}")
    v = float(value)
    ok = (low < v if open_low else low <= v) and v < high
    if not ok:
        bracket = "(" if open_low else "["
        raise ValueError(f"{name} must be in {bracket}{low}, {high}), got {value!r}")
    return v


def check_int(name: str, value: object, *, minimum: int) -> int:
    """Validate an integer ``>= minimum`` (booleans refused)."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_number(name: str, value: object, *, minimum: float = 0.0) -> float:
    """Validate a finite number ``>= minimum``."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number, got {value!r}")
    v = float(value)
    if not math.isfinite(v) or v < minimum:
        raise ValueError(f"{name} must be a finite number >= {minimum}, got {value!r}")
    return v


class OutlierBase(ABC, Generic[InputT]):
    """Parameters, the fitted check, ``decision_function``, ``predict``, ``calibrate``."""

    #: type name in manifests and config files (``mahalanobis``, ``knn``, ...)
    kind: ClassVar[str] = ""

    target_fpr: float
    holdout: float
    random_state: int | None
    offset_: float
    calibration_size_: int

    # -- parameters (the subset of BaseEstimator that clone() and users need)

    @classmethod
    def param_names(cls) -> list[str]:
        """The names of the constructor's (keyword-only) parameters."""
        sig = inspect.signature(cls.__init__)
        return sorted(p.name for p in sig.parameters.values() if p.kind is p.KEYWORD_ONLY)

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """The constructor parameters, as given."""
        return {name: getattr(self, name) for name in self.param_names()}

    def set_params(self, **params: Any) -> Self:
        """Set constructor parameters (validated at the next ``fit``)."""
        valid = set(self.param_names())
        for key, value in params.items():
            if key not in valid:
                raise ValueError(
                    f"invalid parameter {key!r} for {type(self).__name__} "
                    f"(valid: {', '.join(sorted(valid))})"
                )
            setattr(self, key, value)
        return self

    def __repr__(self) -> str:
        sig = inspect.signature(type(self).__init__)
        changed = [
            f"{name}={getattr(self, name)!r}"
            for name, p in sig.parameters.items()
            if p.kind is p.KEYWORD_ONLY and getattr(self, name) != p.default
        ]
        return f"{type(self).__name__}({', '.join(changed)})"

    # -- fitted state

    def _check_fitted(self) -> None:
        if not hasattr(self, "offset_"):
            raise NotFittedError(
                f"This {type(self).__name__} instance is not fitted yet. Call 'fit' with "
                "appropriate arguments before using this estimator."
            )

    def _validate_common(self) -> None:
        check_fraction("target_fpr", self.target_fpr, low=0.0, high=0.5, open_low=True)
        check_fraction("holdout", self.holdout, low=0.0, high=0.9, open_low=False)
        if self.random_state is not None:
            check_int("random_state", self.random_state, minimum=0)

    def _split(self, n: int) -> tuple[NDArray[np.intp], NDArray[np.intp] | None]:
        """Seeded train/held-out indices; ``None`` held-out when ``holdout == 0``."""
        if self.holdout == 0:
            return np.arange(n), None
        order = np.random.default_rng(self.random_state).permutation(n)
        n_held = round(self.holdout * n)
        if n_held < 1 or n - n_held < 2:
            raise ValueError(
                f"holdout={self.holdout} leaves no usable split of {n} samples "
                "(need at least 1 held-out and 2 training samples)"
            )
        return np.sort(order[n_held:]), np.sort(order[:n_held])

    def _set_offset(self, scores: FloatArray) -> None:
        self.offset_ = threshold_at_fpr(scores, float(self.target_fpr))
        self.calibration_size_ = int(scores.size)

    # -- the outlier API

    @abstractmethod
    def fit(self, X: InputT, y: object = None) -> Self:
        """Fit on benign reference data and set ``offset_``; returns ``self``."""

    @abstractmethod
    def score_samples(self, X: InputT) -> FloatArray:
        """Score each sample; higher is more normal."""

    def decision_function(self, X: InputT) -> FloatArray:
        """``score_samples(X) - offset_``: negative is anomalous."""
        scores = self.score_samples(X)
        return scores - self.offset_

    def predict(self, X: InputT) -> NDArray[np.int64]:
        """+1 for normal samples, -1 for anomalous ones (``score < offset_``)."""
        return np.where(self.decision_function(X) < 0, -1, 1).astype(np.int64)

    def calibrate(self, X: InputT) -> Self:
        """Reset ``offset_`` at ``target_fpr`` on benign held-out ``X``; returns ``self``."""
        self._check_fitted()
        self._set_offset(self.score_samples(X))
        return self

    # -- persistence (see detectors.persist)

    def _common_state(self) -> dict[str, NDArray[Any]]:
        self._check_fitted()
        return {
            "offset_": np.asarray(self.offset_, dtype=np.float64),
            "calibration_size_": np.asarray(self.calibration_size_, dtype=np.int64),
        }

    def _restore_common(self, state: dict[str, NDArray[Any]]) -> None:
        self._validate_common()
        offset = state["offset_"]
        size = state["calibration_size_"]
        if offset.shape != () or size.shape != () or not np.isfinite(offset):
            raise ValueError("offset_ and calibration_size_ must be finite scalars")
        self.calibration_size_ = int(size)
        self.offset_ = float(offset)

    @abstractmethod
    def export_state(self) -> dict[str, NDArray[Any]]:
        """The fitted state as plain numeric arrays (no objects, nothing to unpickle)."""

    @classmethod
    @abstractmethod
    def from_state(cls, params: dict[str, Any], state: dict[str, NDArray[Any]]) -> Self:
        """Rebuild a fitted detector from :meth:`get_params` and :meth:`export_state`."""


class RowOutlierBase(OutlierBase[ArrayLike]):
    """A detector of numeric rows: ``fit(X)`` on an ``(n, d)`` matrix."""

    n_features_in_: int

    def fit(self, X: ArrayLike, y: object = None) -> Self:
        """Fit on benign reference rows; set ``offset_`` on a held-out part.

        A seeded ``holdout`` fraction of ``X`` is set aside; the model is fitted
        on the rest and ``offset_`` is the score threshold at ``target_fpr`` on
        the held-out rows. With ``holdout=0`` the threshold comes from the
        training rows themselves, which is optimistic (use :meth:`calibrate`
        with separate data then).
        """
        self._validate_common()
        self._validate_params()
        arr = as_matrix(X)
        train, held = self._split(arr.shape[0])
        if hasattr(self, "offset_"):  # refitting: "not fitted" until it succeeds
            del self.offset_
        self._fit(arr[train])
        self.n_features_in_ = int(arr.shape[1])
        scores = self._training_scores(arr[train]) if held is None else self._score(arr[held])
        self._set_offset(scores)
        return self

    def score_samples(self, X: ArrayLike) -> FloatArray:
        """Score each row of ``X``; higher is more normal. Plain numpy, no scikit-learn."""
        self._check_fitted()
        arr = np.asarray(X, dtype=np.float64)
        if arr.ndim != 2 or arr.shape[1] != self.n_features_in_:
            raise ValueError(
                f"X has shape {arr.shape}, but {type(self).__name__} is expecting "
                f"{self.n_features_in_} features as input"
            )
        if not np.isfinite(arr).all():
            raise ValueError("X contains NaN or infinity")
        return self._score(arr)

    def score_validated(self, X: FloatArray) -> FloatArray:
        """:meth:`score_samples` for rows the caller has already checked.

        ``X`` must be a finite ``(n, n_features_in_)`` float64 matrix; the
        online wrapper checks exactly that before scoring, so the hot path does
        not check twice.
        """
        return self._score(X)

    def score_row_validated(self, x: FloatArray) -> float:
        """The score of one already-checked row, as a float (the online hot path).

        ``x`` must be a finite float64 vector of ``n_features_in_`` values; the
        result equals ``score_validated(x[None])[0]``.
        """
        return self._score_row(x)

    def _score_row(self, x: FloatArray) -> float:
        """Score one validated row (a vector); detectors override it with a cheaper path."""
        return float(self._score(x[None, :])[0])

    @abstractmethod
    def _validate_params(self) -> None:
        """Raise ``ValueError`` for an invalid parameter."""

    @abstractmethod
    def _fit(self, X: FloatArray) -> None:
        """Learn the model's ``_`` attributes from validated rows."""

    @abstractmethod
    def _score(self, X: FloatArray) -> FloatArray:
        """Score validated rows (the hot path)."""

    def _training_scores(self, X: FloatArray) -> FloatArray:
        """Scores of the training rows, for ``holdout=0`` (k-NN overrides: leave-one-out)."""
        return self._score(X)
