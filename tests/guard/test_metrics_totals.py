"""The tally's per-child totals (guard.metrics.Tally.total / .histogram), as Counts uses them.

A request's updates are additions to plain numbers; what a scrape reads must
be exactly what prometheus_client's own ``inc``/``observe`` would have made
of the same updates, however the flushes fall.
"""

from __future__ import annotations

import asyncio
import math
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, values
from prometheus_client.multiprocess import MultiProcessCollector

import inference_guard.guard.metrics as gm
from inference_guard.detectors.base import DetectorResult
from inference_guard.guard._counts import Counts
from inference_guard.guard.decisions import Action, Decision
from inference_guard.guard.metrics import GuardMetrics, Tally

BOUNDS = (-3.0, -1.0, -0.3, 0.0, 0.3, 1.0, 3.0)

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples(registry: CollectorRegistry) -> Samples:
    """Every sample of ``registry`` but the ``_created`` times (collecting flushes the tally)."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in registry.collect()
        for s in family.samples
        if not s.name.endswith("_created") and not s.name.startswith("process_")
    }


def same(a: Samples, b: Samples) -> None:
    assert a.keys() == b.keys()
    for key, value in a.items():
        assert value == b[key] or (math.isnan(value) and math.isnan(b[key])), key


def raw(counter: Any) -> float:
    """A counter child's value as it stands, read without collecting (no flush)."""
    return float(counter._value.get())


def odd_values() -> list[float]:
    """Values on every bound, between them, beyond them, and the non-finite ones."""
    return [
        *BOUNDS,
        -0.0,
        0.1,
        -2.0,
        2.5,
        1e300,
        -1e300,
        math.inf,
        -math.inf,
        math.nan,
        5.0,
        -0.3,
        3,
        -1,
    ]


def result(detector: str, score: float, threshold: float) -> DetectorResult:
    return DetectorResult(detector, score, threshold, score < threshold)


# ------------------------------------------------------------------ histograms


def test_buckets_read_as_observe_would_make_them() -> None:
    """Bucket counts, count and sum are those of Histogram.observe, NaN and infinities too."""
    one, many = CollectorRegistry(), CollectorRegistry()
    h1 = Histogram("margin", "m", ("d",), buckets=BOUNDS, registry=one).labels("x")
    h2 = Histogram("margin", "m", ("d",), buckets=BOUNDS, registry=many).labels("x")
    tally = Tally()
    buckets = tally.histogram(h2)
    finite = [v for v in odd_values() if math.isfinite(v)]
    for v in finite:
        h1.observe(v)
        buckets.add(v)
    tally.flush()
    same(samples(one), samples(many))
    assert h2._sum.get() == h1._sum.get()  # one flush: the same additions in the same order
    for v in odd_values():
        h1.observe(v)
        buckets.add(v)
    tally.flush()
    same(samples(one), samples(many))
    assert math.isnan(h2._sum.get())  # +Inf and -Inf: as observe makes it


def test_a_nan_joins_the_sum_and_no_bucket() -> None:
    registry = CollectorRegistry()
    child = Histogram("secs", "s", buckets=(0.1, 1.0), registry=registry)
    tally = Tally()
    buckets = tally.histogram(child)
    buckets.add(0.5)
    buckets.add(math.nan)
    tally.flush()
    get = registry.get_sample_value
    assert get("secs_count") == 1.0
    assert get("secs_bucket", {"le": "1.0"}) == 1.0
    assert math.isnan(get("secs_sum") or 0.0)


def test_a_histogram_child_is_given_one_set_of_buckets() -> None:
    child = Histogram("secs", "s", registry=CollectorRegistry())
    tally = Tally()
    assert tally.histogram(child) is tally.histogram(child)
    counter = Counter("n", "n", registry=CollectorRegistry())
    assert tally.total(counter) is tally.total(counter)


# ------------------------------------------------------------------ Counts, end to end


