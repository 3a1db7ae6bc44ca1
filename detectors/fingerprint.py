"""Near-duplicate query detection with salted fingerprints (Blacklight-style).

After Li et al., *Blacklight: Scalable Defense for Neural Networks against
Query-Based Black-Box Attacks* (USENIX Security 2022), and the stateful
detection of Chen, Carlini and Wagner (2019); our own implementation.
Query-based evasion attacks (HopSkipJump, Boundary, Square, SimBA) send long
runs of near-identical rows around one input. Each row is

1. shifted by a secret per-feature offset derived from the deployment's salt,
   and quantized with a step of ``(high - low) / levels``, so that tiny
   perturbations land in the same bins while the bin edges stay unknown to
   the attacker;
2. cut into every sliding window of ``window`` consecutive quantized values,
   each hashed with a polynomial hash whose coefficients are also derived from
   the salt (vectorised numpy, no per-window Python);
3. summarised by its top-``fingerprint_size`` distinct hash values: its fingerprint.

Two rows are near-duplicates when they share at least ``match_fraction`` of
the larger of their two fingerprints. An inverted index maps each hash to the
earlier rows that had it, so a lookup costs ``O(fingerprint_size)`` whatever
the history. The index is **global**: a row is matched against every
client's earlier rows, so an attacker who spreads one attack over many API
keys is still seen. Matches are chained into *runs*: a row that matches an
earlier row extends that row's run by one; runs are kept twice, over
everyone's rows and over the client's own.

What counts as evidence, so that ordinary clients are never punished:

* **Exact repeats count for nothing.** A row identical to one of the client's
  recent rows, or to any indexed row, is neither indexed nor counted (health
  probes, retries, public examples).
* **A client is convicted by its own rows.** Its evidence is
  ``max(own share, longest run / run_scale)``: the share of its recent rows
  that are near-duplicates of its own earlier rows (over at least
  ``min_rows``), and the longest run such a row extends. Other clients'
  near-duplicates of the *same* row add weight, which is what catches an
  attack spread thinly over many keys: they lengthen that row's own run to at
  most ``cross_gain`` times. A row that matches only other clients' rows is no
  evidence, so a client scores 1 whatever others sent (noisy copies of a
  victim's inputs sent under a throwaway key frame nobody).

The score is ``1 - evidence`` (higher is more normal). The features' ranges
and the threshold come from calibration on the deployment's own reference
data (:class:`detectors.profile.TrafficProfile`, ``guard calibrate``).
"""

from __future__ import annotations

import asyncio
import hashlib
import math
from collections import OrderedDict
from collections.abc import Coroutine
from typing import Any, ClassVar, NamedTuple, TypeVar

import numpy as np
from numpy.typing import ArrayLike, NDArray

from inference_guard.detectors.base import Detector, DetectorResult, Query
from inference_guard.detectors.client_map import ClientMap
from inference_guard.detectors.profile import feature_ranges
from inference_guard.detectors.repeats import RecentRows, digest_keys, query_digests
from inference_guard.detectors.shared_evidence import SharedLog
from inference_guard.detectors.shared_standing import SharedStanding
from inference_guard.detectors.store import KeyValueStore

__all__ = ["Fingerprinter", "NearDuplicateDetector"]

_U64 = NDArray[np.uint64]
_A = TypeVar("_A")
_B = TypeVar("_B")
# index entries: tag (high 32 bits of the hash) | slot | generation of the slot's row
_SLOT_BITS = 20
_GEN_BITS = 12
_TAG_SHIFT = np.uint64(32)
_TAG_MASK = np.uint64(0xFFFFFFFF00000000)
_SLOT_MASK = np.uint64((1 << _SLOT_BITS) - 1)
_GEN_MASK = np.uint64((1 << _GEN_BITS) - 1)
# generations cycle through 0..4094; 4095 marks an empty entry (slot 0), never live
_GEN_CYCLE = (1 << _GEN_BITS) - 1
_EMPTY = np.uint64(0xFFFFFFFF00000000 | _GEN_CYCLE)
# a slot's generation before its first row: no 12-bit value, and (x + 1) % cycle == 0
_NO_GEN = _GEN_CYCLE * 257 - 1
# window hashes are exact integers in float64 arithmetic: |q| <= 2**20, coefficients < 2**27,
# at most 32 terms, so every sum stays below 2**53
_Q_LIMIT = float(1 << 20)
_COEF_LIMIT = 1 << 27
_MAX_WINDOW = 32
_MAX_WIDTHS = 4  # per-width offsets kept for this many row widths (a model has one)
_RECENT_DIGESTS = 64  # a client's last distinct rows remembered to spot exact repeats
_OWN_ROWS = 32  # a client's last indexed rows compared with each new row of its own
# positions of the scratch table that tells which hashes of earlier rows a new row shares
_TABLE_MASK = (1 << 12) - 1


