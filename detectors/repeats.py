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

from collections import OrderedDict
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray

if TYPE_CHECKING:
    from inference_guard.detectors.base import Query

__all__ = ["RecentRows", "digest_keys", "query_digests", "row_bytes", "row_digests"]


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


#: per-width constants of :func:`row_digests`, per key table: (table, position keys,
#: width keys); a model has one width, so a few entries
_Layout = tuple[NDArray[np.uint64], NDArray[np.uint64], NDArray[np.uint64]]
_LAYOUTS: dict[tuple[int, int], _Layout] = {}
_MAX_LAYOUTS = 16
_MASK64 = (1 << 64) - 1


def _layout(table: NDArray[np.uint64], width: int) -> tuple[NDArray[np.uint64], NDArray[np.uint64]]:
    """The keys of each position of a ``width``-wide row, and the width's own keys."""
    key = (id(table), width)
    layout = _LAYOUTS.get(key)
    if layout is None or layout[0] is not table:
        keys = table[:, np.arange(width) % table.shape[1]]
        with np.errstate(over="ignore"):
            layout = (table, np.ascontiguousarray(keys[0]), keys[1] * np.uint64(width))
        if len(_LAYOUTS) >= _MAX_LAYOUTS:
            _LAYOUTS.clear()
        _LAYOUTS[key] = layout
    return layout[1], layout[2]


def _mix_int(v: int) -> int:
    """:func:`_mix` of one 64-bit word, in Python ints (a single row's digest)."""
    v ^= v >> 30
    v = (v * 0xBF58476D1CE4E5B9) & _MASK64
    v ^= v >> 27
    v = (v * 0x94D049BB133111EB) & _MASK64
    return v ^ (v >> 31)


def row_digests(
    rows: NDArray[np.float64], keys: NDArray[np.uint64] | None = None
) -> NDArray[np.int64]:
    """One keyed 64-bit digest per row of its exact float64 values (``-0.0`` equals ``0.0``).

    Each value's bits are keyed by its position and mixed, then the mixed
    words are summed: rows equal to the bit are equal, and two different rows
    share a digest with probability about ``2**-64`` whatever their values.
    Vectorised: a few numpy passes per request (unsigned integer arithmetic
    wraps silently, so no error state is switched). ``keys`` (from
    :func:`digest_keys`) replace this process's own secret keys, so that
    several processes sharing the secret compare digests.
    """
    data = np.add(rows, 0.0, dtype=np.float64)  # a fresh C-ordered copy; -0.0 -> 0.0
    width = data.shape[1]
    position, of_width = _layout(_KEYS if keys is None else keys, width)
    words = data.view(np.uint64)
    words ^= position
    words += of_width  # rows of other widths differ too
    summed = _mix(words).sum(axis=1, dtype=np.uint64)
    if summed.shape[0] == 1:  # one row: the last mix in Python ints is cheaper
        v = _mix_int(int(summed[0]))
        return np.array([v - (1 << 64) if v >> 63 else v], dtype=np.int64)
    return _mix(summed).view(np.int64)


def query_digests(
    query: Query, rows: NDArray[np.float64], keys: NDArray[np.uint64] | None = None
) -> NDArray[np.int64]:
    """:func:`row_digests` of ``rows`` (``query.rows``), computed once per request and key.

    Every detector that leaves exact repeats out asks for the same digests of
    the same request: the first computes them, the others read them from the
    query's memo (keyed by the key table, so detectors under different keys
    never share). Treat the result as read-only.
    """
    memo = query.memo
    table = _KEYS if keys is None else keys
    key = ("digests", id(table))
    found = memo.get(key)
    if found is not None and found[0] is rows:
        digests: NDArray[np.int64] = found[1]
        return digests
    if (
        rows.ndim == 2
        and rows.shape[0] == 1
        and rows.dtype == np.float64
        and rows.shape[1] * 8 <= _ONE_ROW_MAX_BYTES
    ):
        digests = _one_row_digest(table, row_bytes(query, rows), rows)
    else:
        digests = row_digests(rows, keys)
    memo[key] = (rows, digests)
    return digests


def row_bytes(query: Query, rows: NDArray[np.float64]) -> bytes:
    """The request's rows as bytes (the key of a row's cached results), once per request."""
    memo = query.memo
    found = memo.get("bytes")
    if found is not None and found[0] is rows:
        raw: bytes = found[1]
        return raw
    raw = rows.tobytes()
    memo["bytes"] = (rows, raw)
    return raw


#: the digests of the last single float64 rows, by key table and exact bytes: a
#: repeated row (a health probe, a retry, a popular input) is digested once. Each
#: entry holds its table, so a table's ``id`` cannot be reused while it is here
_ONE_ROW: OrderedDict[tuple[int, bytes], tuple[NDArray[np.uint64], NDArray[np.int64]]] = (
    OrderedDict()
)
#: entries of :data:`_ONE_ROW`
_ONE_ROW_MAX = 1024
#: the widest row remembered, in bytes (1 024 float64 features): at most 8 MiB of keys
#: whatever rows clients send (wider rows are digested every time)
_ONE_ROW_MAX_BYTES = 8192


def _one_row_digest(
    table: NDArray[np.uint64], raw: bytes, rows: NDArray[np.float64]
) -> NDArray[np.int64]:
    """:func:`row_digests` of one float64 row whose bytes are ``raw``, memoised.

    The bytes of a float64 row fix its width and every value (``-0.0`` and
    ``0.0`` differ in bytes and share a digest, so both keys are right). The
    result is shared between requests: treat it as read-only.
    """
    key = (id(table), raw)
    found = _ONE_ROW.get(key)
    if found is not None and found[0] is table:
        try:  # noqa: SIM105 - cheaper than contextlib.suppress on the hot path
            _ONE_ROW.move_to_end(key)
        except KeyError:  # evicted meanwhile by a guard running in another thread
            pass
        return found[1]
    digests = row_digests(rows, table)
    digests.flags.writeable = False
    _ONE_ROW[key] = (table, digests)
    if len(_ONE_ROW) > _ONE_ROW_MAX:
        _ONE_ROW.popitem(last=False)
    return digests


class RecentRows:
    """The digests of one client's last ``size`` distinct rows."""

    __slots__ = ("_ring", "head", "last", "n")

    def __init__(self, size: int = 64) -> None:
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size!r}")
        self._ring = np.zeros(size, dtype=np.int64)
        self.head = 0
        self.n = 0
        #: the digest remembered last (``None``: none yet): the usual repeat (a probe,
        #: a retry) repeats the client's latest row, and is known without the ring
        self.last: int | None = None

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
            self.last = d
        return out

    def fresh(self, rows: NDArray[np.float64]) -> NDArray[np.bool_]:
        """Which rows are not exact repeats of the client's recent rows (or of earlier ones)."""
        return self.fresh_digests(row_digests(rows))

    def fresh_one(self, digest: int) -> bool:
        """:meth:`fresh_digests` of a single digest, as a bool (a single-row request)."""
        if digest == self.last:
            return False
        n = self.n
        ring = self._ring
        if n and (ring[:n] == digest).any():
            return False
        ring[self.head] = digest
        self.head = (self.head + 1) % ring.shape[0]
        self.n = min(n + 1, ring.shape[0])
        self.last = digest
        return True
