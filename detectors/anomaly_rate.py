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
misreading. A store of this process's own (``memory://``) keeps a client's two
windows under one key, ``anomaly_rate:<namespace>:<window>:<client>``
(``add_windowed``/``read_windowed``): the same counts, one lookup per request
where the counters take two to four.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

from inference_guard.detectors.base import Detector, DetectorResult, Query
from inference_guard.detectors.store import KeyValueStore

__all__ = ["AnomalyRateDetector", "AnomalyRateTracker", "read_rates", "read_rates_now"]


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
        # a store that keeps a client's two windows under one key, read and written at
        # once (memory://): the counts there, no counters, no coroutine
        add = getattr(store, "add_windowed", None)
        read = getattr(store, "read_windowed", None)
        self._windowed: tuple[Callable[..., None], Callable[..., tuple[int, ...]]] | None = (
            (add, read) if callable(add) and callable(read) else None
        )
        #: whether :meth:`record_now` and :func:`read_rates_now` answer (the store's
        #: counts are read and written at once)
        self.answers_now = self._windowed is not None

    def _keys(self, client: str, bucket: int) -> tuple[str, str]:
        base = f"{self._prefix}{client}:{bucket}"
        return f"{base}:all", f"{base}:bad"

    def record_now(self, client: str, anomalous: int, total: int) -> bool:
        """:meth:`record` without the coroutine, where the store answers at once
        (:attr:`answers_now`); ``False``, having recorded nothing, where it does not."""
        windowed = self._windowed
        if windowed is None:
            return False
        if total > 0:
            windowed[0](
                self._prefix + client,
                math.floor(self._clock() / self.window_s),
                total,
                min(anomalous, total) if anomalous > 0 else 0,
                2.0 * self.window_s,
            )
        return True

    async def record(self, client: str, *, anomalous: int, total: int) -> None:
        """Add ``total`` rows, ``anomalous`` of them flagged, to ``client``'s current window."""
        if total <= 0 or self.record_now(client, anomalous, total):
            return
        all_key, bad_key = self._keys(client, math.floor(self._clock() / self.window_s))
        # two windows of TTL: a bucket is read while current and while previous
        ttl = 2.0 * self.window_s
        await self.store.incr(all_key, total, ttl=ttl)
        if anomalous > 0:
            await self.store.incr(bad_key, min(anomalous, total), ttl=ttl)

    async def rate(self, client: str) -> tuple[int, int]:
        """``(anomalous rows, total rows)`` for ``client`` over about the last window."""
        return (await read_rates((self,), client))[0]

    def _rate_now(self, client: str) -> tuple[int, int]:
        """:meth:`rate` from a store that answers at once (:attr:`answers_now`)."""
        position = self._clock() / self.window_s
        bucket = math.floor(position)
        assert self._windowed is not None
        cur_total, cur_bad, prev_total, prev_bad = self._windowed[1](self._prefix + client, bucket)
        weight_prev = 1.0 - (position - bucket)
        return (
            round(cur_bad + weight_prev * prev_bad),
            round(cur_total + weight_prev * prev_total),
        )

    def _plan(self, client: str) -> _Plan:
        """What :meth:`rate` must read for ``client`` now: ``(tracker, client, bucket,
        weight of the previous window, keys to read)``: the current window's two
        keys and the previous window's."""
        position = self._clock() / self.window_s
        bucket = math.floor(position)
        return (
            self,
            client,
            bucket,
            1.0 - (position - bucket),
            self._keys(client, bucket) + self._keys(client, bucket - 1),
        )

    def _finish(self, plan: _Plan, values: Sequence[bytes | int | None]) -> tuple[int, int]:
        """The rate from what :meth:`_plan` asked for (``values``, in its keys' order)."""
        weight_prev = plan[3]
        cur_total, cur_bad = _as_count(values[0]), _as_count(values[1])
        prev_total, prev_bad = _as_count(values[2]), _as_count(values[3])
        return (
            round(cur_bad + weight_prev * prev_bad),
            round(cur_total + weight_prev * prev_total),
        )


#: :meth:`AnomalyRateTracker._plan`'s answer
_Plan = tuple["AnomalyRateTracker", str, int, float, "tuple[str, ...]"]


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
    per key. Trackers whose store answers at once (``memory://``) are read as
    :func:`read_rates_now` reads them.
    """
    now = read_rates_now(trackers, client)
    return now if now is not None else await _read_rates_stored(trackers, client)


async def _read_rates_stored(
    trackers: Sequence[AnomalyRateTracker], client: str
) -> list[tuple[int, int]]:
    """:func:`read_rates` from the trackers' per-window counters."""
    plans = [tracker._plan(client) for tracker in trackers]
    store = trackers[0].store
    if len(plans) == 1 or all(tracker.store is store for tracker in trackers):
        keys: list[str] = []
        for plan in plans:
            keys += plan[4]
        values = await _get_many(store, keys)
        out: list[tuple[int, int]] = []
        at = 0
        for plan in plans:
            n = len(plan[4])
            out.append(plan[0]._finish(plan, values[at : at + n]))
            at += n
        return out
    return [plan[0]._finish(plan, await _get_many(plan[0].store, plan[4])) for plan in plans]


def read_rates_now(
    trackers: Sequence[AnomalyRateTracker], client: str
) -> list[tuple[int, int]] | None:
    """:func:`read_rates` at once, where every tracker's store answers at once
    (``memory://``); ``None`` where one does not."""
    for tracker in trackers:
        if tracker._windowed is None:
            return None
    return [tracker._rate_now(client) for tracker in trackers]


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
        rates = read_rates_now(self.trackers, query.client)
        if rates is None:
            rates = await _read_rates_stored(self.trackers, query.client)
        for b, t in rates:
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
