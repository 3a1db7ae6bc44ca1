"""Boundary-probing and coverage signals: natural clients pass, random extraction is flagged.

Benign clients replay natural held-out digits, answered by a logistic regression
trained on 600 other digits. The extraction attacker queries uniform-random
points of the input domain (the simplest Tramer-style sampling): its answers
concentrate on few classes and its rows cover every value bin of every pixel.
"""

from __future__ import annotations

import asyncio
import functools
import math
from collections.abc import Iterable, Iterator

import numpy as np
import pytest
from numpy.typing import NDArray
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression

from inference_guard.detectors.base import Answer, Detector, DetectorResult, Query
from inference_guard.detectors.boundary import DEFAULT_BASELINE, BoundaryDetector
from inference_guard.detectors.outlier_base import threshold_at_fpr
from inference_guard.guard.stores.memory import MemoryStore

Rows = NDArray[np.float64]


@functools.cache
def digits() -> tuple[Rows, LogisticRegression]:
    """(held-out rows, victim model trained on 600 other rows)."""
    X, y = load_digits(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(X))
    victim = LogisticRegression(max_iter=2000).fit(X[order[:600]], y[order[:600]])
    return X[order[600:]].astype(np.float64), victim


def detector(**kwargs: object) -> BoundaryDetector:
    params: dict[str, object] = {"low": 0.0, "high": 16.0, **kwargs}
    return BoundaryDetector("boundary", store=MemoryStore(), **params)  # type: ignore[arg-type]


def requests(client: str, rows: Rows, rng: np.random.Generator) -> Iterator[tuple[Query, Answer]]:
    victim = digits()[1]
    i = 0
    while i < len(rows):
        batch = rows[i : i + int(rng.choice([1, 2, 4, 8, 16, 32]))]
        i += len(batch)
        yield (
            Query(client, "p", batch, n_rows=len(batch)),
            Answer(probabilities=victim.predict_proba(batch)),
        )


