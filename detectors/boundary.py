"""Boundary-probing and coverage signals per client, against a benign baseline.

Extraction and query-based evasion leave traces in *what a client asks* and
*what it is told*, window by window. Over each client's consecutive windows
of ``window`` rows the detector measures:

``low_confidence``
    the share of rows whose top-1 probability is below ``p_low``: boundary
    probing (HopSkipJump's binary searches, Jacobian augmentation) lands near
    decision boundaries, natural data rarely does;
``class_concentration``
    ``1 - H / log(min(K, n))``, one minus the normalised entropy of the
    predicted classes: random or synthetic queries pile onto few classes,
    natural traffic spreads like the class priors;
``coverage``
    the share of (feature, value bin) cells the window touched, with
    ``bins`` equal bins over ``[low, high]`` per feature plus one below and one
    above. Natural data leaves most cells empty (a digit's corner pixels are
    always 0); uniform-random or grid extraction queries fill them all. This is
    the cheap version of Kesarwani et al.'s coverage monitor: ``O(features)``
    per row and a bitmap per client, with no reference data at run time;
``anomaly_rate``
    optionally, the share of the client's rows other detectors found
    anomalous, read from an object with ``async rate(client) -> (anomalous, total)``.

Each signal is compared with its benign mean and standard deviation
(:meth:`BoundaryDetector.fit` learns them from benign traffic), and the score is
minus the largest one-sided z-score, so higher is more normal, and the client
is flagged when it falls below ``threshold``. One-sided on purpose: a client
whose answers are *more* confident or *more* spread than the baseline is not
suspicious for that.

Ordinary clients are never judged on what they cannot help:

* **What the client sends leads; what the model answers corroborates.** The
  input signals (``coverage``, ``anomaly_rate``) compare a client's rows with
  reference rows drawn from the same distribution as live traffic. The answer
  signals (``low_confidence``, ``class_concentration``) cannot be baselined
  that way: calibration sees the model's answers on its *own training rows*,
  on which it is more confident than on anything a client sends (4 % of
  held-out digits answers are low-confidence against 0.4 % of training
  answers), and a one-class client or a two-class model's busy side is
  concentrated by nature. So the score is led by the largest input z-score,
  and the answer signals add at most half of it, when it is positive: they
  make a suspicious window more suspicious and never make a window suspicious.
* Exact repeats of a client's recent rows (health probes, retries) are left
  out of its windows: one row sent a hundred times is one row.

The per-feature ranges, the baseline and the threshold come from calibration
on the deployment's own data (``guard calibrate``), never from constants.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping
from typing import ClassVar, NamedTuple, Protocol, Self

import numpy as np
from numpy.typing import ArrayLike, NDArray

from inference_guard.detectors.base import Answer, Detector, DetectorResult, Query
from inference_guard.detectors.client_map import ClientMap
from inference_guard.detectors.profile import feature_ranges
from inference_guard.detectors.repeats import RecentRows, query_digests
from inference_guard.detectors.shared_evidence import SharedLog
from inference_guard.detectors.shared_standing import SharedStanding
from inference_guard.detectors.store import KeyValueStore

__all__ = ["DEFAULT_BASELINE", "LEADING", "SIGNALS", "AnomalyRateSource", "BoundaryDetector"]

#: the signals the detector can use, in a fixed order
SIGNALS: tuple[str, ...] = ("low_confidence", "class_concentration", "coverage", "anomaly_rate")
#: the signals that may lead the score: what the client sends (the others only corroborate)
LEADING: frozenset[str] = frozenset({"coverage", "anomaly_rate"})

#: a placeholder baseline for uncalibrated use (tests, examples): benign (mean, std) per
#: signal measured once on one model; a deployment's own comes from ``guard calibrate``
#: (:meth:`BoundaryDetector.fit` on simulated benign sessions)
DEFAULT_BASELINE: Mapping[str, tuple[float, float]] = {
    "low_confidence": (0.0215, 0.0132),
    "class_concentration": (0.0195, 0.0088),
    "coverage": (0.6645, 0.0087),
    "anomaly_rate": (0.010, 0.010),
}

_MIN_STD = 1e-3  # a baseline std is never taken below this: no infinite z-scores
# the fresh-row mask of a single fresh row (read-only)
_ONE_FRESH = np.ones(1, dtype=bool)
_ONE_FRESH.flags.writeable = False
_MAX_WIDTHS = 4  # feature subsets kept for this many row widths (a model has one)


class AnomalyRateSource(Protocol):
    """Anything that can tell a client's anomalous and total row counts."""

    async def rate(self, client: str) -> tuple[int, int]:
        """``(anomalous rows, rows)`` recently seen from ``client``."""
        ...