def decisions() -> list[tuple[str, Decision, int]]:
    nan = math.nan
    flagged = Decision(
        Action.FLAG,
        Action.FLAG,
        "p",
        results=(result("d1", 0.2, 1.0), result("d2", 5.0, 1.0), result("d3", nan, 0.0)),
        fired=(("d1", Action.FLAG),),
    )
    shadow = Decision(
        Action.ALLOW,
        Action.BLOCK,
        "q",
        results=(result("d1", -50.0, 0.0), result("d2", 1.0, 1.0), result("d4", math.inf, 0.0)),
        fired=(("d1", Action.BLOCK), ("d4", Action.THROTTLE)),
        shadow=True,
    )
    plain = Decision(Action.ALLOW, Action.ALLOW, "p", results=(result("d1", 3.0, 1.0),))
    return [("p", flagged, 3), ("q", shadow, 1), ("p", plain, 2), ("p", flagged, 0)]


def count_everything(counts: Counts) -> None:
    """One of each per-request update Counts makes, several times over."""
    fast = counts.allowed_counter("p", "allow", "json")
    observe = counts.overhead_observer("q")
    for _ in range(3):
        for policy, decision, n_rows in decisions():
            counts.decision(policy, decision, n_rows)
        counts.allowed("p", "allow", 4, "json")
        counts.allowed("q", "flag", 1, None)
        fast(2, None)
        fast(5, 0.0003)
        observe(0.002)
        counts.overhead("p", 1e-6)
        counts.outcome("p", "invalid", 1)
        counts.outcome("q", "error", 0)
        counts.payload("q", "numpy")
        counts.degraded("p", "degraded")
        counts.exempt("q")


def count_by_hand(m: GuardMetrics) -> None:
    """What count_everything counts, straight to prometheus_client, one update at a time."""
    for _ in range(3):
        for policy, decision, n_rows in decisions():
            m.requests.labels(policy, str(decision.action)).inc()
            m.rows.labels(policy, str(decision.action)).inc(n_rows)
            for name, action in decision.fired:
                m.detections.labels(policy, name, str(action)).inc()
            for r in decision.results:
                margin = r.score - r.threshold
                if not math.isnan(margin):
                    m.score.labels(r.detector).observe(margin)
        m.requests.labels("p", "allow").inc()
        m.rows.labels("p", "allow").inc(4)
        m.payloads.labels("p", "json").inc()
        m.requests.labels("q", "flag").inc()
        m.rows.labels("q", "flag").inc(1)
        for n_rows, seconds in ((2, None), (5, 0.0003)):
            m.requests.labels("p", "allow").inc()
            m.rows.labels("p", "allow").inc(n_rows)
            m.payloads.labels("p", "json").inc()
            if seconds is not None:
                m.overhead.labels("p").observe(seconds)
        m.overhead.labels("q").observe(0.002)
        m.overhead.labels("p").observe(1e-6)
        m.requests.labels("p", "invalid").inc()
        m.rows.labels("p", "invalid").inc(1)
        m.requests.labels("q", "error").inc()
        m.rows.labels("q", "error")  # made at 0 with its request count: no rows
        m.payloads.labels("q", "numpy").inc()
        m.degraded.labels("p", "degraded").inc()
        m.exempt.labels("q").inc()


def test_a_scrape_reads_what_one_by_one_updates_would_have_made() -> None:
    deferred, by_hand = GuardMetrics(CollectorRegistry()), GuardMetrics(CollectorRegistry())
    counts = Counts(deferred, enabled=True)

    async def scenario() -> float:
        count_everything(counts)
        return raw(deferred.requests.labels("p", "allow"))

    assert asyncio.run(scenario()) == 0.0  # inside a loop: nothing applied before a flush
    count_by_hand(by_hand)
    same(samples(by_hand.registry), samples(deferred.registry))
    get = deferred.registry.get_sample_value
    assert get("guard_requests_total", {"policy": "p", "decision": "allow"}) == 12.0
    assert get("guard_rows_total", {"policy": "p", "decision": "allow"}) == 39.0
    assert get("guard_detector_score_count", {"detector": "d4"}) == 3.0
    assert get("guard_detector_score_count", {"detector": "d3"}) is None  # NaN margins skipped


def test_updates_outside_a_loop_apply_at_once() -> None:
    m = GuardMetrics(CollectorRegistry())
    counts = Counts(m, enabled=True)
    counts.allowed("p", "allow", 3, "json")
    counts.overhead_observer("p")(0.01)
    assert raw(m.rows.labels("p", "allow")) == 3.0
    assert m.overhead.labels("p")._sum.get() == 0.01


