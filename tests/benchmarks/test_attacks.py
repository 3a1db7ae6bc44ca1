"""The attack clients' data and bookkeeping (benchmarks/attacks), without a server."""

from __future__ import annotations

from types import SimpleNamespace
from typing import cast

import numpy as np
import pytest

from benchmarks.attacks import benign, extraction
from benchmarks.attacks._data import _area_matrix, digits, photo_patches
from benchmarks.attacks._http import Oracle, Sent


@pytest.fixture(scope="module")
def patches() -> np.ndarray:
    pytest.importorskip("PIL", reason="the sample photos need Pillow (test and bench extras)")
    return photo_patches(300, 0)


def test_photo_patches_are_digits_like_rows(patches: np.ndarray) -> None:
    assert patches.shape == (300, 64)
    assert np.array_equal(patches, np.rint(patches))
    assert patches.min() == 0 and patches.max() == 16
    # every patch is stretched: its darkest pixel is full ink, its blank half is page
    assert np.all(patches.max(axis=1) == 16)
    assert np.all(np.mean(patches == 0, axis=1) >= 0.5)
    # not all alike: the crops differ in place, size and photo
    assert np.unique(patches, axis=0).shape[0] == patches.shape[0]


def test_photo_patches_are_seeded(patches: np.ndarray) -> None:
    fresh = photo_patches.__wrapped__(300, 0)  # bypass the cache
    assert np.array_equal(fresh, patches)
    assert np.array_equal(photo_patches.__wrapped__(20, 0), patches[:20])
    assert not np.array_equal(photo_patches.__wrapped__(20, 1), patches[:20])
    with pytest.raises(ValueError):
        patches[0, 0] = 1.0  # cached: shared, so read-only


def test_photo_patches_plain_min_max_stretch() -> None:
    pytest.importorskip("PIL", reason="the sample photos need Pillow (test and bench extras)")
    X = photo_patches(50, 0, blank=0.0)
    assert np.all(X.min(axis=1) == 0) and np.all(X.max(axis=1) == 16)
    with pytest.raises(ValueError):
        photo_patches(5, 0, sizes=(16, 1000))


@pytest.mark.parametrize("size", [8, 16, 21, 64, 100, 128])
def test_area_matrix_averages_by_area(size: int) -> None:
    A = _area_matrix(size)
    assert A.shape == (8, size)
    np.testing.assert_allclose(A.sum(axis=1), 1.0)  # each output pixel is an average
    np.testing.assert_allclose(A.sum(axis=0), 8 / size)  # each input pixel counts once
    img = np.random.default_rng(size).uniform(0, 255, size=(size, size))
    if size % 8 == 0:
        b = size // 8
        blocks = img.reshape(8, b, 8, b).mean(axis=(1, 3))
        np.testing.assert_allclose(A @ img @ A.T, blocks)


def test_substitute_agreement_measures_what_the_labels_teach() -> None:
    data = digits()
    good = extraction.substitute_agreement(data.pool, data.model.predict(data.pool))
    assert good > 0.85
    ones = np.ones(data.pool.shape[0], dtype=np.int64)
    assert extraction.substitute_agreement(data.pool, ones) == pytest.approx(
        float(np.mean(data.eval_labels == 1))
    )
    assert np.array_equal(data.benign[data.eval_index], data.eval)


def _replay(p: benign.BenignPlan, refuse_from: int | None = None) -> Oracle:
    """An oracle whose log is what ``run_client`` would record for plan ``p``."""
    model = digits().model
    oracle = Oracle("http://127.0.0.1:9", [p.key])
    at = 0
    for i, n in enumerate(p.batches):
        refused = refuse_from is not None and i >= refuse_from
        idx = list(p.rows[at : at + n])
        labels = () if refused else tuple(int(v) for v in model.predict(digits().benign[idx]))
        at += n
        oracle.log.append(
            Sent(f"r{i}", p.key, n, at, 403 if refused else 200, False, False, labels)
        )
        oracle.rows = at
        if refused:
            break
    return oracle


def test_received_reads_the_answers_back_against_the_plan() -> None:
    p = max(benign.plan(30, seed=4), key=lambda q: len(q.batches))
    o = _replay(p, refuse_from=3)
    idx, labels = benign.received(p, o)
    answered = sum(p.batches[:3])
    assert idx.tolist() == list(p.rows[:answered])
    assert np.array_equal(labels, digits().model.predict(digits().benign[idx]))
    assert benign.sent_rows(p, o) == p.rows[: answered + p.batches[3]]
    other = benign.plan(1, seed=5, max_requests=3)[0]
    with pytest.raises(ValueError):
        benign.received(other, _replay(p))


