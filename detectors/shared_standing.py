"""A client's standing with a detector, shared by every worker.

The extraction detectors keep their heavy per-client structures (PRADA's
growing sets, the fingerprint index, boundary windows) in per-process memory:
they are too large, and consulted too often, for a store round trip per row.
What other workers must know is small: *this client was flagged, with this
score*. :class:`SharedStanding` writes that summary to the
:class:`~detectors.store.KeyValueStore` the detector was built with
(``memory://`` in one process, ``redis://`` across workers and replicas), with
a TTL so a flag expires on its own. Every key starts with
:data:`STANDING_PREFIX`, which stores use to keep standings apart from the
state they may evict (the ``memory://`` store's flag table).

With a shared store, a client flagged by one worker is flagged by all of them
on its next request. The evidence behind the flags is shared too, compactly
and one request late (:mod:`detectors.shared_evidence`), so that traffic spread
over the workers convicts as early as traffic seen by one.
"""

from __future__ import annotations

import math

from inference_guard.detectors.store import KeyValueStore

__all__ = ["STANDING_PREFIX", "SharedStanding"]

#: the prefix of every standing's key: a bounded store must not evict these for rate keys
STANDING_PREFIX = "standing:"


class SharedStanding:
    """Flagged clients and their scores, under ``standing:<namespace>:<policy>:<client>``.

    Parameters
    ----------
    store : KeyValueStore
        Where standings are written; every worker reads the same keys.
    namespace : str
        Key prefix, normally ``"<detector type>:<detector name>"``.
    ttl : float or None
        Seconds a flag lasts after it was last confirmed (``None``: forever).
    """

    def __init__(self, store: KeyValueStore, namespace: str, ttl: float | None) -> None:
        if ttl is not None and not (math.isfinite(ttl) and ttl > 0):
            raise ValueError(f"ttl must be a number of seconds > 0 or None, got {ttl!r}")
        self.store = store
        self.namespace = namespace
        self.ttl = ttl

    def _key(self, policy: str, client: str) -> str:
        return f"{STANDING_PREFIX}{self.namespace}:{policy}:{client}"

    async def flag(self, policy: str, client: str, score: float) -> None:
        """Record that ``client`` was flagged with ``score`` (refreshes the TTL)."""
        await self.store.set(self._key(policy, client), repr(float(score)).encode(), self.ttl)

    async def score(self, policy: str, client: str) -> float | None:
        """The score ``client`` was flagged with, by any worker; ``None`` if not flagged."""
        raw = await self.store.get(self._key(policy, client))
        if raw is None:
            return None
        try:
            value = float(raw.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            return None  # not ours (or corrupted): ignore rather than fail the request
        return value if math.isfinite(value) else None

    async def resolve(
        self, policy: str, client: str, local: float | None, threshold: float
    ) -> float | None:
        """The client's standing: this worker's score, or the shared one when it is lower.

        The store is read only when the local score does not already flag the
        client, so a flagged client costs no round trip; nor is it read when the
        store can tell that it holds no standing at all (``memory://`` while no
        client is flagged: ``may_hold_flag``).
        """
        if local is not None and local < threshold:
            return local
        may_hold = getattr(self.store, "may_hold_flag", None)
        if may_hold is not None and not may_hold(STANDING_PREFIX):
            return local
        return self.pick(local, await self.score(policy, client), threshold)

    @staticmethod
    def pick(local: float | None, shared: float | None, threshold: float) -> float | None:
        """What :meth:`resolve` answers, given the shared score already read."""
        if local is not None and local < threshold:
            return local
        if shared is not None and (local is None or shared < local):
            return shared
        return local