class _Rows(NamedTuple):
    """What a window needs of some rows and their answers (the evidence workers share)."""

    #: per row: 1 the top-1 probability was below ``p_low``, 0 it was not, -1 no probabilities
    low: NDArray[np.int8]
    #: per row: the predicted class (meaningless when ``n_classes`` is 0)
    labels: NDArray[np.int64]
    #: the answer's number of classes (probabilities' width, or the largest label + 1);
    #: 0 when it carried no class
    n_classes: int
    #: per row and covered feature: its cell, 0 below ``low`` .. ``bins + 1`` at or above
    #: ``high`` (``None``: coverage is off)
    cells: NDArray[np.intp] | None

    def part(self, part: slice) -> _Rows:
        labels = self.labels[part]
        n_classes = self.n_classes
        if n_classes and labels.shape[0] and self.low[part][0] < 0:
            # labels only: as many classes as this part's largest label says
            n_classes = int(labels.max(initial=0)) + 1
        return _Rows(
            self.low[part], labels, n_classes, None if self.cells is None else self.cells[part]
        )


class _Window:
    """Running counts of one client's current window."""

    __slots__ = ("classes", "cover", "last", "low", "n", "n_prob", "recent")

    def __init__(self) -> None:
        #: exact repeats of recent rows carry no evidence (health probes, retries)
        self.recent = RecentRows(64)
        self.n = 0
        self.n_prob = 0  # rows that came with probabilities
        self.low = 0
        self.classes: NDArray[np.int64] | None = None
        self.cover: NDArray[np.bool_] | None = None
        #: signals of the last complete window
        self.last: dict[str, float] | None = None

    def reset(self) -> None:
        self.n = self.n_prob = self.low = 0
        if self.classes is not None:
            self.classes[:] = 0
        if self.cover is not None:
            self.cover[:] = False


