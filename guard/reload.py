"""What a config reload may change, and which built detectors it keeps.

A running guard reloads its config file on ``SIGHUP`` or ``POST /-/reload``
(:meth:`Guard.reload <guard.pipeline.Guard.reload>`). The new file is loaded and
every detector it names is built before anything changes; then the policies
and detectors are swapped in one assignment, so a request in flight finishes
on the config it started with and the next one sees the new config. On any
error the running config stays as it was.

Two rules decide what a reload may do:

* :data:`FROZEN` sections cannot change on reload: they are wired into what
  lives as long as the process (the state store and its connections, the
  metrics endpoint and families, the audit and capture writers, how clients are
  identified and who is exempt, the parsing limits the front end reads). A new
  file that changes one is refused as a whole, naming the section, rather than
  half applied; restart the guard to change them.
* A detector is *kept* (the same object, with its per-client windows and
  fingerprints) when the new config has a detector of the same policy name,
  detector name and type, with equal parameters, and ``calibration_dir`` is
  unchanged; its action and escalation may change (they are the policy's, not
  the detector's). Any other detector is built anew, with fresh state. State
  kept in a shared store (rate counters, quarantine) is outside the detectors
  and survives either way.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from inference_guard.detectors.base import Detector
from inference_guard.guard.config import DetectorSpec, GuardConfig
from inference_guard.guard.errors import ConfigurationError

__all__ = ["FROZEN", "ReloadResult", "check_frozen", "detector_key", "reusable"]

#: top-level config sections a reload cannot change (the key named in the refusal)
FROZEN: tuple[str, ...] = (
    "state",
    "metrics",
    "audit",
    "capture",
    "client_identity",
    "exempt",
    "limits",
)

#: a detector's identity across configs: (policy name, detector name, detector type)
DetectorKey = tuple[str, str, str]


@dataclass(frozen=True, slots=True)
class ReloadResult:
    """What a successful reload did."""

    #: ``guard_build_info``'s ``config_sha`` of the config now running
    config_sha: str
    #: the detectors kept with their state, as ``policy/detector``
    kept: tuple[str, ...]
    #: the detectors built anew (new, or changed), as ``policy/detector``
    built: tuple[str, ...]
    #: the detectors of the old config no longer used, as ``policy/detector``
    dropped: tuple[str, ...]


def check_frozen(old: GuardConfig, new: GuardConfig) -> None:
    """Raise :class:`ConfigurationError` naming the first :data:`FROZEN` section that differs.

    The message names the section only, never its values (a store URI may
    carry a password).
    """
    for section in FROZEN:
        if getattr(old, section) != getattr(new, section):
            raise ConfigurationError(
                section, "cannot change on reload; restart the guard to change it"
            )


def detector_key(policy: str, spec: DetectorSpec) -> DetectorKey:
    return (policy, spec.name, spec.type)


def reusable(
    old: GuardConfig,
    new: GuardConfig,
    built: Mapping[DetectorKey, tuple[DetectorSpec, Detector]],
    policy: str,
    spec: DetectorSpec,
) -> Detector | None:
    """The running detector ``spec`` may keep, or ``None`` when it must be built anew.

    ``built`` holds each running detector with the spec it was built from.
    """
    if old.calibration_dir != new.calibration_dir:
        return None
    running = built.get(detector_key(policy, spec))
    if running is None:
        return None
    old_spec, detector = running
    return detector if _same_params(old_spec.params, spec.params) else None


def _same_params(a: Mapping[str, object], b: Mapping[str, object]) -> bool:
    try:
        return dict(a) == dict(b)
    except Exception:  # a value without a sane __eq__ (numpy arrays): build anew
        return False
