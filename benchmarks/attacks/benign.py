"""Benign clients: natural held-out rows replayed at varied rates and batch sizes.

Each client has its own API key and a seeded plan:

* a few to a few dozen requests (log-uniform, 3 to 40);
* a batching habit: *interactive* (1 or 2 rows per request), *small batches*
  (1 to 8) or *bulk* (8 to 32), re-drawn per request within the habit;
* a request rate (log-uniform, 1 to 40 requests per second) with exponential
  gaps between requests;
* rows: natural held-out rows the model was never trained on, in a
  client-specific random order, and 10 % of the time a row it sent recently
  (a retry or a re-check): some repetition, as real traffic has;
* a start time, uniform over the first ``start_window`` seconds, so that the
  population's sessions overlap.

The held-out sets are small (54 to 540 rows), so over hundreds of clients the
*same* rows recur across clients many times. :func:`session` turns a plan into
a timed :class:`~._traffic.Session`; ``_traffic.run_sessions`` interleaves the
population's requests in time order, as real traffic does (:func:`run_population`
runs the plans concurrently against a URL instead, for ``guard simulate``).
:func:`sent_rows` and :func:`received` read back, from a client's request log,
which rows it sent and what it was told about them: what it could learn.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from ._data import digits
from ._http import Oracle, Refused
from ._traffic import Session

__all__ = [
    "BenignPlan",
    "plan",
    "received",
    "run_client",
    "run_population",
    "sent_rows",
    "session",
]

_HABITS = ((1, 2), (1, 8), (8, 32))
_HABIT_P = (0.4, 0.35, 0.25)


@dataclass(frozen=True, slots=True)
class BenignPlan:
    """What one benign client will send."""

    key: str
    #: rows per request
    batches: tuple[int, ...]
    #: seconds to wait before each request
    gaps: tuple[float, ...]
    #: indices into the benign pool, ``sum(batches)`` of them, in sending order
    rows: tuple[int, ...]
    #: seconds after the population's start when the first gap begins
    start: float = 0.0

    @property
    def n_rows(self) -> int:
        return len(self.rows)


def plan(
    n_clients: int,
    *,
    seed: int = 0,
    key_prefix: str = "benign",
    min_requests: int = 3,
    max_requests: int = 40,
    rate: tuple[float, float] = (1.0, 40.0),
    pool_size: int | None = None,
    repeat_p: float = 0.1,
    start_window: float = 0.0,
) -> list[BenignPlan]:
    """Seeded plans for ``n_clients`` benign clients (see the module docstring)."""
    rng = np.random.default_rng(seed)
    size = digits().benign.shape[0] if pool_size is None else pool_size
    plans: list[BenignPlan] = []
    for c in range(n_clients):
        n_req = int(np.exp(rng.uniform(np.log(min_requests), np.log(max_requests + 1))))
        lo, hi = _HABITS[int(rng.choice(len(_HABITS), p=_HABIT_P))]
        batches = tuple(int(b) for b in rng.integers(lo, hi + 1, size=n_req))
        per_s = float(np.exp(rng.uniform(np.log(rate[0]), np.log(rate[1]))))
        gaps = tuple(float(g) for g in rng.exponential(1.0 / per_s, size=n_req))
        order = rng.permutation(size)
        rows: list[int] = []
        fresh = 0
        for _ in range(sum(batches)):
            if rows and rng.random() < repeat_p:
                rows.append(rows[-int(rng.integers(1, min(len(rows), 20) + 1))])
            else:
                rows.append(int(order[fresh % size]))
                fresh += 1
        start = float(rng.uniform(0.0, start_window)) if start_window > 0 else 0.0
        plans.append(BenignPlan(f"{key_prefix}-{seed}-{c:04d}", batches, gaps, tuple(rows), start))
    return plans


def session(p: BenignPlan, pool: NDArray[np.float64], kind: str = "benign") -> Session:
    """The plan as a timed session over the rows of ``pool`` (its benign rows)."""
    times = p.start + np.cumsum(p.gaps)
    batches: list[NDArray[np.float64]] = []
    at = 0
    for n in p.batches:
        batches.append(pool[list(p.rows[at : at + n])])
        at += n
    return Session(p.key, kind, tuple(float(t) for t in times), tuple(batches))


def run_client(
    url: str, p: BenignPlan, *, pool: NDArray[np.float64] | None = None, time_scale: float = 1.0
) -> Oracle:
    """Send one client's plan; returns its oracle (the request log). Stops if refused."""
    pool = digits().benign if pool is None else pool
    oracle = Oracle(url, [p.key], reference=digits().predict_proba)
    at = 0
    try:
        for batch, gap in zip(p.batches, p.gaps, strict=True):
            if gap * time_scale > 0:
                time.sleep(gap * time_scale)
            oracle.query(pool[list(p.rows[at : at + batch])])
            at += batch
    except Refused:
        pass
    finally:
        oracle.close()
    return oracle


def run_population(
    url: str, plans: list[BenignPlan], *, workers: int = 48, time_scale: float = 1.0
) -> list[Oracle]:
    """Run every plan concurrently (``workers`` clients at a time); oracles in plan order."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(run_client, url, p, time_scale=time_scale) for p in plans]
        return [f.result() for f in futures]


def sent_rows(p: BenignPlan, oracle: Oracle) -> tuple[int, ...]:
    """Indices (into the benign pool) of the rows the client sent, refused requests included."""
    return p.rows[: oracle.rows]


def received(p: BenignPlan, oracle: Oracle) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """The rows the client got answers for (pool indices) and the labels it was given.

    Reads ``oracle.log`` against the plan: :func:`run_client` sends one request per
    batch, in order, and stops at the first refusal.
    """
    idx: list[int] = []
    labels: list[int] = []
    at = 0
    for sent in oracle.log:
        if at + sent.rows > p.n_rows:
            raise ValueError(f"the log sends more rows than the plan's {p.n_rows}: another client")
        if sent.status == 200:
            if len(sent.labels) != sent.rows:
                raise ValueError(
                    f"request {sent.request_id!r}: {sent.rows} rows, labels for {len(sent.labels)}"
                )
            idx.extend(p.rows[at : at + sent.rows])
            labels.extend(sent.labels)
        at += sent.rows
    return np.asarray(idx, dtype=np.int64), np.asarray(labels, dtype=np.int64)
