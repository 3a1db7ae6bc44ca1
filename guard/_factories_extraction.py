"""Factories for the extraction detectors (registered on import)."""

from __future__ import annotations
