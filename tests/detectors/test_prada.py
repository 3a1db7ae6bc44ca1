"""PRADA on the digits data: natural clients pass, Jacobian-augmentation extraction is flagged.

The victim is a logistic regression trained on 600 digits; benign clients replay
natural held-out rows (without repeats) in batches of 1 to 32. The attacker runs
Papernot's Jacobian-based dataset augmentation against a ridge substitute that
it refits every round: each round adds ``x + lambda * sign(gradient)`` for
every point it has.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Iterator

import numpy as np
import pytest
from numpy.typing import NDArray
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression

from inference_guard.detectors.base import Answer, Query
from inference_guard.detectors.prada import PradaDetector
from inference_guard.guard.stores.memory import MemoryStore

Rows = NDArray[np.float64]


@functools.cache
def digits() -> tuple[Rows, Rows, LogisticRegression]:
    """(training rows, held-out rows, victim model)."""
    X, y = load_digits(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(X))
    train, held_out = order[:600], order[600:]
    victim = LogisticRegression(max_iter=2000).fit(X[train], y[train])
    return X[train].astype(np.float64), X[held_out].astype(np.float64), victim


def requests(client: str, rows: Rows, rng: np.random.Generator) -> Iterator[tuple[Query, Answer]]:
    """``rows`` in batches of varied size, each with the victim's answer."""
    victim = digits()[2]
    i = 0
    while i < len(rows):
        batch = rows[i : i + int(rng.choice([1, 1, 2, 4, 8, 16, 32]))]
        i += len(batch)
        probs = victim.predict_proba(batch)
        yield (
            Query(client, "p", batch, n_rows=len(batch)),
            Answer(labels=np.argmax(probs, axis=1), probabilities=probs),
        )


def jbda(rng: np.random.Generator, n: int, lam: float) -> Rows:
    """Jacobian-based augmentation from 20 training seeds (Papernot et al. 2017)."""
    train, _, victim = digits()
    points = train[rng.choice(len(train), 20, replace=False)]
    while len(points) < n:
        labels = victim.predict(points)
        design = np.hstack([points, np.ones((len(points), 1))])
        weights = np.linalg.solve(
            design.T @ design + np.eye(design.shape[1]), design.T @ np.eye(10)[labels]
        )[:-1]
        step = lam * np.sign(weights[:, labels].T)
        points = np.vstack([points, np.clip(points + step, 0.0, 16.0)])
    return points[:n]


async def rows_until_flagged(
    det: PradaDetector, client: str, rows: Rows, rng: np.random.Generator
) -> int | None:
    seen = 0
    for query, answer in requests(client, rows, rng):
        seen += query.n_rows
        result = await det.observe(query, answer)
        if result is not None and result.anomalous:
            return seen
    return None


def test_benign_clients_replaying_natural_digits_are_not_flagged() -> None:
    held_out = digits()[1]
    rng = np.random.default_rng(1)
    det = PradaDetector("prada", store=MemoryStore(), seed=0)

    async def run() -> list[float]:
        lowest = []
        for c in range(20):
            rows = held_out[rng.choice(len(held_out), 400, replace=False)]
            assert await rows_until_flagged(det, f"benign-{c}", rows, rng) is None
            result = await det.inspect(Query(f"benign-{c}", "p", None))
            assert not result.anomalous
            lowest.append(result.score)
        return lowest

    scores = asyncio.run(run())
    # every client was tested (W is 1.0 only before the first test)
    assert all(0.9 <= s < 1.0 for s in scores)


@pytest.mark.parametrize("lam", [0.5, 1.0, 1.6])
def test_jacobian_augmentation_is_flagged_within_a_few_hundred_rows(lam: float) -> None:
    rng = np.random.default_rng(2)
    det = PradaDetector("prada", store=MemoryStore(), seed=0)

    async def run() -> list[int | None]:
        return [await rows_until_flagged(det, f"x{i}", jbda(rng, 600, lam), rng) for i in range(3)]

    found = asyncio.run(run())
    assert all(n is not None and n <= 300 for n in found), found