def _spread(h: _U64) -> _U64:
    """Spread the bits of a < 2**53 value over the word (in place): tag and bucket both vary."""
    h *= np.uint64(0x9E3779B97F4A7C15)  # odd: a bijection mod 2**64, low bits move up
    h ^= h >> np.uint64(29)  # and high bits come back down
    return h


class Fingerprinter:
    """Salted quantize-and-hash fingerprints of rows.

    Parameters
    ----------
    salt : bytes
        The deployment's secret; every derived constant depends on it.
        It is not kept (only a keyed digest of it is).
    low, high : float or array of float
        The features' usual range, one pair for all features or one per feature
        (see :func:`detectors.profile.robust_range`); ``(high - low) / levels`` is
        the quantization step.
    levels : int
        Quantization bins across the range.
    window : int
        Consecutive quantized values hashed together (at most 32).
    size : int
        Hashes kept per fingerprint (the largest ``size`` distinct ones).

    Notes
    -----
    A window's hash is ``sum(c_j * q_j)`` with secret integer coefficients
    ``c_j``, computed exactly in float64 by one matrix product over a gather
    of all windows, then xored with a secret word and bit-spread. Different
    windows collide with probability about ``2**-27``; a near-duplicate match
    needs half a fingerprint, so chance collisions do not make one.

    Examples
    --------
    >>> import numpy as np
    >>> fp = Fingerprinter(b"secret salt 0123", low=0.0, high=16.0, levels=8, window=5, size=50)
    >>> x = np.random.default_rng(0).uniform(0, 16, size=(1, 64))
    >>> a, b = fp.fingerprints(np.vstack([x, x + 0.01]))
    >>> len(np.intersect1d(a, b)) >= len(a) // 2
    True
    """

    def __init__(
        self,
        salt: bytes,
        *,
        low: float | ArrayLike,
        high: float | ArrayLike,
        levels: int,
        window: int,
        size: int,
    ) -> None:
        if not isinstance(salt, bytes) or len(salt) < 8:
            raise ValueError("salt must be at least 8 bytes")
        lo, hi = feature_ranges(low, high)
        for pname, value in (("levels", levels), ("window", window), ("size", size)):
            if value < 1:
                raise ValueError(f"{pname} must be >= 1, got {value!r}")
        if window > _MAX_WINDOW:
            raise ValueError(f"window must be <= {_MAX_WINDOW}, got {window!r}")
        #: per-feature quantisation: ``q = (x - low) * inv_step`` (one value: every feature)
        self.low = lo
        self.inv_step = levels / (hi - lo)
        self.window = window
        self.size = size
        key = hashlib.blake2b(salt, digest_size=32, person=b"ig-fingerprint").digest()
        self._key = int.from_bytes(key, "little")
        rng = np.random.default_rng([self._key, 0])
        self._coef = rng.integers(1, _COEF_LIMIT, size=window).astype(np.float64)
        # xored in before spreading: no hash value (not even an all-zero window's) is public
        self._mask = np.uint64(int(rng.integers(0, 1 << 63)) << 1 | 1)
        self._layouts: OrderedDict[
            int, tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.intp]]
        ] = OrderedDict()

    def digest_keys(self) -> NDArray[np.uint64]:
        """Keys for :func:`~detectors.repeats.row_digests` drawn from the salt (secret too)."""
        return digest_keys(self._key)

    def _layout(
        self, width: int
    ) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.intp]]:
        """Per row width: the quantization scale and bias, and every window's feature indices."""
        layout = self._layouts.get(width)
        if layout is None:
            # a secret offset in [0, 1) bins per feature: bin edges unknown to the client
            offset = np.random.default_rng([self._key, 1, width]).random(width)
            w = min(self.window, width)
            windows = np.arange(width - w + 1)[:, None] + np.arange(w)[None, :]
            if self.low.shape[0] == width:
                low, inv = self.low, self.inv_step
            else:
                # calibrated for another width (or one range for all): one median step
                low = np.full(width, float(np.median(self.low)))
                inv = np.full(width, float(np.median(self.inv_step)))
            layout = (inv, offset - low * inv, windows)
            self._layouts[width] = layout
            if len(self._layouts) > _MAX_WIDTHS:
                self._layouts.popitem(last=False)
        return layout

    def hashes(self, rows: NDArray[np.float64]) -> _U64:
        """``(n_rows, n_windows)`` salted hashes of every sliding window."""
        inv, bias, windows = self._layout(rows.shape[1])
        q = rows * inv
        q += bias
        # clip to +-2**20; fmax also maps NaN (refused by the guard anyway) to the low end
        np.fmax(q, -_Q_LIMIT, out=q)
        np.fmin(q, _Q_LIMIT, out=q)
        np.floor(q, out=q)
        coef = self._coef[: windows.shape[1]]
        # one row: the windows' sums as one correlation (exact: integers below 2**53)
        h = np.correlate(q[0], coef)[None, :] if q.shape[0] == 1 else q[:, windows] @ coef
        return _spread(h.astype(np.int64).view(np.uint64) ^ self._mask)

    def fingerprints(self, rows: NDArray[np.float64]) -> list[_U64]:
        """One fingerprint per row: its largest ``size`` distinct window hashes, ascending."""
        h = self.hashes(rows)
        h.sort(axis=1)
        keep = np.empty(h.shape, dtype=bool)
        keep[:, 0] = True
        np.not_equal(h[:, 1:], h[:, :-1], out=keep[:, 1:])
        size = self.size
        if h.shape[0] == 1:
            return [h[0][keep[0]][-size:]]
        return [row[k][-size:] for row, k in zip(h, keep, strict=True)]


