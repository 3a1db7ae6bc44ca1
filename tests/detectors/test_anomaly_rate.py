"""AnomalyRateTracker and AnomalyRateDetector on the memory store with a fake clock."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

import numpy as np
import pytest

from benchmarks.memory import CountersOnly
from inference_guard.detectors.anomaly import RowAnomalyDetector
from inference_guard.detectors.anomaly_rate import AnomalyRateDetector, AnomalyRateTracker
from inference_guard.detectors.base import Query
from inference_guard.detectors.mahalanobis import MahalanobisOutlier
from inference_guard.guard.errors import StateError
from inference_guard.guard.stores.memory import MemoryStore
from tests.detectors.anomaly_helpers import gaussian

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


class Clock:
    def __init__(self, now: float = 6000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(clock: Clock) -> MemoryStore:
    return MemoryStore(clock=clock)


def q(client: str, rows: np.ndarray | None = None) -> Query:
    return Query(client=client, policy="p", rows=rows, n_rows=0 if rows is None else len(rows))


def test_counts_per_client(store: MemoryStore, clock: Clock) -> None:
    tracker = AnomalyRateTracker(store, namespace="knn", window_s=60, clock=clock)

    async def scenario() -> None:
        await tracker.record("a", anomalous=2, total=10)
        await tracker.record("a", anomalous=0, total=5)
        await tracker.record("b", anomalous=1, total=1)
        assert await tracker.rate("a") == (2, 15)
        assert await tracker.rate("b") == (1, 1)
        assert await tracker.rate("nobody") == (0, 0)
        await tracker.record("a", anomalous=0, total=0)  # nothing to count
        assert await tracker.rate("a") == (2, 15)

    run(scenario())


def test_sliding_window_blends_and_forgets(store: MemoryStore, clock: Clock) -> None:
    tracker = AnomalyRateTracker(store, namespace="knn", window_s=60, clock=clock)

    async def scenario() -> None:
        clock.now = 6000.0  # start of bucket 100
        await tracker.record("a", anomalous=10, total=20)
        clock.now = 6060.0 + 15  # a quarter into the next window: 3/4 of the old one counts
        await tracker.record("a", anomalous=0, total=4)
        assert await tracker.rate("a") == (round(10 * 0.75), round(4 + 20 * 0.75))
        clock.now = 6120.0 + 30  # two windows on: only the previous window, half weighted
        assert await tracker.rate("a") == (0, 2)
        clock.now = 6300.0  # long after: everything expired or out of the window
        assert await tracker.rate("a") == (0, 0)

    run(scenario())
    assert len(store) <= 4  # the counters carry a TTL; expired keys are dropped


def test_windowed_counts_read_as_the_counters_do(clock: Clock) -> None:
    """memory://'s one key per client (two windows, changed in place) gives every rate the
    per-window counters give, reads interleaved with records, windows skipped and
    resumed, several clients, over keys expiring; and one fewer lookup is all it saves."""
    windowed_store = MemoryStore(clock=clock)
    windowed = AnomalyRateTracker(windowed_store, namespace="knn", window_s=60, clock=clock)
    counters = AnomalyRateTracker(
        CountersOnly(MemoryStore(clock=clock)), namespace="knn", window_s=60, clock=clock
    )
    assert windowed.answers_now and not counters.answers_now
    rng = np.random.default_rng(5)

    async def scenario() -> None:
        reads = 0
        for _ in range(600):
            clock.now += float(rng.choice([0.5, 7.0, 29.0, 61.0, 125.0]))
            client = str(rng.choice(["a", "b", "c"]))
            bad, total = int(rng.integers(0, 3)), int(rng.integers(0, 4))
            await windowed.record(client, anomalous=bad, total=total)
            await counters.record(client, anomalous=bad, total=total)
            if rng.random() < 0.5:
                other = str(rng.choice(["a", "b", "c", "d"]))
                got = await windowed.rate(other)
                assert got == await counters.rate(other)
                reads += got[1] > 0
        assert reads > 100  # most reads found counts: the comparison was not of zeros

    run(scenario())
    assert len(windowed_store) <= 3  # one key per client


def test_windowed_counts_stay_within_the_stores_bound(clock: Clock) -> None:
    """A flood of client ids keeps at most ``max_keys`` windowed keys (the least recently
    used evicted and counted); an active client's counts survive it, until they expire."""
    store = MemoryStore(max_keys=50, clock=clock)
    tracker = AnomalyRateTracker(store, namespace="knn", window_s=60, clock=clock)
    for i in range(2000):
        tracker.record_now(f"flood-{i}", 1, 1)
        if i % 10 == 0:
            tracker.record_now("active", 1, 2)  # touched all along: never the least recent
    assert len(store) == 50 and store.evictions == 2001 - 50  # 2000 flood keys, 1 active
    assert run(tracker.rate("active")) == (200, 400)
    clock.now += 121.0  # two windows later: the key has expired, and reading drops it
    assert run(tracker.rate("active")) == (0, 0)
    assert len(store) == 49


