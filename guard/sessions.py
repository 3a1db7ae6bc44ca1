"""Simulated benign client sessions, and per-client thresholds set on them.

A stateful detector judges a client by its whole traffic, so its threshold
must be set on *clients*, not rows: on how low an ordinary client's score
goes over a session. :func:`simulate_sessions` draws such sessions from the
deployment's own reference rows (and the model's answers on them), and
:func:`calibrate_profile` runs them through the detector exactly as it is
configured, sets the threshold at a per-client false-positive target, and
measures the false-positive rate on a second, independent set of sessions.

Sessions mix ordinary clients with the hard cases that real deployments have
and that must never be punished:

``ordinary``
    10 to 600 rows in a client-specific random order, in batches of 1-2,
    1-8 or 8-32 rows (a habit per client), 10 % of rows a resend of a recent one;
``health_probe``
    one row, sent again and again;
``retrier``
    every row sent three times in a row;
``batch_job``
    the reference rows in their stored order, in batches of up to 64;
``one_class``
    only rows that the model puts in one class.
"""

from __future__ import annotations

import asyncio
import math
import os
import secrets
import tempfile
import time
from collections import Counter
from collections.abc import Coroutine, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final, TypeVar

import numpy as np
from numpy.typing import NDArray

from inference_guard.detectors.base import Answer, Detector, Query
from inference_guard.detectors.boundary import SIGNALS, BoundaryDetector
from inference_guard.detectors.outlier_base import threshold_at_fpr
from inference_guard.detectors.persist import save_model
from inference_guard.detectors.profile import TrafficProfile, robust_range
from inference_guard.guard.calibration_files import resolve_file
from inference_guard.guard.config import DetectorSpec
from inference_guard.guard.reference_data import DataError, ReferenceData
from inference_guard.guard.registry import BuildContext, build_detector
from inference_guard.guard.stores.memory import MemoryStore

__all__ = [
    "SESSION_KINDS",
    "ProfileReport",
    "Session",
    "Traffic",
    "calibrate_profile",
    "run_to_completion",
    "session_minima",
    "simulate_sessions",
    "traffic_from_capture",
]

T = TypeVar("T")

#: what each simulated client is
SESSION_KINDS: Final = ("ordinary", "health_probe", "retrier", "batch_job", "one_class")
#: share of each hard case among simulated sessions (the rest are ordinary)
HARD_SHARE: Final = 0.05
#: a private variable for calibration's own throwaway fingerprint salt
_SALT_ENV: Final = "GUARD_CALIBRATION_FINGERPRINT_SALT"
_HABITS: Final = ((1, 2), (1, 8), (8, 32))
_HABIT_P: Final = (0.4, 0.35, 0.25)


@dataclass(frozen=True, slots=True)
class Session:
    """One simulated client: what it sends, request by request."""

    client: str
    #: one of :data:`SESSION_KINDS`
    kind: str
    #: per request, indices into the reference rows
    batches: tuple[NDArray[np.intp], ...]

    @property
    def n_rows(self) -> int:
        return sum(int(b.shape[0]) for b in self.batches)


def _habit_batches(rng: np.random.Generator, order: list[int]) -> list[NDArray[np.intp]]:
    lo, hi = _HABITS[int(rng.choice(len(_HABITS), p=_HABIT_P))]
    out: list[NDArray[np.intp]] = []
    at = 0
    while at < len(order):
        size = int(rng.integers(lo, hi + 1))
        out.append(np.asarray(order[at : at + size], dtype=np.intp))
        at += size
    return out


def _ordinary(rng: np.random.Generator, pool: NDArray[np.intp], length: int) -> list[int]:
    order = rng.permutation(pool)
    rows: list[int] = []
    fresh = 0
    for _ in range(length):
        if rows and rng.random() < 0.1:
            rows.append(rows[-int(rng.integers(1, min(len(rows), 20) + 1))])
        else:
            rows.append(int(order[fresh % order.shape[0]]))
            fresh += 1
    return rows


