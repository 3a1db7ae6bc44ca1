"""Per-client share of anomalous rows over a time window.

One anomalous row is a data-quality event; a client whose rows are
anomalous *again and again* is probing, extracting with synthetic queries,
or fuzzing. Two pieces, so that one count serves several readers:

* :class:`AnomalyRateTracker` keeps, per client and window, two counters in the
  guard's :class:`~detectors.store.KeyValueStore` (memory or Redis): rows
  seen and rows flagged. A row detector (:class:`~detectors.anomaly.RowAnomalyDetector`,
  :class:`~detectors.anomaly.TextAnomalyDetector`) built with a tracker adds
  its verdicts after scoring each request.
* :class:`AnomalyRateDetector` reads the counts for the requesting client and
  fires when the share of anomalous rows exceeds ``max_rate`` over at least
  ``min_rows`` rows. Other detectors (extraction) read the same counts through
  :meth:`AnomalyRateTracker.rate`.

Counts live in fixed windows of ``window_s`` seconds; :meth:`~AnomalyRateTracker.rate`
blends the current window with the previous one weighted by how much of it
still overlaps the last ``window_s`` seconds (the sliding-window counter
approximation), so the rate neither resets to zero at a window boundary nor
remembers more than two windows. Keys are
``anomaly_rate:<namespace>:<window>:<client>:<bucket>:{all,bad}``; the namespace
is the name of the row detector that counts, so several row detectors in one
policy do not add up each other's rows, and the window length is part of the
key, so a reader configured with another window reads nothing rather than
misreading.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

from inference_guard.detectors.base import Detector, DetectorResult, Query
from inference_guard.detectors.store import KeyValueStore

__all__ = ["AnomalyRateDetector", "AnomalyRateTracker", "read_rates"]

#: clients whose previous window's counts a tracker keeps (memory:// only)
_ENDED_CLIENTS = 2048


class AnomalyRateTracker:
    """Counts rows seen and rows flagged per client, in the given store.

    Parameters
    ----------
    store : KeyValueStore
        Where the counters live (``incr`` with a TTL of two windows).
    namespace : str
        Which row detector's verdicts these are (its configured name).
    window_s : float, default=60.0
        Window length in seconds.
    clock : callable, default=time.time
        Seconds; with a store shared between hosts it must be wall-clock time
        so that every worker agrees on the window boundaries.

    Examples
    --------
    >>> import asyncio
    >>> class DictStore:  # the guard passes its memory:// or redis:// store
    ...     backend = "dict"
    ...     def __init__(self): self.data = {}
    ...     async def get(self, key):
    ...         return str(self.data[key]).encode() if key in self.data else None
    ...     async def incr(self, key, amount=1, ttl=None):
    ...         self.data[key] = self.data.get(key, 0) + amount
    ...         return self.data[key]
    >>> tracker = AnomalyRateTracker(DictStore(), namespace="knn", clock=lambda: 0.0)
    >>> async def demo():
    ...     await tracker.record("client-a", anomalous=3, total=10)
    ...     return await tracker.rate("client-a")
    >>> asyncio.run(demo())
    (3, 10)
    """

    def __init__(
        self,
        store: KeyValueStore,
        *,
        namespace: str,
        window_s: float = 60.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not namespace or ":" in namespace:
            raise ValueError(f"namespace must be non-empty and contain no ':', got {namespace!r}")
        if not (math.isfinite(window_s) and window_s > 0):
            raise ValueError(f"window_s must be a finite number > 0, got {window_s!r}")
        self.store = store
        self.namespace = namespace
        self.window_s = float(window_s)
        self._clock = clock
        self._prefix = f"anomaly_rate:{namespace}:{self.window_s:g}:"
        # per client, the previous window's counts once read: a window that has ended
        # takes no more rows in a store of this process's own (memory://), so they are
        # read once per window instead of once per request. A shared store takes other
        # workers' late rows: read every time there
        # (the previous bucket, its (total, bad), and the current bucket's keys)
        self._ended: dict[str, tuple[int, tuple[int, int], tuple[str, ...]]] | None = (
            {} if getattr(store, "backend", None) == "memory" else None
        )

    def _keys(self, client: str, bucket: int) -> tuple[str, str]:
        base = f"{self._prefix}{client}:{bucket}"
        return f"{base}:all", f"{base}:bad"

    async def record(self, client: str, *, anomalous: int, total: int) -> None:
        """Add ``total`` rows, ``anomalous`` of them flagged, to ``client``'s current window."""
        if total <= 0:
            return
        bucket = math.floor(self._clock() / self.window_s)
        ended = self._ended
        known = None if ended is None else ended.get(client)
        if known is not None and known[0] == bucket - 1:
            all_key, bad_key = known[2]  # this window's keys, kept since they were read
        else:
            all_key, bad_key = self._keys(client, bucket)
        # two windows of TTL: a bucket is read while current and while previous
        ttl = 2.0 * self.window_s
        await self.store.incr(all_key, total, ttl=ttl)
        if anomalous > 0:
            await self.store.incr(bad_key, min(anomalous, total), ttl=ttl)

    async def rate(self, client: str) -> tuple[int, int]:
        """``(anomalous rows, total rows)`` for ``client`` over about the last window."""
        return (await read_rates((self,), client))[0]

    def _plan(self, client: str) -> _Plan:
        """What :meth:`rate` must read for ``client`` now: ``(tracker, client, bucket,
        weight of the previous window, its (total, bad) when known, keys to read)``:
        the current window's two keys, and the previous window's unless this process
        already knows its counts (memory:// only, :attr:`_ended`)."""
        position = self._clock() / self.window_s
        bucket = math.floor(position)
        weight_prev = 1.0 - (position - bucket)
        ended = self._ended
        if ended is not None:
            known = ended.get(client)
            if known is not None and known[0] == bucket - 1:
                return (self, client, bucket, weight_prev, known[1], known[2])
        return (
            self,
            client,
            bucket,
            weight_prev,
            None,
            self._keys(client, bucket) + self._keys(client, bucket - 1),
        )

    def _finish(self, plan: _Plan, values: Sequence[bytes | int | None]) -> tuple[int, int]:
        """The rate from what :meth:`_plan` asked for (``values``, in its keys' order)."""
        _, client, bucket, weight_prev, prev, keys = plan
        cur_total, cur_bad = _as_count(values[0]), _as_count(values[1])
        if prev is not None:
            prev_total, prev_bad = prev
        else:
            prev_total, prev_bad = _as_count(values[2]), _as_count(values[3])
            ended = self._ended
            if ended is not None:
                if len(ended) >= _ENDED_CLIENTS and client not in ended:
                    ended.clear()  # O(1); the clients still active read theirs again
                # the previous window's counts, and the current window's keys with them
                ended[client] = (bucket - 1, (prev_total, prev_bad), keys[:2])
        return (
            round(cur_bad + weight_prev * prev_bad),
            round(cur_total + weight_prev * prev_total),
        )


