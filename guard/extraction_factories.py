"""Factories for the extraction detectors (``FACTORIES``, in :mod:`guard.builtin_detectors`).

Types ``prada`` (:class:`detectors.prada.PradaDetector`), ``near_duplicate``
(:class:`detectors.fingerprint.NearDuplicateDetector`) and ``boundary``
(:class:`detectors.boundary.BoundaryDetector`).

Every data-dependent parameter comes from calibration: ``guard calibrate
--config FILE --data REF --out DIR`` writes one
:class:`~detectors.profile.TrafficProfile` per detector (``<type>.npz`` in
``calibration_dir``, or ``params.file``) holding the per-feature ranges, the
per-client threshold set on simulated benign sessions and, for ``boundary``,
the benign window baseline and class count. A detector with neither a
profile nor the explicit override of what it lacks (``feature_range`` for
``near_duplicate``, ``delta`` for ``prada``, ``threshold`` for ``boundary``)
is a configuration error that says so; ``guard check-config`` lists them.

The other parameters are structural and data-independent::

    policies:
      - name: inference
        detectors:
          - type: prada
            action: degrade
            params:
              # delta: 0.90            # override the calibrated threshold on Shapiro-Wilk W
              min_distances: 100
              test_every: 10
              max_set: 200             # rows per class set
              max_set_rows: 2000       # rows per client, all classes
              max_distances: 1000
              proj_dim: 32
              outlier_sigma: 3.0
              max_clients: 1000
              flag_ttl_s: 3600         # null: flags never expire
          - type: near_duplicate
            action: degrade
            params:
              # feature_range: [0, 16] # override the calibrated per-feature ranges
              # threshold: 0.7         # override the calibrated threshold
              salt_env: GUARD_FINGERPRINT_SALT
              levels: 8
              window: 5
              fingerprint_size: 50
              match_fraction: 0.5
              recent_rows: 50
              min_rows: 10
              run_scale: 20
              cross_gain: 5.0          # others' near-duplicates lengthen an own run <= 5x
              max_rows: 20000
              max_rows_per_client: 256
              bucket_size: 8
              max_clients: 10000
              flag_ttl_s: 3600
          - type: boundary
            action: degrade
            params:
              window: 100
              p_low: 0.6
              bins: 8
              signals: [low_confidence, class_concentration, coverage, anomaly_rate]
              anomaly_rate_source: mahalanobis          # a row detector with track_rate
              anomaly_rate_window_s: 60
              max_clients: 10000
              flag_ttl_s: 3600
              # feature_range, n_classes, baseline, threshold: from calibration

The fingerprint salt is a secret, read from the environment variable named by
``salt_env`` and never logged. Without it each process draws a random salt and
logs a warning: fingerprints then differ between workers, which matters as soon
as anything compares them across processes.

With a ``redis://`` store the three detectors share their evidence between
workers and replicas (:mod:`detectors.shared_evidence`); each takes
``share`` (``false``: keep the evidence per worker, share flags only),
``share_entries`` (requests the log keeps, 1024), ``share_rows`` (rows of one
request shared, 256) and ``share_ttl_s`` (600). Workers must agree on how
rows are projected (``prada``) and which features are covered (``boundary``,
wide rows): without an explicit ``seed`` both draw theirs from the
fingerprint salt (``GUARD_FINGERPRINT_SALT``), which is a secret; without
that either, ``prada`` shares nothing and says so in the log.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import secrets
from collections.abc import Callable, Mapping
from typing import Any, Final

from inference_guard.detectors.base import Detector
from inference_guard.detectors.boundary import DEFAULT_BASELINE, SIGNALS, BoundaryDetector
from inference_guard.detectors.fingerprint import NearDuplicateDetector
from inference_guard.detectors.persist import CorruptModelFile, load_model, manifest_path
from inference_guard.detectors.prada import PradaDetector
from inference_guard.detectors.profile import TrafficProfile
from inference_guard.guard.calibration_files import calibration_key, resolve_file
from inference_guard.guard.config import DetectorSpec
from inference_guard.guard.errors import ConfigurationError, ModelFileError
from inference_guard.guard.factory import BuildContext, DetectorFactory

__all__ = ["DEFAULT_SALT_ENV", "build_boundary", "build_near_duplicate", "build_prada"]

log = logging.getLogger("guard.extraction_factories")

#: environment variable the fingerprint salt is read from, unless ``salt_env`` names another
DEFAULT_SALT_ENV: Final = "GUARD_FINGERPRINT_SALT"
_MIN_SALT_BYTES: Final = 16
_MAX_INDEX_ROWS: Final = 1 << 20
#: the parameters of the evidence shared between workers (every extraction detector)
_SHARE_PARAMS: Final = frozenset({"share", "share_entries", "share_rows", "share_ttl_s"})


class _Params:
    """Reads ``spec.params`` one name at a time, collecting every problem with its key path."""

    def __init__(self, spec: DetectorSpec, allowed: frozenset[str]) -> None:
        self.params: Mapping[str, Any] = spec.params
        self.base = f"{spec.key}.params" if spec.key else "params"
        self.problems: list[tuple[str, str]] = [
            (self.key(str(name)), f"unknown parameter (allowed: {', '.join(sorted(allowed))})")
            for name in spec.params
            if name not in allowed
        ]

    def key(self, name: str) -> str:
        return f"{self.base}.{name}"

    def fail(self, name: str, problem: str) -> None:
        self.problems.append((self.key(name), problem))

    def _read(self, name: str, default: Any, ok: Callable[[Any], bool], what: str) -> Any:
        value = self.params.get(name, default)
        if value is default or ok(value):
            return value
        self.fail(name, f"must be {what}, got {value!r}")
        return default

    def integer(self, name: str, default: int, low: int, high: int | None = None) -> int:
        what = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"
        return int(
            self._read(
                name,
                default,
                lambda v: _is_int(v) and v >= low and (high is None or v <= high),
                what,
            )
        )

    def number(
        self,
        name: str,
        default: float,
        *,
        low: float,
        high: float = math.inf,
        low_open: bool = False,
    ) -> float:
        bracket = "(" if low_open else "["
        what = (
            f"a number in {bracket}{low}, {high}]"
            if high < math.inf
            else (f"a number {'>' if low_open else '>='} {low}")
        )

        def ok(v: Any) -> bool:
            return _is_num(v) and (v > low if low_open else v >= low) and v <= high

        return float(self._read(name, default, ok, what))

    def finite(self, name: str, default: float) -> float:
        return float(self._read(name, default, _is_num, "a finite number"))

    def ttl(self, name: str, default: float | None) -> float | None:
        value = self._read(
            name,
            default,
            lambda v: v is None or (_is_num(v) and v > 0),
            "a number of seconds > 0 or null",
        )
        return None if value is None else float(value)

    def optional_integer(self, name: str, low: int) -> int | None:
        value = self._read(
            name,
            None,
            lambda v: v is None or (_is_int(v) and v >= low),
            f"an integer >= {low} or null",
        )
        return None if value is None else int(value)

    def seed(self, name: str, default: int | None) -> int | None:
        value = self._read(
            name,
            default,
            lambda v: v is None or (_is_int(v) and v >= 0),
            "an integer >= 0 or null",
        )
        return None if value is None else int(value)

    def boolean(self, name: str, default: bool) -> bool:
        return bool(self._read(name, default, lambda v: isinstance(v, bool), "true or false"))

    def string(self, name: str, default: str) -> str:
        return str(
            self._read(
                name,
                default,
                lambda v: isinstance(v, str) and bool(v.strip()),
                "a non-empty string",
            )
        )

    def range(self, name: str) -> tuple[float, float] | None:
        value = self.params.get(name)
        if value is None:
            return None
        if (
            isinstance(value, list | tuple)
            and len(value) == 2
            and all(_is_num(v) for v in value)
            and value[0] < value[1]
        ):
            return float(value[0]), float(value[1])
        self.fail(name, f"must be [low, high] with finite low < high, got {value!r}")
        return None

    def done(self) -> None:
        if self.problems:
            key, problem = self.problems[0]
            raise ConfigurationError(key, problem, problems=self.problems)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _share(p: _Params) -> dict[str, Any]:
    """The evidence log's size, rows per request and TTL (used with a sharing store)."""
    return {
        "share": p.boolean("share", True),
        "share_entries": p.integer("share_entries", 1024, 1, 1 << 20),
        "share_rows": p.integer("share_rows", 256, 1, 1 << 16),
        "share_ttl_s": p.number("share_ttl_s", 600.0, low=0.0, low_open=True),
    }