class BoundaryDetector(Detector):
    """Flags clients whose windows of queries look like probing or extraction.

    Scores in :meth:`observe` (it needs the answers); :meth:`inspect` returns
    the client's standing, so a flagged client stays flagged before the model
    runs, on every worker that shares the store.

    Parameters
    ----------
    name : str
        Instance name (metrics, audit log).
    store : KeyValueStore
        Where the standing of flagged clients is shared.
    window : int, default=100
        Rows per window; a client is scored at the end of each.
    p_low : float, default=0.6
        A row is low-confidence when its top-1 probability is below this.
    low, high : float, array of float, or None
        The features' usual range, one per feature (from calibration) or one
        for all, for ``coverage`` (both or neither; the signal is off without them).
    bins : int, default=8
        Equal bins over ``[low, high]`` per feature, plus one below and one above.
    max_coverage_features : int, default=256
        Wider rows are covered on a seeded random subset of this many features.
    n_classes : int or None
        The model's number of classes, for answers that carry labels only
        (probabilities tell it); otherwise the most classes seen so far is used.
    max_classes : int, default=1024
        Class indices at or above this are left out of ``class_concentration``.
    baseline : mapping, default=DEFAULT_BASELINE
        Benign ``(mean, std)`` per signal; a signal missing here is not used.
        ``guard calibrate`` measures it on the deployment's simulated sessions.
    threshold : float, default=-6.0
        Flag when the score (minus the largest z-score) is below this;
        ``guard calibrate`` sets it at a per-client false-positive target.
    anomaly_rate : AnomalyRateSource or None
        Source of the client's anomalous-row share (the ``anomaly_rate`` signal).
    max_clients : int, default=10000
        Clients tracked per process (least recently used evicted).
    flag_ttl_s : float or None, default=3600
        Seconds a flag lasts in the shared store after it was last confirmed.
    seed : int or None
        Seed of the feature subset for wide rows.
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
    With a sharing store every worker counts every client's windows: each
    request's per-row summary (the coverage cell of each covered feature, one
    byte each, whether the answer was low-confidence, the predicted class)
    goes to the evidence log, and each worker adds the others' to its own
    windows before its own. Exact repeats are left out by the worker that
    received them (a row repeated on several workers counts once per worker).

    Cost per row is ``O(min(d, max_coverage_features))``. Memory per tracked
    client: ``min(d, max_coverage_features) * (bins + 2)`` bytes of coverage
    bitmap plus 8 bytes per class: 1.3 KB measured for the digits model
    (64 features, 10 classes), Python objects included.

    Examples
    --------
    >>> import asyncio
    >>> import numpy as np
    >>> from inference_guard.detectors.base import Answer, Query
    >>> from inference_guard.detectors.boundary import BoundaryDetector
    >>> class Store:
    ...     backend = "dict"
    ...     def __init__(self): self.d = {}
    ...     async def get(self, k): return self.d.get(k)
    ...     async def set(self, k, v, ttl=None): self.d[k] = v
    ...     async def delete(self, k): self.d.pop(k, None)
    ...     async def incr(self, k, amount=1, ttl=None): return 0
    >>> det = BoundaryDetector("boundary", store=Store(), window=20, low=0.0, high=1.0)
    >>> rows = np.random.default_rng(0).random((20, 4))  # spread over the whole box
    >>> probs = np.tile([0.5, 0.5], (20, 1))  # every answer on the boundary
    >>> async def probe():
    ...     await det.observe(Query("c1", "p", rows, n_rows=20), Answer(probabilities=probs))
    ...     return await det.inspect(Query("c1", "p", None))
    >>> asyncio.run(probe()).anomalous
    True
    """

    technique: ClassVar[str] = "AML.T0024.002"
    observes_answers: ClassVar[bool] = True

    def __init__(
        self,
        name: str,
        *,
        store: KeyValueStore,
        window: int = 100,
        p_low: float = 0.6,
        low: float | ArrayLike | None = None,
        high: float | ArrayLike | None = None,
        bins: int = 8,
        max_coverage_features: int = 256,
        n_classes: int | None = None,
        max_classes: int = 1024,
        baseline: Mapping[str, tuple[float, float]] = DEFAULT_BASELINE,
        threshold: float = -6.0,
        anomaly_rate: AnomalyRateSource | None = None,
        max_clients: int = 10_000,
        flag_ttl_s: float | None = 3600.0,
        seed: int | None = None,
        share: bool = True,
        share_entries: int = 1024,
        share_rows: int = 256,
        share_ttl_s: float = 600.0,
    ) -> None:
        super().__init__(name)
        if window < 2:
            raise ValueError(f"window must be >= 2, got {window!r}")
        if not 0.0 < p_low <= 1.0:
            raise ValueError(f"p_low must be in (0, 1], got {p_low!r}")
        if (low is None) != (high is None):
            raise ValueError("low and high must be given together")
        self._range: tuple[NDArray[np.float64], NDArray[np.float64]] | None = None
        if low is not None and high is not None:
            self._range = feature_ranges(low, high)
        for pname, value in (
            ("bins", bins),
            ("max_coverage_features", max_coverage_features),
            ("max_classes", max_classes),
            ("n_classes", 2 if n_classes is None else n_classes - 1),
        ):
            if value < 1:
                raise ValueError(f"{pname} must be >= 1, got {value!r}")
        if not math.isfinite(threshold):
            raise ValueError(f"threshold must be finite, got {threshold!r}")
        self.window = window
        self.p_low = float(p_low)
        self.low = low
        self.high = high
        self.bins = bins
        self.max_coverage_features = max_coverage_features
        self.max_classes = max_classes
        self.baseline = _check_baseline(baseline)
        self.threshold = float(threshold)
        self.anomaly_rate = anomaly_rate
        self.seed = seed
        self._clients: ClientMap[_Window] = ClientMap(max_clients, _Window)
        self._standing = SharedStanding(store, f"boundary:{name}", flag_ttl_s)
        # the verdict on a client without a complete window (immutable: one for all)
        self._ok = DetectorResult.ok(self.name, 0.0, self.threshold)
        self._features: OrderedDict[int, NDArray[np.intp] | None] = OrderedDict()
        self._layouts: OrderedDict[
            int, tuple[NDArray[np.intp] | None, NDArray[np.float64], NDArray[np.float64]]
        ] = OrderedDict()
        # most classes any answer showed (probabilities' width, labels), or the configured count
        self._classes_seen = 0 if n_classes is None else min(n_classes, max_classes)
        self._log = (
            SharedLog.of(
                store,
                f"boundary:{name}",
                max_entries=share_entries,
                max_rows=share_rows,
                ttl=share_ttl_s,
            )
            if share
            else None
        )

    @property
    def shared(self) -> SharedLog | None:
        """The evidence log shared with other workers (``None``: this process only)."""
        return self._log

    @property
    def clients(self) -> ClientMap[_Window]:
        """The per-process client map (its ``len`` and ``evictions`` are metrics)."""
        return self._clients

    # ------------------------------------------------------------------ calibration

    def fit(
        self,
        rows: NDArray[np.float64],
        probabilities: NDArray[np.float64] | None = None,
        labels: NDArray[np.int64] | None = None,
    ) -> Self:
        """Learn the benign baseline from benign traffic, in arrival order.

        ``rows`` are cut into consecutive windows of ``window`` rows; the mean
        and standard deviation of each signal over those windows become the
        baseline (``anomaly_rate`` keeps its configured value). At least two
        windows are needed; a few hundred give stable figures.
        """
        rows = np.asarray(rows, dtype=np.float64)
        n = rows.shape[0] // self.window
        if rows.ndim != 2 or n < 2:
            raise ValueError(f"need at least 2 windows of {self.window} rows, got {rows.shape}")
        observed: list[dict[str, float]] = []
        for i in range(n):
            part = slice(i * self.window, (i + 1) * self.window)
            answer = Answer(
                labels=None if labels is None else np.asarray(labels)[part],
                probabilities=None if probabilities is None else np.asarray(probabilities)[part],
            )
            state = _Window()
            self._update(state, rows[part], answer)
            observed.append(self._signals(state))
        baseline = dict(self.baseline)
        for signal in SIGNALS:
            values = [s[signal] for s in observed if signal in s]
            if len(values) >= 2:
                baseline[signal] = (float(np.mean(values)), float(np.std(values, ddof=1)))
        self.baseline = _check_baseline(baseline)
        return self

    # ------------------------------------------------------------------ online

    async def inspect(self, query: Query) -> DetectorResult:
        state = self._clients.peek(query.client)
        local = None if state is None or state.last is None else self._score(state.last)
        score = await self._standing.resolve(query.policy, query.client, local, self.threshold)
        if score is None:
            ok = self._ok
            if ok.threshold != self.threshold or ok.detector != self.name:  # changed since
                ok = self._ok = DetectorResult.ok(self.name, 0.0, self.threshold)
            return ok
        return self._result(score, state.last if state is not None else None, query.n_rows)

    async def observe(self, query: Query, answer: Answer) -> DetectorResult | None:
        rows = query.rows
        if rows is None or rows.ndim != 2 or rows.shape[0] == 0 or answer.status >= 400:
            return None
        n = rows.shape[0]
        if not _answer_fits(answer, n):
            return None
        state = self._clients.get_or_create(query.client)
        digests = query_digests(query, rows)
        if n == 1:  # a single row: a repeat (a health probe, a retry) carries nothing new
            if not state.recent.fresh_one(int(digests[0])):
                return None
            fresh = _ONE_FRESH
        else:
            fresh = state.recent.fresh_digests(digests)
        if not fresh.all():
            rows, answer = rows[fresh], _select_answer(answer, fresh)
            n = rows.shape[0]
            if n == 0:
                return None
        summary = self._summary(rows, answer)
        if self._log is not None:
            try:
                others = await self._log.exchange(query.client, _pack(summary, self.bins))
            except Exception:
                # the store failed: this worker's evidence is kept all the same
                await self._add_rows(query.client, summary)
                raise
            for client, arrays in others:
                unpacked = _unpack(arrays, self.bins)
                if unpacked is not None:
                    await self._add_rows(client, unpacked)
        finished = await self._add_rows(query.client, summary)
        state = self._clients.get_or_create(query.client)
        if not finished or state.last is None:
            return None
        score = self._score(state.last)
        if score < self.threshold:
            await self._standing.flag(query.policy, query.client, score)
        return self._result(score, state.last, query.n_rows)

    async def _add_rows(self, client: str, rows: _Rows) -> bool:
        """Add a client's rows to its windows, scoring each one they finish; True if any."""
        state = self._clients.get_or_create(client)
        n = rows.low.shape[0]
        finished = False
        start = 0
        while start < n:  # split the request where a window ends
            stop = min(n, start + self.window - state.n)
            self._add(state, rows.part(slice(start, stop)))
            if state.n == self.window:
                signals = self._signals(state)
                if self.anomaly_rate is not None and "anomaly_rate" in self.baseline:
                    bad, total = await self.anomaly_rate.rate(client)
                    if total >= self.window:
                        signals["anomaly_rate"] = bad / total
                state.last = signals
                state.reset()
                finished = True
            start = stop
        return finished

    def last_signals(self, client: str) -> dict[str, float] | None:
        """The signals of ``client``'s last complete window in this process, if any."""
        state = self._clients.peek(client)
        return None if state is None or state.last is None else dict(state.last)

    # ------------------------------------------------------------------ internals

    def _feature_subset(self, width: int) -> NDArray[np.intp] | None:
        if width in self._features:
            return self._features[width]
        subset: NDArray[np.intp] | None = None
        if width > self.max_coverage_features:
            rng = np.random.default_rng(None if self.seed is None else [self.seed, width])
            subset = np.sort(rng.choice(width, self.max_coverage_features, replace=False))
        self._features[width] = subset
        if len(self._features) > _MAX_WIDTHS:
            self._features.popitem(last=False)
        return subset

    def _update(self, state: _Window, rows: NDArray[np.float64], answer: Answer) -> None:
        """Add a chunk of rows (none past the window's end) to the client's counts."""
        self._add(state, self._summary(rows, answer))

    def _summary(self, rows: NDArray[np.float64], answer: Answer) -> _Rows:
        """What the windows need of ``rows`` and their answers."""
        n = rows.shape[0]
        probs = answer.probabilities
        low = np.full(n, -1, dtype=np.int8)
        if probs is not None:
            low[:] = probs.max(axis=1) < self.p_low
            labels = np.asarray(np.argmax(probs, axis=1), dtype=np.int64)
            n_classes = probs.shape[1]
        elif answer.labels is not None:
            labels = np.asarray(answer.labels, dtype=np.int64)
            n_classes = int(labels.max(initial=0)) + 1
        else:
            labels = np.zeros(n, dtype=np.int64)
            n_classes = 0
        cells = None if self._range is None else self._cells(rows, *self._range)
        return _Rows(low, labels, n_classes, cells)

    def _add(self, state: _Window, rows: _Rows) -> None:
        """Add summarised rows (none past the window's end) to the client's counts."""
        n = rows.low.shape[0]
        state.n += n
        with_probs = rows.low >= 0
        state.n_prob += int(np.count_nonzero(with_probs))
        state.low += int(np.count_nonzero(rows.low == 1))
        if rows.n_classes > 0:
            labels = rows.labels[(rows.labels >= 0) & (rows.labels < self.max_classes)]
            # labels alone do not tell how many classes the model has: remember the most seen
            n_classes = max(self._classes_seen, min(rows.n_classes, self.max_classes))
            self._classes_seen = n_classes
            counts = state.classes
            if counts is None or counts.shape[0] < n_classes:
                grown = np.zeros(n_classes, dtype=np.int64)
                if counts is not None:
                    grown[: counts.shape[0]] = counts
                state.classes = counts = grown
            counts += np.bincount(labels, minlength=counts.shape[0])[: counts.shape[0]]
        cells = rows.cells
        if cells is not None:
            f = cells.shape[1]
            if state.cover is None or state.cover.shape[0] != f:
                state.cover = np.zeros((f, self.bins + 2), dtype=bool)
            state.cover[np.arange(f), cells] = True

    def _layout(
        self, width: int, low: NDArray[np.float64], high: NDArray[np.float64]
    ) -> tuple[NDArray[np.intp] | None, NDArray[np.float64], NDArray[np.float64]]:
        """Per row width: the covered features, their lows and their bins per unit."""
        layout = self._layouts.get(width)
        if layout is None:
            if low.shape[0] != width:  # one range for all, or calibrated on another width
                low = np.full(width, float(np.median(low)))
                high = np.full(width, float(np.median(high)))
            subset = self._feature_subset(width)
            if subset is not None:
                low, high = low[subset], high[subset]
            layout = (subset, low, self.bins / (high - low))
            self._layouts[width] = layout
            if len(self._layouts) > _MAX_WIDTHS:
                self._layouts.popitem(last=False)
        return layout

    def _cells(
        self, rows: NDArray[np.float64], low: NDArray[np.float64], high: NDArray[np.float64]
    ) -> NDArray[np.intp]:
        """Per row and covered feature: its cell, 0 below ``low``, ``bins + 1`` from ``high``."""
        subset, lows, per_unit = self._layout(rows.shape[1], low, high)
        x = rows if subset is None else rows[:, subset]
        scaled = (x - lows) * per_unit
        # bin -1 (below low) and bin ``bins`` (at or above high) become the edge cells;
        # fmax sends NaN below low (it returns the non-NaN operand)
        np.fmax(scaled, -1.0, out=scaled)
        np.fmin(scaled, float(self.bins), out=scaled)
        return np.floor(scaled).astype(np.intp) + 1

    def _signals(self, state: _Window) -> dict[str, float]:
        out: dict[str, float] = {}
        if state.n_prob:
            out["low_confidence"] = state.low / state.n_prob
        if state.classes is not None:
            total = int(state.classes.sum())
            k = min(max(state.classes.shape[0], self._classes_seen), total)
            if k >= 2:
                p = state.classes[state.classes > 0] / total
                out["class_concentration"] = 1.0 + float((p * np.log(p)).sum()) / math.log(k)
        if state.cover is not None:
            out["coverage"] = float(state.cover.mean())
        return out

    def _score(self, signals: Mapping[str, float]) -> float:
        """Minus the leading input z-score, raised by at most half by the answer signals."""
        lead: float | None = None
        support = 0.0
        for name, value in signals.items():
            if name not in self.baseline:
                continue
            mean, std = self.baseline[name]
            z = (value - mean) / std
            if name not in LEADING:
                support = max(support, z)
            elif lead is None or z > lead:
                lead = z
        if lead is None:
            return 0.0
        if lead > 0.0:
            lead += 0.5 * min(support, lead)
        return -lead

    def _result(
        self, score: float, signals: Mapping[str, float] | None, n_rows: int
    ) -> DetectorResult:
        if score >= self.threshold:
            return DetectorResult(self.name, score, self.threshold, False)
        detail = ", ".join(f"{k}={v:.3f}" for k, v in (signals or {}).items())
        return DetectorResult(
            self.name,
            score,
            self.threshold,
            True,
            reason=f"probing/coverage window far from benign: {detail or 'shared standing'}",
            rows_flagged=n_rows,
        )