def simulate_sessions(
    n_rows: int,
    n_sessions: int,
    *,
    predicted: NDArray[np.int64] | None = None,
    seed: int = 0,
    min_length: int = 10,
    max_length: int = 600,
    max_batch: int = 64,
    prefix: str = "s",
) -> list[Session]:
    """``n_sessions`` seeded benign sessions over ``n_rows`` reference rows.

    ``predicted`` (the model's class per row) enables ``one_class`` sessions.
    About :data:`HARD_SHARE` of the sessions are each hard case, the rest
    ordinary; lengths are log-uniform in ``[min_length, max_length]`` rows.
    """
    if n_rows < 2:
        raise ValueError(f"need at least 2 reference rows, got {n_rows}")
    rng = np.random.default_rng(seed)
    pool = np.arange(n_rows, dtype=np.intp)
    classes: list[NDArray[np.intp]] = []
    if predicted is not None:
        for c in np.unique(predicted):
            members = np.flatnonzero(predicted == c).astype(np.intp)
            if members.shape[0] >= 2:
                classes.append(members)
    kinds = [k for k in SESSION_KINDS[1:] if k != "one_class" or classes]
    out: list[Session] = []
    for i in range(n_sessions):
        draw = rng.random()
        kind = "ordinary"
        if draw < HARD_SHARE * len(kinds):
            kind = kinds[int(draw / HARD_SHARE)]
        length = int(math.exp(rng.uniform(math.log(min_length), math.log(max_length + 1))))
        batches: list[NDArray[np.intp]]
        if kind == "health_probe":
            row = int(rng.integers(n_rows))
            batches = [np.array([row], dtype=np.intp)] * length
        elif kind == "retrier":
            rows = rng.permutation(pool)[: max(1, length // 3)]
            batches = [np.array([r], dtype=np.intp) for r in rows for _ in range(3)]
        elif kind == "batch_job":
            start = int(rng.integers(n_rows))
            order = np.roll(pool, -start)[:length]
            batches = [order[j : j + max_batch] for j in range(0, order.shape[0], max_batch)]
        elif kind == "one_class":
            members = classes[int(rng.integers(len(classes)))]
            batches = _habit_batches(rng, _ordinary(rng, members, length))
        else:
            batches = _habit_batches(rng, _ordinary(rng, pool, length))
        out.append(Session(f"{prefix}{i:05d}", kind, tuple(batches)))
    return out


@dataclass(frozen=True, slots=True)
class Traffic:
    """Recorded client sessions (a capture file), to set thresholds on instead of simulations."""

    #: every recorded row, ``(n, d)``; sessions index into it
    rows: NDArray[np.float64]
    probabilities: NDArray[np.float64] | None
    labels: NDArray[np.int64] | None
    sessions: tuple[Session, ...]


def traffic_from_capture(source: str | Path) -> Traffic:
    """The answered, non-exempt requests of a capture (``capture:``), grouped by client.

    Lines without rows or without an answer (refused, or texts) are left out,
    and so are exempt clients (monitors and load tests are not the benign
    population). Rows of another width than the most common one are left out.
    """
    from inference_guard.guard.replay import (
        read_lines,  # the capture's reader; imported only when used
    )

    lines = [
        ln for ln in read_lines(source)
        if ln.rows is not None and ln.answer is not None and not ln.exempt
    ]
    if not lines:
        raise DataError(f"{source}: no answered, non-exempt request with rows to learn from")
    widths = Counter(int(ln.rows.shape[1]) for ln in lines if ln.rows is not None)
    width = widths.most_common(1)[0][0]
    lines = [ln for ln in lines if ln.rows is not None and ln.rows.shape[1] == width]
    blocks: list[NDArray[np.float64]] = []
    probs: list[NDArray[np.float64]] | None = []
    labels: list[NDArray[np.int64]] | None = []
    by_client: dict[str, list[NDArray[np.intp]]] = {}
    at = 0
    for ln in lines:
        assert ln.rows is not None and ln.answer is not None
        n = int(ln.rows.shape[0])
        blocks.append(ln.rows)
        by_client.setdefault(ln.client, []).append(np.arange(at, at + n, dtype=np.intp))
        at += n
        p, lab = ln.answer.probabilities, ln.answer.labels
        if probs is not None:
            if p is None or p.shape[0] != n or (probs and p.shape[1] != probs[0].shape[1]):
                probs = None
            else:
                probs.append(p)
        if labels is not None:
            if lab is None and p is not None and p.shape[0] == n:
                lab = np.asarray(np.argmax(p, axis=1), dtype=np.int64)
            if lab is None or lab.shape != (n,):
                labels = None
            else:
                labels.append(np.asarray(lab, dtype=np.int64))
    sessions = tuple(
        Session(client, "recorded", tuple(batches)) for client, batches in by_client.items()
    )
    return Traffic(
        rows=np.vstack(blocks),
        probabilities=np.vstack(probs) if probs else None,
        labels=np.concatenate(labels) if labels else None,
        sessions=sessions,
    )


async def session_minima(
    detector: Detector,
    sessions: Sequence[Session],
    rows: NDArray[np.float64],
    *,
    probabilities: NDArray[np.float64] | None = None,
    labels: NDArray[np.int64] | None = None,
    policy: str = "calibration",
) -> NDArray[np.float64]:
    """The lowest score each session's client reached, through ``detector`` as deployed.

    Sessions run one after another through the one detector instance, so
    cross-client state (the global near-duplicate index) fills as it would live.
    """
    minima = np.empty(len(sessions))
    observes = detector.observes_answers
    for i, session in enumerate(sessions):
        low = math.inf
        for idx in session.batches:
            query = Query(session.client, policy, rows[idx], n_rows=int(idx.shape[0]))
            result = await detector.inspect(query)
            low = min(low, result.score)
            if observes:
                answer = Answer(
                    labels=None if labels is None else labels[idx],
                    probabilities=None if probabilities is None else probabilities[idx],
                )
                seen = await detector.observe(query, answer)
                if seen is not None:
                    low = min(low, seen.score)
        minima[i] = low
    return minima


@dataclass(frozen=True, slots=True)
class ProfileReport:
    """What calibrating one stateful detector gave."""

    kind: str
    #: the profile written (manifest beside it)
    path: Path
    #: sessions the threshold was set on, and the independent ones it was checked on
    sessions: int
    check_sessions: int
    target_fpr: float
    threshold: float
    #: share of the check sessions flagged (all kinds together)
    client_fpr: float
    #: per session kind: (sessions, share flagged), on the check sessions
    by_kind: Mapping[str, tuple[int, float]] = field(default_factory=dict)
    #: note on how the threshold was bounded, if it was
    note: str = ""
    seconds: float = 0.0


#: the structural bounds on a calibrated threshold (what a single chance event looks like)
def _bounded(kind: str, threshold: float, spec: DetectorSpec) -> tuple[float, str]:
    if kind == "near_duplicate":
        min_rows = int(spec.params.get("min_rows", 10))
        # one near-duplicate pair among a client's first rows is chance, not probing
        cap = 1.0 - 1.5 / min_rows
        if threshold > cap:
            return cap, f"bounded at {cap:.3g}: one own near-duplicate pair never flags"
    elif kind == "boundary" and threshold > -4.0:
        # live traffic drifts from the reference rows (a held-out split covers a little
        # more than the training split); a window this close to the baseline is not probing
        return -4.0, "bounded at -4: a window within 4 benign standard deviations never flags"
    elif kind == "prada" and threshold >= 1.0:
        return 0.99, "no simulated session reached a test; bounded at 0.99 (use more data)"
    return threshold, ""


def _placeholder(kind: str) -> float:
    return {"near_duplicate": 0.7, "prada": 0.9, "boundary": -6.0}[kind]


def _calibration_spec(spec: DetectorSpec, path: Path) -> DetectorSpec:
    params = {
        k: v
        for k, v in spec.params.items()
        # data-dependent overrides and the live anomaly-rate link are calibration's to set
        if k not in ("threshold", "delta", "feature_range", "n_classes", "baseline",
                     "anomaly_rate_source", "file", "salt_env")
    }
    params["file"] = str(path)
    if spec.type == "near_duplicate":
        params["salt_env"] = _SALT_ENV
    return replace(spec, params=params)


def _baseline(
    windows: list[Mapping[str, float]], anomaly_fpr: float | None, window: int
) -> NDArray[np.float64]:
    out = np.full((len(SIGNALS), 2), np.nan)
    for j, name in enumerate(SIGNALS):
        values = [w[name] for w in windows if name in w]
        if len(values) >= 2:
            out[j] = (float(np.mean(values)), float(np.std(values, ddof=1)))
    if anomaly_fpr is not None:
        # a benign window's anomalous share is binomial around the row detectors' rate
        p = max(anomaly_fpr, 1e-4)
        out[SIGNALS.index("anomaly_rate")] = (p, max(math.sqrt(p * (1 - p) / window), p))
    return out


async def _boundary_windows(
    det: BoundaryDetector,
    sessions: Sequence[Session],
    rows: NDArray[np.float64],
    probabilities: NDArray[np.float64] | None,
    labels: NDArray[np.int64] | None,
) -> list[Mapping[str, float]]:
    windows: list[Mapping[str, float]] = []
    for session in sessions:
        if session.kind not in ("ordinary", "recorded"):
            continue
        for idx in session.batches:
            query = Query(session.client, "baseline", rows[idx], n_rows=int(idx.shape[0]))
            answer = Answer(
                labels=None if labels is None else labels[idx],
                probabilities=None if probabilities is None else probabilities[idx],
            )
            if await det.observe(query, answer) is not None:
                signals = det.last_signals(session.client)
                if signals is not None:
                    windows.append(signals)
    return windows


def run_to_completion(work: Coroutine[Any, Any, T]) -> T:
    """Run ``work`` to its end from synchronous code, inside a running event loop or not.

    Calibration is synchronous, but may be called from a loop's thread: an ASGI
    server calling an app factory (``uvicorn --factory``) that calibrates at its
    first start. ``asyncio.run`` refuses to nest, so there the work runs on a
    loop of its own in a helper thread, and the caller waits (a start-up step:
    the server serves nothing until its app exists).
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(work)
    with ThreadPoolExecutor(1, thread_name_prefix="guard-calibrate") as pool:
        return pool.submit(asyncio.run, work).result()


def calibrate_profile(
    spec: DetectorSpec,
    data: ReferenceData,
    out_dir: str | Path,
    *,
    target_fpr: float = 0.001,
    n_sessions: int = 600,
    seed: int = 0,
    max_batch: int = 64,
    anomaly_fpr: float | None = None,
    hmac_key: bytes | None = None,
    traffic: Traffic | None = None,
) -> ProfileReport:
    """Fit one stateful detector's :class:`TrafficProfile` and write it under ``out_dir``.

    ``n_sessions`` set the threshold; half as many again, drawn with another
    seed, measure the per-client false-positive rate it gives. With
    ``traffic`` (recorded sessions) two thirds of its clients set the
    threshold and the rest measure it instead; the per-feature ranges still
    come from ``data``. ``anomaly_fpr``: the row detectors' held-out
    false-positive rate, for the ``boundary`` detector's ``anomaly_rate`` signal.
    """
    started = time.perf_counter()
    ref_rows = data.rows
    if ref_rows is None:
        raise DataError(f"{spec.key or spec.type}: {spec.type} needs numeric rows, not prompts")
    low, high = robust_range(ref_rows)
    fit_sessions: Sequence[Session]
    check_sessions: Sequence[Session]
    if traffic is None:
        rows, probs, labels, predicted = ref_rows, data.probabilities, data.labels, data.predicted
    else:
        rows, probs, labels = traffic.rows, traffic.probabilities, traffic.labels
        predicted = labels
        if rows.shape[1] != ref_rows.shape[1]:
            raise DataError(
                f"recorded traffic has {rows.shape[1]} features, the reference data "
                f"{ref_rows.shape[1]}"
            )
    if spec.type in ("prada", "boundary") and probs is None and labels is None:
        raise DataError(
            f"{spec.key or spec.type}: {spec.type} learns from the model's answers; give them in "
            "the .npz as 'proba' (predict_proba on X) or 'labels' (predicted classes)"
        )
    n_classes = 0
    if probs is not None:
        n_classes = int(probs.shape[1])
    elif predicted is not None:
        n_classes = int(predicted.max()) + 1
    if traffic is None:
        fit_sessions = simulate_sessions(
            rows.shape[0], n_sessions, predicted=predicted, seed=seed, max_batch=max_batch
        )
        check_sessions = simulate_sessions(
            rows.shape[0],
            max(n_sessions // 2, 1),
            predicted=predicted,
            seed=seed + 7919,
            max_batch=max_batch,
            prefix="c",
        )
    else:
        if len(traffic.sessions) < 3:
            raise DataError(f"recorded traffic holds {len(traffic.sessions)} clients; need 3+")
        order = np.random.default_rng(seed).permutation(len(traffic.sessions))
        cut = max(1, (2 * len(order)) // 3)
        fit_sessions = [traffic.sessions[i] for i in np.sort(order[:cut])]
        check_sessions = [traffic.sessions[i] for i in np.sort(order[cut:])]
    out_path = resolve_file(spec, Path(out_dir))

    def build(tmp: Path, threshold: float, baseline: NDArray[np.float64] | None) -> Detector:
        path = tmp / out_path.name
        profile = TrafficProfile(
            detector=spec.type,
            threshold=threshold,
            target_fpr=target_fpr,
            sessions=0,
            client_fpr=0.0,
            n_classes=n_classes,
        ).with_arrays(low, high, baseline)
        save_model(profile, path)
        ctx = BuildContext(store=MemoryStore(max_keys=1 << 20), calibration_dir=tmp, seed=seed)
        return build_detector(_calibration_spec(spec, path), ctx)

    previous = os.environ.get(_SALT_ENV)
    os.environ[_SALT_ENV] = secrets.token_hex(16)
    try:
        with tempfile.TemporaryDirectory(prefix="guard-calibrate-") as tmp_name:
            tmp = Path(tmp_name)
            baseline: NDArray[np.float64] | None = None
            if spec.type == "boundary":
                det = build(tmp, _placeholder("boundary"), None)
                assert isinstance(det, BoundaryDetector)
                windows = run_to_completion(
                    _boundary_windows(det, fit_sessions, rows, probs, labels)
                )
                if len(windows) < 2:
                    raise DataError(
                        f"{spec.key or spec.type}: too little reference data for a "
                        f"window of {det.window} distinct rows; use more rows or a smaller "
                        "params.window"
                    )
                use_rate = "anomaly_rate_source" in spec.params
                baseline = _baseline(windows, anomaly_fpr if use_rate else None, det.window)
            det = build(tmp, _placeholder(spec.type), baseline)
            minima = run_to_completion(
                session_minima(det, fit_sessions, rows, probabilities=probs, labels=labels)
            )
            threshold, note = _bounded(spec.type, threshold_at_fpr(minima, target_fpr), spec)
            if traffic is not None:
                # a recorded population may hold an attacker: name the lowest for ops to check
                lowest = [fit_sessions[i].client for i in np.argsort(minima)[:3]]
                note = (note + "; " if note else "") + (
                    f"set on {len(fit_sessions)} recorded clients; the lowest-scoring, whose "
                    f"score the threshold rests on, were {', '.join(lowest)}: check they are benign"
                )
            det = build(tmp, threshold, baseline)
            checked = run_to_completion(
                session_minima(det, check_sessions, rows, probabilities=probs, labels=labels)
            )
    finally:
        if previous is None:
            os.environ.pop(_SALT_ENV, None)
        else:
            os.environ[_SALT_ENV] = previous
    flagged = checked < threshold
    by_kind: dict[str, tuple[int, float]] = {}
    for kind in (*SESSION_KINDS, "recorded"):
        mask = np.array([s.kind == kind for s in check_sessions])
        if mask.any():
            by_kind[kind] = (int(mask.sum()), float(flagged[mask].mean()))
    profile = TrafficProfile(
        detector=spec.type,
        threshold=float(threshold),
        target_fpr=float(target_fpr),
        sessions=len(fit_sessions),
        client_fpr=float(flagged.mean()),
        n_classes=n_classes,
    ).with_arrays(low, high, baseline)
    save_model(profile, out_path, hmac_key=hmac_key)
    return ProfileReport(
        kind=spec.type,
        path=out_path,
        sessions=len(fit_sessions),
        check_sessions=len(check_sessions),
        target_fpr=float(target_fpr),
        threshold=float(threshold),
        client_fpr=float(flagged.mean()),
        by_kind=by_kind,
        note=note,
        seconds=time.perf_counter() - started,
    )

