"""The detectors that ship with inference-guard: one explicit table, type name to factory.

Each family keeps its factories in its own module (:mod:`guard.rate_factories`,
:mod:`guard.anomaly_factories`, :mod:`guard.extraction_factories`), which exports
them as ``FACTORIES``; :mod:`guard.registry` reads this table the first time a
detector type is looked up. Nothing registers itself on import.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from inference_guard.guard import anomaly_factories, extraction_factories, rate_factories
from inference_guard.guard.factory import DetectorFactory

__all__ = ["BUILTIN_DETECTORS"]

#: every built-in detector type (``rate``, ``envelope``, ``prada``, ...) and its factory
BUILTIN_DETECTORS: Mapping[str, DetectorFactory] = MappingProxyType(
    {
        **rate_factories.FACTORIES,
        **anomaly_factories.FACTORIES,
        **extraction_factories.FACTORIES,
    }
)