#: :meth:`AnomalyRateTracker._plan`'s answer
_Plan = tuple["AnomalyRateTracker", str, int, float, "tuple[int, int] | None", "tuple[str, ...]"]


def _as_count(raw: bytes | int | None) -> int:
    if raw is None:
        return 0
    if type(raw) is int:
        return max(raw, 0)
    try:
        return max(int(raw), 0)
    except ValueError:
        return 0


async def read_rates(trackers: Sequence[AnomalyRateTracker], client: str) -> list[tuple[int, int]]:
    """:meth:`AnomalyRateTracker.rate` of each tracker, their counters read together.

    Trackers on one store are read with one ``get_many`` where the store has it
    (Redis: one ``MGET``, one round trip for every tracker's keys, where reading
    them one by one took up to four round trips per tracker); else one ``get``
    per key.
    """
    plans = [tracker._plan(client) for tracker in trackers]
    store = trackers[0].store
    if len(plans) == 1 or all(tracker.store is store for tracker in trackers):
        keys: list[str] = []
        for plan in plans:
            keys += plan[5]
        values = await _get_many(store, keys)
        out: list[tuple[int, int]] = []
        at = 0
        for plan in plans:
            n = len(plan[5])
            out.append(plan[0]._finish(plan, values[at : at + n]))
            at += n
        return out
    return [plan[0]._finish(plan, await _get_many(plan[0].store, plan[5])) for plan in plans]


