"""Work shared between detectors and requests gives what computing it afresh gives.

The per-request memo on :class:`Query` (row digests, magnitude, bytes), the
digest fast paths, a row detector's scores of repeated rows, the anomaly
rate's cached previous window and the near-duplicate index's membership table
are all shortcuts: each must answer exactly what the plain computation does.
"""

from __future__ import annotations

import asyncio
import math

import numpy as np
import pytest

from inference_guard.detectors import repeats
from inference_guard.detectors.anomaly import RowAnomalyDetector, row_magnitude
from inference_guard.detectors.base import DetectorResult, Query
from inference_guard.detectors.fingerprint import _Index
from inference_guard.detectors.knn import KNNOutlier
from inference_guard.detectors.repeats import (
    RecentRows,
    digest_keys,
    query_digests,
    row_bytes,
    row_digests,
)

_M1 = 0xBF58476D1CE4E5B9
_M2 = 0x94D049BB133111EB
_MASK = (1 << 64) - 1


def _mix(v: int) -> int:
    v ^= v >> 30
    v = (v * _M1) & _MASK
    v ^= v >> 27
    v = (v * _M2) & _MASK
    return v ^ (v >> 31)


def reference_digest(row: np.ndarray, keys: np.ndarray) -> int:
    """The digest as documented, one Python int at a time."""
    width = row.shape[0]
    total = 0
    for j, x in enumerate((row.astype(np.float64) + 0.0).tolist()):
        bits = int(np.float64(x).view(np.uint64))
        k0 = int(keys[0, j % keys.shape[1]])
        k1 = int(keys[1, j % keys.shape[1]])
        total = (total + _mix(((bits ^ k0) + k1 * width) & _MASK)) & _MASK
    d = _mix(total)
    return d - (1 << 64) if d >> 63 else d


@pytest.mark.parametrize("shape", [(1, 64), (3, 64), (1, 1), (5, 7), (2, 5000), (0, 4)])
def test_row_digests_are_the_documented_digest(shape: tuple[int, int]) -> None:
    keys = digest_keys(42)
    rows = np.random.default_rng(0).normal(size=shape)
    if rows.size:
        rows[0, 0] = -0.0
    got = row_digests(rows, keys)
    assert got.dtype == np.int64 and got.shape == (shape[0],)
    assert got.tolist() == [reference_digest(r, keys) for r in rows]
    # a non-contiguous view, integers and float32 digest as their float64 values
    assert (row_digests(np.asfortranarray(rows), keys) == got).all()
    ints = np.random.default_rng(1).integers(0, 17, size=shape)
    assert (row_digests(ints, keys) == row_digests(ints.astype(np.float64), keys)).all()


