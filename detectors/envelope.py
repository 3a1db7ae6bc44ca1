"""Per-feature envelope: learned ranges and value types, one row at a time.

The cheapest input check there is, and the one that explains itself: every
feature has a range learned from reference data (widened by a margin) and a
type (integer-valued, constant). A row's score is minus the sum of its
violations, so a row inside the envelope scores exactly 0.
"""

from __future__ import annotations

from typing import Any, Self

import numpy as np
from numpy.typing import NDArray

from inference_guard.detectors.outlier_base import FloatArray, RowOutlierBase, check_number

__all__ = ["FeatureEnvelope"]


class FeatureEnvelope(RowOutlierBase):
    """Per-feature min/max and type checks learned from reference rows.

    Each feature ``j`` gets the interval ``[min_j - m * r_j, max_j + m * r_j]``
    where ``r_j = max_j - min_j`` is its range on the training rows and ``m``
    the ``margin``. A value outside adds how far outside it is, in units of
    ``r_j`` (of ``max(|value|, 1)`` for a constant feature). Type checks add
    ``type_penalty`` per violation: a non-integer value in a feature that only
    held integers, any change of a feature that was constant.

    Parameters
    ----------
    margin : float, default=0.05
        Widening of each learned interval, as a fraction of the feature's range.
    check_integer : bool, default=True
        Flag non-integer values in features whose reference values are all integers.
    type_penalty : float, default=1.0
        Score subtracted per type violation (integer or constant feature).
    target_fpr : float, default=0.01
        False-positive rate at which ``offset_`` is set on the held-out rows.
    holdout : float, default=0.2
        Fraction of the rows given to ``fit`` that is held out to set ``offset_``.
    random_state : int or None, default=0
        Seed of the held-out split.

    Attributes
    ----------
    low_, high_ : ndarray of shape (n_features,)
        The widened bounds.
    scale_ : ndarray of shape (n_features,)
        The unit in which distances outside the bounds are counted.
    integer_ : ndarray of bool, shape (n_features,)
        Features whose reference values were all integers (and ``check_integer``).
    constant_ : ndarray of bool, shape (n_features,)
        Features that held a single value.
    offset_ : float
        Threshold: rows scoring below it are anomalous.
    n_features_in_ : int

    Examples
    --------
    >>> import numpy as np
    >>> from inference_guard.detectors.envelope import FeatureEnvelope
    >>> X = np.random.default_rng(0).integers(0, 17, size=(500, 4)).astype(float)
    >>> env = FeatureEnvelope(target_fpr=0.01).fit(X)
    >>> env.predict([[3.0, 4.0, 5.0, 6.0], [3.0, 4.0, 5.5, 40.0]]).tolist()
    [1, -1]
    >>> # 5.5 is not an integer (1.0); 40 is (40 - 16.8) / 16 = 1.45 ranges above the bound
    >>> float(env.score_samples([[3.0, 4.0, 5.5, 40.0]])[0])
    -2.45
    """

    kind = "envelope"

    def __init__(
        self,
        *,
        margin: float = 0.05,
        check_integer: bool = True,
        type_penalty: float = 1.0,
        target_fpr: float = 0.01,
        holdout: float = 0.2,
        random_state: int | None = 0,
    ) -> None:
        self.margin = margin
        self.check_integer = check_integer
        self.type_penalty = type_penalty
        self.target_fpr = target_fpr
        self.holdout = holdout
        self.random_state = random_state

    def _validate_params(self) -> None:
        check_number("margin", self.margin)
        check_number("type_penalty", self.type_penalty)
        if not isinstance(self.check_integer, bool):
            raise ValueError(f"check_integer must be true or false, got {self.check_integer!r}")

    def _fit(self, X: FloatArray) -> None:
        lo = X.min(axis=0)
        hi = X.max(axis=0)
        span = hi - lo
        self.constant_ = span == 0
        self.integer_ = (
            (np.round(X) == X).all(axis=0)
            if self.check_integer
            else np.zeros(X.shape[1], dtype=bool)
        )
        m = float(self.margin)
        self.low_ = lo - m * span
        self.high_ = hi + m * span
        self.scale_ = np.where(self.constant_, np.maximum(np.abs(lo), 1.0), span)
        self._prepare()

    def _prepare(self) -> None:
        # The hot path works on one (3, d) block per row, built with two
        # numpy calls: ``x * _mul + _add`` gives the rows
        #   0: the type check: ``x`` (integer features), ``x - low_`` (constant
        #      features), 0 (unchecked features); a violation is a non-zero
        #      ``fmod(., _mod)`` with ``_mod`` 1 (integer) or infinity
        #      (constant: fmod(y, inf) == y);
        #   1, 2: ``low_ - x`` and ``x - high_``; since ``low_ <= high_`` at most
        #      one is positive, so the sum of both clipped at 0 is the excess,
        #      and one dot product with the reciprocal scale (twice) sums it.
        # Constant features have ``low_ == high_``, so ``x != low_`` exactly
        # when ``x - low_ != 0``; ``fmod(x, 1) != 0`` exactly when ``x`` is not
        # an integer (for finite ``x``).
        d = self.low_.shape[0]
        const = self.constant_
        integer = self.integer_ & ~const
        typed = integer | const
        self._inv_scale = 1.0 / self.scale_
        self._inv2 = np.concatenate([self._inv_scale, self._inv_scale])
        self._mul = np.stack([typed.astype(np.float64), -np.ones(d), np.ones(d)])
        self._add = np.stack([np.where(const, -self.low_, 0.0), self.low_, -self.high_])
        self._mod = np.where(const, np.inf, 1.0)
        self._penalty = float(self.type_penalty)

    def _score(self, X: FloatArray) -> FloatArray:
        if X.shape[0] == 1:
            return np.array([self._score_row(X[0])])
        n = X.shape[0]
        parts = X[:, None, :] * self._mul
        parts += self._add
        violations = np.count_nonzero(np.fmod(parts[:, 0], self._mod), axis=1)
        excess = np.maximum(parts[:, 1:], 0.0).reshape(n, -1)
        total = excess @ self._inv2 + self._penalty * violations
        scores: FloatArray = -total
        return scores

    def _score_row(self, x: FloatArray) -> float:
        """Score of one validated row (a vector): six numpy calls."""
        parts = x * self._mul
        parts += self._add
        violations = int(np.count_nonzero(np.fmod(parts[0], self._mod)))
        excess = float(np.vdot(np.maximum(parts[1:], 0.0), self._inv2))
        return -(excess + self._penalty * violations)

    def export_state(self) -> dict[str, NDArray[Any]]:
        return {
            **self._common_state(),
            "low_": self.low_,
            "high_": self.high_,
            "scale_": self.scale_,
            "integer_": self.integer_,
            "constant_": self.constant_,
        }

    @classmethod
    def from_state(cls, params: dict[str, Any], state: dict[str, NDArray[Any]]) -> Self:
        model = cls(**params)
        model._validate_params()
        d = state["low_"].shape
        if len(d) != 1 or d[0] < 1:
            raise ValueError("envelope state: low_ must be a non-empty vector")
        for name in ("high_", "scale_", "integer_", "constant_"):
            if state[name].shape != d:
                raise ValueError(f"envelope state: {name} has shape {state[name].shape}, not {d}")
        model.low_ = state["low_"].astype(np.float64)
        model.high_ = state["high_"].astype(np.float64)
        model.scale_ = state["scale_"].astype(np.float64)
        if not (model.scale_ > 0).all() or not (model.low_ <= model.high_).all():
            raise ValueError("envelope state: inconsistent bounds or scales")
        model.integer_ = state["integer_"].astype(bool)
        model.constant_ = state["constant_"].astype(bool)
        model.n_features_in_ = int(d[0])
        model._prepare()
        model._restore_common(state)
        return model