class _Probe(NamedTuple):
    """A fingerprint's view of the index: its buckets, tags, and what they hold."""

    #: bucket of each hash
    buckets: NDArray[np.intp]
    #: each hash's tag, in the entry's high 32 bits
    tags: _U64
    #: ``(n_hashes, bucket_size)`` current entries of those buckets
    entries: _U64
    #: which of them still point at an indexed row
    live: NDArray[np.bool_]
    #: the slot each entry points at
    slots: NDArray[np.intp]


class _Match(NamedTuple):
    """What the global index knows of a new row."""

    #: the longest near-duplicate run (any client's rows) the row extends; 0: none
    run: int
    #: a near-duplicate belongs to another client
    cross: bool
    #: an exact copy is indexed: the row is a repeat and carries no evidence
    repeat: bool


_NO_MATCH = _Match(0, False, False)
_REPEAT = _Match(0, False, True)


class _Index:
    """Global inverted index: hash -> recent rows, in fixed memory.

    Rows live in ``max_rows`` slots; a new row takes the next slot in FIFO
    order (or, for a client at its cap, its own oldest slot). The index is a
    table of ``n_buckets x bucket_size`` 64-bit entries: a hash goes to bucket
    ``h mod n_buckets`` as ``tag (32 bits) | slot (20 bits) | generation (12
    bits)``, the tag being the hash's high 32 bits. An entry is live while its
    slot still holds the row of that generation, so evicting a row drops its
    entries at once without touching the table, and new entries take dead
    positions first. (A stale entry whose slot is back at the same generation,
    one chance in 4095, adds one shared hash to an unrelated row; a match
    needs ``match_fraction`` of a fingerprint.) A very common hash keeps only
    its ``bucket_size`` most recent rows, which bounds a lookup's cost.
    """

    MAX_ROWS: ClassVar[int] = 1 << _SLOT_BITS

    def __init__(self, max_rows: int, size: int, bucket_size: int) -> None:
        if max_rows > self.MAX_ROWS:
            raise ValueError(f"max_rows must be <= {self.MAX_ROWS}, got {max_rows!r}")
        if bucket_size & (bucket_size - 1):
            raise ValueError(f"bucket_size must be a power of two, got {bucket_size!r}")
        self.max_rows = max_rows
        self.size = size
        n_buckets = 1 << max(4, math.ceil(math.log2(2 * max_rows * size / bucket_size)))
        self.bucket_mask = np.uint64(n_buckets - 1)
        self.pos_mask = np.uint8(bucket_size - 1)
        self.entries = np.full((n_buckets, bucket_size), _EMPTY, dtype=np.uint64)
        self.cursor = np.zeros(n_buckets, dtype=np.uint8)
        # generations compared with entries' low bits without a cast; the initial value is
        # no generation (above 12 bits) and the first one drawn from it is 0
        self.slot_gen = np.full(max_rows, _NO_GEN, dtype=np.uint64)
        self.slot_size = np.zeros(max_rows, dtype=np.int64)
        self.slot_run = np.zeros(max_rows, dtype=np.int64)
        #: each slot's fingerprint (the hashes' high 32 bits, ascending, left-aligned)
        self.slot_fp = np.zeros((max_rows, size), dtype=np.uint32)
        #: the run among its owner's own rows that each slot's row extended
        self.slot_own_run = np.zeros(max_rows, dtype=np.int32)
        self.slot_owner: list[str | None] = [None] * max_rows
        #: digest of each indexed row's exact bytes: exact copies are not near-duplicates
        self.slot_digest = np.zeros(max_rows, dtype=np.int64)
        self.next_slot = 0
        self.generation = 0
        # scratch membership table of :meth:`_in`: a fingerprint's tags by their low bits;
        # an empty position holds a value whose low bits differ from the position's
        self._empty = np.arange(_TABLE_MASK + 1, dtype=np.uint32) ^ np.uint32(1)
        self._table = self._empty.copy()
        #: per fingerprint length: which of the ``size`` positions it fills
        self._valid = np.arange(size)[None, :] < np.arange(size + 1)[:, None]

    @property
    def nbytes(self) -> int:
        """Bytes held by the index (the owner list counted at 8 bytes per slot)."""
        arrays = (
            self.entries,
            self.cursor,
            self.slot_gen,
            self.slot_size,
            self.slot_run,
            self.slot_digest,
            self.slot_fp,
            self.slot_own_run,
        )
        return sum(a.nbytes for a in arrays) + 8 * self.max_rows

    def probe(self, fp: _U64) -> _Probe:
        """Where a fingerprint's hashes go, and what those buckets hold now."""
        buckets = (fp & self.bucket_mask).astype(np.intp)
        entries = self.entries[buckets]
        slots = ((entries >> _GEN_BITS) & _SLOT_MASK).astype(np.intp)
        live = self.slot_gen[slots] == (entries & _GEN_MASK)
        return _Probe(buckets, fp & _TAG_MASK, entries, live, slots)

    def match(self, probe: _Probe, fraction: float, digest: int, client: str) -> _Match:
        """The longest run among an indexed row's near-duplicates, and whose rows they are.

        A near-duplicate is an indexed row sharing at least ``fraction`` of the
        larger of the two fingerprints. An exact copy of the row (same
        ``digest``) makes it a repeat, which carries no evidence: a repeated
        input, a retry or a popular public example teaches an attacker nothing
        new. Probing attacks send *perturbed* rows, which still match.
        """
        hit = (probe.entries & _TAG_MASK) == probe.tags[:, None]
        hit &= probe.live
        n = probe.buckets.shape[0]
        need = math.ceil(fraction * n)  # shared hashes any match needs, at the least
        found = probe.slots[hit]
        m = found.shape[0]
        if m < need:
            return _NO_MATCH
        slots = np.sort(found)
        # a slot needs ``need`` hits: it then fills ``need`` consecutive sorted positions
        long = slots[need - 1 :][slots[need - 1 :] == slots[: m - need + 1]]
        if long.shape[0] == 0:  # the common, cheap case: no slot has enough
            return _NO_MATCH
        slot_size, slot_digest, slot_run, owners = (
            self.slot_size,
            self.slot_digest,
            self.slot_run,
            self.slot_owner,
        )
        run = 0
        cross = matched = False
        for slot in np.unique(long).tolist() if long.shape[0] > 1 else (int(long[0]),):
            # the larger of the two fingerprints decides how many hits make a match
            hits = int(np.count_nonzero(slots == slot))
            if hits < math.ceil(fraction * max(int(slot_size[slot]), n)):
                continue
            if int(slot_digest[slot]) == digest:
                return _REPEAT
            matched = True
            run = max(run, int(slot_run[slot]))
            cross = cross or owners[slot] != client
        if not matched:
            return _NO_MATCH
        return _Match(run=run, cross=cross, repeat=False)

    def new_slot(self) -> int:
        slot = self.next_slot
        self.next_slot = (slot + 1) % self.max_rows
        return slot

    def own_run(
        self, tags: NDArray[np.uint32], slots: NDArray[np.intp], fraction: float, digest: int
    ) -> int:
        """The longest own run among ``slots`` (the client's recent rows) that ``tags`` extends.

        ``tags`` are the new row's hashes' high 32 bits, ascending (as the index
        keeps fingerprints). The same test as :meth:`match` (``fraction`` of the
        larger fingerprint, on the hashes' high 32 bits, as the index's tags),
        against the client's own rows directly: however many other clients'
        rows came in between, they are found. ``-1``: an exact copy (a repeat).
        """
        if slots.shape[0] == 0:
            return 0
        n = tags.shape[0]
        sizes = self.slot_size[slots]
        hit = self._in(tags, self.slot_fp[slots])
        if int(sizes.min()) < self.size:  # short fingerprints: their padding is not theirs
            hit &= self._valid[sizes]
        shared = hit.sum(axis=1)
        near = shared >= np.ceil(fraction * np.maximum(sizes, n))
        if not near.any():
            return 0
        near_slots = slots[near]
        if (self.slot_digest[near_slots] == digest).any():
            return -1
        return int(self.slot_own_run[near_slots].max())

    def _in(self, tags: NDArray[np.uint32], held: NDArray[np.uint32]) -> NDArray[np.bool_]:
        """Which of ``held`` are among ``tags`` (ascending): ``held``'s shape, booleans.

        One lookup in a scratch table addressed by a hash's low bits, when no
        two of ``tags`` share a position there (the usual case); else a binary
        search. An empty position holds a value whose low bits are not its
        own, so nothing matches it.
        """
        table = self._table
        at = (tags & _TABLE_MASK).astype(np.intp)
        table[at] = tags
        found: NDArray[np.bool_]
        try:
            if bool((table[at] == tags).all()):
                found = table[(held & _TABLE_MASK).astype(np.intp)] == held
                return found
        finally:
            table[at] = self._empty[at]
        pos = np.minimum(np.searchsorted(tags, held), tags.shape[0] - 1)
        found = tags[pos] == held
        return found

    def insert(
        self,
        probe: _Probe,
        tags: NDArray[np.uint32],
        slot: int,
        owner: str,
        found: _Match,
        own_run: int,
        digest: int,
    ) -> int:
        """Store a fingerprint in ``slot`` (evicting what was there); its generation.

        ``tags`` are its hashes' high 32 bits. In each bucket the entry goes to
        a dead position (empty, or a row since evicted) when there is one, else
        over the oldest: live entries are only lost when a bucket holds
        ``bucket_size`` live rows, so a client that recycles its own slots does
        not churn other clients' entries out.
        """
        gen = (int(self.slot_gen[slot]) + 1) % _GEN_CYCLE
        self.slot_gen[slot] = gen
        n = tags.shape[0]
        self.slot_size[slot] = n
        self.slot_run[slot] = max(found.run, own_run) + 1
        self.slot_own_run[slot] = own_run + 1
        self.slot_fp[slot, :n] = tags
        self.slot_owner[slot] = owner
        self.slot_digest[slot] = digest
        buckets = probe.buckets
        live = probe.live
        full = live.all(axis=1)
        if full.any():
            pos = np.where(full, self.cursor[buckets] & self.pos_mask, np.argmin(live, axis=1))
            self.cursor[buckets[full]] += np.uint8(1)
        else:
            pos = np.argmin(live, axis=1)
        # two hashes of one row in one bucket: the second write wins (rare: ~S^2/2B)
        self.entries[buckets, pos] = probe.tags | np.uint64((slot << _GEN_BITS) | gen)
        return gen

    def holds(self, slot: int, gen: int) -> bool:
        return int(self.slot_gen[slot]) == gen


