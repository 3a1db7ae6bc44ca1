"""PRADA: model-extraction detection from the distribution of query distances.

After Juuti, Szyller, Marchal and Asokan, *PRADA: Protecting against DNN Model
Stealing Attacks* (EuroS&P 2019); our own implementation of the published
algorithm. Per client and per predicted class the detector keeps a growing set
of the client's earlier queries. For each new query it records the minimum L2
distance to the set of its predicted class, and adds the query to the set when
that distance exceeds the set's threshold (``max(old, mean - std)`` of the
set's distances). Every ``test_every`` rows, once ``min_distances`` distances
are pooled (outliers beyond ``outlier_sigma`` standard deviations dropped), a
Shapiro-Wilk test measures how normal they are: natural queries give
near-normal distances, synthetic extraction queries (Papernot's Jacobian
augmentation and its kin: small steps from earlier points) do not. The score
is Shapiro-Wilk's ``W`` (higher is more normal); the client is flagged when
``W < delta``.

Known blind spot: an attacker who queries with natural data looks benign.
That one only shows as volume and coverage (:mod:`detectors.boundary`).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import ClassVar, TypeVar

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.stats import shapiro

from inference_guard.detectors.base import Answer, Detector, DetectorResult, Query
from inference_guard.detectors.client_map import ClientMap
from inference_guard.detectors.repeats import RecentRows, query_digests
from inference_guard.detectors.shared_evidence import SharedLog
from inference_guard.detectors.shared_standing import SharedStanding
from inference_guard.detectors.store import KeyValueStore

__all__ = ["PradaDetector"]

_F32 = NDArray[np.float32]
_T = TypeVar("_T", bound=np.generic)
# projection matrices kept for this many distinct row widths (a model has one)
_MAX_WIDTHS = 4
# the fresh-row mask of a single fresh row (read-only)
_ONE_FRESH = np.ones(1, dtype=bool)
_ONE_FRESH.flags.writeable = False


class _ClassSet:
    """One class's growing set: a ring of at most ``cap`` projected rows."""

    __slots__ = ("cap", "dists", "head", "n", "points", "sq", "sum", "thr", "with_dist")

    def __init__(self, dim: int, cap: int) -> None:
        self.cap = cap
        # grown by doubling: benign sets stay small (a threshold that only rises
        # admits fewer and fewer rows), so most clients never pay for ``cap``
        self.points: _F32 = np.empty((min(cap, 4), dim), dtype=np.float32)
        # distance each member had when it joined (NaN for the first member)
        self.dists = np.full(self.points.shape[0], np.nan)
        self.n = 0
        self.head = 0  # next slot to overwrite once full
        self.thr = 0.0
        self.sum = 0.0
        self.sq = 0.0
        self.with_dist = 0

    def min_distance(self, z: _F32) -> float:
        diff = self.points[: self.n] - z
        return math.sqrt(float(np.einsum("ij,ij->i", diff, diff).min()))

    def add(self, z: _F32, dist: float, grow: bool) -> None:
        """Add ``z``; replace the oldest member when full or when ``grow`` is false."""
        if self.n < self.cap and (grow or self.n == 0):
            if self.n == self.points.shape[0]:
                size = min(2 * self.n, self.cap)
                self.points = _grown(self.points, size)
                self.dists = _grown(self.dists, size, np.nan)
            slot = self.n
            self.n += 1
        else:
            slot = self.head
            self.head = (self.head + 1) % self.n
            old = self.dists[slot]
            if not math.isnan(old):
                self.sum -= old
                self.sq -= old * old
                self.with_dist -= 1
        self.points[slot] = z
        self.dists[slot] = dist
        if not math.isnan(dist):
            self.sum += dist
            self.sq += dist * dist
            self.with_dist += 1
        if self.with_dist:
            mean = self.sum / self.with_dist
            std = math.sqrt(max(self.sq / self.with_dist - mean * mean, 0.0))
            self.thr = max(self.thr, mean - std)


