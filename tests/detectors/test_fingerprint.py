"""Near-duplicate fingerprints: natural clients pass, HopSkipJump-like probing is flagged.

Benign clients replay disjoint slices of the natural held-out digits (a global
index would rightly match two clients sending the very same image). The attack
follows HopSkipJump's shape: a binary search between the input and a point of
another class, then batches of gradient-estimation queries ``x_b + delta * u``
around the boundary point, a geometric step, another binary search, and so on.
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

from inference_guard.detectors.base import Query
from inference_guard.detectors.fingerprint import Fingerprinter, NearDuplicateDetector
from inference_guard.guard.stores.memory import MemoryStore

Rows = NDArray[np.float64]
SALT = b"test salt, 16+ bytes"


@functools.cache
def digits() -> tuple[Rows, LogisticRegression]:
    """(held-out rows, victim model trained on 600 other rows)."""
    X, y = load_digits(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(X))
    victim = LogisticRegression(max_iter=2000).fit(X[order[:600]], y[order[:600]])
    return X[order[600:]].astype(np.float64), victim


def detector(**kwargs: object) -> NearDuplicateDetector:
    params: dict[str, object] = {"salt": SALT, "low": 0.0, "high": 16.0, **kwargs}
    return NearDuplicateDetector("near_duplicate", store=MemoryStore(), **params)  # type: ignore[arg-type]


def hop_skip_jump(
    x0: Rows, rng: np.random.Generator, n_rows: int, delta: float = 0.1
) -> Iterator[Rows]:
    """Request batches of a HopSkipJump-like attack on ``x0`` (at least ``n_rows`` rows)."""
    held_out, victim = digits()
    c0 = victim.predict(x0[None])[0]
    others = held_out[victim.predict(held_out) != c0]
    target = others[rng.integers(len(others))]

    def search(x_adv: Rows) -> tuple[list[Rows], Rows]:
        lo, hi, sent = 0.0, 1.0, []
        for _ in range(10):
            mid = (lo + hi) / 2
            x = (1 - mid) * x0 + mid * x_adv
            sent.append(x[None])
            lo, hi = (mid, hi) if victim.predict(x[None])[0] == c0 else (lo, mid)
        return sent, (1 - hi) * x0 + hi * x_adv

    sent, boundary = search(target)
    yield from sent
    total = len(sent)
    d = x0.shape[0]
    while total < n_rows:
        u = rng.normal(size=(20, d))
        u /= np.linalg.norm(u, axis=1, keepdims=True)
        probes = boundary + delta * np.sqrt(d) * u
        yield probes
        signs = np.where(victim.predict(probes) == c0, -1.0, 1.0)
        v = (signs[:, None] * u).mean(axis=0)
        step = boundary + np.linalg.norm(boundary - x0) / 8 * v / (np.linalg.norm(v) + 1e-12)
        sent, boundary = search(step if victim.predict(step[None])[0] != c0 else boundary)
        yield from sent
        total += 20 + len(sent)


async def rows_until_flagged(
    det: NearDuplicateDetector, batches: Iterator[Rows], client: str = "attacker"
) -> int | None:
    seen = 0
    for rows in batches:
        seen += len(rows)
        if (await det.inspect(Query(client, "p", rows, n_rows=len(rows)))).anomalous:
            return seen
    return None


def test_benign_clients_replaying_disjoint_natural_rows_are_not_flagged() -> None:
    held_out = digits()[0]
    rng = np.random.default_rng(1)
    det = detector()
    order = rng.permutation(len(held_out))
    # 23 clients of 50 rows, interleaved request by request, batches of 1 to 8 rows
    streams = {
        f"b{k}": list(np.array_split(held_out[order[k * 50 : (k + 1) * 50]], 12))
        for k in range(len(held_out) // 50)
    }

    async def run() -> dict[str, float]:
        lowest = dict.fromkeys(streams, 1.0)
        while any(streams.values()):
            for client, batches in streams.items():
                if batches:
                    rows = batches.pop(0)
                    result = await det.inspect(Query(client, "p", rows, n_rows=len(rows)))
                    lowest[client] = min(lowest[client], result.score)
        return lowest

    lowest = asyncio.run(run())
    assert len(lowest) == 23
    # at most one chance match per client (share 1/min_rows), far from the threshold
    assert min(lowest.values()) >= 0.9 > det.threshold


def test_clients_sharing_the_same_natural_rows_are_not_flagged() -> None:
    """Exact copies (a shared pool, a popular example, retries) are not near-duplicates."""
    pool = digits()[0][:60]
    rng = np.random.default_rng(2)
    det = detector()

    async def run() -> float:
        lowest = 1.0
        for _ in range(40):  # 200 clients, each replaying rows drawn from one small pool
            for c in range(200):
                rows = pool[rng.integers(0, len(pool), size=int(rng.integers(1, 4)))]
                result = await det.inspect(Query(f"b{c}", "p", rows, n_rows=len(rows)))
                lowest = min(lowest, result.score)
        return lowest

    assert asyncio.run(run()) >= det.threshold


def test_exact_repeats_do_not_hide_a_probe() -> None:
    """Interleaving exact repeats does not dilute a probing run below the threshold."""
    held_out = digits()[0]
    det = detector()
    x0 = held_out[0]
    rng = np.random.default_rng(3)

    def batches() -> Iterator[Rows]:
        for probe in hop_skip_jump(x0, rng, 200):
            yield np.vstack([probe, np.repeat(x0[None], len(probe), axis=0)])

    seen = asyncio.run(rows_until_flagged(det, batches()))
    assert seen is not None and seen <= 80


@pytest.mark.parametrize("delta", [0.05, 0.1, 0.2])
def test_hop_skip_jump_is_flagged_within_about_twenty_rows(delta: float) -> None:
    held_out = digits()[0]
    rng = np.random.default_rng(2)
    det = detector()

    async def run() -> list[int | None]:
        return [
            await rows_until_flagged(det, hop_skip_jump(held_out[i], rng, 300, delta), f"a{i}")
            for i in (3, 30, 300)
        ]

    found = asyncio.run(run())
    assert all(n is not None and n <= 20 for n in found), found


def test_the_attack_spread_round_robin_over_ten_keys_flags_every_key() -> None:
    held_out = digits()[0]
    rng = np.random.default_rng(3)
    det = detector()
    rows = np.vstack(list(hop_skip_jump(held_out[7], rng, 300)))

    async def run() -> dict[str, int]:
        first: dict[str, int] = {}
        for i, row in enumerate(rows):
            key = f"key{i % 10}"
            result = await det.inspect(Query(key, "p", row[None]))
            if result.anomalous:
                first.setdefault(key, i + 1)
        return first

    first = asyncio.run(run())
    assert len(first) == 10
    assert max(first.values()) <= 100  # every key flagged within the attack's first 100 rows


def test_a_thinly_spread_attack_is_caught_only_through_the_global_index() -> None:
    """40 near-duplicate rows, two per key: each key's own evidence is one match.

    Each key's second row matches its first, so its own evidence is 1/min_rows =
    0.1 (score 0.9, above the threshold of 0.85 used here). What flags it is that
    the same row also extends a run of near-duplicates sent by the other keys,
    which lengthens its own run of 1 to ``cross_gain`` (5) rows: 5/run_scale =
    0.25, score 0.75. The control sends the same shape of traffic with no link
    between keys (each key probes its own input) and must not be flagged.
    """
    held_out = digits()[0]
    rng = np.random.default_rng(4)

    def probes(x: Rows, n: int) -> Rows:
        return x + rng.normal(0.0, 0.05, size=(n, x.shape[0]))

    async def flagged(det: NearDuplicateDetector, rows: list[tuple[str, Rows]]) -> set[str]:
        keys = set()
        for key, row in rows:
            if (await det.inspect(Query(key, "p", row[None]))).anomalous:
                keys.add(key)
        return keys

    linked = probes(held_out[11], 40)
    sybil = [(f"key{i % 20}", linked[i]) for i in range(40)]
    control = [(f"key{k}", row) for k in range(20) for row in probes(held_out[100 + k], 2)]
    control = control[0::2] + control[1::2]  # same interleaving: first rows, then second rows

    assert asyncio.run(flagged(detector(threshold=0.85), sybil)) == {f"key{k}" for k in range(20)}
    assert asyncio.run(flagged(detector(threshold=0.85), control)) == set()
    # without the cross-client weight the same attack goes unseen
    alone = detector(threshold=0.85, cross_gain=1.0)
    assert asyncio.run(flagged(alone, sybil)) == set()


def test_same_salt_gives_same_fingerprints_and_another_salt_does_not() -> None:
    rows = digits()[0][:20]
    a = Fingerprinter(SALT, low=0.0, high=16.0, levels=8, window=5, size=50).fingerprints(rows)
    b = Fingerprinter(SALT, low=0.0, high=16.0, levels=8, window=5, size=50).fingerprints(rows)
    c = Fingerprinter(b"another salt 0123", low=0, high=16, levels=8, window=5, size=50)
    other = c.fingerprints(rows)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert all(len(np.intersect1d(x, y)) == 0 for x, y in zip(a, other, strict=True))
    assert all(len(x) <= 50 and np.all(np.diff(x.astype(np.float64)) > 0) for x in a)


def test_the_salt_is_not_kept_or_shown() -> None:
    det = detector()
    assert SALT.decode() not in repr(det)
    assert all(SALT not in repr(v).encode() for v in vars(det.fingerprinter).values())


def test_huge_and_odd_rows_do_not_break_hashing() -> None:
    det = detector()
    rows = np.array([[1e300] * 64, [-np.inf] * 64, [np.nan] * 64, [0.0] * 64, [5.5] * 64])

    async def run() -> None:
        await det.inspect(Query("c", "p", rows, n_rows=5))
        await det.inspect(Query("c", "p", np.zeros((1, 3))))  # narrower than the window
        await det.inspect(Query("c", "p", None, texts=("hello",)))

    asyncio.run(run())


def test_one_client_at_its_cap_cannot_flush_the_others_rows() -> None:
    held_out = digits()[0]
    rng = np.random.default_rng(5)
    victim_row = held_out[0][None]

    async def still_matched(per_client_cap: int) -> bool:
        det = detector(max_rows=500, max_rows_per_client=per_client_cap)
        await det.inspect(Query("honest", "p", victim_row))
        flood = rng.uniform(0, 16, size=(1500, 64))  # 3x the index, from one client
        for i in range(0, 1500, 50):
            await det.inspect(Query("flooder", "p", flood[i : i + 50], n_rows=50))
        state = det.clients.peek("flooder")
        assert state is not None and state.own_n <= per_client_cap
        # is the honest row still indexed? what a near-duplicate of it finds in the index
        index = det._index
        fp = det.fingerprinter.fingerprints(victim_row + 0.01)[0]
        found = index.match(index.probe(fp), det.match_fraction, digest=0, client="repeat")
        return found.run > 0 and found.cross

    assert asyncio.run(still_matched(100)) is True
    assert asyncio.run(still_matched(10_000)) is False  # without the cap FIFO evicts it


def test_ten_thousand_clients_keep_the_client_map_at_its_cap() -> None:
    det = detector(max_clients=1000, max_rows=5000)
    rng = np.random.default_rng(6)
    rows = rng.uniform(0, 16, size=(10_000, 64))

    async def run() -> None:
        for c in range(10_000):
            await det.inspect(Query(f"c{c}", "p", rows[c : c + 1]))

    asyncio.run(run())
    assert len(det.clients) == 1000
    assert det.clients.evictions == 9000
    assert det.index_nbytes < 1_200 * 5000  # fixed at construction: < 1.2 KB per indexed row


@pytest.mark.parametrize(
    "kwargs",
    [
        {"salt": b"short"},
        {"low": 1.0, "high": 1.0},
        {"window": 33},
        {"match_fraction": 0.0},
        {"threshold": 1.5},
        {"bucket_size": 6},
        {"max_rows": 1 << 21},
        {"recent_rows": 0},
    ],
)
def test_bad_parameters_are_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        detector(**kwargs)


# --------------------------------------------------------------------------- ordinary clients


def test_exact_repeats_carry_no_evidence_health_probe_and_retrier() -> None:
    """A probe sending one row forever and a client retrying each row 3x are never flagged."""
    held_out = digits()[0]
    det = detector(threshold=0.95)  # stricter than any calibration would set

    async def run() -> list[float]:
        scores = []
        for _ in range(200):
            scores.append((await det.inspect(Query("probe", "p", held_out[:1]))).score)
        for i in range(60):
            for _ in range(3):
                row = held_out[200 + i : 201 + i]
                scores.append((await det.inspect(Query("retrier", "p", row))).score)
        return scores

    assert min(asyncio.run(run())) == 1.0
    assert det.clients.peek("probe") is not None and det.clients.peek("probe").n == 1


def test_other_clients_rows_alone_never_convict_a_framed_client() -> None:
    """A throwaway key sends 20 noisy copies of a public row; the victim then sends it once."""
    held_out = digits()[0]
    rng = np.random.default_rng(9)
    public = held_out[42]
    det = detector(threshold=0.95)

    async def run() -> tuple[bool, list[bool]]:
        copies = public + rng.normal(0.0, 0.05, size=(20, public.shape[0]))
        framer = await det.inspect(Query("framer", "p", copies, n_rows=20))
        victim = [(await det.inspect(Query("victim", "p", public[None]))).anomalous]
        for i in range(30):  # and then an ordinary session
            row = held_out[300 + i : 301 + i]
            victim.append((await det.inspect(Query("victim", "p", row))).anomalous)
        return framer.anomalous, victim

    framer, victim = asyncio.run(run())
    assert framer  # the noisy copies are the framer's own near-duplicate run
    assert not any(victim)