async def _get_many(store: KeyValueStore, keys: Sequence[str]) -> Sequence[bytes | int | None]:
    counts = getattr(store, "get_counts", None)
    if counts is not None:  # a store of this process's own: its integers as they are
        found: Sequence[int | bytes | None] = counts(keys)
        return found
    get_many = getattr(store, "get_many", None)
    if get_many is not None:
        values: Sequence[bytes | None] = await get_many(keys)
        return values
    return [await store.get(key) for key in keys]


class AnomalyRateDetector(Detector):
    """Fires for a client whose share of anomalous rows exceeds ``max_rate``.

    The score keeps the guard's convention (higher is more normal): it is
    ``-rate`` with threshold ``-max_rate``, so the detector fires exactly when
    ``rate > max_rate``. Below ``min_rows`` rows in the window the evidence is
    too thin and the score is 0 (normal).

    With a row false-positive rate ``p`` (the row detector's ``target_fpr``), a
    benign client's flagged count over ``n`` rows is Binomial(n, p); choose
    ``max_rate`` and ``min_rows`` so that its tail above ``max_rate * n`` is
    negligible (p = 1%, n = 20, max_rate = 0.2: P ≈ 4e-6).

    With several trackers (one per row detector it reads) the client's rate is
    the largest of their shares: each row detector is calibrated on its own,
    and a client that trips any of them on a fifth of its rows is off the map
    (one detector may see what the others miss, such as type violations).

    Parameters
    ----------
    name : str
        Detector name (metrics, audit log).
    tracker : AnomalyRateTracker or sequence of them
        The counts to read (the namespaces of the row detectors that write them).
    max_rate : float, default=0.2
        Share of anomalous rows above which the client is flagged.
    min_rows : int, default=20
        Rows the window must hold before the detector may fire.

    Examples
    --------
    >>> import asyncio
    >>> from inference_guard.detectors.base import Query
    >>> class DictStore:  # the guard passes its memory:// or redis:// store
    ...     backend = "dict"
    ...     def __init__(self): self.data = {}
    ...     async def get(self, key):
    ...         return str(self.data[key]).encode() if key in self.data else None
    ...     async def incr(self, key, amount=1, ttl=None):
    ...         self.data[key] = self.data.get(key, 0) + amount
    ...         return self.data[key]
    >>> tracker = AnomalyRateTracker(DictStore(), namespace="knn", clock=lambda: 0.0)
    >>> det = AnomalyRateDetector("knn-rate", tracker, max_rate=0.2, min_rows=20)
    >>> async def demo():
    ...     await tracker.record("c1", anomalous=8, total=25)
    ...     return await det.inspect(Query(client="c1", policy="p", rows=None))
    >>> result = asyncio.run(demo())
    >>> result.anomalous, result.score, result.threshold
    (True, -0.32, -0.2)
    """

    technique = "AML.T0015"

    def __init__(
        self,
        name: str,
        tracker: AnomalyRateTracker | Sequence[AnomalyRateTracker],
        *,
        max_rate: float = 0.2,
        min_rows: int = 20,
    ) -> None:
        super().__init__(name)
        trackers = (tracker,) if isinstance(tracker, AnomalyRateTracker) else tuple(tracker)
        if not trackers:
            raise ValueError("need at least one tracker")
        if not (0.0 <= max_rate < 1.0):
            raise ValueError(f"max_rate must be in [0, 1), got {max_rate!r}")
        if isinstance(min_rows, bool) or not isinstance(min_rows, int) or min_rows < 1:
            raise ValueError(f"min_rows must be an integer >= 1, got {min_rows!r}")
        #: the counts read, one per source row detector
        self.trackers = trackers
        self.tracker = trackers[0]
        self.max_rate = float(max_rate)
        self.min_rows = min_rows

    async def inspect(self, query: Query) -> DetectorResult:
        threshold = -self.max_rate
        bad = total = seen = 0
        rate = -1.0
        for b, t in await read_rates(self.trackers, query.client):
            seen = max(seen, t)
            if t >= self.min_rows and b / t > rate:
                bad, total, rate = b, t, b / t
        if rate < 0.0:
            return DetectorResult(
                self.name, 0.0, threshold, False, reason=f"{seen} rows < min_rows"
            )
        anomalous = -rate < threshold
        reason = f"{bad}/{total} rows anomalous" if anomalous else ""
        return DetectorResult(self.name, -rate, threshold, anomalous, reason=reason)