def _shared_seed(p: _Params, spec: DetectorSpec, ctx: BuildContext) -> int | None:
    """``params.seed``, else the context's; with a sharing store and neither, one from the salt.

    Workers that share evidence must draw the same random projection (and
    feature subset); the salt is a secret every worker already shares, so the
    projection stays unknown to clients.
    """
    seed = p.seed("seed", ctx.seed)
    if seed is not None or not getattr(ctx.store, "shares_evidence", False):
        return seed
    raw = os.environ.get(DEFAULT_SALT_ENV, "").encode("utf-8")
    if len(raw) < _MIN_SALT_BYTES:
        log.warning(
            "%s detector %r: the store is shared but neither params.seed nor %s is set; "
            "workers draw different projections, so this detector's evidence is not shared",
            spec.type,
            spec.name,
            DEFAULT_SALT_ENV,
        )
        return None
    digest = hashlib.blake2b(raw, digest_size=8, person=b"ig-shared-seed").digest()
    return int.from_bytes(digest, "little")


def load_profile(spec: DetectorSpec, ctx: BuildContext) -> TrafficProfile | None:
    """The detector's calibrated :class:`TrafficProfile`, or ``None`` when there is none.

    Looked up as ``params.file`` or ``<type>.npz`` in ``calibration_dir``; a file
    that exists but cannot be trusted (checksum, HMAC, another detector's
    profile) is an error, never silently ignored.
    """
    if ctx.calibration_dir is None and "file" not in spec.params:
        return None
    path = resolve_file(spec, ctx.calibration_dir)
    if not path.exists() and not manifest_path(path).exists():
        return None
    try:
        profile = load_model(path, kind=TrafficProfile.kind, hmac_key=calibration_key())
    except CorruptModelFile as exc:
        raise ModelFileError(exc.path, exc.problem) from exc
    if not isinstance(profile, TrafficProfile) or profile.detector != spec.type:
        found = getattr(profile, "detector", "?")
        raise ModelFileError(str(path), f"holds a profile for {found!r}, not {spec.type!r}")
    return profile


