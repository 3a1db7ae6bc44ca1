"""``guard calibrate``: fit every detector a policy uses on the deployment's reference data.

::

    guard calibrate --data REF --out DIR --config FILE [--target-fpr 0.001]
                    [--client-fpr 0.001] [--sessions 400 | --traffic CAPTURE]
                    [--holdout 0.2] [--seed 0]
    guard calibrate --data REF --out DIR [--detectors envelope,knn]

``REF`` holds benign reference rows (``.npy``, ``.npz``, ``.csv``, ``.jsonl`` of
recorded requests) or prompts (``.txt``, ``.jsonl`` of chat/completions
requests); see :mod:`guard.reference_data`. For the stateful detectors that
learn from answers (``prada``, ``boundary``) the ``.npz`` also holds the
model's answers on the rows: ``proba`` (``predict_proba``) or ``labels``.

* **Input-anomaly detectors** (``envelope``, ``mahalanobis``, ``iforest``,
  ``knn``, ``text``): a seeded ``--holdout`` share is set aside, each detector
  is fitted on the rest and its threshold set at ``--target-fpr`` (per row) on
  the held-out part. Written as ``<type>.npz`` plus its manifest (see
  :mod:`detectors.persist`; signed with HMAC-SHA256 when
  ``GUARD_CALIBRATION_KEY`` is set).
* **Stateful detectors** (``near_duplicate``, ``prada``, ``boundary``): the
  per-feature robust ranges, the class count and the benign window baseline
  are measured on the rows, then ``--sessions`` simulated benign client
  sessions (ordinary clients and the hard cases: health probes, retriers,
  batch jobs, one-class clients; :mod:`guard.sessions`) run through the
  detector as configured, and its threshold is set at ``--client-fpr`` per
  client. An independent set of sessions measures the per-client
  false-positive rate the threshold gives. With ``--traffic`` the sessions are
  recorded ones instead (a ``capture:`` file of benign traffic, exempt
  clients left out); the report names the lowest-scoring recorded clients, on
  whom the threshold rests, for ops to check. Written as a
  :class:`~detectors.profile.TrafficProfile` (``<type>.npz`` and manifest).

Which detectors: with ``--config``, every detector its policies configure
that calibration fits, with their parameters and ``params.file`` names;
otherwise ``--detectors``, by default all four row detectors for rows and
``text`` for prompts.

The report gives, per input-anomaly detector, the threshold, the
false-positive rate on the held-out rows (at most the target by
construction), a two-fold cross-check and score quantiles; per stateful
detector, the threshold and the per-client false-positive rate on the check
sessions, overall and per kind of client. A held-out set of ``n`` rows
cannot resolve a target below ``1 / (n + 1)``; the report says so.

:func:`calibrate_digits` calibrates the row detectors on the demo's digits
training split, for ``guard demo`` (well under two seconds).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np
from numpy.typing import NDArray

from inference_guard.detectors.outlier_base import threshold_at_fpr
from inference_guard.detectors.persist import KINDS, load_model, save_model
from inference_guard.guard.anomaly_factories import ROW_TYPES, TEXT_TYPES, model_params
from inference_guard.guard.calibration_files import (
    CALIBRATION_KEY_ENV,
    calibration_key,
    resolve_file,
)
from inference_guard.guard.config import DetectorSpec, GuardConfig
from inference_guard.guard.errors import ConfigurationError
from inference_guard.guard.reference_data import DataError, ReferenceData, load_reference
from inference_guard.guard.score_buckets import calibration_summary
from inference_guard.guard.sessions import (
    SESSION_KINDS,
    ProfileReport,
    Traffic,
    calibrate_profile,
    simulate_sessions,
    traffic_from_capture,
)

__all__ = [
    "STATEFUL_TYPES",
    "Calibration",
    "DetectorReport",
    "Job",
    "add_arguments",
    "calibrate",
    "calibrate_config",
    "calibrate_digits",
    "calibrate_rows",
    "format_report",
    "jobs_from_config",
    "run",
]

#: the detector types calibrated on simulated client sessions (a TrafficProfile each)
STATEFUL_TYPES = ("near_duplicate", "prada", "boundary")
#: score quantiles shown in the report
QUANTILES = (0.0, 0.01, 0.05, 0.5, 1.0)
#: the demo's split of load_digits (middleware/demo.py: seeded permutation, first 80% train)
DIGITS_TRAIN_FRACTION = 0.8


@dataclass(frozen=True, slots=True)
class Job:
    """One detector to fit and the file to write it to."""

    #: detector type (``knn``, ``text``, ...)
    kind: str
    #: file name under the output directory
    file: str
    #: model parameters (from the config); target_fpr and random_state default to the CLI's
    params: Mapping[str, Any] = field(default_factory=dict)
    #: config key paths of the specs that use this file
    keys: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class DetectorReport:
    """What calibrating one detector gave."""

    kind: str
    #: the ``.npz`` written (manifest beside it)
    path: Path
    #: rows (prompts) the model was fitted on
    n_fit: int
    #: held-out rows the threshold was set on
    n_heldout: int
    #: the target false-positive rate used
    target_fpr: float
    #: ``offset_``: inputs scoring below it are anomalous
    threshold: float
    #: share of held-out rows below the threshold
    heldout_fpr: float
    #: two-fold estimate: threshold from one half of the held-out rows, measured on the other
    crosscheck_fpr: float
    #: held-out score quantiles at :data:`QUANTILES`
    quantiles: tuple[float, ...]
    #: seconds spent fitting and scoring
    seconds: float

    @property
    def resolvable(self) -> bool:
        """Whether the held-out set is large enough for the target (``n + 1 >= 1 / target``)."""
        return (self.n_heldout + 1) * self.target_fpr >= 1.0


class Progress:
    """A one-line progress bar on stderr (one line per step when not a terminal)."""

    def __init__(self, total: int, *, stream: TextIO | None = None, width: int = 24) -> None:
        self.total = max(total, 1)
        self.done = 0
        self.stream = stream if stream is not None else sys.stderr
        self.width = width
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())

    def step(self, label: str) -> None:
        """Mark one more step done, with what is happening next."""
        self.done = min(self.done + 1, self.total)
        filled = round(self.width * self.done / self.total)
        bar = "#" * filled + "." * (self.width - filled)
        line = f"[{bar}] {self.done}/{self.total} {label}"
        if self._tty:
            self.stream.write("\r\x1b[K" + line)
            if self.done == self.total:
                self.stream.write("\n")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


# --------------------------------------------------------------------------- fitting


def _split(n: int, holdout: float, seed: int) -> tuple[NDArray[np.intp], NDArray[np.intp]]:
    order = np.random.default_rng(seed).permutation(n)
    n_held = round(holdout * n)
    if n_held < 2 or n - n_held < 2:
        raise DataError(
            f"{n} reference rows are too few for holdout={holdout} (need 2 held-out and "
            "2 fitting rows; thousands are better)"
        )
    return np.sort(order[n_held:]), np.sort(order[:n_held])


def _crosscheck(scores: NDArray[np.float64], target_fpr: float, seed: int) -> float:
    if scores.size < 4:
        return math.nan
    order = np.random.default_rng(seed + 1).permutation(scores.size)
    a, b = scores[order[: scores.size // 2]], scores[order[scores.size // 2 :]]
    fpr_b = float(np.mean(b < threshold_at_fpr(a, target_fpr)))
    fpr_a = float(np.mean(a < threshold_at_fpr(b, target_fpr)))
    return (fpr_a + fpr_b) / 2


def _subset(data: ReferenceData, idx: NDArray[np.intp]) -> Any:
    if data.rows is not None:
        return data.rows[idx]
    return [data.texts[i] for i in idx]


def calibrate(
    data: ReferenceData,
    out_dir: str | Path,
    jobs: Sequence[Job],
    *,
    target_fpr: float = 0.001,
    holdout: float = 0.2,
    seed: int = 0,
    hmac_key: bytes | None = None,
    progress: Progress | None = None,
) -> list[DetectorReport]:
    """Fit, calibrate and write each job's detector; return one report per job."""
    if not 0.0 < target_fpr < 0.5:
        raise ValueError(f"target FPR must be in (0, 0.5), got {target_fpr}")
    if not 0.0 < holdout < 0.9:
        raise ValueError(f"holdout must be in (0, 0.9), got {holdout}")
    out = Path(out_dir)
    fit_idx, held_idx = _split(len(data), holdout, seed)
    fit_part, held_part = _subset(data, fit_idx), _subset(data, held_idx)
    reports = []
    for job in jobs:
        if (job.kind in TEXT_TYPES) != (data.rows is None):
            raise DataError(f"{job.kind!r} needs {'texts' if job.kind in TEXT_TYPES else 'rows'}")
        params = dict(job.params)
        fpr = float(params.setdefault("target_fpr", target_fpr))
        params.setdefault("random_state", seed)
        params["holdout"] = 0.0  # the split is ours: fit on fit_part, threshold on held_part
        start = time.perf_counter()
        if progress is not None:
            progress.step(f"fitting {job.kind}")
        model = KINDS[job.kind](**params)
        model.fit(fit_part)
        model.calibrate(held_part)
        scores = model.score_samples(held_part)
        seconds = time.perf_counter() - start
        path = save_model(
            model,
            out / job.file,
            hmac_key=hmac_key,
            calibration=calibration_summary(model.offset_, scores),
        )
        if progress is not None:
            progress.step(f"wrote {path.name}")
        reports.append(
            DetectorReport(
                kind=job.kind,
                path=path,
                n_fit=len(fit_idx),
                n_heldout=len(held_idx),
                target_fpr=fpr,
                threshold=model.offset_,
                heldout_fpr=float(np.mean(scores < model.offset_)),
                crosscheck_fpr=_crosscheck(scores, fpr, seed),
                quantiles=tuple(float(q) for q in np.quantile(scores, QUANTILES)),
                seconds=seconds,
            )
        )
    return reports


