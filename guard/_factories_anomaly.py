"""Factories for the anomaly detectors (registered on import)."""

from __future__ import annotations
