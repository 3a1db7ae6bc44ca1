"""Bucket layouts for ``guard_detector_score``, one per detector.

The histogram records each score's margin, ``score - threshold``: below 0 the
detector fired. Detectors score on very different scales (a Mahalanobis
distance squared of benign digits sits 150 to 260 above its threshold, an
isolation forest's 0.03 to 0.17), so one layout for all of them fits none.
Each detector gets its own, always with an edge at 0:

* **Calibrated row and text detectors** (``envelope``, ``mahalanobis``,
  ``iforest``, ``knn``, ``text``): ``guard calibrate`` saves the held-out
  benign score quantiles in the manifest (``calibration``). The positive
  edges are the benign margins at those quantiles, so benign traffic fills
  them in known shares and drift towards the threshold shows as mass moving
  down; one more edge at twice the largest. The negative edges are the median
  benign margin times 1/100 up to 10 000 (attack rows lie orders of magnitude
  past the threshold: uniform noise scores 1 500 to 6 000 below it on the
  digits Mahalanobis detector).
* **Detectors with a bounded score** (``rate``, ``anomaly_rate``, ``prada``,
  ``near_duplicate``: margins within [-1, 1]) and ``boundary`` (margins in
  benign standard deviations): a fixed layout over that range.
* **Anything else** (a custom detector, a file calibrated before quantiles
  were saved, a file that cannot be read): :data:`DEFAULT_BUCKETS`, decades
  from -100 to 100.

Edges are rounded to three significant digits.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from inference_guard.detectors.persist import CorruptModelFile, read_manifest
from inference_guard.guard.anomaly_factories import ROW_TYPES, TEXT_TYPES
from inference_guard.guard.calibration_files import calibration_key, resolve_file
from inference_guard.guard.config import DetectorSpec
from inference_guard.guard.errors import ConfigurationError

__all__ = [
    "DEFAULT_BUCKETS",
    "SCORE_QUANTILES",
    "calibrated_buckets",
    "calibration_summary",
    "score_buckets",
]

log = logging.getLogger("guard")

#: margins of an uncalibrated or unknown detector
DEFAULT_BUCKETS = (-100.0, -10.0, -3.0, -1.0, -0.3, -0.1, 0.0, 0.1, 0.3, 1.0, 3.0, 10.0, 100.0)
#: benign score quantiles ``guard calibrate`` saves in the manifest
SCORE_QUANTILES = (0.001, 0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99, 1.0)
#: multiples of the median benign margin below the threshold
_BELOW = (0.01, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0, 3000.0, 10000.0)

_UNIT = (0.01, 0.03, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0)
#: fixed layouts of detectors whose margin range is known
_FIXED: dict[str, tuple[float, ...]] = {
    "rate": (*(-x for x in reversed(_UNIT)), 0.0, *_UNIT),
    "anomaly_rate": (*(-x for x in reversed(_UNIT)), 0.0, *_UNIT),
    "prada": (*(-x for x in reversed(_UNIT)), 0.0, *_UNIT),
    "near_duplicate": (*(-x for x in reversed(_UNIT)), 0.0, *_UNIT),
    "boundary": (-100.0, -30.0, -10.0, -6.0, -3.0, -2.0, -1.0, -0.3, 0.0,
                 0.3, 1.0, 2.0, 3.0, 6.0, 10.0, 30.0, 100.0),
}  # fmt: skip


def _round(x: float) -> float:
    return float(f"{x:.3g}")


def calibration_summary(threshold: float, scores: ArrayLike) -> dict[str, Any]:
    """What ``guard calibrate`` saves beside a detector: threshold and benign score quantiles."""
    values = np.quantile(np.asarray(scores, dtype=np.float64), SCORE_QUANTILES)
    return {
        "threshold": float(threshold),
        "quantiles": [[q, float(v)] for q, v in zip(SCORE_QUANTILES, values, strict=True)],
    }


def calibrated_buckets(calibration: Mapping[str, Any]) -> tuple[float, ...] | None:
    """The layout from a manifest's ``calibration`` block; ``None`` if it is unusable."""
    try:
        threshold = float(calibration["threshold"])
        pairs = [(float(q), float(v)) for q, v in calibration["quantiles"]]
    except (KeyError, TypeError, ValueError):
        return None
    if not math.isfinite(threshold) or not pairs:
        return None
    margins = [v - threshold for _, v in pairs if math.isfinite(v)]
    above = sorted({_round(m) for m in margins if m > 0})
    median = next((v - threshold for q, v in pairs if q == 0.5), math.nan)
    scale = median if math.isfinite(median) and median > 0 else (above[-1] if above else 0.0)
    if scale <= 0:
        scale = abs(threshold) or 1.0
    if above:
        above.append(_round(2 * above[-1]))
    else:
        above = [_round(scale)]
    below = sorted({-_round(scale * k) for k in _BELOW})
    return tuple(sorted({*below, 0.0, *above}))


def score_buckets(spec: DetectorSpec, calibration_dir: Path | None) -> tuple[float, ...]:
    """The bucket layout of one configured detector (see the module docstring)."""
    if spec.type in ROW_TYPES or spec.type in TEXT_TYPES:
        try:
            path = resolve_file(spec, calibration_dir)
            manifest = read_manifest(path, hmac_key=calibration_key())
        except (ConfigurationError, CorruptModelFile, OSError) as exc:
            log.debug("detector %s: default score buckets (%s)", spec.name, exc)
            return DEFAULT_BUCKETS
        block = manifest.get("calibration")
        layout = calibrated_buckets(block) if isinstance(block, Mapping) else None
        if layout is None:
            log.info(
                "detector %s: its calibration file holds no score quantiles (calibrated by an "
                "older guard calibrate); guard_detector_score uses the default buckets until "
                "it is recalibrated",
                spec.name,
            )
            return DEFAULT_BUCKETS
        return layout
    return _FIXED.get(spec.type, DEFAULT_BUCKETS)