def calibrate_rows(
    X: Any,
    out_dir: str | Path,
    *,
    kinds: Sequence[str] = ROW_TYPES,
    target_fpr: float = 0.001,
    holdout: float = 0.2,
    seed: int = 0,
    hmac_key: bytes | None = None,
) -> list[DetectorReport]:
    """Fit the row detectors ``kinds`` on benign rows ``X`` and write them to ``out_dir``."""
    rows = np.asarray(X, dtype=np.float64)
    data = ReferenceData(rows, (), "array")
    jobs = [Job(kind, f"{kind}.npz") for kind in kinds]
    return calibrate(
        data, out_dir, jobs, target_fpr=target_fpr, holdout=holdout, seed=seed, hmac_key=hmac_key
    )


def calibrate_digits(
    out_dir: str | Path,
    *,
    target_fpr: float = 0.001,
    seed: int = 0,
    X: Any = None,
    hmac_key: bytes | None = None,
) -> list[DetectorReport]:
    """Calibrate ``envelope``, ``mahalanobis``, ``iforest`` and ``knn`` for the digits demo.

    ``X`` defaults to the demo's training split of :func:`sklearn.datasets.load_digits`
    (rows shuffled by ``numpy.random.default_rng(seed)``, first 80%), the same split
    ``middleware.demo.train_digits_model(seed)`` trains on; pass ``model.X_train``
    to be independent of that detail. The files are ``<out_dir>/<type>.npz``:
    point ``calibration_dir`` at ``out_dir``.
    """
    if X is None:
        from sklearn.datasets import load_digits

        data = np.asarray(load_digits().data, dtype=np.float64)
        order = np.random.default_rng(seed).permutation(data.shape[0])
        X = data[order[: int(DIGITS_TRAIN_FRACTION * data.shape[0])]]
    return calibrate_rows(X, out_dir, target_fpr=target_fpr, seed=seed, hmac_key=hmac_key)