def test_a_disabled_count_keeps_nothing() -> None:
    m = GuardMetrics(CollectorRegistry())
    counts = Counts(m, enabled=False)
    counts.allowed("p", "allow", 3, "json")
    counts.allowed_counter("p", "allow", "json")(3, 0.1)
    counts.decision("p", decisions()[0][1], 3)
    assert (
        m.registry.get_sample_value("guard_requests_total", {"policy": "p", "decision": "allow"})
        is None
    )


def test_a_full_batch_applies_at_once() -> None:
    m = GuardMetrics(CollectorRegistry())
    counts = Counts(m, enabled=True)
    child = m.requests.labels("p", "invalid")

    async def scenario() -> list[float]:
        seen = []
        for _ in range(gm.FLUSH_AT):
            counts.outcome("p", "invalid", 1)
            seen.append(raw(child))
        return seen

    seen = asyncio.run(scenario())
    assert seen[-2] == 0.0
    assert seen[-1] == float(gm.FLUSH_AT)


def test_the_timer_applies_the_totals_within_flush_after(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gm, "FLUSH_AFTER_S", 0.05)
    m = GuardMetrics(CollectorRegistry())
    counts = Counts(m, enabled=True)
    child = m.rows.labels("p", "allow")

    async def scenario() -> tuple[float, float]:
        counts.allowed("p", "allow", 2, None)
        counts.allowed("p", "allow", 3, None)
        before = raw(child)
        await asyncio.sleep(0.2)
        return before, raw(child)

    assert asyncio.run(scenario()) == (0.0, 5.0)


# ------------------------------------------------------------------ bad values


def test_a_row_count_that_is_not_a_number_costs_only_itself(
    caplog: pytest.LogCaptureFixture,
) -> None:
    m = GuardMetrics(CollectorRegistry())
    counts = Counts(m, enabled=True)

    async def scenario() -> None:
        counts.allowed("p", "allow", 2, "json")
        counts.allowed("p", "allow", None, "json")  # type: ignore[arg-type]
        counts.allowed("p", "allow", -5, "json")  # a counter never goes down
        counts.allowed("p", "allow", 3, "json")

    with caplog.at_level("ERROR", logger="guard"):
        asyncio.run(scenario())
        get = m.registry.get_sample_value
        assert get("guard_requests_total", {"policy": "p", "decision": "allow"}) == 4.0
        assert get("guard_rows_total", {"policy": "p", "decision": "allow"}) == 5.0
        assert get("guard_payloads_total", {"policy": "p", "format": "json"}) == 4.0
    assert sum("metric update" in r.getMessage() for r in caplog.records) == 2


def test_a_score_that_is_not_a_number_costs_only_itself(
    caplog: pytest.LogCaptureFixture,
) -> None:
    m = GuardMetrics(CollectorRegistry())
    counts = Counts(m, enabled=True)
    broken = Decision(
        Action.ALLOW,
        Action.ALLOW,
        "p",
        results=(
            result("d1", 0.5, 0.0),
            DetectorResult("d2", None, 0.0, False),
            result("d3", 1.0, 0.0),
        ),  # type: ignore[arg-type]
    )

    async def scenario() -> None:
        counts.decision("p", broken, 1)

    with caplog.at_level("ERROR", logger="guard"):
        asyncio.run(scenario())
        get = m.registry.get_sample_value
        assert get("guard_requests_total", {"policy": "p", "decision": "allow"}) == 1.0
        assert get("guard_detector_score_count", {"detector": "d1"}) == 1.0
        assert get("guard_detector_score_count", {"detector": "d3"}) == 1.0
        assert get("guard_detector_score_count", {"detector": "d2"}) == 0.0
    assert any("d2" in r.getMessage() for r in caplog.records)


