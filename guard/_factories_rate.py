"""Factories for the rate detectors (registered on import)."""

from __future__ import annotations