def natural(rng: np.random.Generator, n: int) -> Rows:
    held_out = digits()[0]
    return np.vstack([held_out[rng.permutation(len(held_out))] for _ in range(n // 1197 + 1)])[:n]


async def lowest_scores(
    det: Detector, traffic: Iterable[tuple[Query, Answer | None]]
) -> dict[str, float]:
    """Each client's lowest score, inspecting and observing in arrival order like the guard."""
    lowest: dict[str, float] = {}
    for query, answer in traffic:
        result = await det.inspect(query)
        lowest[query.client] = min(lowest.get(query.client, math.inf), result.score)
        if answer is not None and det.observes_answers:
            observed = await det.observe(query, answer)
            if observed is not None:
                lowest[query.client] = min(lowest[query.client], observed.score)
    return lowest


async def rows_until_flagged(
    det: BoundaryDetector, client: str, rows: Rows, rng: np.random.Generator
) -> int | None:
    seen = 0
    for query, answer in requests(client, rows, rng):
        seen += query.n_rows
        result = await det.observe(query, answer)
        if result is not None and result.anomalous:
            return seen
    return None


def test_benign_clients_replaying_natural_digits_are_not_flagged() -> None:
    rng = np.random.default_rng(1)
    det = detector()

    async def run() -> list[float]:
        scores = []
        for c in range(40):
            rows = natural(rng, int(rng.integers(200, 800)))
            assert await rows_until_flagged(det, f"b{c}", rows, rng) is None
            result = await det.inspect(Query(f"b{c}", "p", None))
            assert not result.anomalous
            scores.append(result.score)
        return scores

    scores = asyncio.run(run())
    assert min(scores) > det.threshold + 1.0


def test_uniform_random_extraction_is_flagged_at_the_first_window() -> None:
    rng = np.random.default_rng(2)
    det = detector()

    async def run() -> list[int | None]:
        return [
            await rows_until_flagged(det, f"x{i}", rng.uniform(0, 16, size=(400, 64)), rng)
            for i in range(5)
        ]

    found = asyncio.run(run())
    assert all(n is not None and n < 100 + 32 for n in found), found


def test_a_threshold_calibrated_on_benign_clients_holds_on_fresh_ones() -> None:
    rng = np.random.default_rng(10)

    def traffic(prefix: str, n_clients: int) -> list[tuple[Query, Answer | None]]:
        return [
            (query, answer)
            for c in range(n_clients)
            for query, answer in requests(f"{prefix}{c}", natural(rng, 300), rng)
        ]

    async def run() -> tuple[float, dict[str, float], int | None]:
        lowest = await lowest_scores(detector(threshold=-1e9), traffic("cal", 100))
        # a client is a false positive if it ever drops below: the quantile of the minima
        threshold = threshold_at_fpr(list(lowest.values()), target_fpr=0.05)
        det = detector(threshold=threshold)
        fresh = await lowest_scores(det, traffic("new", 60))
        attack = await rows_until_flagged(det, "x", rng.uniform(0, 16, size=(200, 64)), rng)
        return threshold, fresh, attack

    threshold, fresh, attack = asyncio.run(run())
    assert -8.0 < threshold < 0.0
    flagged = sum(score < threshold for score in fresh.values())
    assert flagged <= 6  # 5 % of 60 clients expected, with room for chance
    assert attack is not None


def test_coverage_alone_flags_uniform_random_queries() -> None:
    rng = np.random.default_rng(3)
    det = detector(baseline={"coverage": DEFAULT_BASELINE["coverage"]})

    async def run() -> tuple[int | None, int | None]:
        attack = await rows_until_flagged(det, "x", rng.uniform(0, 16, size=(300, 64)), rng)
        benign = await rows_until_flagged(det, "b", natural(rng, 300), rng)
        return attack, benign

    attack, benign = asyncio.run(run())
    assert attack is not None and benign is None


def test_answer_signals_alone_never_fire() -> None:
    """Low-confidence answers on natural rows: training answers are no baseline for them.

    A model is more confident on its own training rows, which is all
    calibration sees, than on anything a client sends; so what the model
    answers only corroborates what the client sends.
    """
    det = detector(low=None, high=None, window=50)
    rng = np.random.default_rng(4)
    rows = digits()[0][:50]
    p = 0.5 + rng.uniform(-0.05, 0.05, size=50)
    probs = np.zeros((50, 10))
    probs[:, 0], probs[:, 1] = p, 1 - p

    async def run() -> DetectorResult | None:
        return await det.observe(Query("x", "p", rows, n_rows=50), Answer(probabilities=probs))

    result = asyncio.run(run())
    assert result is not None and not result.anomalous and result.score == 0.0


def test_a_request_is_split_where_a_window_ends() -> None:
    det = detector(window=100)
    rows = natural(np.random.default_rng(5), 210)
    victim = digits()[1]

    async def run() -> list[bool]:
        done = []
        for part in (rows[:70], rows[70:140], rows[140:210]):  # windows end at 100 and 200
            probs = victim.predict_proba(part)
            result = await det.observe(
                Query("c", "p", part, n_rows=len(part)), Answer(probabilities=probs)
            )
            done.append(result is not None)
        return done

    assert asyncio.run(run()) == [False, True, True]
    state = det.clients.peek("c")
    assert state is not None and state.n == 10


def test_fit_learns_the_baseline_from_benign_traffic() -> None:
    rng = np.random.default_rng(6)
    rows = natural(rng, 5000)
    probs = digits()[1].predict_proba(rows)
    det = detector().fit(rows, probs)
    for name in ("low_confidence", "class_concentration", "coverage"):
        mean, std = det.baseline[name]
        ref_mean, ref_std = DEFAULT_BASELINE[name]
        assert abs(mean - ref_mean) < 3 * ref_std and 0.5 * ref_std < std < 2 * ref_std
    assert det.baseline["anomaly_rate"] == DEFAULT_BASELINE["anomaly_rate"]
    with pytest.raises(ValueError):
        detector().fit(rows[:150], probs[:150])  # one window is not a distribution


class FakeRates:
    def __init__(self, bad: int, total: int) -> None:
        self.answer = (bad, total)
        self.asked: list[str] = []

    async def rate(self, client: str) -> tuple[int, int]:
        self.asked.append(client)
        return self.answer


@pytest.mark.parametrize(("bad", "flagged"), [(40, True), (1, False)])
def test_the_anomaly_rate_of_other_detectors_counts(bad: int, flagged: bool) -> None:
    rates = FakeRates(bad, 200)
    det = detector(anomaly_rate=rates)
    rng = np.random.default_rng(7)

    async def run() -> int | None:
        return await rows_until_flagged(det, "c", natural(rng, 150), rng)

    assert (asyncio.run(run()) is not None) is flagged
    assert rates.asked == ["c"]  # read once, when the window ended


def test_class_concentration_alone_never_fires() -> None:
    """A one-class client (labels only, so no other signal) is concentrated by nature."""
    det = detector(low=None, high=None, window=50, n_classes=10)
    rows = digits()[0][:50]

    async def run() -> tuple[DetectorResult | None, DetectorResult | None]:
        one_class = await det.observe(
            Query("x", "p", rows, n_rows=50), Answer(labels=np.zeros(50, dtype=np.int64))
        )
        spread = await det.observe(
            Query("y", "p", rows, n_rows=50), Answer(labels=np.arange(50, dtype=np.int64) % 10)
        )
        return one_class, spread

    one_class, spread = asyncio.run(run())
    assert one_class is not None and spread is not None
    assert not one_class.anomalous and not spread.anomalous
    assert one_class.score == 0.0  # no leading signal: concentration is not scored alone


def test_answer_signals_corroborate_a_leading_input_signal() -> None:
    """The same uniform rows (coverage leads) score lower with low-confidence, one-class answers."""
    det = detector(window=50)
    rows = np.random.default_rng(8).uniform(0.0, 16.0, size=(50, 64))
    probs = np.full((50, 10), 0.1 / 9)
    probs[:, 0] = 0.45  # on the boundary, all class 1
    probs[:, 1] = 0.45 + 0.1 / 9
    confident = np.full((50, 10), 0.01)
    confident[np.arange(50), np.arange(50) % 10] = 0.91  # every class in turn, sure of each

    async def run() -> tuple[float, float]:
        a = await det.observe(Query("a", "p", rows, n_rows=50), Answer(probabilities=probs))
        b = await det.observe(Query("b", "p", rows, n_rows=50), Answer(probabilities=confident))
        assert a is not None and b is not None
        return a.score, b.score

    probing, plain = asyncio.run(run())
    assert probing < plain < 0.0
    assert probing >= 1.5 * plain  # corroboration adds at most half of the lead


def test_a_flag_is_shared_with_other_workers_through_the_store() -> None:
    store = MemoryStore()
    a = BoundaryDetector("boundary", store=store, low=0.0, high=16.0)
    b = BoundaryDetector("boundary", store=store, low=0.0, high=16.0)
    rng = np.random.default_rng(8)

    async def run() -> tuple[bool, bool]:
        assert await rows_until_flagged(a, "x", rng.uniform(0, 16, size=(200, 64)), rng)
        return (await b.inspect(Query("x", "p", None))).anomalous, (
            await b.inspect(Query("y", "p", None))
        ).anomalous

    assert asyncio.run(run()) == (True, False)


def test_ten_thousand_clients_keep_the_client_map_at_its_cap() -> None:
    det = detector(max_clients=1000)
    rows = digits()[0]

    async def run() -> None:
        for c in range(10_000):
            row = rows[c % len(rows)][None]
            await det.observe(Query(f"c{c}", "p", row), Answer(labels=np.array([c % 10])))

    asyncio.run(run())
    assert len(det.clients) == 1000
    assert det.clients.evictions == 9000


def test_wide_rows_are_covered_on_a_bounded_feature_subset() -> None:
    det = detector(max_coverage_features=32, seed=0)
    rows = np.random.default_rng(9).uniform(0, 16, size=(3, 5000))

    async def run() -> None:
        await det.observe(Query("c", "p", rows, n_rows=3), Answer(labels=np.arange(3)))

    asyncio.run(run())
    state = det.clients.peek("c")
    assert state is not None and state.cover is not None
    assert state.cover.shape == (32, 10)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"window": 1},
        {"p_low": 0.0},
        {"low": 0.0, "high": None},
        {"low": 2.0, "high": 1.0},
        {"bins": 0},
        {"baseline": {"bogus": (0.0, 1.0)}},
        {"baseline": {"coverage": (0.5, -1.0)}},
        {"threshold": float("nan")},
        {"n_classes": 1},
    ],
)
def test_bad_parameters_are_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        detector(**kwargs)
