"""Detectors: plain numpy and scikit-learn code that knows nothing of HTTP.

The contract every online detector follows is in :mod:`detectors.base`; the
store protocol stateful detectors are given is in :mod:`detectors.store`.
"""

from __future__ import annotations

from inference_guard.detectors.base import Answer, Detector, DetectorResult, Query

__all__ = ["Answer", "Detector", "DetectorResult", "Query"]
