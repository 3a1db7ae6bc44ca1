"""Registers the detectors that ship with inference-guard.

Each family keeps its factories in its own private module, which calls
:func:`guard.registry.register_detector` on import.
"""

from __future__ import annotations

import guard._factories_anomaly
import guard._factories_extraction
import guard._factories_rate  # noqa: F401

__all__: list[str] = []
