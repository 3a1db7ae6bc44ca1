"""``memory://``: a bounded, per-process store with TTLs and LRU eviction.

An attacker controls how many client ids we see, so the store holds at most
``max_keys`` keys; past that the least recently used key is evicted (and
counted in :attr:`MemoryStore.evictions`). Expired keys are dropped when touched
and swept in small steps on writes, so memory stays bounded without a
background task.

Rate-limit state lives in the same bounded table (an evicted client simply
starts with a fresh budget), timed by the injected clock.

Flags are worth more than budgets: a quarantine (``quarantine:`` keys) or a
detector's standing (``standing:`` keys) is evidence against a client, and a
flood of fresh client ids must not push it out of an LRU shared with their
rate keys. Flags therefore live in a table of their own, bounded by
``max_flag_keys`` and never evicted while their TTL runs: expired flags are
dropped (the soonest-expiring first) to make room, and when every flag in it
is still live, a new flag *overflows* into the main table, where it is
evicted like any other key. Each overflow is counted
(:attr:`MemoryStore.flag_overflows`, ``on_event("flag_overflow", "memory")``);
live flags are never given up for it.

Every method runs to completion without awaiting, so each call is atomic with
respect to the other tasks of the event loop; the store is not meant to be
shared across threads.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence

from inference_guard.detectors.shared_standing import STANDING_PREFIX
from inference_guard.detectors.store import GcraLimit, RateCheck, RateLimit, RateState
from inference_guard.guard.errors import StateError
from inference_guard.guard.stores._ratemath import check_acquire, gcra_step, window_step
from inference_guard.guard.stores.base import QUARANTINE_PREFIX, QuarantineCount, Store
from inference_guard.guard.stores.rate import RateLimitStore

__all__ = ["FLAG_PREFIXES", "MemoryStore"]

_NEVER = float("inf")
#: keys kept in the flag table: quarantine (``guard.pipeline``) and detector standings
FLAG_PREFIXES = (QUARANTINE_PREFIX, STANDING_PREFIX)


class _Tat(float):
    """GCRA state: the theoretical arrival time (a float of its own type, so that a
    rate key is told apart from a counter; made for every admitted check)."""

    __slots__ = ()


class _Window(tuple[int, int, int]):
    """Sliding-window state: ``(window index, its count, the previous window's count)``,
    a tuple of its own type (made for every admitted check, without a Python ``__init__``)."""

    __slots__ = ()


class _Windows(list[int]):
    """Two windows of counts under one key, changed in place: ``[window index, its
    total, its flagged, the previous window's total, its flagged]`` (the anomaly
    rate's counts, :meth:`MemoryStore.add_windowed`)."""

    __slots__ = ()


_Value = bytes | int | _Tat | _Window | _Windows
#: what :meth:`MemoryStore.read_windowed` answers for a key with no count in either window
_NO_COUNTS = (0, 0, 0, 0)


class MemoryStore(Store, RateLimitStore, QuarantineCount):
    """Per-process store. Not shared across workers: use Redis for that."""

    backend = "memory"
    answers_now = True

    def __init__(
        self,
        *,
        max_keys: int = 100_000,
        max_flag_keys: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
        on_event: Callable[[str, str], None] | None = None,
        flag_prefixes: tuple[str, ...] = FLAG_PREFIXES,
    ):
        if max_keys < 1:
            raise ValueError("max_keys must be >= 1")
        if max_flag_keys < 1:
            raise ValueError("max_flag_keys must be >= 1")
        self.max_keys = max_keys
        self.max_flag_keys = max_flag_keys
        self._clock = clock
        #: called as ``on_event("eviction", "memory")`` for every eviction, and
        #: ``on_event("flag_overflow", "memory")`` for every overflowing flag (metrics)
        self.on_event = on_event
        # key -> (expires_at, value); order is recency of use (last = most recent)
        self._data: OrderedDict[str, tuple[float, _Value]] = OrderedDict()
        #: keys evicted because the store was full (exported as a metric)
        self.evictions = 0
        self._flag_prefixes = flag_prefixes
        # the flag table, key -> (expires_at, value), and a heap of (expires_at, key) to
        # find expired flags without a scan (stale entries are skipped, then compacted)
        self._flags: dict[str, tuple[float, _Value]] = {}
        self._flag_expiry: list[tuple[float, str]] = []
        #: flags that found the flag table full of live flags and went to the main table
        self.flag_overflows = 0

    def __len__(self) -> int:
        return len(self._data) + len(self._flags)

    @property
    def lru_keys(self) -> int:
        """Keys in the LRU table (``max_keys`` bounds it), flags aside."""
        return len(self._data)

    @property
    def flag_keys(self) -> int:
        """Quarantine and standing flags held in their own table (``max_flag_keys``)."""
        return len(self._flags)

    def may_hold_flag(self, prefix: str) -> bool:
        """Whether a key starting with ``prefix`` may be held now; ``False`` only when it
        is certain that none is: ``prefix`` is a flag's, the flag table is empty and no
        flag ever overflowed into the main table.

        For readers that look a client's flag up on every request (a detector's
        shared standing): while no client is flagged at all, the usual case, they
        skip the lookup. Conservative: expired flags not yet dropped count.
        """
        if not prefix.startswith(self._flag_prefixes):
            return True  # kept in the main table with everything else: cannot tell
        return bool(self._flags) or self.flag_overflows > 0

    def quarantined_now(self) -> int:
        """Live ``quarantine:`` keys: the flag table, and the main table if a flag overflowed.

        Called from the metrics exposition, perhaps in another thread: the tables
        are copied first (one C-level call each, under the GIL), never iterated
        while the event loop may change them. Costs one pass over the flags.
        """
        now = self._clock()
        items = list(self._flags.items())
        if self.flag_overflows:
            items += list(self._data.items())
        return sum(
            1 for key, (expires, _) in items if expires > now and key.startswith(QUARANTINE_PREFIX)
        )

    def _live(self, key: str, now: float) -> tuple[float, _Value] | None:
        if key.startswith(self._flag_prefixes):
            flag = self._flags.get(key)
            if flag is not None:
                if flag[0] > now:
                    return flag
                del self._flags[key]
            # else perhaps an overflowed flag, in the main table
        item = self._data.get(key)
        if item is None:
            return None
        if item[0] <= now:
            del self._data[key]
            return None
        self._data.move_to_end(key)
        return item

    def _flag_room(self, key: str, now: float) -> bool:
        """Whether the flag table can hold ``key``, after dropping expired flags if full."""
        flags = self._flags
        if key in flags or len(flags) < self.max_flag_keys:
            return True
        heap = self._flag_expiry
        while heap and heap[0][0] <= now:
            _, old = heapq.heappop(heap)
            item = flags.get(old)
            if item is not None and item[0] <= now:
                del flags[old]
        return len(flags) < self.max_flag_keys

    def _put_flag(self, key: str, expires: float, value: _Value) -> bool:
        """Keep a flag in the flag table; ``False`` when it is full of live flags."""
        if not self._flag_room(key, self._clock()):
            self.flag_overflows += 1
            if self.on_event is not None:
                self.on_event("flag_overflow", self.backend)
            return False
        self._flags[key] = (expires, value)
        self._data.pop(key, None)  # an older copy that had overflowed
        heap = self._flag_expiry
        heapq.heappush(heap, (expires, key))
        if len(heap) > 2 * len(self._flags) + 64:  # refreshed flags leave stale entries
            heap[:] = [(exp, k) for k, (exp, _) in self._flags.items()]
            heapq.heapify(heap)
        return True

    def _put(self, key: str, expires: float, value: _Value) -> None:
        if key.startswith(self._flag_prefixes) and self._put_flag(key, expires, value):
            return
        data = self._data
        data[key] = (expires, value)
        data.move_to_end(key)
        if len(data) > self.max_keys:
            self._sweep()
            while len(data) > self.max_keys:
                data.popitem(last=False)
                self.evictions += 1
                if self.on_event is not None:
                    self.on_event("eviction", self.backend)

    def _sweep(self, budget: int = 64) -> None:
        # drop expired keys among the least recently used, a bounded amount of work
        now = self._clock()
        data = self._data
        for key in list(itertools.islice(data, budget)):
            if data[key][0] <= now:
                del data[key]

    @staticmethod
    def _expiry(now: float, ttl: float | None) -> float:
        return _NEVER if ttl is None else now + ttl

    async def get(self, key: str) -> bytes | None:
        item = self._live(key, self._clock())
        if item is None:
            return None
        value = item[1]
        if isinstance(value, int):
            return str(value).encode()
        if isinstance(value, bytes):
            return value
        raise StateError(self.backend, "get", "the key holds rate-limit state")

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """:meth:`get` of every key, in one call (what Redis does with one ``MGET``)."""
        return [
            str(value).encode() if isinstance(value, int) else value
            for value in self.get_counts(keys)
        ]

    def get_counts(self, keys: Sequence[str]) -> list[int | bytes | None]:
        """:meth:`get_many` without the coroutine, counters as the integers they are.

        For readers in this process that only parse counters (the anomaly
        rate): an ``incr``-ed key is an ``int`` here, another value its bytes.
        """
        now = self._clock()
        out: list[int | bytes | None] = []
        for key in keys:
            item = self._live(key, now)
            if item is None:
                out.append(None)
                continue
            value = item[1]
            if isinstance(value, int | bytes):
                out.append(value)
            else:
                raise StateError(self.backend, "get", "the key holds rate-limit state")
        return out

    async def set(self, key: str, value: bytes, ttl: float | None = None) -> None:
        now = self._clock()
        self._put(key, self._expiry(now, ttl), value)

    async def delete(self, key: str) -> None:
        self._data.pop(key, None)
        self._flags.pop(key, None)

    async def incr(self, key: str, amount: int = 1, ttl: float | None = None) -> int:
        now = self._clock()
        item = self._live(key, now)
        if item is None:
            new = amount
            self._put(key, self._expiry(now, ttl), new)
            return new
        old = item[1]
        if isinstance(old, _Tat | _Window | _Windows):
            raise StateError(self.backend, "incr", "the key holds rate-limit state")
        try:
            new = (int(old) if isinstance(old, bytes) else old) + amount
        except ValueError as exc:
            raise StateError(self.backend, "incr", "the value is not an integer") from exc
        if key in self._flags:
            self._flags[key] = (item[0], new)
        else:
            self._data[key] = (item[0], new)
        return new

    def add_windowed(self, key: str, window: int, total: int, flagged: int, ttl: float) -> None:
        """Add ``total`` rows, ``flagged`` of them, to window ``window`` of ``key``'s counts.

        A key holds two consecutive windows' counts (``window`` and the one before;
        older ones no longer count), changed in place: what a shared store keeps as
        two counters per window (:class:`~detectors.anomaly_rate.AnomalyRateTracker`),
        here in one key, one lookup per request. ``window`` is the caller's index
        (its own clock); ``ttl`` is how long the key lives after this write (two
        windows: then neither of its windows counts). The key is evicted like any
        other. Raises :class:`StateError` when the key holds another kind of value.
        """
        now = self._clock()
        item = self._rate_item(key, now)
        if item is None:
            self._put(key, now + ttl, _Windows((window, total, flagged, 0, 0)))
            return
        counts = item[1]
        if type(counts) is not _Windows:
            raise StateError(self.backend, "incr", "the key holds another kind of value")
        if counts[0] != window:
            if counts[0] == window - 1:  # the window moved on: the current one is previous
                counts[3] = counts[1]
                counts[4] = counts[2]
            else:
                counts[3] = counts[4] = 0
            counts[0] = window
            counts[1] = total
            counts[2] = flagged
        else:
            counts[1] += total
            counts[2] += flagged
        self._write(key, (now + ttl, counts), True)

    def read_windowed(self, key: str, window: int) -> tuple[int, int, int, int]:
        """``(total, flagged)`` of window ``window`` of ``key``'s counts and of the one
        before, as one tuple (zeros for a window with none; see :meth:`add_windowed`)."""
        item = self._rate_item(key, self._clock())
        if item is None:
            return _NO_COUNTS
        counts = item[1]
        if type(counts) is not _Windows:
            raise StateError(self.backend, "get", "the key holds another kind of value")
        at = counts[0]
        if at == window:
            return (counts[1], counts[2], counts[3], counts[4])
        if at == window - 1:
            return (0, 0, counts[1], counts[2])
        return _NO_COUNTS

    async def acquire(self, checks: Sequence[RateCheck], *, cost: int) -> tuple[RateState, ...]:
        """Check every limit, then consume ``cost`` from all of them only if all admit."""
        return self._acquire(checks, cost)

    def acquire_sync(self, checks: Sequence[RateCheck], *, cost: int) -> tuple[RateState, ...]:
        """:meth:`acquire` without the coroutine: this store answers every check at once.

        For a caller on the event loop's thread (the rate detector's hot path); the
        same check, atomic for the same reason (it runs to completion).
        """
        return self._acquire(checks, cost)

    def acquire_now(
        self, checks: Sequence[RateCheck], *, cost: int
    ) -> tuple[RateState, ...] | None:
        """:meth:`acquire`, at once: its states when it admits, else ``None`` (nothing consumed)."""
        if len(checks) == 1:
            state = self._acquire(checks, cost)[0]
            return (state,) if state.allowed else None
        states = self._acquire(checks, cost)
        for state in states:
            if not state.allowed:
                return None
        return states

    def _rate_item(self, key: str, now: float) -> tuple[float, _Value] | None:
        """:meth:`_live` of a rate key, inlined for the usual one (not a flag's prefix)."""
        if key.startswith(self._flag_prefixes):
            return self._live(key, now)
        data = self._data
        item = data.get(key)
        if item is None:
            return None
        if item[0] <= now:
            del data[key]
            return None
        data.move_to_end(key)
        return item

    def _acquire(self, checks: Sequence[RateCheck], cost: int) -> tuple[RateState, ...]:
        check_acquire(checks, cost)
        now = self._clock()
        compute = self._compute
        if len(checks) == 1:
            # one limit: admitted or refused, its own state is the whole answer
            key, limit = checks[0]
            item = self._rate_item(key, now)
            state, write = compute(None if item is None else item[1], limit, now, cost)
            if state.allowed and write is not None:
                self._write(key, write, item is not None)
            return (state,)
        states: list[RateState] = []
        writes: list[tuple[str, tuple[float, _Value], bool]] = []
        refused_at = -1
        for i, (key, limit) in enumerate(checks):
            item = self._rate_item(key, now)
            value = None if item is None else item[1]
            if refused_at < 0:
                state, write = compute(value, limit, now, cost)
                if not state.allowed:
                    refused_at = i
                elif write is not None:
                    writes.append((key, write, item is not None))
            else:
                # refused already: this limit's state untouched if it would admit the
                # request, else its refusal (one step tells which)
                state = self._probe(value, limit, now, cost)
            states.append(state)
        if refused_at < 0:
            for key, write, existed in writes:
                self._write(key, write, existed)
            return tuple(states)
        # refused: the limits before the refusing one admitted it; they report their
        # state untouched (computed again at no cost: nothing was written meanwhile)
        for i in range(refused_at):
            key, limit = checks[i]
            item = self._rate_item(key, now)
            states[i] = compute(None if item is None else item[1], limit, now, 0)[0]
        return tuple(states)

    def _write(self, key: str, item: tuple[float, _Value], existed: bool) -> None:
        """Store a rate key's new state; one :meth:`_live` just read (and, if it
        ``existed``, moved it last in the table), so an update in place is all it takes."""
        data = self._data
        if existed and key in data:
            data[key] = item
        else:
            self._put(key, *item)

    @staticmethod
    def _probe(stored: _Value | None, limit: RateLimit, now: float, cost: int) -> RateState:
        """What one limit answers for a request another limit has refused (see ``probe``
        in :mod:`guard.stores._ratemath`): nothing is written."""
        if type(limit) is GcraLimit or isinstance(limit, GcraLimit):
            return gcra_step(
                stored if type(stored) is _Tat else None, now, limit, cost, probe=True
            )[0]
        prior = stored if type(stored) is _Window else None
        return window_step(prior, now, limit, cost, probe=True)[0]

    @staticmethod
    def _compute(
        stored: _Value | None, limit: RateLimit, now: float, cost: int
    ) -> tuple[RateState, tuple[float, _Value] | None]:
        """One limit's answer from its stored state, and what to store if admitted."""
        if type(limit) is GcraLimit or isinstance(limit, GcraLimit):
            tat = stored if type(stored) is _Tat else None
            state, new_tat = gcra_step(tat, now, limit, cost)
            return state, ((new_tat, _Tat(new_tat)) if new_tat > now else None)
        prior = stored if type(stored) is _Window else None
        state, window, expires = window_step(prior, now, limit, cost)
        return state, (expires, _Window(window))
