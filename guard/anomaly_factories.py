"""Factories for the input-anomaly detectors (``FACTORIES``, in :mod:`guard.builtin_detectors`).

Types ``envelope``, ``mahalanobis``, ``iforest``, ``knn`` (rows), ``text``
(prompts) and ``anomaly_rate`` (per-client share of anomalous rows). The
first five load a file written by ``guard calibrate``; nothing is fitted at
start-up::

    calibration_dir: ./calibration          # guard calibrate --out ./calibration
    policies:
      - name: tabular
        detectors:
          - type: mahalanobis
            action: flag
            params:
              file: mahalanobis.npz         # default: <calibration_dir>/<type>.npz
              on_width_mismatch: flag       # flag (default) | skip
              track_rate: true              # count rows for anomaly_rate
              rate_window_s: 60
              shrinkage: ledoit_wolf        # optional: must match the file
          - type: anomaly_rate
            action: block
            params: {source: mahalanobis, window_s: 60, max_rate: 0.2, min_rows: 20}
            # source may list several row detectors (each with track_rate): the client's
            # rate is then the largest of their shares

Parameters of the model itself (``shrinkage``, ``n_neighbors``,
``target_fpr``, ...) are what ``guard calibrate --config`` fits with; at
start-up they are compared with the file's, so a config and a calibration that
drifted apart are refused instead of silently disagreeing.

A missing calibration is a :class:`~guard.errors.ConfigurationError` naming
the detector's key path; a file that fails verification (checksum, manifest,
HMAC, type, width) is a :class:`~guard.errors.ModelFileError`. When the
environment variable ``GUARD_CALIBRATION_KEY`` is set, manifests must carry a
valid HMAC made with it (``guard calibrate`` signs them when it is set).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Final

from inference_guard.detectors.anomaly import RowAnomalyDetector, TextAnomalyDetector
from inference_guard.detectors.anomaly_rate import AnomalyRateDetector, AnomalyRateTracker
from inference_guard.detectors.base import Detector
from inference_guard.detectors.persist import KINDS, CorruptModelFile, load_model, manifest_path
from inference_guard.guard.calibration_files import calibration_key, resolve_file
from inference_guard.guard.config import DetectorSpec
from inference_guard.guard.errors import ConfigurationError, ModelFileError
from inference_guard.guard.factory import BuildContext, DetectorFactory

__all__ = [
    "FACTORIES",
    "ROW_TYPES",
    "TEXT_TYPES",
    "model_params",
]

ROW_TYPES: Final = ("envelope", "mahalanobis", "iforest", "knn")
TEXT_TYPES: Final = ("text",)
_ROW_RUNTIME: Final = frozenset({"file", "on_width_mismatch", "track_rate", "rate_window_s"})
_TEXT_RUNTIME: Final = frozenset({"file", "track_rate", "rate_window_s"})
#: fit-time only: the split is ``guard calibrate``'s business
_FIT_ONLY: Final = frozenset({"holdout"})


def model_params(kind: str) -> frozenset[str]:
    """The model parameters a spec of type ``kind`` may set (those of its class)."""
    return frozenset(KINDS[kind].param_names())


def _key(spec: DetectorSpec, name: str) -> str:
    base = f"{spec.key}.params" if spec.key else "params"
    return f"{base}.{name}" if name else base


def _check_keys(spec: DetectorSpec, allowed: frozenset[str]) -> None:
    for name in spec.params:
        if name not in allowed:
            raise ConfigurationError(
                _key(spec, str(name)), f"unknown parameter (allowed: {', '.join(sorted(allowed))})"
            )


def _get(
    spec: DetectorSpec, name: str, default: Any, check: Callable[[Any], bool], what: str
) -> Any:
    value = spec.params.get(name, default)
    if not check(value):
        raise ConfigurationError(_key(spec, name), f"must be {what}, got {value!r}")
    return value


def _is_bool(v: Any) -> bool:
    return isinstance(v, bool)


def _is_positive(v: Any) -> bool:
    return not isinstance(v, bool) and isinstance(v, int | float) and math.isfinite(v) and v > 0


def _is_str(v: Any) -> bool:
    return isinstance(v, str) and bool(v.strip())


def _load(spec: DetectorSpec, ctx: BuildContext, kind: str) -> Any:
    path = resolve_file(spec, ctx.calibration_dir)
    if not path.exists() and not manifest_path(path).exists():
        raise ConfigurationError(
            _key(spec, "file") if "file" in spec.params or not spec.key else spec.key,
            f"calibration file {str(path)!r} does not exist; run "
            f"`guard calibrate --data REFERENCE --out {path.parent}`",
        )
    try:
        model = load_model(path, kind=kind, hmac_key=calibration_key())
    except CorruptModelFile as exc:
        raise ModelFileError(exc.path, exc.problem) from exc
    fitted = model.get_params()
    for name in model_params(kind) - _FIT_ONLY - {"random_state"}:
        if name in spec.params and spec.params[name] != fitted[name]:
            raise ConfigurationError(
                _key(spec, name),
                f"is {spec.params[name]!r} but {path.name} was calibrated with "
                f"{fitted[name]!r}; rerun guard calibrate with this config",
            )
    return model


def _tracker(spec: DetectorSpec, ctx: BuildContext) -> AnomalyRateTracker | None:
    if not _get(spec, "track_rate", False, _is_bool, "true or false"):
        return None
    window = _get(spec, "rate_window_s", 60.0, _is_positive, "a number of seconds > 0")
    return AnomalyRateTracker(
        ctx.store, namespace=spec.name, window_s=float(window), clock=ctx.wall_clock
    )


def _row_factory(kind: str) -> Callable[[DetectorSpec, BuildContext], Detector]:
    allowed = _ROW_RUNTIME | (model_params(kind) - _FIT_ONLY)

    def build(spec: DetectorSpec, ctx: BuildContext) -> Detector:
        _check_keys(spec, allowed)
        mode = _get(
            spec, "on_width_mismatch", "flag", lambda v: v in ("flag", "skip"), "'flag' or 'skip'"
        )
        tracker = _tracker(spec, ctx)
        model = _load(spec, ctx, kind)
        return RowAnomalyDetector(spec.name, model, on_width_mismatch=mode, tracker=tracker)

    return build


def _text_factory(spec: DetectorSpec, ctx: BuildContext) -> Detector:
    _check_keys(spec, _TEXT_RUNTIME | (model_params("text") - _FIT_ONLY))
    tracker = _tracker(spec, ctx)
    return TextAnomalyDetector(spec.name, _load(spec, ctx, "text"), tracker=tracker)


def _rate_factory(spec: DetectorSpec, ctx: BuildContext) -> Detector:
    _check_keys(spec, frozenset({"source", "window_s", "max_rate", "min_rows"}))
    if "source" not in spec.params:
        raise ConfigurationError(
            _key(spec, "source"),
            "is required: the name of the row or text detector (with track_rate: true) "
            "whose verdicts are counted",
        )
    source = _get(
        spec,
        "source",
        None,
        lambda v: (_is_str(v) and ":" not in v)
        or (isinstance(v, list) and bool(v) and all(_is_str(x) and ":" not in x for x in v)),
        "a detector name or a non-empty list of them",
    )
    window = _get(spec, "window_s", 60.0, _is_positive, "a number of seconds > 0")
    max_rate = _get(
        spec, "max_rate", 0.2,
        lambda v: not isinstance(v, bool) and isinstance(v, int | float) and 0 <= v < 1,
        "a share in [0, 1)",
    )
    min_rows = _get(
        spec, "min_rows", 20, lambda v: not isinstance(v, bool) and isinstance(v, int) and v >= 1,
        "an integer >= 1",
    )
    sources = [source] if isinstance(source, str) else list(dict.fromkeys(source))
    trackers = [
        AnomalyRateTracker(ctx.store, namespace=name, window_s=float(window), clock=ctx.wall_clock)
        for name in sources
    ]
    return AnomalyRateDetector(spec.name, trackers, max_rate=float(max_rate), min_rows=min_rows)


#: the detector types of this family
FACTORIES: dict[str, DetectorFactory] = {
    **{kind: _row_factory(kind) for kind in ROW_TYPES},
    "text": _text_factory,
    "anomaly_rate": _rate_factory,
}
