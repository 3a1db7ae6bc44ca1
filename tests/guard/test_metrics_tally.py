"""The deferred per-request metric updates (guard.metrics.Tally): nothing lost, nothing late."""

from __future__ import annotations

import asyncio
import sys
import threading

import pytest
from prometheus_client import CollectorRegistry, Counter

import inference_guard.guard.metrics as gm
from inference_guard.guard.metrics import GuardMetrics, Tally


def raw(metric: Counter) -> float:
    """The counter's value as it stands, read without collecting the registry (no flush)."""
    return next(s.value for s in metric.collect()[0].samples if s.name.endswith("_total"))


def _counter() -> tuple[CollectorRegistry, Counter]:
    registry = CollectorRegistry()
    return registry, Counter("things", "things counted", registry=registry)


def test_outside_an_event_loop_updates_apply_at_once() -> None:
    _, counter = _counter()
    tally = Tally()
    tally.add(counter.inc, 2.0)
    assert raw(counter) == 2.0


def test_inside_a_loop_updates_wait_until_the_registry_is_collected() -> None:
    metrics = GuardMetrics(CollectorRegistry())
    child = metrics.requests.labels("p", "allow")

    async def scenario() -> tuple[float, float | None]:
        for _ in range(5):
            metrics.tally.add(child.inc, 1.0)
        pending = raw(metrics.requests)
        # a scrape (collect) applies what is pending before reading the samples
        seen = metrics.registry.get_sample_value(
            "guard_requests_total", {"policy": "p", "decision": "allow"}
        )
        return pending, seen

    pending, seen = asyncio.run(scenario())
    assert pending == 0.0
    assert seen == 5.0


def test_timer_applies_updates_within_flush_after(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gm, "FLUSH_AFTER_S", 0.05)
    _, counter = _counter()
    tally = Tally()

    async def scenario() -> tuple[float, float]:
        tally.add(counter.inc, 1.0)
        tally.add(counter.inc, 1.0)
        before = raw(counter)
        await asyncio.sleep(0.2)
        return before, raw(counter)

    before, after = asyncio.run(scenario())
    assert (before, after) == (0.0, 2.0)


def test_timer_is_rearmed_on_a_new_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gm, "FLUSH_AFTER_S", 0.05)
    _, counter = _counter()
    tally = Tally()

    async def add_and_leave() -> None:
        tally.add(counter.inc, 1.0)  # the loop ends before its timer fires

    async def add_and_wait() -> None:
        tally.add(counter.inc, 1.0)
        await asyncio.sleep(0.2)

    asyncio.run(add_and_leave())
    assert raw(counter) == 0.0
    asyncio.run(add_and_wait())
    assert raw(counter) == 2.0


def test_a_full_batch_applies_at_once() -> None:
    _, counter = _counter()
    tally = Tally()

    async def scenario() -> list[float]:
        seen = []
        for _ in range(gm.FLUSH_AT):
            tally.add(counter.inc, 1.0)
            seen.append(raw(counter))
        return seen

    seen = asyncio.run(scenario())
    assert seen[-2] == 0.0
    assert seen[-1] == float(gm.FLUSH_AT)


def test_histogram_observations_keep_their_values() -> None:
    metrics = GuardMetrics(CollectorRegistry())
    child = metrics.overhead.labels("p")

    async def scenario() -> None:
        for v in (1e-6, 3e-5, 2e-3):
            metrics.tally.add(child.observe, v)

    asyncio.run(scenario())
    sample = metrics.registry.get_sample_value
    assert sample("guard_overhead_seconds_count", {"policy": "p"}) == 3
    assert sample("guard_overhead_seconds_sum", {"policy": "p"}) == pytest.approx(2.031e-3)
    assert sample("guard_overhead_seconds_bucket", {"policy": "p", "le": "2.5e-05"}) == 1


def test_concurrent_scrapes_lose_and_double_nothing() -> None:
    """A scrape thread flushing while the loop adds: every update lands exactly once."""
    _, counter = _counter()
    tally = Tally()
    stop = threading.Event()

    def scraper() -> None:
        while not stop.is_set():
            tally.collect()

    n = 20_000

    async def scenario() -> None:
        for i in range(n):
            tally.add(counter.inc, 1.0)
            if i % 500 == 0:
                await asyncio.sleep(0)

    thread = threading.Thread(target=scraper)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible: make races likely
    thread.start()
    try:
        asyncio.run(scenario())
    finally:
        stop.set()
        thread.join()
        sys.setswitchinterval(interval)
    tally.flush()
    assert raw(counter) == float(n)