class _Client:
    """A client's recent rows: their slots in the index and their match history."""

    __slots__ = (
        "n",
        "own",
        "own_gen",
        "own_head",
        "own_n",
        "own_slot",
        "pos",
        "recent",
        "runs",
        "score",
    )

    def __init__(self, cap: int, window: int) -> None:
        self.own_slot = np.zeros(cap, dtype=np.int32)
        self.own_gen = np.zeros(cap, dtype=np.uint16)  # generations are < 4095
        self.own_head = 0
        self.own_n = 0
        #: per recent row: it is a near-duplicate of one of the client's own earlier rows
        self.own = np.zeros(window, dtype=bool)
        #: per recent row: the run it extended, weighted by other clients' rows (see _row)
        self.runs = np.zeros(window, dtype=np.int32)
        self.pos = 0
        self.n = 0
        self.recent = RecentRows(_RECENT_DIGESTS)
        #: the client's score as of its last indexed row (``None``: to compute)
        self.score: float | None = 1.0


class NearDuplicateDetector(Detector):
    """Flags clients whose rows are near-duplicates of earlier rows (any client's).

    Scores in :meth:`inspect`, before the model runs: it needs no answer.

    Parameters
    ----------
    name : str
        Instance name (metrics, audit log).
    store : KeyValueStore
        Where the standing of flagged clients is shared.
    salt : bytes
        Secret per deployment (at least 8 bytes); never logged. Set the same
        salt on every worker so fingerprints agree.
    low, high : float or array of float
        The features' usual range, one per feature (from calibration: robust
        quantiles of the reference rows) or one for all. A range much wider
        than the data's puts every row in the same bins; it must come from the
        deployment's data, never from a guess.
    levels : int, default=8
        Quantization bins across the range; the step is ``(high - low) / levels``.
    window : int, default=5
        Consecutive quantized values hashed together.
    fingerprint_size : int, default=50
        Hashes kept per row (Blacklight's S).
    match_fraction : float, default=0.5
        Share of the larger fingerprint two rows must have in common.
    threshold : float, default=0.7
        Flag a client whose score falls below this. ``guard calibrate`` sets it
        on simulated benign client sessions at a per-client false-positive target.
    recent_rows : int, default=50
        The window of a client's rows over which its share is measured.
    min_rows : int, default=10
        The share is taken over at least this many rows.
    run_scale : int, default=20
        A near-duplicate run of this many rows counts as full evidence.
    cross_gain : float, default=5.0
        A row's own near-duplicate run is lengthened by other clients'
        near-duplicates of it to at most this multiple (1: other clients' rows
        never count; a row with no own near-duplicate is never evidence).
    max_rows : int, default=20000
        Rows indexed, all clients together (FIFO eviction).
    max_rows_per_client : int, default=256
        Rows one client may hold in the index; past it the client's new rows
        replace its own oldest, so one client cannot flush the others' history.
    bucket_size : int, default=8
        Rows remembered per hash bucket.
    max_clients : int, default=10000
        Clients tracked per process (least recently used evicted).
    flag_ttl_s : float or None, default=3600
        Seconds a flag lasts in the shared store after it was last confirmed.
    share : bool, default=True
        With a store that shares evidence (``redis://``), share it; ``False``
        keeps this worker's evidence to itself (only flags are shared).
    share_entries, share_rows, share_ttl_s : int, int, float
        With a store that shares evidence (``redis://``): the evidence log's
        length in requests (default 1024), the rows of one request shared
        (default 256) and its TTL (default 600 s); see
        :mod:`detectors.shared_evidence`.

    Notes
    -----
    With a sharing store every worker indexes every worker's rows: each
    request's fingerprints (and keyed digests of its rows, under a key drawn
    from the salt, so every worker tells exact repeats apart alike) go to the
    evidence log, and each worker adds the others' to its own index before
    it scores a request. The index is then global across workers and
    replicas, not only within a process. Fingerprinting stays with the worker
    that received the row; indexing is done by every worker.

    Memory: the index holds at least ``2 * fingerprint_size`` entries of 8
    bytes per indexed row (buckets rounded up to a power of two), the row's
    fingerprint at 4 bytes a hash (to compare a client's new rows with its own)
    and 32 bytes of slot bookkeeping: 1 096 bytes per row with the defaults,
    21.9 MB for 20 000 rows, allocated once. A tracked client costs
    ``6 * max_rows_per_client + 10 * recent_rows + 512`` bytes of arrays plus
    Python objects (``benchmarks/memory.py`` measures it).

    Structural defaults (``levels``, ``window``, ``fingerprint_size``,
    ``match_fraction``) describe *what a near-duplicate is* relative to each
    feature's calibrated range: rows within about an eighth of every
    feature's range. Nothing in them depends on a dataset.

    Examples
    --------
    >>> import asyncio
    >>> import numpy as np
    >>> from inference_guard.detectors.base import Query
    >>> from inference_guard.detectors.fingerprint import NearDuplicateDetector
    >>> class Store:
    ...     backend = "dict"
    ...     def __init__(self): self.d = {}
    ...     async def get(self, k): return self.d.get(k)
    ...     async def set(self, k, v, ttl=None): self.d[k] = v
    ...     async def delete(self, k): self.d.pop(k, None)
    ...     async def incr(self, k, amount=1, ttl=None): return 0
    >>> det = NearDuplicateDetector(
    ...     "nd", store=Store(), salt=b"0123456789abcdef", low=0.0, high=16.0, max_rows=1000
    ... )
    >>> rng = np.random.default_rng(0)
    >>> x = rng.uniform(0, 16, size=(1, 64))
    >>> async def probe():  # tiny perturbations around one input
    ...     for _ in range(20):
    ...         r = await det.inspect(Query("c1", "p", x + rng.normal(0, 0.05, size=x.shape)))
    ...     return r
    >>> asyncio.run(probe()).anomalous
    True
    """

    technique: ClassVar[str] = "AML.T0043"

    def __init__(
        self,
        name: str,
        *,
        store: KeyValueStore,
        salt: bytes,
        low: float | ArrayLike,
        high: float | ArrayLike,
        levels: int = 8,
        window: int = 5,
        fingerprint_size: int = 50,
        match_fraction: float = 0.5,
        threshold: float = 0.7,
        recent_rows: int = 50,
        min_rows: int = 10,
        run_scale: int = 20,
        cross_gain: float = 5.0,
        max_rows: int = 20_000,
        max_rows_per_client: int = 256,
        bucket_size: int = 8,
        max_clients: int = 10_000,
        flag_ttl_s: float | None = 3600.0,
        share: bool = True,
        share_entries: int = 1024,
        share_rows: int = 256,
        share_ttl_s: float = 600.0,
    ) -> None:
        super().__init__(name)
        if not 0.0 < match_fraction <= 1.0:
            raise ValueError(f"match_fraction must be in (0, 1], got {match_fraction!r}")
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {threshold!r}")
        if not (math.isfinite(cross_gain) and cross_gain >= 1.0):
            raise ValueError(f"cross_gain must be a number >= 1, got {cross_gain!r}")
        for pname, value in (
            ("recent_rows", recent_rows),
            ("min_rows", min_rows),
            ("run_scale", run_scale),
            ("max_rows", max_rows),
            ("max_rows_per_client", max_rows_per_client),
            ("bucket_size", bucket_size),
        ):
            if value < 1:
                raise ValueError(f"{pname} must be >= 1, got {value!r}")
        self.fingerprinter = Fingerprinter(
            salt, low=low, high=high, levels=levels, window=window, size=fingerprint_size
        )
        self.match_fraction = float(match_fraction)
        self.threshold = float(threshold)
        self.recent_rows = recent_rows
        self.min_rows = min_rows
        self.run_scale = run_scale
        self.cross_gain = float(cross_gain)
        self.max_rows_per_client = max_rows_per_client
        self._index = _Index(max_rows, fingerprint_size, bucket_size)
        self._clients: ClientMap[_Client] = ClientMap(max_clients, self._new_client)
        self._standing = SharedStanding(store, f"near_duplicate:{name}", flag_ttl_s)
        self._log = (
            SharedLog.of(
                store,
                f"near_duplicate:{name}",
                max_entries=share_entries,
                max_rows=share_rows,
                ttl=share_ttl_s,
            )
            if share
            else None
        )
        # digests keyed by the salt: every worker with the same salt agrees on them
        self._digest_keys = self.fingerprinter.digest_keys()

    def __repr__(self) -> str:  # never show derived key material
        return f"{type(self).__name__}(name={self.name!r})"

    @property
    def clients(self) -> ClientMap[_Client]:
        """The per-process client map (its ``len`` and ``evictions`` are metrics)."""
        return self._clients

    @property
    def index_nbytes(self) -> int:
        """Bytes of the global index (fixed at construction)."""
        return self._index.nbytes

    def _new_client(self) -> _Client:
        return _Client(self.max_rows_per_client, self.recent_rows)

    @property
    def shared(self) -> SharedLog | None:
        """The evidence log shared with other workers (``None``: this process only)."""
        return self._log

    async def inspect(self, query: Query) -> DetectorResult:
        rows = query.rows
        own = cross = 0
        read = False
        shared: float | None = None
        if rows is not None and rows.ndim == 2 and rows.shape[0] > 0 and rows.shape[1] > 0:
            if self._log is None:
                own, cross = await self._learn(query, rows)
            else:
                # the standing is read beside the exchange: one pipelined round trip for both
                (own, cross), shared = await _both(
                    self._learn(query, rows),
                    self._standing.score(query.policy, query.client),
                )
                read = True
            local = self._score(self._clients.get_or_create(query.client))
            if local < self.threshold:
                await self._standing.flag(query.policy, query.client, local)
        else:
            peeked = self._clients.peek(query.client)
            local = 1.0 if peeked is None else self._score(peeked)
        if read:
            resolved = self._standing.pick(local, shared, self.threshold)
        else:
            resolved = await self._standing.resolve(
                query.policy, query.client, local, self.threshold
            )
        score = local if resolved is None else resolved
        if score >= self.threshold:
            return DetectorResult(self.name, score, self.threshold, False)
        return DetectorResult(
            self.name,
            score,
            self.threshold,
            True,
            reason=f"near-duplicate queries: score {score:.2f} < {self.threshold:.2f}; "
            f"{own} of {query.n_rows} rows matched the client's own earlier rows, "
            f"{cross} matched other clients' rows",
            rows_flagged=own,
        )

    async def _learn(self, query: Query, rows: NDArray[np.float64]) -> tuple[int, int]:
        """Fingerprint a request's fresh rows and index them (after the other workers' rows).

        Returns how many of them matched the client's own earlier rows, and
        how many matched other clients' rows.
        """
        client = query.client
        state = self._clients.get_or_create(client)
        log = self._log
        # digests under this process's keys unless they are shared (then the salt's, which
        # every worker holds): the other detectors that skip repeats reuse them
        digests = query_digests(query, rows, None if log is None else self._digest_keys)
        if log is None:
            # exact repeats of the client's recent rows are not even fingerprinted
            if digests.shape[0] == 1:
                if not state.recent.fresh_one(int(digests[0])):
                    return 0, 0
                return self._ingest(
                    state, client, digests, self.fingerprinter.fingerprints(rows)
                )
            fresh = np.flatnonzero(state.recent.fresh_digests(digests))
            if fresh.shape[0] == 0:
                return 0, 0
            fps = self.fingerprinter.fingerprints(rows[fresh])
            return self._ingest(state, client, digests[fresh], fps)
        todo = np.flatnonzero(~state.recent.known(digests))
        fps = self.fingerprinter.fingerprints(rows[todo]) if todo.shape[0] else []
        mine = digests[todo]
        try:
            others = await log.exchange(
                client, [mine, *_pack_fingerprints(fps, self.fingerprinter.size)]
            )
        except BaseException:
            # the store failed: this worker's evidence is kept all the same
            self._apply(client, mine, fps)
            raise
        for other, arrays in others:
            unpacked = _unpack(arrays, self.fingerprinter.size)
            if unpacked is not None:
                self._apply(other, *unpacked)
        return self._apply(client, mine, fps)

    def _apply(self, client: str, digests: NDArray[np.int64], fps: list[_U64]) -> tuple[int, int]:
        """Index a client's rows, leaving out exact repeats of its recent rows."""
        state = self._clients.get_or_create(client)
        fresh = state.recent.fresh_digests(digests)
        return self._ingest(
            state,
            client,
            digests[fresh],
            [fp for fp, keep in zip(fps, fresh.tolist(), strict=True) if keep],
        )

    def _ingest(
        self, state: _Client, client: str, digests: NDArray[np.int64], fps: list[_U64]
    ) -> tuple[int, int]:
        own = cross = 0
        for digest, fp in zip(digests.tolist(), fps, strict=True):
            own_run, other = self._row(state, fp, client, digest)
            own += own_run > 0
            cross += other
        return own, cross

    def _row(
        self, state: _Client, fp: NDArray[np.uint64], client: str, digest: int
    ) -> tuple[int, bool]:
        """Match one fingerprint, index it, record it for the client.

        Returns the own run it extends (0: none) and whether it matched other
        clients' rows; an exact repeat changes nothing and returns ``(0, False)``.
        """
        index = self._index
        probe = index.probe(fp)
        found = index.match(probe, self.match_fraction, digest, client)
        if found.repeat:
            return 0, False
        tags = (fp >> _TAG_SHIFT).astype(np.uint32)  # ascending, as fp is
        cap = self.max_rows_per_client
        head = state.own_head
        k = min(state.own_n, _OWN_ROWS)
        if k:
            # the client's last k rows (in any order: only the longest run counts)
            if head >= k:
                own_slot, own_gen = state.own_slot[head - k : head], state.own_gen[head - k : head]
            else:
                recent = (head - 1 - np.arange(k)) % cap
                own_slot, own_gen = state.own_slot[recent], state.own_gen[recent]
            slots = own_slot.astype(np.intp)
            live = index.slot_gen[slots] == own_gen
            own_run = index.own_run(tags, slots[live], self.match_fraction, digest)
            if own_run < 0:
                return 0, False
        else:
            own_run = 0
        slot = -1
        if state.own_n == cap and index.holds(int(state.own_slot[head]), int(state.own_gen[head])):
            slot = int(state.own_slot[head])  # at its cap, a client recycles its own oldest slot
        if slot < 0:
            slot = index.new_slot()
        state.own_gen[head] = index.insert(probe, tags, slot, client, found, own_run, digest)
        state.own_slot[head] = slot
        state.own_head = (head + 1) % cap
        state.own_n = min(state.own_n + 1, cap)
        pos = state.pos
        state.own[pos] = own_run > 0
        # a row's run: its own run, lengthened by other clients' near-duplicates of it to
        # at most cross_gain times; a row with no own near-duplicate is no evidence
        state.runs[pos] = (
            min(max(found.run, own_run), math.floor(self.cross_gain * own_run)) if own_run else 0
        )
        state.pos = (pos + 1) % self.recent_rows
        state.n = min(state.n + 1, self.recent_rows)
        state.score = None
        return own_run, found.cross

    def _score(self, state: _Client) -> float:
        """``1 - evidence``: the share of own near-duplicates, or the longest (weighted) run."""
        score = state.score
        if score is not None:
            return score
        if state.n == 0:
            score = 1.0
        else:
            share = float(state.own.sum()) / max(state.n, self.min_rows)
            evidence = max(share, float(state.runs.max()) / self.run_scale)
            score = max(0.0, 1.0 - evidence)
        state.score = score
        return score


