"""Local leases on a shared rate store: most checks answered without a round trip.

A shared store (Redis) answers every rate check with a round trip, so a busy
client costs the store one script per request. :class:`LeasedRateStore` sits
in front of it, one per rate detector and process, and keeps two kinds of
answer locally, per state key:

* **a lease**: when a request is admitted and every limit has plenty of room,
  the same script takes ``lease`` more units from every limit
  (:meth:`~guard.stores.rate.RateLimitStore.acquire_lease`) and this process
  spends them on the client's next requests, with no round trip, until they
  run out or ``lease_s`` seconds pass. The units are taken from the shared
  budget when leased, so the total admitted never exceeds what the store
  handed out; what a lease changes is *when* they are spent. A lease is
  granted only while every limit keeps at least half its capacity after it,
  so a client near a limit is checked request by request, exactly as without
  leases.
* **a refusal**: a request refused with ``retry_after`` ``r`` is refused again
  locally, for requests of the same cost or more, until ``min(r, lease_s)``
  seconds after the refused check was *sent*. A shared budget only refills
  with time (no one hands units back), so the store would refuse them too:
  this answer is exact, and a client over its limit costs one round trip per
  ``lease_s`` per process instead of one per request.

Bounds, with ``W`` processes (workers times replicas) and a lease of ``L``
units (``lease`` times the smallest capacity among the detector's limits,
rounded down; no lease at all when that is below 1):

* over-admission: the units a process holds in a lease were counted against
  the budget when leased, at most ``lease_s`` earlier; a burst can therefore
  exceed what the limits would allow at that instant by at most ``W * L``
  units (for a sliding window: ``W * L`` units leased in one window and spent
  in the next).
* under-admission: a lease that expires or is replaced before it is spent
  (its client's traffic went to other processes, or stopped) is lost, so a
  client can be refused up to ``W * L`` units early; a GCRA budget earns them
  back with time.

A process asks for at most one lease per key at a time (checks of the same
key made meanwhile are exact, lease-free ones), and a new lease replaces the
last: what remained of it (less than one request's cost) is lost, not carried,
so a process never holds more than ``L`` units, all leased within ``lease_s``.

The default ``lease`` is 1 % of the smallest capacity, held at most
``lease_s = 1`` second and never longer than a tenth of the shortest limit's
window: with 8 processes, at most 8 % of a burst. The table is bounded
(``max_entries``; the entry renewed longest ago is dropped first, which loses
at most its lease). The headers of a request answered from a lease are estimates: the
state of the leasing check less what this process has spent since, blind to
other processes and to the refill.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from inference_guard.detectors.store import GcraLimit, RateCheck, RateLimit, RateState
from inference_guard.guard.stores.rate import RateLimitStore

__all__ = ["DEFAULT_LEASE", "DEFAULT_LEASE_S", "LeasedRateStore", "lease_units"]

#: default lease: this share of the smallest capacity among a check's limits
DEFAULT_LEASE = 0.01
#: default longest time a lease (or a local refusal) is held, in seconds
DEFAULT_LEASE_S = 1.0
#: a lease never outlives this share of the shortest limit's window
_WINDOW_SHARE = 0.1


def lease_units(limits: Sequence[RateLimit], share: float) -> int:
    """Units leased at once for ``limits``: ``share`` of the smallest capacity, rounded down."""
    return math.floor(share * min(limit.capacity for limit in limits) + 1e-9)


@dataclass(slots=True)
class _Entry:
    """What this process holds for one state key (or one set of keys)."""

    #: the limits the entry was taken for (a key checked with other limits misses)
    limits: object
    #: local clock time the entry stops answering
    expires: float
    #: the states the store answered (the leasing or the refused check)
    states: tuple[RateState, ...]
    #: local clock time the check was sent
    sent: float
    #: units of the lease still to spend (0 for a refusal)
    left: int
    #: units granted (0 for a refusal)
    granted: int
    #: a refusal: requests of at least ``cost`` are refused until ``expires``
    refused: bool
    cost: int
    #: per limit, seconds a unit adds to ``reset_after`` (a GCRA's interval, else 0)
    per_unit: tuple[float, ...]


class LeasedRateStore(RateLimitStore):
    """A rate store that answers most checks from local leases and refusals.

    Parameters
    ----------
    inner : RateLimitStore
        The shared store (Redis, Redis Cluster, or either behind the circuit
        breaker); it grants the leases (:meth:`RateLimitStore.acquire_lease`).
    lease : float, default=0.01
        Share of the smallest capacity leased at once (0 turns leases off;
        local refusals stay on while ``lease_s`` > 0).
    lease_s : float, default=1.0
        Longest a lease or a refusal is held, capped at a tenth of the shortest
        limit's window.
    max_entries : int, default=10000
        Most state keys held at once.
    clock : callable, default=time.monotonic
        The local clock (leases expire on it; the store keeps its own time).
    """

    def __init__(
        self,
        inner: RateLimitStore,
        *,
        lease: float = DEFAULT_LEASE,
        lease_s: float = DEFAULT_LEASE_S,
        max_entries: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not (math.isfinite(lease) and 0.0 <= lease <= 1.0):
            raise ValueError(f"lease must be a share in [0, 1], got {lease!r}")
        if not (math.isfinite(lease_s) and lease_s >= 0.0):
            raise ValueError(f"lease_s must be a finite number of seconds >= 0, got {lease_s!r}")
        if max_entries < 1:
            raise ValueError("max_entries must be >= 1")
        self.inner = inner
        self.backend: str = getattr(inner, "backend", "unknown")
        self.lease = lease
        self.lease_s = lease_s
        #: whether :meth:`acquire_now` may answer: only with leases on
        self.answers_now = lease > 0 and lease_s > 0
        self.max_entries = max_entries
        self._clock = clock
        # least recently renewed first (popitem(last=False) stays O(1) as keys churn)
        self._table: OrderedDict[object, _Entry] = OrderedDict()
        # keys with a lease request in flight
        self._pending: set[object] = set()
        # per set of limits: (units leased, seconds held, per-unit reset of each limit)
        self._plans: dict[object, tuple[int, float, tuple[float, ...]]] = {}
        #: checks sent to the shared store
        self.remote = 0
        #: checks answered here: from a lease, or refused again
        self.local = 0

    def _plan(self, limits: tuple[RateLimit, ...]) -> tuple[int, float, tuple[float, ...]]:
        plan = self._plans.get(limits)
        if plan is None:
            held = min(self.lease_s, _WINDOW_SHARE * min(limit.window for limit in limits))
            per_unit = tuple(
                limit.interval if isinstance(limit, GcraLimit) else 0.0 for limit in limits
            )
            plan = (lease_units(limits, self.lease) if held > 0 else 0, held, per_unit)
            if len(self._plans) < 64:  # a detector has one set of limits; never unbounded
                self._plans[limits] = plan
        return plan

    def acquire_now(
        self, checks: Sequence[RateCheck], *, cost: int
    ) -> tuple[RateState, ...] | None:
        """The answer of this process's lease for the key when it covers ``cost``, else
        ``None`` (nothing spent: :meth:`acquire` answers, from a local refusal or the store)."""
        ident, limits = _ident(checks)
        entry = self._table.get(ident)
        if entry is None or entry.refused or not 0 < cost <= entry.left:
            return None
        now = self._clock()
        if now >= entry.expires or entry.limits != limits:
            return None
        entry.left -= cost
        self.local += 1
        return _spent(entry, now)

    async def acquire(self, checks: Sequence[RateCheck], *, cost: int) -> tuple[RateState, ...]:
        """Answer from this process's lease or refusal for the key, else from the store."""
        ident, limits = _ident(checks)
        now = self._clock()
        entry = self._table.get(ident)
        if entry is not None and now < entry.expires and entry.limits == limits:
            if entry.refused:
                if cost >= entry.cost:
                    self.local += 1
                    return _refused_again(entry.states, now - entry.sent)
            elif 0 < cost <= entry.left:
                entry.left -= cost
                self.local += 1
                return _spent(entry, now)
        units, held, per_unit = self._plan(limits)
        self.remote += 1
        pending = self._pending
        if units > 0 and ident not in pending:
            # one lease request per key at a time: concurrent ones are checked exactly
            pending.add(ident)
            try:
                states, granted = await self.inner.acquire_lease(checks, cost=cost, lease=units)
            finally:
                pending.discard(ident)
        else:
            states, granted = await self.inner.acquire(checks, cost=cost), 0
        if granted > 0:
            # what remained of the last lease (less than this request's cost) is lost,
            # not carried: units spent locally were all leased within ``lease_s``
            self._keep(
                ident, _Entry(limits, now + held, states, now, granted, granted, False, 0, per_unit)
            )
        elif held > 0 and not all(state.allowed for state in states):
            retry = max(state.retry_after for state in states if not state.allowed)
            current = self._table.get(ident)
            if (
                current is not None
                and not current.refused
                and current.left > 0
                and now < current.expires
                and current.limits == limits
            ):
                # a lease granted while this check was in flight: its units were taken
                # from the budget already, so they stay this process's to spend
                return states
            if retry > 0:
                hold = min(retry, held)
                self._keep(
                    ident, _Entry(limits, now + hold, states, now, 0, 0, True, cost, per_unit)
                )
        return states

    def _keep(self, ident: object, entry: _Entry) -> None:
        table = self._table
        if table.pop(ident, None) is None and len(table) >= self.max_entries:
            # the least recently renewed entry goes (a key renewed moves to the end): a
            # lease lost is budget left unspent, never over-admission
            table.popitem(last=False)
        table[ident] = entry

    def __len__(self) -> int:
        return len(self._table)