class _Client:
    """A client's PRADA state: class sets, pooled distances, last test result."""

    __slots__ = (
        "dist_head",
        "dist_n",
        "dists",
        "max_distances",
        "recent",
        "rows_held",
        "score",
        "sets",
        "since_test",
        "width",
    )

    def __init__(self, max_distances: int) -> None:
        self.width = -1
        self.sets: dict[int, _ClassSet] = {}
        self.rows_held = 0  # rows held by all class sets together
        self.max_distances = max_distances
        self.dists = np.empty(min(64, max_distances))
        self.dist_n = 0
        self.dist_head = 0  # next distance to overwrite once ``max_distances`` are held
        self.since_test = 0
        self.score = 1.0
        #: exact repeats of recent rows carry no evidence (retries, probes)
        self.recent = RecentRows(64)

    def push_distance(self, d: float) -> None:
        if self.dist_n < self.max_distances:
            if self.dist_n == self.dists.shape[0]:
                self.dists = _grown(self.dists, min(2 * self.dist_n, self.max_distances))
            self.dists[self.dist_n] = d
            self.dist_n += 1
            return
        self.dists[self.dist_head] = d  # the oldest goes: the test sees the recent ones
        self.dist_head = (self.dist_head + 1) % self.max_distances


class PradaDetector(Detector):
    """Flags clients whose query distances are not normally distributed (PRADA).

    Scores in :meth:`observe`, since it needs the predicted class; :meth:`inspect`
    returns the client's current standing, so a flagged client stays flagged
    before the model runs, on every worker that shares the store.

    Parameters
    ----------
    name : str
        Instance name (metrics, audit log).
    store : KeyValueStore
        Where the standing of flagged clients is shared.
    delta : float, default=0.90
        Alarm when Shapiro-Wilk's ``W < delta`` (the paper uses 0.9 to 0.96).
        How low benign clients' ``W`` goes depends on the deployment's data, so
        ``guard calibrate`` sets it on simulated benign client sessions at a
        per-client false-positive target.
    feature_scale : array of float or None
        Per-feature range widths (from calibration); rows are divided by them
        before distances are taken, so that a feature spanning thousands does
        not drown one spanning tenths. ``None``: raw units.
    min_distances : int, default=100
        Distances pooled before the first test (the reference code waits for > 100).
    test_every : int, default=10
        Rows between two tests; amortises the test's cost (about 70 us).
    max_set : int, default=200
        Most rows kept per class set; past it the oldest member is replaced.
    max_set_rows : int, default=2000
        Most rows kept by all of a client's class sets together. Bounds memory
        per client whatever the number of classes; once reached, sets stop
        growing (they replace their oldest member) and new classes are not tracked.
    max_distances : int, default=1000
        Most recent distances pooled for the test (at most 5000, Shapiro-Wilk's range).
    proj_dim : int, default=32
        Rows wider than this are projected to ``proj_dim`` dimensions by a
        seeded Gaussian random matrix (Johnson-Lindenstrauss: distances are kept
        to within a few percent), which bounds the per-row cost.
    outlier_sigma : float, default=3.0
        Distances further than this many standard deviations from the mean are
        left out of the test.
    max_clients : int, default=1000
        Clients tracked per process (least recently used evicted).
    flag_ttl_s : float or None, default=3600
        Seconds a flag lasts in the shared store after it was last confirmed.
    seed : int or None
        Seed of the projection matrix. Workers that share evidence must
        project alike: with a sharing store and no seed, rows are not shared.
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
    With a sharing store every worker keeps every client's class sets and
    distances: each request's projected rows and predicted classes (32
    floats and a class per row) go to the evidence log, and each worker runs
    the others' through its own state before its own. Exact repeats are then
    told by the projected row, across workers.

    Cost per row is ``O(set size * proj_dim)``: at most ``max_set * proj_dim``
    multiply-adds, whatever the history. Memory per tracked client is at most
    ``max_set_rows * (min(d, proj_dim) * 4 + 8)`` bytes of set rows plus
    ``max_distances * 8`` bytes of distances: 280 KB with the defaults on
    64-feature rows, so ``max_clients`` bounds the total (280 MB worst case).
    Sets grow on demand and benign sets stay small: a digits client measured
    16 KB after 200 natural rows and 32 KB after 1 000.

    Examples
    --------
    >>> import asyncio
    >>> import numpy as np
    >>> from inference_guard.detectors.base import Answer, Query
    >>> from inference_guard.detectors.prada import PradaDetector
    >>> class Store:
    ...     backend = "dict"
    ...     def __init__(self): self.d = {}
    ...     async def get(self, k): return self.d.get(k)
    ...     async def set(self, k, v, ttl=None): self.d[k] = v
    ...     async def delete(self, k): self.d.pop(k, None)
    ...     async def incr(self, k, amount=1, ttl=None): return 0
    >>> det = PradaDetector("prada", store=Store(), seed=0)
    >>> rng = np.random.default_rng(0)
    >>> async def client(name, next_row):
    ...     x = rng.normal(size=(1, 8))
    ...     for _ in range(300):
    ...         x = next_row(x)
    ...         await det.observe(Query(name, "p", x), Answer(labels=np.array([0])))
    ...     return await det.inspect(Query(name, "p", None))
    >>> natural = lambda x: rng.normal(size=(1, 8))
    >>> synthetic = lambda x: x + 0.1 * np.sign(rng.normal(size=(1, 8)))  # small signed steps
    >>> asyncio.run(client("benign", natural)).anomalous
    False
    >>> asyncio.run(client("extractor", synthetic)).anomalous
    True
    """

    technique: ClassVar[str] = "AML.T0024.002"
    observes_answers: ClassVar[bool] = True

    def __init__(
        self,
        name: str,
        *,
        store: KeyValueStore,
        delta: float = 0.90,
        feature_scale: ArrayLike | None = None,
        min_distances: int = 100,
        test_every: int = 10,
        max_set: int = 200,
        max_set_rows: int = 2000,
        max_distances: int = 1000,
        proj_dim: int = 32,
        outlier_sigma: float = 3.0,
        max_clients: int = 1000,
        flag_ttl_s: float | None = 3600.0,
        seed: int | None = None,
        share: bool = True,
        share_entries: int = 1024,
        share_rows: int = 256,
        share_ttl_s: float = 600.0,
    ) -> None:
        super().__init__(name)
        if not 0.0 < delta <= 1.0:
            raise ValueError(f"delta must be in (0, 1], got {delta!r}")
        if not 3 <= min_distances <= max_distances <= 5000:
            raise ValueError(
                "need 3 <= min_distances <= max_distances <= 5000, got "
                f"{min_distances!r} and {max_distances!r}"
            )
        for pname, value in (
            ("test_every", test_every),
            ("max_set", max_set),
            ("proj_dim", proj_dim),
            ("max_set_rows", max_set_rows),
        ):
            if value < 1:
                raise ValueError(f"{pname} must be >= 1, got {value!r}")
        if not outlier_sigma > 0:
            raise ValueError(f"outlier_sigma must be > 0, got {outlier_sigma!r}")
        self.delta = float(delta)
        self.feature_scale: NDArray[np.float64] | None = None
        if feature_scale is not None:
            scale = np.asarray(feature_scale, dtype=np.float64)
            if scale.ndim != 1 or not (np.isfinite(scale).all() and (scale > 0).all()):
                raise ValueError("feature_scale must be a 1-D array of finite numbers > 0")
            self.feature_scale = scale
        self.min_distances = min_distances
        self.test_every = test_every
        self.max_set = max_set
        self.max_set_rows = max_set_rows
        self.max_distances = max_distances
        self.proj_dim = proj_dim
        self.outlier_sigma = float(outlier_sigma)
        self.seed = seed
        self._clients: ClientMap[_Client] = ClientMap(max_clients, self._new_client)
        self._standing = SharedStanding(store, f"prada:{name}", flag_ttl_s)
        # the verdict on a client not seen yet (immutable: one for all)
        self._ok = DetectorResult.ok(self.name, 1.0, self.delta)
        self._projections: OrderedDict[int, _F32 | None] = OrderedDict()
        self._log = (
            None
            if seed is None or not share
            else SharedLog.of(
                store,
                f"prada:{name}",
                max_entries=share_entries,
                max_rows=share_rows,
                ttl=share_ttl_s,
            )
        )

    @property
    def shared(self) -> SharedLog | None:
        """The evidence log shared with other workers (``None``: this process only)."""
        return self._log

    @property
    def threshold(self) -> float:
        """The alarm threshold on ``W`` (``delta``)."""
        return self.delta

    @property
    def clients(self) -> ClientMap[_Client]:
        """The per-process client map (its ``len`` and ``evictions`` are metrics)."""
        return self._clients

    def _new_client(self) -> _Client:
        return _Client(self.max_distances)

    def _projection(self, width: int) -> _F32 | None:
        if width in self._projections:
            self._projections.move_to_end(width)
            return self._projections[width]
        proj: _F32 | None = None
        if width > self.proj_dim:
            # a deterministic matrix per width: every worker projects alike
            rng = np.random.default_rng(None if self.seed is None else [self.seed, width])
            proj = (rng.standard_normal((width, self.proj_dim)) / math.sqrt(self.proj_dim)).astype(
                np.float32
            )
        self._projections[width] = proj
        if len(self._projections) > _MAX_WIDTHS:
            self._projections.popitem(last=False)
        return proj

    async def inspect(self, query: Query) -> DetectorResult:
        state = self._clients.peek(query.client)
        local = None if state is None else state.score
        score = await self._standing.resolve(query.policy, query.client, local, self.delta)
        if score is None:
            ok = self._ok
            if ok.threshold != self.delta or ok.detector != self.name:  # changed since
                ok = self._ok = DetectorResult.ok(self.name, 1.0, self.delta)
            return ok
        return self._result(score, query.n_rows)

    async def observe(self, query: Query, answer: Answer) -> DetectorResult | None:
        rows = query.rows
        if rows is None or rows.ndim != 2 or rows.shape[0] == 0 or answer.status >= 400:
            return None
        if not _has_classes(answer, rows.shape[0]):
            return None
        if self._log is not None:
            labels = _predicted(answer, rows.shape[0])
            assert labels is not None
            return await self._observe_shared(self._log, query, rows, labels)
        state = self._client(query.client, rows.shape[1])
        digests = query_digests(query, rows)
        if digests.shape[0] == 1:  # a single row: a plain bool, no array
            if not state.recent.fresh_one(int(digests[0])):
                return self._result(state.score, query.n_rows)  # a repeat: nothing new
            fresh = _ONE_FRESH
        else:
            fresh = state.recent.fresh_digests(digests)
            if not fresh.any():  # exact repeats only (a health probe, a retry): nothing new
                return self._result(state.score, query.n_rows)
        labels = _predicted(answer, rows.shape[0])
        assert labels is not None
        if not fresh.all():
            rows, labels = rows[fresh], labels[fresh]
        z_all = self._project(rows)
        tested = False
        for i in np.flatnonzero(np.isfinite(z_all).all(axis=1)).tolist():
            tested |= self._row(state, z_all[i], int(labels[i]))
        if tested and state.score < self.delta:
            await self._standing.flag(query.policy, query.client, state.score)
        return self._result(state.score, query.n_rows)

    def _client(self, client: str, width: int) -> _Client:
        state = self._clients.get_or_create(client)
        if state.width not in (-1, width):
            # the client changed row width: its distances no longer compare, start over
            self._clients.pop(client)
            state = self._clients.get_or_create(client)
        state.width = width
        return state

    def _project(self, rows: NDArray[np.float64]) -> _F32:
        proj = self._projection(rows.shape[1])
        scale = self.feature_scale
        if scale is not None and scale.shape[0] == rows.shape[1]:
            rows = rows / scale
        with np.errstate(all="ignore"):  # rows beyond float32 become inf and are skipped
            return rows.astype(np.float32) if proj is None else rows.astype(np.float32) @ proj

    async def _observe_shared(
        self, log: SharedLog, query: Query, rows: NDArray[np.float64], labels: NDArray[np.int64]
    ) -> DetectorResult:
        """Share the request's projected rows; run the others' through, then this one's."""
        z_all = self._project(rows)
        ok = np.isfinite(z_all).all(axis=1)
        z, labels = z_all[ok], labels[ok]
        width = np.array([rows.shape[1]], dtype=np.int64)
        try:
            others = await log.exchange(query.client, [z, labels, width])
        except BaseException:
            self._apply(query.client, rows.shape[1], z, labels)  # kept all the same
            raise
        tested = False
        for client, arrays in others:
            unpacked = _unpack(arrays, self.proj_dim)
            if unpacked is not None:
                hit = self._apply(client, *unpacked)
                tested |= hit and client == query.client
        tested |= self._apply(query.client, rows.shape[1], z, labels)
        state = self._clients.get_or_create(query.client)
        if tested and state.score < self.delta:
            await self._standing.flag(query.policy, query.client, state.score)
        return self._result(state.score, query.n_rows)

    def _apply(self, client: str, width: int, z: _F32, labels: NDArray[np.int64]) -> bool:
        """Run a client's projected rows through its state; True when a test ran."""
        state = self._client(client, width)
        fresh = state.recent.fresh(z.astype(np.float64))
        tested = False
        for i in np.flatnonzero(fresh).tolist():
            tested |= self._row(state, z[i], int(labels[i]))
        return tested

    def _row(self, state: _Client, z: _F32, label: int) -> bool:
        """Process one projected row; True when a test ran."""
        cset = state.sets.get(label)
        budget_left = state.rows_held < self.max_set_rows
        if cset is None:
            if not budget_left:
                return False  # too many classes for this client's budget
            cset = state.sets[label] = _ClassSet(z.shape[0], self.max_set)
            cset.add(z, math.nan, True)
            state.rows_held += 1
            return False
        dist = cset.min_distance(z)
        if dist == 0.0 or not math.isfinite(dist):
            # a copy of a set member tells an extractor nothing new; leave it out of the test
            # (and a distance that overflowed float32 says nothing about the distribution)
            return False
        state.push_distance(dist)
        if dist > cset.thr:
            before = cset.n
            cset.add(z, dist, budget_left)
            state.rows_held += cset.n - before
        state.since_test += 1
        if state.dist_n >= self.min_distances and state.since_test >= self.test_every:
            state.since_test = 0
            state.score = self._test(state.dists[: state.dist_n])
            return True
        return False

    def _test(self, dists: NDArray[np.float64]) -> float:
        mean = float(dists.mean())
        std = float(dists.std())
        if std > 0.0:
            dists = dists[np.abs(dists - mean) <= self.outlier_sigma * std]
        if dists.shape[0] < 3 or float(np.ptp(dists)) == 0.0:
            # identical distances: a lattice, not natural data (and W is undefined)
            return 0.0
        return float(shapiro(dists).statistic)

    def _result(self, score: float, n_rows: int) -> DetectorResult:
        anomalous = score < self.delta
        return DetectorResult(
            self.name,
            score,
            self.delta,
            anomalous,
            reason=f"query distances not normal: W={score:.3f} < {self.delta}" if anomalous else "",
            rows_flagged=n_rows if anomalous else 0,
        )