def test_a_failing_update_is_logged_and_the_rest_still_apply(
    caplog: pytest.LogCaptureFixture,
) -> None:
    _, counter = _counter()
    tally = Tally()

    def broken(_value: float) -> None:
        raise ValueError("bad sample")

    async def scenario() -> None:
        tally.add(counter.inc, 1.0)
        tally.add(broken, 1.0)
        tally.add(counter.inc, 1.0)

    asyncio.run(scenario())
    with caplog.at_level("ERROR", logger="guard"):
        tally.flush()
    assert raw(counter) == 2.0
    assert any("metric update" in r.getMessage() for r in caplog.records)


def test_a_counters_increments_reach_it_as_one_sum(monkeypatch: pytest.MonkeyPatch) -> None:
    """A flush sums each counter's pending increments: one locked inc() per counter."""
    _, counter = _counter()
    metrics = GuardMetrics(registry=CollectorRegistry())
    hist = metrics.overhead.labels("p")
    calls: list[float] = []
    value = counter._value
    real_inc = value.inc

    def counted(amount: float) -> None:
        calls.append(amount)
        real_inc(amount)

    monkeypatch.setattr(value, "inc", counted)
    tally = Tally()

    async def scenario() -> None:
        for i in range(100):
            tally.add(counter.inc, 1.0 + i % 2)
            tally.add(hist.observe, 1e-5)

    asyncio.run(scenario())
    tally.flush()
    assert calls == [150.0]
    assert raw(counter) == 150.0
    # histogram observations are not summed: each keeps its bucket
    assert metrics.registry.get_sample_value("guard_overhead_seconds_count", {"policy": "p"}) == 100


def test_a_counter_update_that_is_not_a_number_costs_only_itself(
    caplog: pytest.LogCaptureFixture,
) -> None:
    _, counter = _counter()
    tally = Tally()

    async def scenario() -> None:
        tally.add(counter.inc, 1.0)
        tally.add(counter.inc, None)  # type: ignore[arg-type]
        tally.add(counter.inc, 2.0)

    asyncio.run(scenario())
    with caplog.at_level("ERROR", logger="guard"):
        tally.flush()
    assert raw(counter) == 3.0
    assert any("metric update" in r.getMessage() for r in caplog.records)


def test_leased_rate_checks_are_read_at_each_flush() -> None:
    """guard_rate_checks_total follows a leased store's own counts, read when flushed:
    watched once however often it is asked, and no longer once the store is gone."""
    import gc

    from inference_guard.detectors.store import GcraLimit
    from inference_guard.guard.stores.lease import LeasedRateStore
    from inference_guard.guard.stores.memory import MemoryStore
    from tests.conftest import sample
    from tests.stores_fixture import FakeClock

    metrics = GuardMetrics(CollectorRegistry())
    tiny = [("k", GcraLimit(rate=1.0, period=3600.0, burst=1))]
    clock = FakeClock()
    # a memory store grants no lease: every check goes to it, and a refusal is repeated here
    leased = LeasedRateStore(MemoryStore(clock=clock), lease=0.01, lease_s=1.0, clock=clock)
    metrics.watch_rate_checks("rl", leased)
    metrics.watch_rate_checks("rl", leased)  # a reload that kept the detector

    def checks(answered: str) -> float:
        return sample(metrics.registry, "guard_rate_checks_total", detector="rl", answered=answered)

    async def spend(store: LeasedRateStore, n: int) -> None:
        for _ in range(n):
            await store.acquire(tiny, cost=1)

    asyncio.run(spend(leased, 4))  # admitted, refused by the store, then refused here twice
    assert (leased.remote, leased.local) == (2, 2)
    metrics.tally.flush()
    assert (checks("store"), checks("local")) == (2, 2)
    asyncio.run(spend(leased, 1))
    metrics.tally.flush()
    assert (checks("store"), checks("local")) == (2, 3)
    del leased
    gc.collect()
    metrics.tally.flush()  # the source finds its store gone and is dropped
    assert metrics.tally._sources == []
    assert (checks("store"), checks("local")) == (2, 3)