def _ident(checks: Sequence[RateCheck]) -> tuple[object, tuple[RateLimit, ...]]:
    """The table key of ``checks`` (its one state key, or the tuple of them) and its limits."""
    if len(checks) == 1:
        return checks[0][0], (checks[0][1],)
    return tuple(key for key, _ in checks), tuple(limit for _, limit in checks)


def _spent(entry: _Entry, now: float) -> tuple[RateState, ...]:
    """The states after this process spent part of its lease (an estimate for the headers)."""
    used = entry.granted - entry.left
    elapsed = now - entry.sent
    if len(entry.states) == 1:  # the usual single limit, without a generator
        state = entry.states[0]
        reset = state.reset_after + used * entry.per_unit[0] - elapsed
        return (RateState(True, max(0, state.remaining - used), 0.0, max(0.0, reset), state.limit),)
    return tuple(
        RateState(
            True,
            max(0, state.remaining - used),
            0.0,
            max(0.0, state.reset_after + used * unit - elapsed),
            state.limit,
        )
        for state, unit in zip(entry.states, entry.per_unit, strict=True)
    )


def _refused_again(states: tuple[RateState, ...], elapsed: float) -> tuple[RateState, ...]:
    """The refused states, ``elapsed`` seconds later: the waits shorten, the rest stands."""
    return tuple(
        RateState(
            state.allowed,
            state.remaining,
            max(0.0, state.retry_after - elapsed),
            max(0.0, state.reset_after - elapsed),
            state.limit,
        )
        for state in states
    )