def _uncalibrated(p: _Params, spec: DetectorSpec, ctx: BuildContext, override: str) -> None:
    where = (
        f"{ctx.calibration_dir}/{spec.params.get('file', spec.type + '.npz')}"
        if ctx.calibration_dir is not None
        else "calibration_dir (not set)"
    )
    p.fail(
        override,
        f"not calibrated: no profile at {where}; run `guard calibrate --config FILE "
        f"--data REFERENCE --out DIR` (or set params.{override} explicitly)",
    )


# ---------------------------------------------------------------------------- prada

_PRADA_PARAMS: Final = frozenset(
    {
        "file",
        "delta",
        "min_distances",
        "test_every",
        "max_set",
        "max_set_rows",
        "max_distances",
        "proj_dim",
        "outlier_sigma",
        "max_clients",
        "flag_ttl_s",
        "seed",
        *_SHARE_PARAMS,
    }
)


def build_prada(spec: DetectorSpec, ctx: BuildContext) -> Detector:
    """Build a :class:`PradaDetector` from ``spec``, or raise ConfigurationError."""
    p = _Params(spec, _PRADA_PARAMS)
    profile = load_profile(spec, ctx)
    delta = p.number(
        "delta",
        0.90 if profile is None else profile.threshold,
        low=0.0,
        high=1.0,
        low_open=True,
    )
    if profile is None and "delta" not in spec.params:
        _uncalibrated(p, spec, ctx, "delta")
    min_distances = p.integer("min_distances", 100, 3, 5000)
    max_distances = p.integer("max_distances", max(1000, min_distances), 3, 5000)
    if max_distances < min_distances:
        p.fail("max_distances", f"must be >= min_distances ({min_distances}), got {max_distances}")
    kwargs: dict[str, Any] = {
        "delta": delta,
        "min_distances": min_distances,
        "max_distances": max_distances,
        "test_every": p.integer("test_every", 10, 1),
        "max_set": p.integer("max_set", 200, 1),
        "max_set_rows": p.integer("max_set_rows", 2000, 1),
        "proj_dim": p.integer("proj_dim", 32, 1, 4096),
        "outlier_sigma": p.number("outlier_sigma", 3.0, low=0.0, low_open=True),
        "max_clients": p.integer("max_clients", 1000, 1),
        "flag_ttl_s": p.ttl("flag_ttl_s", 3600.0),
        "seed": _shared_seed(p, spec, ctx),
        **_share(p),
    }
    p.done()
    if profile is not None:
        kwargs["feature_scale"] = profile.high_ - profile.low_
    return PradaDetector(spec.name, store=ctx.store, **kwargs)