@dataclass(frozen=True, slots=True)
class RateReport:
    """What an ``anomaly_rate`` detector would do to simulated benign clients.

    It has nothing to fit (it counts the calibrated verdicts of a row
    detector), so calibration measures it: sessions replay held-out rows and
    the share of clients it would fire on is reported.
    """

    #: config key path of the anomaly_rate detector
    key: str
    #: the row detectors whose verdicts it counts
    source: str
    max_rate: float
    min_rows: int
    sessions: int
    #: share of the sessions it fires on
    client_fpr: float
    #: per session kind: (sessions, share fired on)
    by_kind: Mapping[str, tuple[int, float]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Calibration:
    """Everything one ``guard calibrate --config`` run fitted."""

    #: the input-anomaly detectors, one report each
    rows: tuple[DetectorReport, ...]
    #: the stateful detectors' profiles, one report each
    profiles: tuple[ProfileReport, ...]
    #: detectors skipped, and why
    notes: tuple[str, ...] = ()
    #: the anomaly_rate detectors, measured on simulated sessions
    rates: tuple[RateReport, ...] = ()


def _rate_reports(
    cfg: GuardConfig,
    data: ReferenceData,
    out_dir: Path,
    *,
    holdout: float,
    seed: int,
    sessions: int,
) -> tuple[list[RateReport], list[str]]:
    """Each ``anomaly_rate`` detector, judged on sessions of held-out rows its source flags."""
    reports: list[RateReport] = []
    notes: list[str] = []
    if data.rows is None:
        return reports, notes
    _, held = _split(len(data), holdout, seed)
    for policy in cfg.policies:
        by_name = {spec.name: spec for spec in policy.detectors}
        for spec in policy.detectors:
            if spec.type != "anomaly_rate":
                continue
            raw = spec.params.get("source")
            names = [str(x) for x in (raw if isinstance(raw, list) else [raw])]
            sources = [by_name.get(name) for name in names]
            paths = [None if src is None else resolve_file(src, out_dir) for src in sources]
            if not all(
                src is not None and src.type in ROW_TYPES and path is not None and path.exists()
                for src, path in zip(sources, paths, strict=True)
            ):
                notes.append(f"not measured: {spec.key} (anomaly_rate): a source is not a row "
                             "detector calibrated in this run")
                continue
            # (rows, sources): which row each source detector flags
            flags = np.column_stack(
                [load_model(path).predict(data.rows[held]) < 0 for path in paths if path]
            )
            max_rate = float(spec.params.get("max_rate", 0.2))
            min_rows = int(spec.params.get("min_rows", 20))
            predicted = None if data.predicted is None else data.predicted[held]
            simulated = simulate_sessions(
                int(held.shape[0]), sessions, predicted=predicted, seed=seed + 13
            )
            fired = np.zeros(len(simulated), dtype=bool)
            for i, session in enumerate(simulated):
                bad = np.zeros(flags.shape[1], dtype=np.int64)
                total = 0
                for idx in session.batches:
                    bad += flags[idx].sum(axis=0)
                    total += int(idx.shape[0])
                    if total >= min_rows and (bad > max_rate * total).any():
                        fired[i] = True
                        break
            by_kind: dict[str, tuple[int, float]] = {}
            for kind in SESSION_KINDS:
                mask = np.array([x.kind == kind for x in simulated])
                if mask.any():
                    by_kind[kind] = (int(mask.sum()), float(fired[mask].mean()))
            reports.append(
                RateReport(spec.key, ", ".join(names), max_rate, min_rows, len(simulated),
                           float(fired.mean()), by_kind)
            )
    return reports, notes


def calibrate_config(
    config: str | Path | GuardConfig,
    data: ReferenceData,
    out_dir: str | Path,
    *,
    target_fpr: float = 0.001,
    client_fpr: float = 0.001,
    sessions: int = 400,
    holdout: float = 0.2,
    seed: int = 0,
    hmac_key: bytes | None = None,
    progress: Progress | None = None,
    traffic: Traffic | None = None,
) -> Calibration:
    """Fit every detector ``config`` uses that calibration fits, and write them to ``out_dir``.

    Input-anomaly detectors at ``target_fpr`` per row, stateful detectors at
    ``client_fpr`` per client on ``sessions`` simulated benign sessions, or on
    recorded ``traffic`` (:func:`guard.sessions.traffic_from_capture`) when given.
    """
    if not 0.0 < client_fpr < 0.5:
        raise ValueError(f"client FPR must be in (0, 0.5), got {client_fpr}")
    if sessions < 10:
        raise ValueError(f"sessions must be >= 10, got {sessions}")
    cfg = _as_config(config)
    specs, notes = stateful_specs(cfg, data)
    jobs, row_notes = jobs_from_config(cfg, data, required=not specs)
    row_reports = calibrate(
        data, out_dir, jobs, target_fpr=target_fpr, holdout=holdout, seed=seed,
        hmac_key=hmac_key, progress=progress,
    ) if jobs else []
    # the row detectors' measured per-row rate: what a benign window's anomalous share centres on
    anomaly_fpr = max((r.heldout_fpr for r in row_reports), default=target_fpr)
    max_batch = max(1, min(64, cfg.limits.max_rows))
    profiles = []
    for spec in specs:
        if progress is not None:
            progress.step(f"simulating sessions for {spec.type}")
        profiles.append(
            calibrate_profile(
                spec, data, out_dir, target_fpr=client_fpr, n_sessions=sessions, seed=seed,
                max_batch=max_batch, anomaly_fpr=max(anomaly_fpr, target_fpr),
                hmac_key=hmac_key, traffic=traffic,
            )
        )
    rates, rate_notes = _rate_reports(
        cfg, data, Path(out_dir), holdout=holdout, seed=seed, sessions=sessions
    )
    rate_notes += [
        f"not fitted: {spec.key} ({spec.type}): its quotas are yours to set, not the data's"
        for policy in cfg.policies
        for spec in policy.detectors
        if spec.type == "rate"
    ]
    return Calibration(
        tuple(row_reports), tuple(profiles), tuple(row_notes + notes + rate_notes), tuple(rates)
    )


# --------------------------------------------------------------------------- which detectors


def _as_config(config: str | Path | GuardConfig) -> GuardConfig:
    return config if isinstance(config, GuardConfig) else GuardConfig.from_file(config)


def _output_file(spec: DetectorSpec) -> str:
    """The file (under ``--out``) a spec is calibrated into: ``<type>.npz`` or ``params.file``."""
    raw_file = spec.params.get("file")
    if isinstance(raw_file, str) and Path(raw_file).is_absolute():
        raise ConfigurationError(
            f"{spec.key}.params.file", "must be relative: guard calibrate writes under --out"
        )
    return str(resolve_file(spec, Path(".")))


def stateful_specs(
    config: str | Path | GuardConfig, data: ReferenceData
) -> tuple[list[DetectorSpec], list[str]]:
    """The stateful detectors a config uses (one per profile file); notes on those skipped."""
    cfg = _as_config(config)
    specs: dict[str, DetectorSpec] = {}
    notes: list[str] = []
    for policy in cfg.policies:
        for spec in policy.detectors:
            if spec.type not in STATEFUL_TYPES:
                continue
            if data.rows is None:
                notes.append(f"skipped {spec.key} ({spec.type}): needs rows, not prompts")
                continue
            file = _output_file(spec)
            known = specs.get(file)
            if known is not None and (known.type, dict(known.params)) != (
                spec.type,
                dict(spec.params),
            ):
                raise ConfigurationError(
                    f"{spec.key}.params.file",
                    f"{file} is also written for {known.key} with other parameters; "
                    "give this detector its own params.file",
                )
            specs.setdefault(file, spec)
    return list(specs.values()), notes


def jobs_from_config(
    config_path: str | Path | GuardConfig, data: ReferenceData, *, required: bool = True
) -> tuple[list[Job], list[str]]:
    """The input-anomaly detectors a config's policies use that fit ``data``; notes on others.

    With ``required``, a config without any is an error.
    """
    cfg = _as_config(config_path)
    jobs: dict[str, Job] = {}
    notes: list[str] = []
    for policy in cfg.policies:
        for spec in policy.detectors:
            if spec.type not in ROW_TYPES + TEXT_TYPES:
                continue
            if (spec.type in TEXT_TYPES) != (data.rows is None):
                needs = "prompts" if spec.type in TEXT_TYPES else "rows"
                notes.append(f"skipped {spec.key} ({spec.type}): needs {needs}")
                continue
            file = _output_file(spec)
            allowed = model_params(spec.type) - {"holdout"}
            params = {k: v for k, v in spec.params.items() if k in allowed}
            job = Job(spec.type, file, params, (spec.key,))
            known = jobs.get(file)
            if known is None:
                jobs[file] = job
            elif known.kind != job.kind or dict(known.params) != params:
                raise ConfigurationError(
                    f"{spec.key}.params.file",
                    f"{file} is also written for {known.keys[0]} with other parameters; "
                    "give this detector its own params.file",
                )
            else:
                jobs[file] = Job(known.kind, file, known.params, (*known.keys, spec.key))
    if not jobs and required:
        problem = "no input-anomaly detector (envelope, mahalanobis, iforest, knn, text) is set"
        if notes:
            problem = "no configured input-anomaly detector fits this data: " + "; ".join(notes)
        raise ConfigurationError("policies", problem)
    return list(jobs.values()), notes


def default_jobs(data: ReferenceData, names: str | None) -> list[Job]:
    """``--detectors`` (comma-separated), or every detector that fits the data."""
    available = TEXT_TYPES if data.rows is None else ROW_TYPES
    if names is None:
        kinds: Sequence[str] = available
    else:
        kinds = [n.strip() for n in names.split(",") if n.strip()]
        for kind in kinds:
            if kind not in available:
                raise DataError(
                    f"--detectors: {kind!r} does not apply to "
                    f"{'prompts' if data.rows is None else 'rows'} (use {', '.join(available)})"
                )
    return [Job(kind, f"{kind}.npz") for kind in kinds]


# --------------------------------------------------------------------------- the command


def format_report(
    reports: Sequence[DetectorReport], data: ReferenceData, *, holdout: float, seed: int
) -> str:
    """The human-readable calibration report."""
    what = (
        f"{len(data)} prompts" if data.rows is None
        else f"{data.rows.shape[0]} rows x {data.rows.shape[1]} features"
    )
    lines = [f"reference: {what} from {data.source}; held out {holdout:.0%} (seed {seed})"]
    q_head = "  ".join(f"{'q' + format(q * 100, 'g'):>9}" for q in QUANTILES)
    lines.append(
        f"{'detector':<12} {'threshold':>11} {'target':>7} {'FPR held':>9} {'FPR 2-fold':>10}"
        f"  {q_head}  {'s':>5}  file"
    )
    for r in reports:
        qs = "  ".join(f"{q + 0.0:>9.4g}" for q in r.quantiles)  # + 0.0: no "-0"
        lines.append(
            f"{r.kind:<12} {r.threshold:>11.5g} {r.target_fpr:>7.4g} {r.heldout_fpr:>9.4f} "
            f"{r.crosscheck_fpr:>10.4f}  {qs}  {r.seconds:>5.2f}  {r.path}"
        )
    unresolved: dict[tuple[int, float], list[str]] = {}
    for r in reports:
        if not r.resolvable:
            unresolved.setdefault((r.n_heldout, r.target_fpr), []).append(r.kind)
    for (n, target), kinds in unresolved.items():
        lines.append(
            f"note: {', '.join(kinds)}: {n} held-out rows cannot resolve a target FPR of "
            f"{target:g} (needs {math.ceil(1 / target) - 1}); the threshold is the lowest "
            f"held-out score, expected FPR ~ 1/(n+1) = {1 / (n + 1):.4f}. Use more reference "
            "data or a larger --holdout."
        )
    return "\n".join(lines)


def format_profiles(reports: Sequence[ProfileReport]) -> str:
    """The stateful detectors' part of the report: thresholds and per-client false positives."""
    if not reports:
        return ""
    kinds = sorted({k for r in reports for k in r.by_kind})
    head = "  ".join(f"{k:>12}" for k in kinds)
    lines = [
        f"{'stateful':<15} {'threshold':>10} {'client target':>13} {'client FPR':>10} "
        f"{'sessions':>10}  {head}  {'s':>5}  file",
    ]
    for r in reports:
        cells = "  ".join(
            f"{r.by_kind[k][1]:>6.3f} ({r.by_kind[k][0]:>3})" if k in r.by_kind else f"{'—':>12}"
            for k in kinds
        )
        lines.append(
            f"{r.kind:<15} {r.threshold:>10.4g} {r.target_fpr:>13.4g} {r.client_fpr:>10.4f} "
            f"{r.sessions:>4}+{r.check_sessions:<5}  {cells}  {r.seconds:>5.1f}  {r.path}"
        )
    lines.append(
        "client FPR: share of independent simulated benign sessions the threshold flags "
        "(per kind: share flagged, sessions)"
    )
    for r in reports:
        if r.note:
            lines.append(f"note: {r.kind}: {r.note}")
        if (r.sessions + 1) * r.target_fpr < 1.0:
            lines.append(
                f"note: {r.kind}: {r.sessions} sessions cannot resolve a per-client target of "
                f"{r.target_fpr:g}; the threshold is the lowest benign session's score "
                "(use --sessions to simulate more)"
            )
    return "\n".join(lines)


def format_rates(reports: Sequence[RateReport]) -> str:
    """The anomaly_rate detectors' part of the report."""
    lines = []
    for r in reports:
        kinds = ", ".join(f"{k} {v:.3f} ({n})" for k, (n, v) in r.by_kind.items())
        lines.append(
            f"anomaly_rate {r.key}: counts {r.source}'s verdicts, fires above {r.max_rate:g} of "
            f">= {r.min_rows} rows; client FPR {r.client_fpr:.4f} on {r.sessions} simulated "
            f"sessions of held-out rows ({kinds})"
        )
    return "\n".join(lines)


def _fraction(low: float, high: float) -> Any:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not low < value < high:
            raise argparse.ArgumentTypeError(f"must be in ({low}, {high}), got {value}")
        return value

    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``guard calibrate``'s options to ``parser``."""
    parser.description = (
        "Fit the input-anomaly detectors on benign reference data and write them, with "
        f"thresholds at a target false-positive rate, to DIR. Manifests are signed when "
        f"{CALIBRATION_KEY_ENV} is set."
    )
    parser.add_argument("--data", required=True, metavar="REF",
                        help="reference rows (.npy .npz .csv .jsonl) or prompts (.txt .jsonl)")
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory")
    parser.add_argument("--target-fpr", type=_fraction(0.0, 0.5), default=0.001,
                        help="false-positive rate for the thresholds (default 0.001)")
    parser.add_argument("--config", default=None, metavar="FILE",
                        help="fit the detectors this guard config uses, with its parameters")
    parser.add_argument("--holdout", type=_fraction(0.0, 0.9), default=0.2,
                        help="share of the data held out to set thresholds (default 0.2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split and the models")
    parser.add_argument("--detectors", default=None, metavar="LIST",
                        help="comma-separated types without --config (default: all that apply)")
    parser.add_argument("--client-fpr", type=_fraction(0.0, 0.5), default=0.001,
                        help="per-client false-positive target of the stateful detectors "
                        "(default 0.001)")
    parser.add_argument("--traffic", default=None, metavar="CAPTURE",
                        help="set the stateful detectors' thresholds on recorded client "
                        "sessions (a capture: file of benign traffic) instead of simulated ones")
    parser.add_argument("--sessions", type=int, default=400,
                        help="simulated benign client sessions per stateful detector "
                        "(default 400; half as many again check the rate)")


def run(args: argparse.Namespace) -> int:
    """Run ``guard calibrate``; 0 on success, 1 on bad data or configuration."""
    profiles: Sequence[ProfileReport] = ()
    rates: Sequence[RateReport] = ()
    try:
        data = load_reference(args.data)
        notes: Sequence[str] = []
        if args.config is not None:
            cfg = GuardConfig.from_file(args.config)
            specs, _ = stateful_specs(cfg, data)
            jobs, _ = jobs_from_config(cfg, data, required=not specs)
            traffic = None if args.traffic is None else traffic_from_capture(args.traffic)
            done = calibrate_config(
                cfg, data, args.out, target_fpr=args.target_fpr, client_fpr=args.client_fpr,
                sessions=args.sessions, holdout=args.holdout, seed=args.seed,
                hmac_key=calibration_key(), progress=Progress(2 * len(jobs) + len(specs)),
                traffic=traffic,
            )
            reports, profiles, notes = list(done.rows), done.profiles, done.notes
            rates = done.rates
        else:
            jobs = default_jobs(data, args.detectors)
            reports = calibrate(
                data, args.out, jobs, target_fpr=args.target_fpr, holdout=args.holdout,
                seed=args.seed, hmac_key=calibration_key(), progress=Progress(2 * len(jobs)),
            )
    except ConfigurationError as exc:
        for key, problem in exc.problems:
            print(f"guard calibrate: {key or '<config>'}: {problem}", file=sys.stderr)
        return 1
    except (DataError, ValueError, OSError) as exc:
        print(f"guard calibrate: error: {exc}", file=sys.stderr)
        return 1
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    if reports:
        print(format_report(reports, data, holdout=args.holdout, seed=args.seed))
    if profiles:
        print(format_profiles(profiles))
    if rates:
        print(format_rates(rates))
    return 0
