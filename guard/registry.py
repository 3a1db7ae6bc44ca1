"""Detectors are built from config by type name; third parties register their own.

A factory takes the :class:`~guard.config.DetectorSpec` (type, name, action,
params, key path) and a :class:`BuildContext` (the state store, the clock, the
calibration directory) and returns a :class:`detectors.base.Detector`. It
validates ``spec.params`` itself and raises :class:`~guard.errors.ConfigurationError`
with ``spec.key`` in the key path. Register with::

    from inference_guard.guard.registry import register_detector
    register_detector("my-detector", lambda spec, ctx: MyDetector(spec.name, **spec.params))

or ship an entry point in the ``inference_guard.detectors`` group; it is loaded
the first time an unknown type name is looked up.

The detectors that ship with the guard are one explicit table,
:data:`guard.builtin_detectors.BUILTIN_DETECTORS`, read the first time a type
is looked up (it imports the detector families, numpy and scikit-learn
included). A registered factory takes precedence over a built-in of the same
name when registered with ``replace=True``.
"""

from __future__ import annotations

from collections.abc import Mapping
from importlib.metadata import entry_points

from inference_guard.detectors.base import Detector
from inference_guard.guard.config import DetectorSpec
from inference_guard.guard.errors import ConfigurationError
from inference_guard.guard.factory import BuildContext, DetectorFactory

__all__ = ["BuildContext", "DetectorFactory", "build_detector", "register_detector", "registered"]

#: factories registered at run time (third parties, tests); they shadow built-ins
_FACTORIES: dict[str, DetectorFactory] = {}
_ENTRY_POINT_GROUP = "inference_guard.detectors"


def _builtins() -> Mapping[str, DetectorFactory]:
    # imported on first use: the detector families pull in numpy and scikit-learn
    from inference_guard.guard.builtin_detectors import BUILTIN_DETECTORS

    return BUILTIN_DETECTORS


def register_detector(type_name: str, factory: DetectorFactory, *, replace: bool = False) -> None:
    """Make ``type_name`` available in config files.

    Raises :class:`ValueError` when the name is taken (a built-in included),
    unless ``replace``.
    """
    if not type_name or not isinstance(type_name, str):
        raise ValueError("type_name must be a non-empty string")
    if not replace and (type_name in _FACTORIES or type_name in _builtins()):
        raise ValueError(f"detector type {type_name!r} is already registered")
    _FACTORIES[type_name] = factory


def registered() -> list[str]:
    """The detector type names that config files may use."""
    return sorted({*_builtins(), *_FACTORIES})


def _factory(type_name: str) -> DetectorFactory | None:
    factory = _FACTORIES.get(type_name) or _builtins().get(type_name)
    if factory is not None:
        return factory
    for ep in entry_points(group=_ENTRY_POINT_GROUP):
        if ep.name == type_name:
            loaded: DetectorFactory = ep.load()
            _FACTORIES[type_name] = loaded
            return loaded
    return None


def build_detector(spec: DetectorSpec, ctx: BuildContext) -> Detector:
    """Build one detector, or raise ConfigurationError naming ``spec.key``."""
    factory = _factory(spec.type)
    if factory is None:
        raise ConfigurationError(
            f"{spec.key}.type" if spec.key else "type",
            f"unknown detector type {spec.type!r} (known: {', '.join(registered()) or 'none'})",
        )
    try:
        return factory(spec, ctx)
    except ConfigurationError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigurationError(f"{spec.key}.params" if spec.key else "params", str(exc)) from exc