def test_an_overhead_that_is_not_a_number_costs_only_itself(
    caplog: pytest.LogCaptureFixture,
) -> None:
    m = GuardMetrics(CollectorRegistry())
    counts = Counts(m, enabled=True)
    observe = counts.overhead_observer("p")

    async def scenario() -> None:
        observe(0.001)
        observe("slow")  # type: ignore[arg-type]
        observe(0.002)

    with caplog.at_level("ERROR", logger="guard"):
        asyncio.run(scenario())
        get = m.registry.get_sample_value
        assert get("guard_overhead_seconds_count", {"policy": "p"}) == 2.0
        assert get("guard_overhead_seconds_sum", {"policy": "p"}) == pytest.approx(0.003)
    assert any("metric update" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------ threads


@pytest.fixture
def frequent_switches() -> Iterator[None]:
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible: make races likely
    try:
        yield
    finally:
        sys.setswitchinterval(interval)


def test_a_scrape_from_another_thread_loses_and_doubles_nothing(frequent_switches: None) -> None:
    """A scrape thread collecting while the loop counts: every update lands exactly once."""
    m = GuardMetrics(CollectorRegistry())
    counts = Counts(m, enabled=True)
    stop = threading.Event()
    scrapes = 0

    def scraper() -> None:
        # mostly bare flushes (what a collect starts with): the read-and-reset, as often as can be
        nonlocal scrapes
        while not stop.is_set():
            m.tally.flush()
            if scrapes % 50 == 0:
                m.registry.get_sample_value("guard_requests_total", {"policy": "p"})
            scrapes += 1

    n = 20_000
    fast = counts.allowed_counter("p", "allow", "json")
    flagged = decisions()[0][1]

    async def scenario() -> None:
        for i in range(n):
            fast(3, 0.5)  # 0.5: its sums are exact, so they can be compared exactly
            counts.decision("p", flagged, 1)
            if i % 500 == 0:
                await asyncio.sleep(0)

    thread = threading.Thread(target=scraper)
    thread.start()
    try:
        asyncio.run(scenario())
    finally:
        stop.set()
        thread.join()
    assert scrapes > 10
    get = m.registry.get_sample_value
    assert get("guard_requests_total", {"policy": "p", "decision": "allow"}) == n
    assert get("guard_rows_total", {"policy": "p", "decision": "allow"}) == 3 * n
    assert get("guard_requests_total", {"policy": "p", "decision": "flag"}) == n
    assert get("guard_detections_total", {"policy": "p", "detector": "d1", "action": "flag"}) == n
    assert get("guard_overhead_seconds_count", {"policy": "p"}) == n
    assert get("guard_overhead_seconds_sum", {"policy": "p"}) == 0.5 * n
    assert get("guard_detector_score_count", {"detector": "d2"}) == n
    # (a layout with negative bounds hides its sum from the exposition: read the child's)
    assert m.score.labels("d2")._sum.get() == 4.0 * n


def test_updates_from_several_threads_all_land(frequent_switches: None) -> None:
    """Threads without a loop apply at once; loops in two threads defer: nothing is lost."""
    m = GuardMetrics(CollectorRegistry())
    counts = Counts(m, enabled=True)
    n = 5_000

    def plain() -> None:
        for _ in range(n):
            counts.allowed("p", "allow", 1, None)

    def in_a_loop() -> None:
        async def scenario() -> None:
            for i in range(n):
                counts.allowed("p", "allow", 1, None)
                if i % 100 == 0:
                    await asyncio.sleep(0)

        asyncio.run(scenario())

    threads = [threading.Thread(target=t) for t in (plain, plain, in_a_loop, in_a_loop)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    get = m.registry.get_sample_value
    assert get("guard_requests_total", {"policy": "p", "decision": "allow"}) == 4 * n
    assert get("guard_rows_total", {"policy": "p", "decision": "allow"}) == 4 * n


# ------------------------------------------------------------------ multiprocess mode


@pytest.fixture
def multiprocess(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Metrics made from now on write their samples to ``tmp_path``, as in a worker.

    (prometheus_client picks its value class at import; its own tests switch it this way.)
    """
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    monkeypatch.setattr(values, "ValueClass", values.MultiProcessValue())
    return tmp_path


def test_multiprocess_workers_see_the_totals_within_flush_after(
    multiprocess: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another worker's scrape reads the files: the timer alone must have written them."""
    monkeypatch.setattr(gm, "FLUSH_AFTER_S", 0.05)
    m = GuardMetrics(CollectorRegistry())
    counts = Counts(m, enabled=True)

    def seen() -> Samples:
        registry = CollectorRegistry()  # not this worker's: its collect does not flush
        MultiProcessCollector(registry, path=str(multiprocess))
        return samples(registry)

    key = ("guard_rows_total", (("decision", "allow"), ("policy", "p")))
    score = ("guard_detector_score_count", (("detector", "d1"),))

    async def scenario() -> tuple[Samples, Samples]:
        counts.allowed("p", "allow", 2, "json")
        counts.decision("p", decisions()[2][1], 5)
        before = seen()
        await asyncio.sleep(0.3)
        return before, seen()

    before, after = asyncio.run(scenario())
    assert before.get(key, 0.0) == 0.0
    assert after[key] == 7.0
    assert after[score] == 1.0


def test_counts_made_while_a_flush_applies_go_to_the_next_one() -> None:
    """A request never waits for a flush: it adds to its totals without a lock.

    The first flush is held after it took the totals, in an attached list's
    ``apply`` (the tally applies those before the totals): counts made
    meanwhile must neither wait nor be lost, and a scrape started meanwhile
    must wait for the first flush to finish, then see them all.
    """
    m = GuardMetrics(CollectorRegistry())
    counts = Counts(m, enabled=True)
    child = m.requests.labels("p", "allow")
    statuses: list[int] = []
    held, release = threading.Event(), threading.Event()

    def slow_apply(batch: list[int]) -> None:
        held.set()
        release.wait(5)

    m.tally.attach(statuses, slow_apply)
    seen: list[float | None] = []

    def scrape() -> None:
        key = {"policy": "p", "decision": "allow"}
        seen.append(m.registry.get_sample_value("guard_requests_total", key))

    async def scenario() -> None:
        for _ in range(3):
            counts.allowed("p", "allow", 1, None)
        statuses.append(200)
        first = threading.Thread(target=m.tally.flush)
        first.start()
        held.wait(5)  # the first flush has taken the 3, and applied none
        for _ in range(4):  # not blocked by the flush under way
            counts.allowed("p", "allow", 1, None)
        second = threading.Thread(target=scrape)
        second.start()
        second.join(0.1)
        waited = second.is_alive()
        release.set()
        first.join()
        second.join()
        assert waited  # the scrape waited for the first flush to finish applying

    asyncio.run(scenario())
    assert seen == [7.0]
    assert raw(child) == 7.0


def test_the_timer_is_rearmed_after_an_idle_spell(monkeypatch: pytest.MonkeyPatch) -> None:
    """A timer that finds nothing to apply lets the writer go; the next count arms a new one."""
    monkeypatch.setattr(gm, "FLUSH_AFTER_S", 0.05)
    m = GuardMetrics(CollectorRegistry())
    counts = Counts(m, enabled=True)
    child = m.requests.labels("p", "allow")

    async def scenario() -> list[float]:
        seen = []
        counts.allowed("p", "allow", 1, None)
        await asyncio.sleep(0.3)  # applied, then idle: the writer is let go
        seen.append(raw(child))
        idle = m.tally.writer is gm.NO_WRITER
        counts.allowed("p", "allow", 1, None)
        seen.append(raw(child))  # deferred again
        await asyncio.sleep(0.2)
        seen.append(raw(child))
        assert idle
        return seen

    assert asyncio.run(scenario()) == [1.0, 1.0, 2.0]


def test_a_new_loop_takes_over_from_a_closed_one() -> None:
    """One test's loop ends (asyncio.run closes it); the next loop's counts are deferred too."""
    m = GuardMetrics(CollectorRegistry())
    counts = Counts(m, enabled=True)
    child = m.requests.labels("p", "allow")

    async def count() -> float:
        counts.allowed("p", "allow", 1, None)
        return raw(child)

    assert asyncio.run(count()) == 0.0
    assert asyncio.run(count()) == 0.0  # not applied at once: this loop is the writer now
    m.tally.flush()
    assert raw(child) == 2.0


def test_start_up_refuses_histograms_it_cannot_apply_in_bulk(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import inference_guard.guard.metrics as metrics_module

    class NoSum(metrics_module.Histogram):
        def _metric_init(self) -> None:
            super()._metric_init()
            del self._sum

    monkeypatch.setattr(metrics_module, "Histogram", NoSum)
    with pytest.raises(RuntimeError, match="prometheus-client release"):
        metrics_module.GuardMetrics()


def test_the_start_up_check_leaves_no_series_behind(multiprocess: Path) -> None:
    GuardMetrics(CollectorRegistry())
    registry = CollectorRegistry()  # what any worker's scrape reads from the directory
    MultiProcessCollector(registry, path=str(multiprocess))
    names = {metric.name for metric in registry.collect()}
    assert not any("selfcheck" in name for name in names)
    assert values.ValueClass is not values.MutexValue  # the mode is left as it was