def test_a_flag_is_shared_with_other_workers_through_the_store() -> None:
    store = MemoryStore()
    rng = np.random.default_rng(3)
    worker_a = PradaDetector("prada", store=store, seed=0)
    worker_b = PradaDetector("prada", store=store, seed=0)

    async def run() -> tuple[bool, bool, bool]:
        assert await rows_until_flagged(worker_a, "x", jbda(rng, 400, 1.0), rng) is not None
        other = await worker_b.inspect(Query("x", "p", None))
        other_policy = await worker_b.inspect(Query("x", "another-policy", None))
        stranger = await worker_b.inspect(Query("y", "p", None))
        return other.anomalous, other_policy.anomalous, stranger.anomalous

    assert asyncio.run(run()) == (True, False, False)


def test_inspect_keeps_a_flagged_client_flagged_before_the_model_runs() -> None:
    rng = np.random.default_rng(4)
    det = PradaDetector("prada", store=MemoryStore(), seed=0)

    async def run() -> tuple[bool, float]:
        await rows_until_flagged(det, "x", jbda(rng, 400, 1.0), rng)
        result = await det.inspect(Query("x", "p", digits()[1][:3], n_rows=3))
        return result.anomalous, result.score

    anomalous, score = asyncio.run(run())
    assert anomalous and score < det.delta


def test_state_per_client_is_bounded_whatever_the_history() -> None:
    held_out = digits()[1]
    rng = np.random.default_rng(5)
    det = PradaDetector(
        "prada",
        store=MemoryStore(),
        seed=0,
        max_set=20,
        max_set_rows=120,
        max_distances=300,
        delta=0.01,
    )

    async def run() -> None:
        for _ in range(4):  # 4 * 1197 rows from one client
            for query, answer in requests("heavy", held_out[rng.permutation(len(held_out))], rng):
                await det.observe(query, answer)

    asyncio.run(run())
    state = det.clients.peek("heavy")
    assert state is not None
    assert all(s.n <= 20 for s in state.sets.values())
    assert state.rows_held == sum(s.n for s in state.sets.values()) <= 120
    assert state.dist_n == 300
    assert all(s.points.shape[1] == 32 for s in state.sets.values())  # projected from 64


def test_ten_thousand_clients_keep_the_client_map_at_its_cap() -> None:
    held_out = digits()[1]
    det = PradaDetector("prada", store=MemoryStore(), seed=0, max_clients=500)

    async def run() -> None:
        for c in range(10_000):
            row = held_out[c % len(held_out)][None, :]
            await det.observe(Query(f"c{c}", "p", row), Answer(labels=np.array([c % 10])))

    asyncio.run(run())
    assert len(det.clients) == 500
    assert det.clients.evictions == 9_500
    assert "c9999" in det.clients and "c0" not in det.clients


def test_answers_it_cannot_use_are_ignored() -> None:
    det = PradaDetector("prada", store=MemoryStore(), seed=0)
    rows = digits()[1][:4]

    async def run() -> list[object]:
        return [
            await det.observe(Query("c", "p", rows, n_rows=4), Answer()),
            await det.observe(Query("c", "p", rows, n_rows=4), Answer(labels=np.array([1, 2]))),
            await det.observe(
                Query("c", "p", rows, n_rows=4), Answer(status=500, labels=np.arange(4))
            ),
            await det.observe(Query("c", "p", None, texts=("hi",)), Answer(labels=np.arange(1))),
        ]

    assert asyncio.run(run()) == [None, None, None, None]
    assert len(det.clients) == 0


def test_probabilities_stand_in_for_missing_labels() -> None:
    held_out = digits()[1]
    victim = digits()[2]
    det = PradaDetector("prada", store=MemoryStore(), seed=0)
    rows = held_out[:50]

    async def run() -> None:
        probs = victim.predict_proba(rows)
        await det.observe(Query("c", "p", rows, n_rows=50), Answer(probabilities=probs))

    asyncio.run(run())
    state = det.clients.peek("c")
    assert state is not None
    classes = set(victim.predict(rows).tolist())
    assert set(state.sets) == classes
    assert state.dist_n == 50 - len(classes)  # the first row of each class has no distance