def test_zero_signs_and_keys() -> None:
    a = np.array([[0.0, 1.0]])
    b = np.array([[-0.0, 1.0]])
    assert row_digests(a)[0] == row_digests(b)[0]
    assert row_digests(a, digest_keys(1))[0] != row_digests(a, digest_keys(2))[0]
    assert row_digests(a)[0] != row_digests(np.array([[0.0, 1.0, 0.0]]))[0]


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The row counts :func:`row_digests` is called with from now on (its memo emptied)."""
    seen: list[int] = []
    real = repeats.row_digests

    def counting(rows: np.ndarray, keys: np.ndarray | None = None) -> np.ndarray:
        seen.append(rows.shape[0])
        return real(rows, keys)

    monkeypatch.setattr(repeats, "row_digests", counting)
    repeats._ONE_ROW.clear()
    return seen


def test_a_query_s_digests_are_computed_once_per_key(calls: list[int]) -> None:
    rows = np.arange(12.0).reshape(3, 4)
    q = Query("c", "p", rows, n_rows=3)
    first = query_digests(q, rows)
    assert query_digests(q, rows) is first and calls == [3]
    salted = query_digests(q, rows, digest_keys(5))
    assert calls == [3, 3] and (salted != first).all()
    # other rows (a detector that reads a part) are not served the request's digests
    assert query_digests(q, rows[:1]).tolist() == [first[0]] and calls == [3, 3, 1]
    # a fresh query starts with an empty memo, and queries compare without it
    q2 = Query("c", "p", rows, n_rows=3)
    assert q2.memo == {} and q2 == q


def test_single_rows_are_digested_once_across_requests(calls: list[int]) -> None:
    real = row_digests  # the module's own, not the counting one
    keys = digest_keys(7)
    row = np.array([[0.0, 1.5, -2.0, 3.0]])
    first = query_digests(Query("a", "p", row, n_rows=1), row)
    # another request (another client) with the same row: the digest is remembered
    again = query_digests(Query("b", "p", row.copy(), n_rows=1), row.copy())
    assert again.tolist() == first.tolist() == real(row).tolist() and calls == [1]
    assert not again.flags.writeable  # shared between requests
    # -0.0 has other bytes and the same digest; other keys, another digest
    signed = np.array([[-0.0, 1.5, -2.0, 3.0]])
    assert query_digests(Query("a", "p", signed, n_rows=1), signed).tolist() == first.tolist()
    salted = query_digests(Query("a", "p", row, n_rows=1), row, keys)
    assert salted.tolist() == real(row, keys).tolist() != first.tolist() and calls == [1, 1, 1]
    # float32 rows whose bytes equal a float64 row's are not served its digest
    f32 = np.frombuffer(row.tobytes(), dtype=np.float32).reshape(1, 8)
    got = query_digests(Query("a", "p", f32, n_rows=1), f32)
    assert got.tolist() == real(f32).tolist() != first.tolist()
    # bounded: the oldest rows are forgotten first
    for i in range(repeats._ONE_ROW_MAX + 5):
        r = np.array([[float(i), 9.0]])
        query_digests(Query("a", "p", r, n_rows=1), r)
    assert len(repeats._ONE_ROW) == repeats._ONE_ROW_MAX
    n = len(calls)
    query_digests(Query("a", "p", row, n_rows=1), row)
    assert len(calls) == n + 1  # evicted, digested again
    # a wide row is digested every time, never kept: the memo's bytes stay bounded
    wide = np.ones((1, repeats._ONE_ROW_MAX_BYTES // 8 + 1))
    before = dict(repeats._ONE_ROW)
    for _ in range(2):
        got = query_digests(Query("a", "p", wide, n_rows=1), wide)
        assert got.tolist() == real(wide).tolist()
    assert len(calls) == n + 3 and dict(repeats._ONE_ROW) == before


@pytest.mark.parametrize("size", [1, 2, 4])
def test_fresh_one_is_fresh_digests_of_one(size: int) -> None:
    a, b = RecentRows(size), RecentRows(size)
    stream = [1, 2, 1, 3, 4, 5, 1, 2, 2, 6, 7, 8, 9, 1, 1, 9, 8, 7, 6, 6, 0]
    got = []
    for d in stream:
        fresh = a.fresh_one(d)
        assert fresh == bool(b.fresh_digests(np.array([d], dtype=np.int64))[0])
        got.append(fresh)
    # what a plain list of the last `size` distinct digests says
    recent: list[int] = []
    expected = []
    for d in stream:
        expected.append(d not in recent)
        if d not in recent:
            recent = [*recent, d][-size:]
    assert got == expected
    assert a.known(np.array(recent, dtype=np.int64)).all()
    assert not a.known(np.array([-1], dtype=np.int64)).any()


def test_magnitude_and_bytes_are_memoised_per_rows() -> None:
    rows = np.array([[1.0, -7.5, 2.0]])
    q = Query("c", "p", rows)
    assert row_magnitude(q, rows) == 7.5 and row_bytes(q, rows) == rows.tobytes()
    q.memo["magnitude"] = (rows, 99.0)  # what is memoised is what is served
    assert row_magnitude(q, rows) == 99.0
    other = rows * 2
    assert row_magnitude(q, other) == 15.0  # other rows: computed, not served
    nan = np.array([[1.0, math.nan]])
    assert math.isnan(row_magnitude(Query("c", "p", nan), nan))


def test_a_repeated_row_gets_the_score_it_got_before() -> None:
    rng = np.random.default_rng(0)
    model = KNNOutlier(n_neighbors=3, target_fpr=0.05).fit(rng.normal(size=(400, 6)))
    det = RowAnomalyDetector("knn", model)
    fresh = RowAnomalyDetector("knn", model)
    rows = [rng.normal(size=(1, 6)) * s for s in (1.0, 1.0, 6.0, 0.5)]

    async def run() -> None:
        for i in range(600):
            x = rows[i % 4] if i % 3 else rng.normal(size=(1, 6))
            got = await det.inspect(Query("c", "p", x.copy()))
            fresh._scored.clear()  # the reference scores every row
            want = await fresh.inspect(Query("c", "p", x.copy()))
            assert got == want
            assert got.score == pytest.approx(float(model.score_samples(x)[0]), abs=1e-9)
        assert 0 < len(det._scored) <= 512

    asyncio.run(run())
    assert isinstance(det._scored, dict)


def test_the_score_cache_of_wide_rows_stays_within_its_bytes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import inference_guard.detectors.anomaly as anomaly

    monkeypatch.setattr(anomaly, "_SCORED_BYTES", 4 * 8 * 64)  # room for four 64-wide rows
    rng = np.random.default_rng(3)
    det = RowAnomalyDetector("knn", KNNOutlier(n_neighbors=3).fit(rng.normal(size=(200, 64))))

    async def run() -> None:
        for _ in range(40):
            x = rng.normal(size=(1, 64))
            await det.inspect(Query("c", "p", x))
            assert det._scored_bytes == 8 * 64 * len(det._scored)
            assert det._scored_bytes <= 5 * 8 * 64

    asyncio.run(run())


def test_results_and_decisions_are_immutable() -> None:
    from inference_guard.guard.decisions import Action, Decision

    r = DetectorResult.ok("d", 1.0, 0.5)
    d = Decision(Action.ALLOW, Action.ALLOW, "p", results=(r,))
    for obj, attr in ((r, "score"), (d, "action")):
        with pytest.raises(AttributeError):
            setattr(obj, attr, None)
    assert d.results[0].detector == "d" and not d.recorded


def test_the_membership_table_agrees_with_a_binary_search() -> None:
    index = _Index(max_rows=64, size=50, bucket_size=8)
    rng = np.random.default_rng(0)
    for trial in range(300):
        tags = np.unique(rng.integers(0, 1 << 32, size=50, dtype=np.uint64)).astype(np.uint32)
        if trial % 3 == 0:  # two tags on one table position: the search answers
            tags[1] = (tags[0] & ~np.uint32(0xFFF)) | (tags[1] & np.uint32(0xFFF))
            tags = np.unique(tags)
        held = rng.integers(0, 1 << 32, size=(7, 50), dtype=np.uint64).astype(np.uint32)
        held[:, :10] = rng.choice(tags, size=(7, 10))  # some shared
        want = np.isin(held, tags)
        assert (index._in(tags, held) == want).all()
        assert (index._table == index._empty).all()  # the scratch table is left clean
