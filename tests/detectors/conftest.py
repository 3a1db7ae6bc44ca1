"""Fixtures for the detector tests: the store backends (see tests/stores_fixture.py)."""

from __future__ import annotations

from tests.stores_fixture import anyio_backend, backend

__all__ = ["anyio_backend", "backend"]
