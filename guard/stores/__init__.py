"""State stores: ``memory://`` (per process, bounded) and ``redis://`` (shared)."""

from __future__ import annotations

from guard.stores.base import Store, store_from_uri
from guard.stores.memory import MemoryStore

__all__ = ["MemoryStore", "Store", "store_from_uri"]