# ---------------------------------------------------------------------------- near_duplicate

_ND_PARAMS: Final = frozenset(
    {
        "file",
        "feature_range",
        "cross_gain",
        "salt_env",
        "levels",
        "window",
        "fingerprint_size",
        "match_fraction",
        "threshold",
        "recent_rows",
        "min_rows",
        "run_scale",
        "max_rows",
        "max_rows_per_client",
        "bucket_size",
        "max_clients",
        "flag_ttl_s",
        *_SHARE_PARAMS,
    }
)


def _salt(env_name: str, name: str, key: str) -> bytes:
    raw = os.environ.get(env_name, "")
    if raw:
        salt = raw.encode("utf-8")
        if len(salt) < _MIN_SALT_BYTES:
            # the message names the variable, never its value
            raise ConfigurationError(
                key, f"environment variable {env_name} must hold at least {_MIN_SALT_BYTES} bytes"
            )
        return salt
    log.warning(
        "near_duplicate detector %r: environment variable %s is not set; using a random "
        "per-process salt. Set it (to the same secret on every worker and replica) so that "
        "fingerprints agree across processes.",
        name,
        env_name,
    )
    return secrets.token_bytes(32)


def build_near_duplicate(spec: DetectorSpec, ctx: BuildContext) -> Detector:
    """Build a :class:`NearDuplicateDetector` from ``spec``, or raise ConfigurationError."""
    p = _Params(spec, _ND_PARAMS)
    profile = load_profile(spec, ctx)
    feature_range = p.range("feature_range")
    if feature_range is None and profile is None and "feature_range" not in spec.params:
        _uncalibrated(p, spec, ctx, "feature_range")
    salt_env = p.string("salt_env", DEFAULT_SALT_ENV)
    bucket_size = p.integer("bucket_size", 8, 1, 128)
    if bucket_size & (bucket_size - 1):
        p.fail("bucket_size", f"must be a power of two, got {bucket_size}")
    kwargs: dict[str, Any] = {
        "levels": p.integer("levels", 8, 1, 1 << 16),
        "window": p.integer("window", 5, 1, 32),
        "fingerprint_size": p.integer("fingerprint_size", 50, 1, 4096),
        "match_fraction": p.number("match_fraction", 0.5, low=0.0, high=1.0, low_open=True),
        "threshold": p.number(
            "threshold",
            0.7 if profile is None else profile.threshold,
            low=0.0,
            high=1.0,
            low_open=True,
        ),
        "cross_gain": p.number("cross_gain", 5.0, low=1.0),
        "recent_rows": p.integer("recent_rows", 50, 1, 100_000),
        "min_rows": p.integer("min_rows", 10, 1),
        "run_scale": p.integer("run_scale", 20, 1),
        "max_rows": p.integer("max_rows", 20_000, 1, _MAX_INDEX_ROWS),
        "max_rows_per_client": p.integer("max_rows_per_client", 256, 1, _MAX_INDEX_ROWS),
        "bucket_size": bucket_size,
        "max_clients": p.integer("max_clients", 10_000, 1),
        "flag_ttl_s": p.ttl("flag_ttl_s", 3600.0),
        **_share(p),
    }
    p.done()
    low: Any
    high: Any
    if feature_range is not None:
        low, high = feature_range
    elif profile is not None:
        low, high = profile.low_, profile.high_
    else:  # not reached: done() raised for it
        raise ConfigurationError(p.key("feature_range"), "is required")
    salt = _salt(salt_env, spec.name, p.key("salt_env"))
    return NearDuplicateDetector(
        spec.name, store=ctx.store, salt=salt, low=low, high=high, **kwargs
    )


# ---------------------------------------------------------------------------- boundary

_BOUNDARY_PARAMS: Final = frozenset(
    {
        "file",
        "window",
        "p_low",
        "feature_range",
        "bins",
        "max_coverage_features",
        "n_classes",
        "max_classes",
        "threshold",
        "signals",
        "baseline",
        "anomaly_rate_source",
        "anomaly_rate_window_s",
        "max_clients",
        "flag_ttl_s",
        "seed",
        *_SHARE_PARAMS,
    }
)


