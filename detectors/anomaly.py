"""Online input-anomaly detectors: a fitted row or text model, scored per request.

:class:`RowAnomalyDetector` wraps any fitted row model (envelope, Mahalanobis,
Isolation Forest, k-NN) and :class:`TextAnomalyDetector` a fitted
:class:`~detectors.text.TextOutlier`. Per request:

* the score is the *lowest* row score (the request is as anomalous as its
  worst row) and the threshold is the model's calibrated ``offset_``;
* ``rows_flagged`` counts the rows below the threshold, so batching anomalous
  rows among benign ones changes nothing;
* with an :class:`~detectors.anomaly_rate.AnomalyRateTracker`, the verdicts
  (flagged rows, rows) are added to the client's counts.

Design decisions for inputs the model was not calibrated for:

* **no rows** (a text or unparsed payload): nothing to score; the result is
  normal, with the reason ``"no rows"``;
* **another width**: payload validation normally refuses it first; when it
  reaches the detector, the model says nothing about such rows, and an
  attacker must not get past the detector by sending one feature more.
  ``on_width_mismatch="flag"`` (default) flags every row with reason
  ``"width"``; ``"skip"`` passes it as normal (for a policy that serves
  several models on one route);
* **NaN or infinity** in a row (possible only when payload validation is
  off): the row is flagged, never silently passed (``NaN < threshold`` is false).

Unscorable rows get :data:`UNSCORABLE` (a large negative, finite number: the
audit log stays valid JSON) as their score.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol

import numpy as np
from numpy.typing import ArrayLike, NDArray

from inference_guard.detectors.anomaly_rate import AnomalyRateTracker
from inference_guard.detectors.base import Detector, DetectorResult, Query
from inference_guard.detectors.repeats import row_bytes

#: inputs are clipped to this magnitude before scoring (no overflow anywhere)
_CLIP = 1e12

__all__ = ["UNSCORABLE", "RowAnomalyDetector", "RowModel", "TextAnomalyDetector", "TextModel"]

#: score given to rows that cannot be scored (wrong width, NaN, infinity)
UNSCORABLE = -1e9

#: single rows whose scores a row detector keeps (by the row's exact bytes)
_SCORED_ROWS = 512
#: bytes of row keys a row detector's score cache may hold before it starts afresh
_SCORED_BYTES = 8 << 20


def row_magnitude(query: Query, rows: NDArray[np.float64]) -> float:
    """``max |x|`` over the request's rows (NaN when one is NaN), once per request.

    Every row detector of a policy checks it before scoring; the first
    computes it, the others read it from the query's memo.
    """
    memo = query.memo
    found = memo.get("magnitude")
    if found is not None and found[0] is rows:
        magnitude: float = found[1]
        return magnitude
    magnitude = float(np.abs(rows).max())
    memo["magnitude"] = (rows, magnitude)
    return magnitude


class RowModel(Protocol):
    """What :class:`RowAnomalyDetector` needs from a fitted row model."""

    offset_: float
    n_features_in_: int

    def score_samples(self, X: ArrayLike) -> NDArray[np.float64]: ...


class TextModel(Protocol):
    """What :class:`TextAnomalyDetector` needs from a fitted text model."""

    offset_: float

    def score_samples(self, X: Sequence[str]) -> NDArray[np.float64]: ...


class RowAnomalyDetector(Detector):
    """Scores each request's rows with a fitted, calibrated row model.

    Parameters
    ----------
    name : str
        Detector name (metrics, audit log).
    model : RowModel
        A fitted model: ``score_samples``, ``offset_``, ``n_features_in_``.
    on_width_mismatch : {"flag", "skip"}, default="flag"
        What to do with rows of another width (see the module docstring).
    tracker : AnomalyRateTracker, optional
        Per-client counts of rows and flagged rows to update.

    Examples
    --------
    >>> import asyncio
    >>> import numpy as np
    >>> from inference_guard.detectors.base import Query
    >>> from inference_guard.detectors.mahalanobis import MahalanobisOutlier
    >>> X = np.random.default_rng(0).normal(size=(1000, 4))
    >>> det = RowAnomalyDetector("maha", MahalanobisOutlier().fit(X))
    >>> rows = np.array([[0.0, 0.0, 0.0, 0.0], [9.0, 9.0, -9.0, 9.0]])
    >>> result = asyncio.run(det.inspect(Query(client="c", policy="p", rows=rows, n_rows=2)))
    >>> result.anomalous, result.rows_flagged
    (True, 1)
    """

    technique = "AML.T0015"
    per_row = True

    def __init__(
        self,
        name: str,
        model: RowModel,
        *,
        on_width_mismatch: str = "flag",
        tracker: AnomalyRateTracker | None = None,
    ) -> None:
        super().__init__(name)
        if on_width_mismatch not in ("flag", "skip"):
            raise ValueError(
                f"on_width_mismatch must be 'flag' or 'skip', got {on_width_mismatch!r}"
            )
        if not hasattr(model, "offset_"):
            raise ValueError("the model is not fitted (no offset_)")
        self.model = model
        # rows are checked here (width, finite) before scoring: skip the model's own checks
        self._score_checked = getattr(model, "score_validated", model.score_samples)
        # and a single row is scored as a vector, straight to a float, where the model can
        self._score_row = getattr(model, "score_row_validated", None)
        self.on_width_mismatch = on_width_mismatch
        self.tracker = tracker
        self.threshold = float(model.offset_)
        self.n_features = int(model.n_features_in_)
        # the results of the last single rows scored, by their exact bytes (the model is
        # fixed, so a repeated row scores the same): health probes, retries and popular
        # inputs are scored once. Emptied when full (512 rows, or 8 MiB of keys: 256 KB at
        # 64 features, a few rows of a very wide model)
        self._scored: dict[bytes, DetectorResult] = {}
        self._scored_bytes = 0

    async def inspect(self, query: Query) -> DetectorResult:
        rows = query.rows
        threshold = self.threshold
        if rows is None or rows.size == 0:
            return DetectorResult(self.name, threshold, threshold, False, reason="no rows")
        n = rows.shape[0] if rows.ndim == 2 else 1
        if rows.ndim != 2 or rows.shape[1] != self.n_features:
            if self.on_width_mismatch == "skip":
                return DetectorResult(
                    self.name, threshold, threshold, False, reason="width skipped"
                )
            await self._record(query, n, n)
            return DetectorResult(
                self.name,
                min(UNSCORABLE, threshold - 1.0),
                threshold,
                True,
                reason=f"width {rows.shape[-1]} != {self.n_features}",
                rows_flagged=n,
            )
        if n == 1 and self._score_row is not None and rows.dtype == np.float64:
            # the hot path: a finite, modest row (NaN fails the comparison; other
            # rows take the careful path below) is scored as a vector, to a float;
            # a row scored lately (the same bytes) is not scored again
            key = row_bytes(query, rows)
            scored = self._scored
            result = scored.get(key)
            if result is None and row_magnitude(query, rows) <= _CLIP:
                worst = float(self._score_row(rows[0]))
                if not math.isfinite(worst):
                    worst = UNSCORABLE
                result = (
                    DetectorResult(self.name, worst, threshold, True, "1/1 rows below threshold", 1)
                    if worst < threshold
                    else DetectorResult(self.name, worst, threshold, False, "", 0)
                )
                if len(scored) >= _SCORED_ROWS or self._scored_bytes > _SCORED_BYTES:
                    # start afresh: O(1), where dropping the oldest of a dict one at a
                    # time makes finding the oldest slower and slower
                    scored.clear()
                    self._scored_bytes = 0
                scored[key] = result
                self._scored_bytes += len(key)
            if result is not None:
                # (results are immutable: a repeated row's is handed out again)
                tracker = self.tracker
                if tracker is not None and not tracker.record_now(
                    query.client, result.rows_flagged, 1
                ):
                    await tracker.record(query.client, anomalous=result.rows_flagged, total=1)
                return result
        # one reduction tells finite-and-modest rows apart (NaN fails the comparison)
        if row_magnitude(query, rows) <= _CLIP:
            scores = np.asarray(self._score_checked(rows), dtype=np.float64)
            if n == 1:  # the hot path: plain floats, no more reductions
                worst = float(scores[0])
                if not math.isfinite(worst):
                    worst = UNSCORABLE
                flagged = int(worst < threshold)
            else:
                if not np.isfinite(scores).all():
                    scores = np.where(np.isfinite(scores), scores, UNSCORABLE)
                flagged = int(np.count_nonzero(scores < threshold))
                worst = float(scores.min())
            reason = f"{flagged}/{n} rows below threshold" if flagged else ""
        elif np.isfinite(rows).all():  # finite, but large enough to overflow a model
            scores = self._scores(rows)
            flagged = int(np.count_nonzero(scores < threshold))
            worst = float(scores.min())
            reason = f"{flagged}/{n} rows below threshold" if flagged else ""
        else:
            finite = np.isfinite(rows).all(axis=1)
            bad = int(n - np.count_nonzero(finite))
            scores = self._scores(rows[finite]) if bad < n else np.zeros(0)
            flagged = bad + int(np.count_nonzero(scores < threshold))
            worst = min(UNSCORABLE, threshold - 1.0)
            reason = f"{flagged}/{n} rows flagged ({bad} non-finite)"
        await self._record(query, flagged, n)
        return DetectorResult(self.name, worst, threshold, flagged > 0, reason, flagged)

    def _scores(self, rows: NDArray[np.float64]) -> NDArray[np.float64]:
        """Row scores, safe for any finite input.

        Values beyond ``±_CLIP`` (1e308 is valid JSON) are clipped first, so no
        model's arithmetic overflows; such a row is still far outside any
        calibration and scores as anomalous. A non-finite score would never
        compare below the threshold, so it becomes the unscorable sentinel.
        """
        if float(np.abs(rows).max()) > _CLIP:
            rows = np.clip(rows, -_CLIP, _CLIP)
        scores = np.asarray(self.model.score_samples(rows), dtype=np.float64)
        if not np.isfinite(scores).all():
            scores = np.where(np.isfinite(scores), scores, UNSCORABLE)
        return scores

    async def _record(self, query: Query, flagged: int, total: int) -> None:
        tracker = self.tracker
        if tracker is not None and not tracker.record_now(query.client, flagged, total):
            await tracker.record(query.client, anomalous=flagged, total=total)


class TextAnomalyDetector(Detector):
    """Scores each prompt of a chat/completions request with a fitted text model.

    Parameters
    ----------
    name : str
        Detector name (metrics, audit log).
    model : TextModel
        A fitted :class:`~detectors.text.TextOutlier` (``score_samples``, ``offset_``).
    tracker : AnomalyRateTracker, optional
        Per-client counts of prompts and flagged prompts to update.

    Examples
    --------
    >>> import asyncio
    >>> from inference_guard.detectors.base import Query
    >>> from inference_guard.detectors.prompt_corpus import benign_prompts
    >>> from inference_guard.detectors.text import TextOutlier
    >>> det = TextAnomalyDetector("text", TextOutlier().fit(benign_prompts(2000)))
    >>> q = Query(client="c", policy="chat", rows=None, texts=("Hello\\u202eevil",))
    >>> asyncio.run(det.inspect(q)).anomalous
    True
    """

    technique = "AML.T0051"
    per_row = True

    def __init__(
        self, name: str, model: TextModel, *, tracker: AnomalyRateTracker | None = None
    ) -> None:
        super().__init__(name)
        if not hasattr(model, "offset_"):
            raise ValueError("the model is not fitted (no offset_)")
        self.model = model
        self.tracker = tracker
        self.threshold = float(model.offset_)

    async def inspect(self, query: Query) -> DetectorResult:
        texts = query.texts
        threshold = self.threshold
        if not texts:
            return DetectorResult(self.name, threshold, threshold, False, reason="no texts")
        scores = self.model.score_samples(texts)
        flagged = int(np.count_nonzero(scores < threshold))
        if self.tracker is not None:
            await self.tracker.record(query.client, anomalous=flagged, total=len(texts))
        reason = f"{flagged}/{len(texts)} texts below threshold" if flagged else ""
        worst = float(scores.min())
        return DetectorResult(self.name, worst, threshold, flagged > 0, reason, flagged)