def _grown(a: NDArray[_T], size: int, fill: float = 0.0) -> NDArray[_T]:
    """A copy of ``a`` with ``size`` rows, the new ones set to ``fill``."""
    out = np.full((size, *a.shape[1:]), fill, dtype=a.dtype)
    out[: a.shape[0]] = a
    return out


def _has_classes(answer: Answer, n_rows: int) -> bool:
    """Whether :func:`_predicted` finds a class per row in ``answer`` (without computing them)."""
    labels = answer.labels
    if labels is not None and labels.shape == (n_rows,) and labels.dtype.kind in "iu":
        return True
    probs = answer.probabilities
    return probs is not None and probs.ndim == 2 and probs.shape[0] == n_rows and probs.shape[1] > 0


def _predicted(answer: Answer, n_rows: int) -> NDArray[np.int64] | None:
    """The predicted class per row, from labels or the argmax of probabilities."""
    labels = answer.labels
    if labels is not None and labels.shape == (n_rows,) and labels.dtype.kind in "iu":
        return np.asarray(labels, dtype=np.int64)
    probs = answer.probabilities
    if probs is not None and probs.ndim == 2 and probs.shape[0] == n_rows and probs.shape[1] > 0:
        return np.asarray(np.argmax(probs, axis=1), dtype=np.int64)
    return None


def _unpack(
    arrays: list[NDArray[np.generic]], proj_dim: int
) -> tuple[int, _F32, NDArray[np.int64]] | None:
    """Another worker's row width, projected rows and classes; ``None`` if they do not fit."""
    if len(arrays) != 3:
        return None
    z, labels, width = arrays
    if width.dtype != np.int64 or width.shape != (1,) or width[0] < 1:
        return None
    if (
        z.dtype != np.float32
        or z.ndim != 2
        or z.shape[1] != min(int(width[0]), proj_dim)
        or labels.dtype != np.int64
        or labels.shape != (z.shape[0],)
        or not np.isfinite(z).all()
    ):
        return None
    return int(width[0]), np.asarray(z, dtype=np.float32), np.asarray(labels, dtype=np.int64)
