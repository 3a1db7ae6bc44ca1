"""Benign clients that look unusual: the traffic the guard must never punish.

Each builder returns timed :class:`~._traffic.Session` objects, one per API
key, over a victim's held-out rows (``Victim.benign``), seeded:

* :func:`probe`: a health probe, the same single row every 0.3 s (150 requests);
* :func:`retrier`: a client that sends every row 3 times in a row (60 rows);
* :func:`batch_job`: a few large requests (4 x 64 rows) walking the held-out set
  in order (round again from the start when it is shorter);
* :func:`one_class`: about 200 rows, all of which the model puts in one class
  (the most common one among the held-out rows), in small batches;
* :func:`what_if`: one base row, one feature at a time swept over its training
  range in 8 steps (a what-if tool: it *is* probing-shaped, and may be flagged);
* :func:`monitor`: a looping synthetic monitor / load test, the same example
  row with uniform noise of +-1 % of each feature's span, from 20 API keys;
* :func:`framing`: a throwaway key sends 20 noisy copies (+-1 %) of a victim
  client's public row in one request; then the victim sends that row once and
  then an ordinary session. Returns (the framer, the victim).

Issue 10's targets: the probe, retrier, batch job and one-class client are
never degraded or blocked; nor is the monitor once its keys are exempt; nor is
the framed victim.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from . import benign
from ._data import Victim
from ._traffic import Session

__all__ = [
    "HARD_CASES",
    "batch_job",
    "framing",
    "monitor",
    "one_class",
    "probe",
    "retrier",
    "what_if",
]

F64 = NDArray[np.float64]

#: the hard cases run beside the benign population, in report order
HARD_CASES = ("probe", "retrier", "batch_job", "one_class", "what_if")


def _times(n: int, gap: float, start: float = 0.0) -> tuple[float, ...]:
    return tuple(start + gap * (i + 1) for i in range(n))


def probe(v: Victim, *, key: str = "hard-probe", requests: int = 150, gap: float = 0.3) -> Session:
    """The same single held-out row every ``gap`` seconds."""
    row = v.benign[:1]
    return Session(key, "probe", _times(requests, gap), tuple(row for _ in range(requests)))


def retrier(
    v: Victim, *, key: str = "hard-retrier", rows: int = 60, repeats: int = 3, seed: int = 0
) -> Session:
    """Each of ``rows`` held-out rows sent ``repeats`` times in a row, one row per request.

    Retries come 0.2 s apart; a new row every 2 s.
    """
    rng = np.random.default_rng(seed)
    order = rng.permutation(v.benign.shape[0])
    idx = [order[i % order.shape[0]] for i in range(rows)]
    times: list[float] = []
    batches: list[F64] = []
    for i, r in enumerate(idx):
        for k in range(repeats):
            times.append(2.0 * (i + 1) + 0.2 * k)
            batches.append(v.benign[r : r + 1])
    return Session(key, "retrier", tuple(times), tuple(batches))


def batch_job(
    v: Victim, *, key: str = "hard-batch", requests: int = 4, size: int = 64, gap: float = 5.0
) -> Session:
    """``requests`` requests of ``size`` held-out rows each, in order, wrapping around."""
    n = v.benign.shape[0]
    batches = tuple(v.benign[np.arange(i * size, (i + 1) * size) % n] for i in range(requests))
    return Session(key, "batch_job", _times(requests, gap), batches)


def one_class(v: Victim, *, key: str = "hard-one-class", rows: int = 200, seed: int = 0) -> Session:
    """About ``rows`` held-out rows the model labels with its most common held-out class.

    Batches of 1 to 8 rows, about 2 requests a second; the class's rows in a fresh
    random order on every pass.
    """
    rng = np.random.default_rng(seed)
    labels = v.predict(v.benign)
    values, counts = np.unique(labels, return_counts=True)
    mine = np.flatnonzero(labels == values[int(np.argmax(counts))])
    order = np.concatenate([rng.permutation(mine) for _ in range(rows // mine.shape[0] + 1)])[:rows]
    batches: list[F64] = []
    at = 0
    while at < rows:
        n = min(int(rng.integers(1, 9)), rows - at)
        batches.append(v.benign[order[at : at + n]])
        at += n
    gaps = np.cumsum(rng.exponential(0.5, size=len(batches)))
    return Session(key, "one_class", tuple(float(t) for t in gaps), tuple(batches))


def what_if(
    v: Victim, *, key: str = "hard-what-if", steps: int = 8, max_rows: int = 200
) -> Session:
    """One base row; each varying feature in turn swept over ``[lo, hi]`` in ``steps`` values.

    One request per feature (``steps`` rows), a second apart; at most ``max_rows``
    rows (the features with the widest spread first when that cuts the sweep).
    """
    base = v.benign[1]
    features = np.flatnonzero(v.movable)
    keep = max(1, max_rows // steps)
    if features.shape[0] > keep:
        spread = np.std(v.normalize(v.X_train), axis=0)[features]
        features = np.sort(features[np.argsort(-spread, kind="stable")[:keep]])
    batches: list[F64] = []
    for j in features:
        rows = np.repeat(base[None], steps, axis=0)
        rows[:, j] = np.linspace(v.lo[j], v.hi[j], steps)
        batches.append(rows)
    return Session(key, "what_if", _times(len(batches), 1.0), tuple(batches))


def noisy(v: Victim, row: F64, n: int, rng: np.random.Generator, scale: float = 0.01) -> F64:
    """``n`` copies of ``row`` with uniform noise of +-``scale`` of each feature's span."""
    noise = rng.uniform(-scale, scale, size=(n, v.n_features)) * v.span * v.movable
    return np.asarray(row[None] + noise)


def monitor(
    v: Victim,
    *,
    keys: int = 20,
    requests: int = 10,
    gap: float = 2.0,
    seed: int = 0,
    prefix: str = "hard-monitor",
) -> list[Session]:
    """``keys`` monitor clients looping the same example row with +-1 % noise.

    Every key sends ``requests`` one-row requests ``gap`` seconds apart, the keys
    staggered over the gap, so the monitor as a whole sends a row every
    ``gap / keys`` seconds.
    """
    rng = np.random.default_rng(seed)
    row = v.benign[2]
    out: list[Session] = []
    for k in range(keys):
        offset = gap * k / keys
        batches = tuple(noisy(v, row, 1, rng) for _ in range(requests))
        out.append(Session(f"{prefix}-{k:02d}", "monitor", _times(requests, gap, offset), batches))
    return out


def framing(v: Victim, *, copies: int = 20, seed: int = 0) -> tuple[Session, Session]:
    """(the framer, the victim): noisy copies of the victim's row, then the victim's session.

    The framer sends its ``copies`` rows in one request at t = 1 s; the victim sends
    its public row alone at t = 5 s, then an ordinary benign session of about 20
    requests from t = 6 s.
    """
    rng = np.random.default_rng(seed)
    row = v.benign[3]
    framer = Session("hard-framer", "framer", (1.0,), (noisy(v, row, copies, rng),))
    p = benign.plan(
        1, seed=seed + 77, pool_size=v.benign.shape[0], min_requests=20, max_requests=20
    )[0]
    rest = benign.session(p, v.benign)
    times = (5.0, *(6.0 + t for t in rest.times))
    victim = Session("hard-framed", "framed", times, (row[None], *rest.batches))
    return framer, victim
