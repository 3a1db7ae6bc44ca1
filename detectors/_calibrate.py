"""Thresholds for the per-client detectors, from measured benign traffic (private).

A per-client detector fires on a *client*, not on a row: a benign client is a
false positive if its score drops below the threshold at any point of its
stream. So the calibration statistic of one benign client is the **lowest
score it ever reached**, and a target per-client false-positive rate is a
quantile of those minima.

:func:`replay` runs a detector over recorded (or simulated) traffic in arrival
order, the way the guard would (``inspect`` before the model, ``observe``
after), and returns each client's minimum score; :func:`calibrate_threshold`
turns the minima of benign clients into a threshold.

Examples
--------
>>> calibrate_threshold([0.99, 0.97, 0.95, 0.98], target_fpr=0.2)
0.95
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from numpy.typing import ArrayLike

from detectors.base import Answer, Detector, Query
from detectors.outlier_base import threshold_at_fpr

__all__ = ["calibrate_threshold", "replay"]


def calibrate_threshold(benign_scores: ArrayLike, target_fpr: float) -> float:
    """The threshold that flags at most about ``target_fpr`` of benign clients.

    Parameters
    ----------
    benign_scores : array-like of float
        One score per benign client: the lowest it reached over its stream
        (:func:`replay` gives them).
    target_fpr : float in (0, 1)
        The share of benign clients it is acceptable to flag.

    Returns
    -------
    float
        A client is flagged when its score is strictly below it. With ``n``
        benign clients the guarantee is split-conformal (see
        :func:`detectors.outlier_base.threshold_at_fpr`): fewer than
        ``1 / target_fpr - 1`` clients cannot resolve the target, and the
        threshold is then the lowest benign score.
    """
    return threshold_at_fpr(benign_scores, target_fpr)


async def replay(
    detector: Detector, requests: Iterable[tuple[Query, Answer | None]]
) -> dict[str, float]:
    """Run ``detector`` over ``requests`` in order; each client's minimum score.

    ``inspect`` sees every request and, when the detector observes answers,
    ``observe`` sees every request that has an answer; both results count.
    """
    lowest: dict[str, float] = {}
    for query, answer in requests:
        result = await detector.inspect(query)
        prev = lowest.get(query.client, math.inf)
        lowest[query.client] = min(prev, result.score)
        if answer is not None and detector.observes_answers:
            observed = await detector.observe(query, answer)
            if observed is not None:
                lowest[query.client] = min(lowest[query.client], observed.score)
    return lowest
