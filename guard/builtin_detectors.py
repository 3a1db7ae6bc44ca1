"""The detectors that ship with inference-guard: one explicit table, type name to factory.

Each family keeps its factories in its own private module, which exports them
as ``FACTORIES``; :mod:`guard.registry` reads this table the first time a
detector type is looked up. Nothing registers itself on import.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from guard import _factories_anomaly, _factories_extraction, _factories_rate
from guard.factory import DetectorFactory

__all__ = ["BUILTIN_DETECTORS"]

#: every built-in detector type (``rate``, ``envelope``, ``prada``, ...) and its factory
BUILTIN_DETECTORS: Mapping[str, DetectorFactory] = MappingProxyType(
    {
        **_factories_rate.FACTORIES,
        **_factories_anomaly.FACTORIES,
        **_factories_extraction.FACTORIES,
    }
)