def _signals(p: _Params) -> tuple[str, ...]:
    value = p.params.get("signals", list(SIGNALS))
    if (
        not isinstance(value, list)
        or not value
        or any(not isinstance(v, str) or v not in SIGNALS for v in value)
    ):
        p.fail("signals", f"must be a non-empty list of {', '.join(SIGNALS)}; got {value!r}")
        return SIGNALS
    return tuple(value)


def _baseline(
    p: _Params, signals: tuple[str, ...], profile: TrafficProfile | None
) -> dict[str, tuple[float, float]]:
    baseline = dict(DEFAULT_BASELINE)
    if profile is not None:
        for name, (mean, std) in zip(SIGNALS, profile.baseline_.tolist(), strict=False):
            if math.isfinite(mean) and math.isfinite(std):
                baseline[name] = (mean, std)
    raw = p.params.get("baseline", {})
    if not isinstance(raw, Mapping):
        p.fail("baseline", f"must be a mapping of signal -> [mean, std], got {raw!r}")
        raw = {}
    for name, pair in raw.items():
        key = f"baseline.{name}"
        if name not in SIGNALS:
            p.fail(key, f"unknown signal (known: {', '.join(SIGNALS)})")
        elif (
            not isinstance(pair, list | tuple)
            or len(pair) != 2
            or not all(_is_num(v) for v in pair)
            or pair[1] < 0
        ):
            p.fail(key, f"must be [mean, std] with std >= 0, got {pair!r}")
        else:
            baseline[name] = (float(pair[0]), float(pair[1]))
    return {name: baseline[name] for name in signals}


def build_boundary(spec: DetectorSpec, ctx: BuildContext) -> Detector:
    """Build a :class:`BoundaryDetector` from ``spec``, or raise ConfigurationError."""
    p = _Params(spec, _BOUNDARY_PARAMS)
    profile = load_profile(spec, ctx)
    if profile is None and "threshold" not in spec.params:
        _uncalibrated(p, spec, ctx, "threshold")
    feature_range = p.range("feature_range")
    signals = _signals(p)
    baseline = _baseline(p, signals, profile)
    source = p.params.get("anomaly_rate_source")
    if source is not None and (not isinstance(source, str) or not source or ":" in source):
        p.fail("anomaly_rate_source", f"must be a detector name, got {source!r}")
        source = None
    rate_window = p.number("anomaly_rate_window_s", 60.0, low=0.0, low_open=True)
    kwargs: dict[str, Any] = {
        "window": p.integer("window", 100, 2, 1_000_000),
        "p_low": p.number("p_low", 0.6, low=0.0, high=1.0, low_open=True),
        "bins": p.integer("bins", 8, 1, 1024),
        "max_coverage_features": p.integer("max_coverage_features", 256, 1, 65_536),
        "max_classes": p.integer("max_classes", 1024, 1, 1 << 20),
        "n_classes": p.optional_integer("n_classes", 2),
        "threshold": p.finite("threshold", -6.0 if profile is None else profile.threshold),
        "max_clients": p.integer("max_clients", 10_000, 1),
        "flag_ttl_s": p.ttl("flag_ttl_s", 3600.0),
        "seed": _shared_seed(p, spec, ctx),
        **_share(p),
    }
    p.done()
    tracker = None
    if source is not None:
        # imported here: the anomaly family is optional for the extraction detectors
        from inference_guard.detectors.anomaly_rate import AnomalyRateTracker

        tracker = AnomalyRateTracker(
            ctx.store, namespace=source, window_s=rate_window, clock=ctx.wall_clock
        )
    low: Any = None
    high: Any = None
    if feature_range is not None:
        low, high = feature_range
    elif profile is not None:
        low, high = profile.low_, profile.high_
    if kwargs["n_classes"] is None and profile is not None and profile.n_classes >= 2:
        kwargs["n_classes"] = profile.n_classes
    return BoundaryDetector(
        spec.name,
        store=ctx.store,
        low=low,
        high=high,
        baseline=baseline,
        anomaly_rate=tracker,
        **kwargs,
    )


#: the detector types of this family (listed in guard.builtin_detectors)
FACTORIES: dict[str, DetectorFactory] = {
    "prada": build_prada,
    "near_duplicate": build_near_duplicate,
    "boundary": build_boundary,
}
