"""RowAnomalyDetector and TextAnomalyDetector: one request, many rows."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from inference_guard.detectors.anomaly import UNSCORABLE, RowAnomalyDetector, TextAnomalyDetector
from inference_guard.detectors.base import DetectorResult, Query
from inference_guard.detectors.knn import KNNOutlier
from inference_guard.detectors.prompt_corpus import benign_prompts
from inference_guard.detectors.text import TextOutlier
from tests.detectors.anomaly_helpers import gaussian


@pytest.fixture(scope="module")
def model() -> KNNOutlier:
    return KNNOutlier(target_fpr=0.01).fit(gaussian(2000, d=8))


def inspect(det: RowAnomalyDetector | TextAnomalyDetector, query: Query) -> DetectorResult:
    return asyncio.run(det.inspect(query))


def rows_query(rows: np.ndarray | None) -> Query:
    return Query(client="c", policy="p", rows=rows, n_rows=0 if rows is None else len(rows))


def test_score_is_the_worst_row_and_flagged_rows_are_counted(model: KNNOutlier) -> None:
    det = RowAnomalyDetector("knn", model)
    benign = gaussian(5, d=8, seed=3)
    rows = np.vstack([benign, np.full((2, 8), 40.0)])
    res = inspect(det, rows_query(rows))
    scores = model.score_samples(rows)
    assert res.anomalous and res.rows_flagged == int((scores < model.offset_).sum()) >= 2
    assert res.score == scores.min() and res.threshold == model.offset_
    assert res.detector == "knn" and RowAnomalyDetector.technique == "AML.T0015"
    ok = inspect(det, rows_query(gaussian(3, d=8, seed=4)))
    assert ok.anomalous == (ok.score < ok.threshold)


def test_no_rows_is_normal(model: KNNOutlier) -> None:
    res = inspect(RowAnomalyDetector("knn", model), rows_query(None))
    assert not res.anomalous and res.reason == "no rows" and not res.score < res.threshold


def test_width_mismatch_is_flagged_by_default(model: KNNOutlier) -> None:
    wide = gaussian(3, d=9)
    res = inspect(RowAnomalyDetector("knn", model), rows_query(wide))
    assert res.anomalous and res.rows_flagged == 3 and res.reason.startswith("width")
    assert res.score <= UNSCORABLE < res.threshold
    skipped = inspect(RowAnomalyDetector("knn", model, on_width_mismatch="skip"), rows_query(wide))
    assert not skipped.anomalous


def test_non_finite_rows_are_flagged_not_passed(model: KNNOutlier) -> None:
    rows = gaussian(4, d=8, seed=6)
    rows[1, 3] = np.nan
    rows[2, 0] = np.inf
    res = inspect(RowAnomalyDetector("knn", model), rows_query(rows))
    assert res.anomalous and res.rows_flagged >= 2 and "non-finite" in res.reason
    all_nan = inspect(RowAnomalyDetector("knn", model), rows_query(np.full((2, 8), np.nan)))
    assert all_nan.anomalous and all_nan.rows_flagged == 2


def test_bad_arguments(model: KNNOutlier) -> None:
    with pytest.raises(ValueError):
        RowAnomalyDetector("knn", model, on_width_mismatch="ignore")
    with pytest.raises(ValueError, match="not fitted"):
        RowAnomalyDetector("knn", KNNOutlier())


def test_text_detector_scores_each_prompt() -> None:
    model = TextOutlier(target_fpr=0.01).fit(benign_prompts(3000, seed=1))
    det = TextAnomalyDetector("text", model)
    assert TextAnomalyDetector.technique == "AML.T0051"
    texts = ("How do I reverse a list in Python?", "hidden\U000e0069\U000e0067 text",
             "Write a haiku about autumn leaves.")
    res = inspect(det, Query(client="c", policy="chat", rows=None, texts=texts, n_rows=3))
    assert res.anomalous and res.rows_flagged == 1
    assert res.score == pytest.approx(model.score_samples(texts).min())
    none = inspect(det, Query(client="c", policy="chat", rows=None))
    assert not none.anomalous and none.reason == "no texts"
