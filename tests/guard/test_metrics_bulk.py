"""A histogram's deferred observations, bucketed in one pass, read as one by one."""

from __future__ import annotations

import asyncio
import math

import numpy as np
from prometheus_client import CollectorRegistry, Histogram

from inference_guard.guard.metrics import Tally, _observe_all

BOUNDS = (-3.0, -1.0, -0.3, 0.0, 0.3, 1.0, 3.0)


def samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in registry.collect()
        for s in family.samples
        if not s.name.endswith("_created")
    }


def histogram(registry: CollectorRegistry) -> Histogram:
    return Histogram("margin", "m", ("detector",), buckets=BOUNDS, registry=registry)


def values() -> list[float]:
    rng = np.random.default_rng(0)
    out = [float(v) for v in rng.normal(0, 2, size=500)]
    out += [*BOUNDS, -1e300, 1e300, math.inf, -math.inf, 0.0, -0.0]
    return out


def test_bucketed_observations_read_as_single_ones() -> None:
    one, many = CollectorRegistry(), CollectorRegistry()
    h1, h2 = histogram(one).labels("d"), histogram(many).labels("d")
    for v in values():
        h1.observe(v)
    _observe_all(h2.observe, values())
    a, b = samples(one), samples(many)
    assert a.keys() == b.keys()
    for key, value in a.items():
        assert b[key] == value or math.isclose(b[key], value, rel_tol=1e-12), key


def test_a_nan_joins_the_sum_and_no_bucket() -> None:
    one, many = CollectorRegistry(), CollectorRegistry()
    h1, h2 = histogram(one).labels("d"), histogram(many).labels("d")
    for v in (1.0, math.nan, -2.0):
        h1.observe(v)
    _observe_all(h2.observe, [1.0, math.nan, -2.0])
    a, b = samples(one), samples(many)
    assert a.keys() == b.keys()
    for key, value in a.items():
        assert (math.isnan(value) and math.isnan(b[key])) or b[key] == value, key


def test_the_tally_buckets_a_flush_and_keeps_counters_summed() -> None:
    one, many = CollectorRegistry(), CollectorRegistry()
    h1, h2 = histogram(one), histogram(many)
    tally = Tally()

    async def deferred() -> None:  # inside a loop: nothing applies before the flush
        for i, v in enumerate(values()):
            tally.add(h2.labels(f"d{i % 3}").observe, v)
        tally.add(h2.labels("d0").observe, 7)  # an int is applied on its own, as ever

    asyncio.run(deferred())
    tally.flush()
    for i, v in enumerate(values()):
        h1.labels(f"d{i % 3}").observe(v)
    h1.labels("d0").observe(7)
    a, b = samples(one), samples(many)
    assert a.keys() == b.keys()
    for key, value in a.items():
        assert math.isclose(b[key], value, rel_tol=1e-12, abs_tol=1e-9), key


def test_the_sum_is_the_sum_of_the_values() -> None:
    """(With a negative bound the family hides its sum: here every bound is positive.)"""
    one, many = CollectorRegistry(), CollectorRegistry()
    bounds = (1e-4, 1e-3, 1e-2, 0.1)
    h1 = Histogram("secs", "s", buckets=bounds, registry=one)
    h2 = Histogram("secs", "s", buckets=bounds, registry=many)
    observed = [float(v) for v in np.random.default_rng(1).exponential(0.003, size=300)]
    for v in observed:
        h1.observe(v)
    _observe_all(h2.observe, observed)
    a, b = samples(one), samples(many)
    assert ("secs_sum", ()) in a and a.keys() == b.keys()
    for key, value in a.items():
        assert math.isclose(b[key], value, rel_tol=1e-12), key