def test_the_closed_world_knockoff_is_reported_against_benign_figures() -> None:
    from benchmarks.attacks import run

    plans = benign.plan(40, seed=0)
    oracles = [_replay(p) for p in plans]
    learner = run.benign_learner(plans, oracles)
    biggest = max(len(set(p.rows)) for p in plans)
    assert learner is not None and learner.distinct == biggest
    assert learner.trained <= 180 and learner.agreement > 0.5
    # the client that sent every held-out row learnt exactly what the closed-world attacker
    # learns from its 180 rows: the same rows, the same answers
    rows = (*range(360), *range(24))  # every held-out row, and a few resent
    full = benign.BenignPlan("everything", (32,) * 12, (0.0,) * 12, rows)
    everything = run.benign_learner([full], [_replay(full)])
    assert everything is not None and everything.trained == 180
    data = digits()
    pool_index = np.setdiff1d(np.arange(360), data.eval_index)
    X = data.benign[pool_index]
    assert everything.agreement == extraction.substitute_agreement(X, data.model.predict(X))

    def scenario(name: str, detected: int | None, flaggable: bool = True) -> run.Scenario:
        result = extraction.ExtractionResult(0.8, 180, 180)
        ran = run.Run(cast(Oracle, SimpleNamespace(rows=180)), result, 1.0)
        sc = run.Scenario(name, "extraction", "", flaggable=flaggable, bare=ran, guard=ran)
        # a row flag earlier than the detection must not count as one
        first = None if detected is None else max(1, detected - 10)
        sc.det = run.Detection(first_flag=first, first_detection=detected)
        return sc

    distinct = [len(set(p.rows)) for p in plans]
    ben = cast(
        run.BenignOutcome,
        SimpleNamespace(
            clients=len(plans),
            distinct_rows=distinct,
            learner=learner,
            sanctioned=0,
            flagged=3,
            detected=0,
            degraded_clients=0,
            blocked_clients=0,
        ),
    )
    attacks = [
        scenario("A", 40),
        scenario("Closed", None, flaggable=False),
        scenario("B", None),
    ]
    lines = run.targets(attacks, ben)
    text = "\n".join(lines)
    assert "every attack flagged: **NOT met** (1 of 2 detected as clients" in text
    assert "  - A: detected after 40 rows" in text
    assert "  - B: **missed**" in text
    closed = next(line for line in lines if line.startswith("- Closed:"))
    assert "not flaggable by construction" in closed
    assert f"**{sum(n >= 180 for n in distinct)} of 40** benign clients" in closed
    assert f"**{100 * learner.agreement:.1f} %**" in closed
    assert "over the 3 extraction attacks: A: 40 rows; Closed: never; B: never" in text
    assert "without the closed-world natural Knockoff: never" in text
    lines = run.targets([scenario("A", 40), scenario("Closed", None, flaggable=False)], ben)
    assert "every attack flagged: **met** (1 of 1 detected as clients" in "\n".join(lines)
    assert "benign clients flagged ≤ 0.5 %: **0.0 %** detected as clients" in "\n".join(lines)


def test_detection_counts_client_level_decisions_not_single_row_flags() -> None:
    """A per-row anomaly flag is not a detection of the client; a per-client detector is."""
    from benchmarks.attacks import run
    log = [Sent(f"r{i}", "k", 10, 10 * (i + 1), 200, False) for i in range(5)]
    h = run.client_hash("k")
    lines = [
        {"client": h, "request_id": "r0", "decision": "flag", "enforced": "flag", "fired": ["knn"]},
        {
            "client": h,
            "request_id": "r1",
            "decision": "flag",
            "enforced": "flag",
            "fired": ["envelope", "mahalanobis"],
        },
        {
            "client": h,
            "request_id": "r2",
            "decision": "degrade",
            "enforced": "degrade",
            "fired": ["anomaly_rate"],
        },
        {
            "client": h,
            "request_id": "r4",
            "decision": "block",
            "enforced": "block",
            "fired": ["near_duplicate"],
            "quarantined": True,
        },
    ]
    det = run.detection(log, lines)
    assert det.first_flag == 10
    assert det.first_detection == 30
    assert det.quarantine == 50
    assert det.flagged and det.keys_flagged == 1
    row_only = run.detection(log, lines[:2])
    assert row_only.first_flag == 10 and not row_only.flagged and row_only.keys_flagged == 0
    # a per-client detector whose action is only 'flag' still detects the client
    watch = [
        {
            "client": h,
            "request_id": "r3",
            "decision": "flag",
            "enforced": "flag",
            "fired": ["prada"],
        }
    ]
    assert run.detection(log, watch).first_detection == 40
