"""What calibration learnt about a deployment's benign traffic, for one stateful detector.

The extraction and query-attack detectors (``near_duplicate``, ``prada``,
``boundary``) judge *clients*, not rows, and every number they compare
against depends on the deployment: the scale of each feature, the model's
classes, how close natural inputs lie to each other, how a benign client's
windows of traffic look. None of it can be a constant. ``guard calibrate``
measures it on the owner's reference data and writes one
:class:`TrafficProfile` per detector, which the detector is built from:

* ``low_`` and ``high_``: a robust per-feature range (:func:`robust_range`),
  so that quantisation, coverage bins and distances treat a feature spanning
  0.02 to 0.2 and one spanning 0 to 4 000 alike;
* ``threshold``: the score at which the detector fires, set on simulated
  benign *client sessions* at a per-client false-positive target;
* ``baseline_``: the benign mean and standard deviation of each window
  signal (``boundary`` only);
* ``n_classes``: the model's class count as its answers showed it.

It is saved and loaded like the input-anomaly detectors (:mod:`detectors.persist`):
an ``.npz`` of plain arrays plus a checksummed, optionally HMAC-signed manifest.

Examples
--------
>>> import numpy as np
>>> X = np.column_stack([np.linspace(0.02, 0.2, 101), np.linspace(0, 4000, 101)])
>>> low, high = robust_range(X)
>>> (high - low).round(3).tolist()
[0.176, 3920.0]
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Final, Self

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = ["PROFILE_KINDS", "TrafficProfile", "feature_ranges", "robust_range"]

#: the detector types a profile may be written for
PROFILE_KINDS: Final = ("near_duplicate", "prada", "boundary")

FloatArray = NDArray[np.float64]


def robust_range(X: ArrayLike, quantile: float = 0.01) -> tuple[FloatArray, FloatArray]:
    """Per-feature ``(low, high)``: the ``quantile`` and ``1 - quantile`` quantiles of ``X``.

    Quantiles rather than min and max, so that a few extreme reference rows do
    not stretch a feature's scale. A feature whose quantiles coincide (a pixel
    that is almost always 0) falls back to its min and max; a feature that is
    constant in the reference data has no scale of its own and gets the median
    width of the other features, centred on its value (1.0 when every feature
    is constant). ``high > low`` for every feature.
    """
    data = np.asarray(X, dtype=np.float64)
    if data.ndim != 2 or data.shape[0] < 2 or data.shape[1] < 1:
        raise ValueError(f"need a 2-D array of at least 2 rows, got shape {data.shape}")
    if not np.isfinite(data).all():
        raise ValueError("reference rows contain NaN or infinity")
    if not 0.0 <= quantile < 0.5:
        raise ValueError(f"quantile must be in [0, 0.5), got {quantile!r}")
    low = np.quantile(data, quantile, axis=0)
    high = np.quantile(data, 1.0 - quantile, axis=0)
    flat = high <= low
    low[flat] = data[:, flat].min(axis=0)
    high[flat] = data[:, flat].max(axis=0)
    width = high - low
    constant = width <= 0
    if constant.any():
        spread = width[~constant]
        fill = float(np.median(spread)) if spread.size else 1.0
        centre = low[constant]
        low[constant] = centre - fill / 2
        high[constant] = centre + fill / 2
    return low, high


def feature_ranges(low: ArrayLike, high: ArrayLike) -> tuple[FloatArray, FloatArray]:
    """``low`` and ``high`` as 1-D float arrays (a scalar: one range for every feature).

    Raises ``ValueError`` unless both are finite, of one length and ``high > low``
    everywhere.
    """
    lo = np.atleast_1d(np.asarray(low, dtype=np.float64))
    hi = np.atleast_1d(np.asarray(high, dtype=np.float64))
    if (
        lo.ndim != 1
        or lo.shape != hi.shape
        or lo.size == 0
        or not (np.isfinite(lo).all() and np.isfinite(hi).all() and (hi > lo).all())
    ):
        raise ValueError(f"need finite low < high (scalars or one per feature), got {low!r}")
    return lo, hi


class TrafficProfile:
    """A stateful detector's calibration: feature ranges, threshold, window baseline.

    Parameters
    ----------
    detector : str
        The detector type it was calibrated for (one of :data:`PROFILE_KINDS`).
    threshold : float
        The detector fires on a client whose score falls below it.
    target_fpr : float
        The per-client false-positive target the threshold was set at.
    sessions : int
        Simulated benign sessions the threshold was set on.
    client_fpr : float
        Share of a second, independent set of simulated sessions that the
        threshold flags: the honest estimate of the per-client false-positive rate.
    n_classes : int
        Classes the model's answers showed (0: unknown).
    """

    kind: ClassVar[str] = "stateful"

    low_: FloatArray
    high_: FloatArray
    baseline_: FloatArray
    n_features_in_: int

    def __init__(
        self,
        *,
        detector: str,
        threshold: float,
        target_fpr: float,
        sessions: int,
        client_fpr: float,
        n_classes: int = 0,
    ) -> None:
        self.detector = detector
        self.threshold = threshold
        self.target_fpr = target_fpr
        self.sessions = sessions
        self.client_fpr = client_fpr
        self.n_classes = n_classes

    @classmethod
    def param_names(cls) -> list[str]:
        return ["client_fpr", "detector", "n_classes", "sessions", "target_fpr", "threshold"]

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.param_names()}

    def _validate(self) -> None:
        if self.detector not in PROFILE_KINDS:
            raise ValueError(f"detector must be one of {', '.join(PROFILE_KINDS)}")
        for name in ("threshold", "target_fpr", "client_fpr"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"{name} must be a number, got {value!r}")
            if not math.isfinite(value):
                raise ValueError(f"{name} must be finite, got {value!r}")
        for name in ("sessions", "n_classes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")

    def with_arrays(
        self, low: ArrayLike, high: ArrayLike, baseline: ArrayLike | None = None
    ) -> Self:
        """Set the fitted arrays (``baseline``: ``(signals, 2)`` mean and std, NaN unused)."""
        self._validate()
        lo, hi = feature_ranges(low, high)
        base = (
            np.zeros((0, 2)) if baseline is None else np.asarray(baseline, dtype=np.float64)
        )
        if base.ndim != 2 or base.shape[1] != 2:
            raise ValueError("baseline must have shape (signals, 2)")
        self.low_, self.high_, self.baseline_ = lo, hi, base
        self.n_features_in_ = int(lo.size)
        return self

    # -- persistence (see detectors.persist)

    def export_state(self) -> dict[str, NDArray[Any]]:
        if not hasattr(self, "low_"):
            raise ValueError("the profile has no arrays yet: call with_arrays()")
        return {"low_": self.low_, "high_": self.high_, "baseline_": self.baseline_}

    @classmethod
    def from_state(cls, params: dict[str, Any], state: dict[str, NDArray[Any]]) -> Self:
        if set(state) != {"low_", "high_", "baseline_"}:
            raise ValueError(f"unexpected arrays {sorted(state)}")
        profile = cls(**params)
        return profile.with_arrays(state["low_"], state["high_"], state["baseline_"])

    def __repr__(self) -> str:
        return (
            f"TrafficProfile(detector={self.detector!r}, threshold={self.threshold!r}, "
            f"features={getattr(self, 'n_features_in_', None)})"
        )