def test_windowed_counts_refuse_another_kind_of_value(store: MemoryStore, clock: Clock) -> None:
    tracker = AnomalyRateTracker(store, namespace="knn", window_s=60, clock=clock)
    run(store.set("anomaly_rate:knn:60:a", b"1"))
    with pytest.raises(StateError):
        tracker.record_now("a", 1, 2)
    with pytest.raises(StateError):
        run(tracker.rate("a"))
    tracker.record_now("b", 1, 2)
    with pytest.raises(StateError):
        run(store.incr("anomaly_rate:knn:60:b"))


def test_namespaces_and_windows_do_not_mix(store: MemoryStore, clock: Clock) -> None:
    knn = AnomalyRateTracker(store, namespace="knn", window_s=60, clock=clock)
    maha = AnomalyRateTracker(store, namespace="maha", window_s=60, clock=clock)
    other_window = AnomalyRateTracker(store, namespace="knn", window_s=30, clock=clock)

    async def scenario() -> None:
        await knn.record("a", anomalous=3, total=3)
        assert await maha.rate("a") == (0, 0)
        assert await other_window.rate("a") == (0, 0)

    run(scenario())


def test_tracker_validates_arguments(store: MemoryStore) -> None:
    with pytest.raises(ValueError):
        AnomalyRateTracker(store, namespace="a:b")
    with pytest.raises(ValueError):
        AnomalyRateTracker(store, namespace="a", window_s=0)


def test_detector_fires_above_max_rate_with_enough_rows(store: MemoryStore, clock: Clock) -> None:
    tracker = AnomalyRateTracker(store, namespace="knn", window_s=60, clock=clock)
    det = AnomalyRateDetector("rate", tracker, max_rate=0.2, min_rows=20)

    async def scenario() -> None:
        await tracker.record("a", anomalous=10, total=19)
        few = await det.inspect(q("a"))
        assert not few.anomalous and few.score == 0.0  # 19 rows < min_rows
        await tracker.record("a", anomalous=0, total=1)
        res = await det.inspect(q("a"))
        assert res.anomalous and res.score == pytest.approx(-0.5) and res.threshold == -0.2
        assert res.score < res.threshold
        await tracker.record("b", anomalous=4, total=20)  # exactly max_rate: not above
        at = await det.inspect(q("b"))
        assert not at.anomalous and at.score == pytest.approx(-0.2)

    run(scenario())


def test_detector_validates_arguments(store: MemoryStore) -> None:
    tracker = AnomalyRateTracker(store, namespace="knn")
    with pytest.raises(ValueError):
        AnomalyRateDetector("r", tracker, max_rate=1.0)
    with pytest.raises(ValueError):
        AnomalyRateDetector("r", tracker, min_rows=0)


def test_row_detector_feeds_the_tracker(store: MemoryStore, clock: Clock) -> None:
    X = gaussian(2000, d=6)
    model = MahalanobisOutlier(target_fpr=0.01).fit(X)
    tracker = AnomalyRateTracker(store, namespace="maha", window_s=60, clock=clock)
    rows_det = RowAnomalyDetector("maha", model, tracker=tracker)
    rate_det = AnomalyRateDetector("maha-rate", tracker, max_rate=0.2, min_rows=20)
    benign = gaussian(40, d=6, seed=5)
    junk = np.full((10, 6), 50.0)

    async def scenario() -> None:
        for _ in range(3):  # a benign client: 120 rows, about 1% flagged
            await rows_det.inspect(q("benign", benign))
        assert not (await rate_det.inspect(q("benign"))).anomalous
        # an attacker hides 10 junk rows per 30-row batch: every request is
        # flagged, and after 30 rows the client is too
        for _ in range(2):
            result = await rows_det.inspect(q("attacker", np.vstack([benign[:20], junk])))
            assert result.anomalous and result.rows_flagged >= 10
        bad, total = await tracker.rate("attacker")
        assert total == 60 and bad >= 20
        assert (await rate_det.inspect(q("attacker"))).anomalous

    run(scenario())


def test_several_sources_fire_on_the_largest_share(store: MemoryStore, clock: Clock) -> None:
    """One row detector may see what another misses: the client's rate is the larger share."""
    quiet = AnomalyRateTracker(store, namespace="mahalanobis", clock=clock)
    loud = AnomalyRateTracker(store, namespace="envelope", clock=clock)
    thin = AnomalyRateTracker(store, namespace="knn", clock=clock)
    det = AnomalyRateDetector("rate", [quiet, loud, thin], max_rate=0.2, min_rows=20)
    run(quiet.record("c", anomalous=1, total=25))
    run(loud.record("c", anomalous=8, total=25))
    run(thin.record("c", anomalous=5, total=5))  # below min_rows: not evidence yet
    result = run(det.inspect(Query("c", "p", None)))
    assert result.anomalous and result.score == pytest.approx(-8 / 25)
    assert not run(det.inspect(Query("other", "p", None))).anomalous
