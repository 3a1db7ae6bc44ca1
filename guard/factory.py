"""What a detector factory is given: :class:`BuildContext`, and the factory type itself.

Its own module so that the factories (``guard/*_factories.py``) and the
registry that lists them (:mod:`guard.registry`, which re-exports both names)
import it, and neither imports the other.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from inference_guard.detectors.base import Detector
from inference_guard.detectors.store import KeyValueStore
from inference_guard.guard.config import DetectorSpec, LimitsConfig

__all__ = ["BuildContext", "DetectorFactory"]


@dataclass(frozen=True, slots=True)
class BuildContext:
    """What a detector factory may use."""

    #: the state store (memory or Redis), for stateful detectors
    store: KeyValueStore
    #: the monotonic clock, injectable for tests (durations, per-process state)
    clock: Callable[[], float] = time.monotonic
    #: the wall clock, for time buckets that workers and hosts must agree on
    wall_clock: Callable[[], float] = time.time
    #: directory of calibrated detector files, if configured
    calibration_dir: Path | None = None
    #: the parsing limits (a detector may size buffers from them)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    #: seed for anything random (projections, salts are secrets, not seeds)
    seed: int | None = None


#: builds one detector from its config entry, or raises ConfigurationError naming ``spec.key``
DetectorFactory = Callable[[DetectorSpec, BuildContext], Detector]