def _check_baseline(baseline: Mapping[str, tuple[float, float]]) -> dict[str, tuple[float, float]]:
    out: dict[str, tuple[float, float]] = {}
    for name, pair in baseline.items():
        if name not in SIGNALS:
            raise ValueError(f"unknown signal {name!r} in baseline (known: {', '.join(SIGNALS)})")
        mean, std = (float(v) for v in pair)
        if not (math.isfinite(mean) and math.isfinite(std) and std >= 0):
            raise ValueError(f"baseline for {name!r} must be (finite mean, std >= 0), got {pair!r}")
        out[name] = (mean, max(std, _MIN_STD))
    return out


def _answer_fits(answer: Answer, n_rows: int) -> bool:
    probs = answer.probabilities
    if probs is not None:
        return probs.ndim == 2 and probs.shape[0] == n_rows and probs.shape[1] > 0
    labels = answer.labels
    return labels is not None and labels.shape == (n_rows,) and labels.dtype.kind in "iu"


def _select_answer(answer: Answer, keep: NDArray[np.bool_]) -> Answer:
    return Answer(
        status=answer.status,
        labels=None if answer.labels is None else answer.labels[keep],
        probabilities=None if answer.probabilities is None else answer.probabilities[keep],
    )


def _pack(rows: _Rows, bins: int) -> list[NDArray[np.generic]]:
    n_classes = np.array([rows.n_classes], dtype=np.int64)
    # a cell fits a byte for up to 254 bins, the usual case
    dtype = np.uint8 if bins + 1 < 256 else np.int32
    cells = np.zeros((rows.low.shape[0], 0)) if rows.cells is None else rows.cells
    return [rows.low, rows.labels, n_classes, cells.astype(dtype)]


def _unpack(arrays: list[NDArray[np.generic]], bins: int) -> _Rows | None:
    """Another worker's summarised rows; ``None`` if they do not fit this detector."""
    if len(arrays) != 4:
        return None
    low, labels, n_classes, raw_cells = arrays
    if raw_cells.dtype not in (np.uint8, np.int32):
        return None
    cells = np.asarray(raw_cells, dtype=np.intp)
    n = low.shape[0]
    if (
        low.dtype != np.int8
        or labels.dtype != np.int64
        or labels.shape != (n,)
        or n_classes.dtype != np.int64
        or n_classes.shape != (1,)
        or n_classes[0] < 0
        or cells.ndim != 2
        or cells.shape[0] != n
        or (cells.size and not ((cells >= 0) & (cells <= bins + 1)).all())
    ):
        return None
    return _Rows(
        np.asarray(low, dtype=np.int8),
        np.asarray(labels, dtype=np.int64),
        int(n_classes[0]),
        None if cells.shape[1] == 0 else cells,
    )