async def _both(first: Coroutine[Any, Any, _A], second: Coroutine[Any, Any, _B]) -> tuple[_A, _B]:
    """Await two coroutines together (their store calls leave in one batch); raise the first
    error only once both are done, so no failure is left unretrieved."""
    a, b = await asyncio.gather(first, second, return_exceptions=True)
    for result in (a, b):
        if isinstance(result, BaseException):
            raise result
    return a, b


def _pack_fingerprints(fps: list[_U64], size: int) -> tuple[_U64, NDArray[np.int32]]:
    """Fingerprints of up to ``size`` hashes as one ``(n, size)`` matrix and their lengths."""
    out = np.zeros((len(fps), size), dtype=np.uint64)
    lengths = np.zeros(len(fps), dtype=np.int32)
    for i, fp in enumerate(fps):
        out[i, : fp.shape[0]] = fp
        lengths[i] = fp.shape[0]
    return out, lengths


def _unpack(
    arrays: list[NDArray[np.generic]], size: int
) -> tuple[NDArray[np.int64], list[_U64]] | None:
    """Another worker's digests and fingerprints, or ``None`` when they do not fit this index."""
    if len(arrays) != 3:
        return None
    if [a.dtype.str for a in arrays] != ["<i8", "<u8", "<i4"]:
        return None
    digests = np.asarray(arrays[0], dtype=np.int64)
    matrix = np.asarray(arrays[1], dtype=np.uint64)
    lengths = np.asarray(arrays[2], dtype=np.int32)
    n = digests.shape[0]
    if (
        matrix.ndim != 2
        or matrix.shape != (n, size)
        or lengths.shape != (n,)
        or (n and not ((lengths >= 1) & (lengths <= size)).all())
    ):
        return None
    return digests, [matrix[i, : int(k)] for i, k in enumerate(lengths.tolist())]
