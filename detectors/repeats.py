"""Exact repeats of a client's recent rows: seen, and left out as evidence.

Ordinary traffic repeats itself: a health probe sends one row forever, a
client retries a row after a timeout, a dashboard re-checks the same inputs.
An exact repeat teaches an attacker nothing new (a degraded client gets the
same perturbed answer for the same row, so repeats cannot average the noise
away either), so it carries no probing or extraction evidence. Every stateful
detector asks :class:`RecentRows` which rows of a request are *fresh* and
learns from those alone; repeats do not move a client's score either way.

A client's memory is a ring of the digests of its last ``size`` distinct rows
(8 bytes each), so the check costs one vectorised comparison per row.

Examples
--------
>>> import numpy as np
>>> recent = RecentRows(size=4)
>>> rows = np.array([[1.0, 2.0], [1.0, 2.0], [3.0, 4.0]])
>>> recent.fresh(rows).tolist()
[True, False, True]
>>> recent.fresh(rows[:1]).tolist()
[False]
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

__all__ = ["RecentRows", "digest_keys", "row_digests"]


_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
# per-process secret keys: which rows share a digest is not the client's to know
_KEYS = np.random.default_rng().integers(0, 1 << 63, size=(2, 1 << 12), dtype=np.uint64)


def _mix(v: NDArray[np.uint64]) -> NDArray[np.uint64]:
    """SplitMix64's finaliser, in place: every input bit moves every output bit."""
    v ^= v >> np.uint64(30)
    v *= _M1
    v ^= v >> np.uint64(27)
    v *= _M2
    v ^= v >> np.uint64(31)
    return v


def digest_keys(seed: int) -> NDArray[np.uint64]:
    """Digest keys drawn from ``seed``: processes given the same secret seed agree on digests."""
    return np.random.default_rng([seed, 0x64]).integers(
        0, 1 << 63, size=_KEYS.shape, dtype=np.uint64
    )


def row_digests(
    rows: NDArray[np.float64], keys: NDArray[np.uint64] | None = None
) -> NDArray[np.int64]:
    """One keyed 64-bit digest per row of its exact float64 values (``-0.0`` equals ``0.0``).

    Each value's bits are keyed by its position and mixed, then the mixed
    words are summed: rows equal to the bit are equal, and two different rows
    share a digest with probability about ``2**-64`` whatever their values.
    Vectorised: a few numpy passes per request. ``keys`` (from
    :func:`digest_keys`) replace this process's own secret keys, so that
    several processes sharing the secret compare digests.
    """
    data = np.ascontiguousarray(rows, dtype=np.float64) + 0.0  # -0.0 -> 0.0
    width = data.shape[1]
    table = _KEYS if keys is None else keys
    keys = table[:, np.arange(width) % table.shape[1]]
    words = data.view(np.uint64) ^ keys[0]
    words += keys[1] * np.uint64(width)  # rows of other widths differ too
    with np.errstate(over="ignore"):
        mixed = _mix(words)
        return _mix(mixed.sum(axis=1, dtype=np.uint64)).view(np.int64)


class RecentRows:
    """The digests of one client's last ``size`` distinct rows."""

    __slots__ = ("_ring", "head", "n")

    def __init__(self, size: int = 64) -> None:
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size!r}")
        self._ring = np.zeros(size, dtype=np.int64)
        self.head = 0
        self.n = 0

    @property
    def nbytes(self) -> int:
        return int(self._ring.nbytes)

    def known(self, digests: NDArray[np.int64]) -> NDArray[np.bool_]:
        """Which digests are among the recent ones (remembering nothing)."""
        return np.isin(digests, self._ring[: self.n])

    def fresh_digests(self, digests: NDArray[np.int64]) -> NDArray[np.bool_]:
        """Which digests were not among the recent ones (remembering the fresh ones)."""
        ring = self._ring
        out = np.ones(digests.shape[0], dtype=bool)
        for i, d in enumerate(digests.tolist()):
            if (ring[: self.n] == d).any():
                out[i] = False
                continue
            ring[self.head] = d
            self.head = (self.head + 1) % ring.shape[0]
            self.n = min(self.n + 1, ring.shape[0])
        return out

    def fresh(self, rows: NDArray[np.float64]) -> NDArray[np.bool_]:
        """Which rows are not exact repeats of the client's recent rows (or of earlier ones)."""
        return self.fresh_digests(row_digests(rows))
