"""Detectors are built from config by type name; third parties register their own.

A factory takes the :class:`~guard.config.DetectorSpec` (type, name, action,
params, key path) and a :class:`BuildContext` (the state store, the clock, the
calibration directory) and returns a :class:`detectors.base.Detector`. It
validates ``spec.params`` itself and raises :class:`~guard.errors.ConfigurationError`
with ``spec.key`` in the key path. Register with::

    from guard.registry import register_detector
    register_detector("my-detector", lambda spec, ctx: MyDetector(spec.name, **spec.params))

or ship an entry point in the ``inference_guard.detectors`` group; it is loaded
the first time an unknown type name is looked up.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path

from detectors.base import Detector
from detectors.store import KeyValueStore
from guard.config import DetectorSpec, LimitsConfig
from guard.errors import ConfigurationError

__all__ = ["BuildContext", "DetectorFactory", "build_detector", "register_detector", "registered"]


@dataclass(frozen=True, slots=True)
class BuildContext:
    """What a detector factory may use."""

    #: the state store (memory or Redis), for stateful detectors
    store: KeyValueStore
    #: the monotonic clock, injectable for tests (durations, per-process state)
    clock: Callable[[], float] = time.monotonic
    #: the wall clock, for time buckets that workers and hosts must agree on
    wall_clock: Callable[[], float] = time.time
    #: directory of calibrated detector files, if configured
    calibration_dir: Path | None = None
    #: the parsing limits (a detector may size buffers from them)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    #: seed for anything random (projections, salts are secrets, not seeds)
    seed: int | None = None


DetectorFactory = Callable[[DetectorSpec, BuildContext], Detector]

_FACTORIES: dict[str, DetectorFactory] = {}
_BUILTINS_LOADED = False
_ENTRY_POINT_GROUP = "inference_guard.detectors"


def register_detector(type_name: str, factory: DetectorFactory, *, replace: bool = False) -> None:
    """Make ``type_name`` available in config files."""
    if not type_name or not isinstance(type_name, str):
        raise ValueError("type_name must be a non-empty string")
    if type_name in _FACTORIES and not replace:
        raise ValueError(f"detector type {type_name!r} is already registered")
    _FACTORIES[type_name] = factory


def registered() -> list[str]:
    """The detector type names that config files may use."""
    _load_builtins()
    return sorted(_FACTORIES)


def _load_builtins() -> None:
    global _BUILTINS_LOADED
    if _BUILTINS_LOADED:
        return
    _BUILTINS_LOADED = True
    # the built-in factories register themselves on import
    import guard.builtin_detectors  # noqa: F401


def _load_entry_point(type_name: str) -> None:
    for ep in entry_points(group=_ENTRY_POINT_GROUP):
        if ep.name == type_name and type_name not in _FACTORIES:
            _FACTORIES[type_name] = ep.load()


def build_detector(spec: DetectorSpec, ctx: BuildContext) -> Detector:
    """Build one detector, or raise ConfigurationError naming ``spec.key``."""
    _load_builtins()
    if spec.type not in _FACTORIES:
        _load_entry_point(spec.type)
    factory = _FACTORIES.get(spec.type)
    if factory is None:
        raise ConfigurationError(
            f"{spec.key}.type" if spec.key else "type",
            f"unknown detector type {spec.type!r} "
            f"(known: {', '.join(sorted(_FACTORIES)) or 'none'})",
        )
    try:
        return factory(spec, ctx)
    except ConfigurationError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigurationError(f"{spec.key}.params" if spec.key else "params", str(exc)) from exc
