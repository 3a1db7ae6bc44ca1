"""The state-store protocols that stateful detectors are given.

Detectors never import a backend: the guard builds a store (``memory://`` per
process, ``redis://`` shared by every worker and replica) and passes it in.
Keys are plain strings chosen by the detector (already prefixed with the client
hash where per-client); values are bytes. Every method may raise the guard's
``StateError``; detectors let it propagate, and the policy applies its failure
mode.

Rate limiting is an optional capability, :class:`RateStore`: atomic GCRA and
sliding-window checks over one or several limits at once. The limits are the
immutable values :class:`GcraLimit` and :class:`WindowLimit`; every check
answers with a :class:`RateState`.

Sharing evidence between workers is another, :class:`EvidenceStore`: a bounded,
expiring log each worker appends a request's compact evidence to and reads the
others' from, in one round trip (:mod:`detectors.shared_evidence`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, NamedTuple, Protocol, TypeAlias, runtime_checkable

__all__ = [
    "EvidenceStore",
    "GcraLimit",
    "KeyValueStore",
    "RateCheck",
    "RateLimit",
    "RateState",
    "RateStore",
    "WindowLimit",
]


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


def _check_period(period: float) -> None:
    if not (math.isfinite(period) and period > 0):
        raise ValueError(f"period must be a finite number of seconds > 0, got {period!r}")


@dataclass(frozen=True, slots=True)
class GcraLimit:
    """A smooth rate with a burst allowance: GCRA, equivalent to a token bucket.

    The bucket holds ``burst`` units and refills at ``rate`` units per ``period``
    seconds; a request of cost ``c`` fits when ``c`` units are in the bucket.
    """

    algorithm: ClassVar[str] = "gcra"

    #: units admitted per ``period`` in the long run
    rate: float
    #: seconds over which ``rate`` is counted
    period: float
    #: bucket capacity: most units admitted at once after a quiet spell
    burst: int

    def __post_init__(self) -> None:
        if not (math.isfinite(self.rate) and self.rate > 0):
            raise ValueError(f"rate must be a finite number > 0, got {self.rate!r}")
        _check_period(self.period)
        if isinstance(self.burst, bool) or not isinstance(self.burst, int) or self.burst < 1:
            raise ValueError(f"burst must be an integer >= 1, got {self.burst!r}")

    @property
    def capacity(self) -> int:
        """Most units one request can ever be admitted for."""
        return self.burst

    @property
    def interval(self) -> float:
        """Seconds to earn back one unit (GCRA's emission interval)."""
        return self.period / self.rate

    @property
    def window(self) -> float:
        """Seconds an empty bucket takes to fill: the ``w`` of ``RateLimit-Policy``."""
        return self.burst * self.interval


@dataclass(frozen=True, slots=True)
class WindowLimit:
    """At most ``limit`` units per ``period`` seconds, counted in a sliding window.

    Backends use the weighted two-window approximation (the count of the previous
    fixed window, weighted by how much of it still overlaps the sliding window,
    plus the count of the current one): constant memory per key, and exact when
    traffic is spread evenly over the previous window.
    """

    algorithm: ClassVar[str] = "sliding_window"

    #: units admitted per ``period``
    limit: int
    #: window length in seconds
    period: float

    def __post_init__(self) -> None:
        if isinstance(self.limit, bool) or not isinstance(self.limit, int) or self.limit < 1:
            raise ValueError(f"limit must be an integer >= 1, got {self.limit!r}")
        _check_period(self.period)

    @property
    def capacity(self) -> int:
        """Most units one request can ever be admitted for."""
        return self.limit

    @property
    def window(self) -> float:
        """The window length: the ``w`` of ``RateLimit-Policy``."""
        return self.period


#: one limit of either algorithm
RateLimit: TypeAlias = GcraLimit | WindowLimit
#: a state key and the limit it enforces
RateCheck: TypeAlias = tuple[str, RateLimit]


class RateState(NamedTuple):
    """The answer of one limit to one check (after ``limits.WindowStats``)."""

    #: the request fits this limit (from a multi-limit acquire: it was admitted
    #: only if *every* limit's ``allowed`` is true)
    allowed: bool
    #: units left after this request (before it, when the request was not admitted)
    remaining: int
    #: seconds until a request of this cost fits (0.0 when it fits now); for a cost
    #: above the limit's capacity, seconds until the limit is full again (it never fits)
    retry_after: float
    #: seconds until the limit is back to full capacity
    reset_after: float
    #: the limit's capacity (GCRA burst, window limit)
    limit: int


@runtime_checkable
class RateStore(Protocol):
    """A store with atomic rate-limit primitives (``memory://`` and ``redis://`` both are).

    A request that does not fit must not consume anything, and concurrent
    callers (other tasks, other workers sharing Redis) never over-admit.
    """

    #: backend name, a metric label (``memory``, ``redis``)
    backend: str

    async def gcra(
        self, key: str, *, rate: float, period: float, burst: int, cost: int
    ) -> RateState:
        """Check and, if it fits, consume ``cost`` units of a GCRA limit at ``key``."""
        ...

    async def window(self, key: str, *, limit: int, period: float, cost: int) -> RateState:
        """Check and, if it fits, consume ``cost`` units of a sliding-window limit."""
        ...

    async def acquire(self, checks: Sequence[RateCheck], *, cost: int) -> tuple[RateState, ...]:
        """Check every limit at once; consume ``cost`` from all of them only if all admit.

        Returns one :class:`RateState` per check, in order. Keys must be distinct.
        """
        ...


@runtime_checkable
class EvidenceStore(Protocol):
    """A store that carries the extraction detectors' evidence between processes.

    ``redis://`` (and ``redis+cluster://``) stores share it; a per-process store
    answers ``shares_evidence = False`` and the detectors then keep their
    evidence to themselves, exactly as without this capability.
    """

    #: whether appended entries reach other processes (``False``: do not call :meth:`exchange`)
    shares_evidence: bool

    async def exchange(
        self,
        key: str,
        entry: bytes,
        cursor: bytes,
        *,
        max_entries: int,
        ttl: float,
        count: int,
    ) -> tuple[bytes, list[bytes]]:
        """Append ``entry`` to the log at ``key`` and read what was appended since ``cursor``.

        The log keeps its last ``max_entries`` entries and expires ``ttl``
        seconds after the last append. Returns the new cursor and at most
        ``count`` entries appended after ``cursor`` and before ``entry``, oldest
        first (``cursor == b""``: the last ``count`` entries before ``entry``).
        The caller's own earlier entries are among them: it tells them apart.
        """
        ...
