"""The state-store protocol that stateful detectors are given.

Detectors never import a backend: the guard builds a store (``memory://`` per
process, ``redis://`` shared by every worker and replica) and passes it in.
Keys are plain strings chosen by the detector (already prefixed with the client
hash where per-client); values are bytes. Every method may raise the guard's
``StateError``; detectors let it propagate, and the policy applies its failure
mode.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

__all__ = ["KeyValueStore"]


@runtime_checkable
class KeyValueStore(Protocol):
    """The minimal store every backend provides."""

    #: backend name, a metric label (``memory``, ``redis``)
    backend: str

    async def get(self, key: str) -> bytes | None:
        """The value at ``key``, or ``None`` if absent or expired."""
        ...

    async def set(self, key: str, value: bytes, ttl: float | None = None) -> None:
        """Store ``value`` at ``key``, expiring after ``ttl`` seconds (never if ``None``)."""
        ...

    async def delete(self, key: str) -> None:
        """Remove ``key`` if present."""
        ...

    async def incr(self, key: str, amount: int = 1, ttl: float | None = None) -> int:
        """Atomically add ``amount`` to the integer at ``key`` (0 if absent); return the new value.

        ``ttl`` is set when the key is created and left alone afterwards, so a
        counter expires ``ttl`` seconds after its first increment (a fixed window).
        """
        ...