def test_a_row_identical_to_a_set_member_adds_no_distance() -> None:
    det = PradaDetector("prada", store=MemoryStore(), seed=0)
    row = digits()[1][:1]
    label = Answer(labels=np.array([3]))

    async def run() -> list[int]:
        counts = []
        for rows in (row, row, row, row + 1.0):
            await det.observe(Query("c", "p", rows), label)
            state = det.clients.peek("c")
            assert state is not None
            counts.append(state.dist_n)
        return counts

    assert asyncio.run(run()) == [0, 0, 0, 1]


def test_the_growing_set_admits_rows_beyond_its_rising_threshold() -> None:
    det = PradaDetector("prada", store=MemoryStore(), seed=0)
    label = Answer(labels=np.array([0]))

    async def run() -> list[tuple[int, float]]:
        seen = []
        for x in (0.0, 10.0, 5.0, 25.0, 22.0, 40.0):
            await det.observe(Query("c", "p", np.array([[x, 0.0]])), label)
            state = det.clients.peek("c")
            assert state is not None
            seen.append((state.sets[0].n, state.sets[0].thr))
        return seen

    # 10 joins (d=10, thr=10); 5 does not (d=5); 25 joins (d=15: mean 12.5 - std 2.5 = 10);
    # 22 does not (d=3); 40 joins (d=15) and the threshold rises to mean - std of 10, 15, 15
    assert asyncio.run(run()) == [
        (1, 0.0),
        (2, 10.0),
        (2, 10.0),
        (3, 10.0),
        (3, 10.0),
        (4, pytest.approx(40 / 3 - np.sqrt(50 / 9))),
    ]


def test_huge_rows_do_not_poison_the_distances() -> None:
    det = PradaDetector("prada", store=MemoryStore(), seed=0, min_distances=3, test_every=1)
    label = Answer(labels=np.zeros(1, dtype=np.int64))

    async def run() -> float:
        for x in (0.0, 1.0, 1e30, 3.0, np.inf, 4.5, 7.0):
            await det.observe(Query("c", "p", np.full((1, 64), x)), label)
        return (await det.inspect(Query("c", "p", None))).score

    score = asyncio.run(run())
    state = det.clients.peek("c")
    assert state is not None and np.isfinite(state.dists[: state.dist_n]).all()
    assert 0.0 <= score <= 1.0


def test_a_client_that_changes_row_width_starts_over() -> None:
    det = PradaDetector("prada", store=MemoryStore(), seed=0)
    rng = np.random.default_rng(6)

    async def run() -> None:
        await det.observe(
            Query("c", "p", rng.normal(size=(5, 64)), n_rows=5),
            Answer(labels=np.zeros(5, dtype=np.int64)),
        )
        await det.observe(
            Query("c", "p", rng.normal(size=(3, 8)), n_rows=3),
            Answer(labels=np.zeros(3, dtype=np.int64)),
        )

    asyncio.run(run())
    state = det.clients.peek("c")
    assert state is not None and state.width == 8 and state.rows_held >= 1
    assert all(s.points.shape[1] == 8 for s in state.sets.values())


@pytest.mark.parametrize(
    "kwargs",
    [
        {"delta": 0.0},
        {"delta": 1.5},
        {"min_distances": 2},
        {"max_distances": 6000},
        {"min_distances": 500, "max_distances": 400},
        {"proj_dim": 0},
        {"outlier_sigma": 0.0},
    ],
)
def test_bad_parameters_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        PradaDetector("prada", store=MemoryStore(), **kwargs)  # type: ignore[arg-type]


def test_exact_repeats_leave_the_score_unchanged() -> None:
    """A client that resends every row three times is judged on the rows, once each."""
    rows = np.random.default_rng(1).normal(size=(300, 8))

    async def run(times: int) -> tuple[float, int]:
        det = PradaDetector("prada", store=MemoryStore(), seed=0)
        for row in rows:
            for _ in range(times):
                await det.observe(Query("c", "p", row[None]), Answer(labels=np.array([0])))
        state = det.clients.peek("c")
        assert state is not None
        return state.score, state.dist_n

    once, thrice = asyncio.run(run(1)), asyncio.run(run(3))
    assert once == thrice and once[1] == 299
