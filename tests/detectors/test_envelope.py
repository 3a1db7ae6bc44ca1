"""FeatureEnvelope: per-feature ranges and type checks.

What all four row detectors share is tested in ``test_outlier_base.py``.
"""

from __future__ import annotations

import numpy as np
import pytest

from inference_guard.detectors.envelope import FeatureEnvelope


def test_inside_scores_zero_and_outside_counts_range_units() -> None:
    X = np.array([[0.0, 10.0, 5.0], [4.0, 20.0, 5.0], [2.0, 15.0, 5.0]] * 10)
    env = FeatureEnvelope(margin=0.0, holdout=0.0).fit(X)
    assert env.score_samples([[1.0, 12.0, 5.0]])[0] == 0.0
    # feature 0 range is 4: 2 above the max is half a range
    assert env.score_samples([[6.0, 12.0, 5.0]])[0] == pytest.approx(-0.5)
    # feature 1 range is 10: 5 below the min is half a range, and 7.5 is no integer
    assert env.score_samples([[1.0, 7.5, 5.0]])[0] == pytest.approx(-0.25 - 1.0)
    # constant feature: any change is a type violation plus its distance in max(|c|, 1) units
    assert env.score_samples([[1.0, 12.0, 6.0]])[0] == pytest.approx(-(1.0 / 5.0) - 1.0)


def test_margin_widens_bounds() -> None:
    X = np.linspace(0.0, 10.0, 101)[:, None]
    env = FeatureEnvelope(margin=0.1, check_integer=False, holdout=0.0).fit(X)
    assert env.low_[0] == pytest.approx(-1.0) and env.high_[0] == pytest.approx(11.0)
    assert env.score_samples([[10.9]])[0] == 0.0
    assert env.score_samples([[12.0]])[0] == pytest.approx(-0.1)


def test_integer_check_can_be_disabled() -> None:
    X = np.arange(100, dtype=float)[:, None]
    assert FeatureEnvelope(holdout=0.0).fit(X).integer_.all()
    env = FeatureEnvelope(check_integer=False, holdout=0.0).fit(X)
    assert env.score_samples([[3.5]])[0] == 0.0
