"""Where a detector's calibration file is, and the key that signs its manifest.

``guard calibrate`` writes one ``.npz`` file per detector (with a manifest
beside it); at start-up the factories read them back. Both sides find the
file the same way, through :func:`resolve_file`, and sign or verify the
manifest with the same key, :func:`calibration_key`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Final

from inference_guard.guard.config import DetectorSpec
from inference_guard.guard.errors import ConfigurationError

__all__ = ["CALIBRATION_KEY_ENV", "calibration_key", "resolve_file"]

#: environment variable holding the HMAC key for calibration manifests
CALIBRATION_KEY_ENV: Final = "GUARD_CALIBRATION_KEY"


def calibration_key() -> bytes | None:
    """The manifest HMAC key from ``GUARD_CALIBRATION_KEY``, if set."""
    value = os.environ.get(CALIBRATION_KEY_ENV)
    return value.encode() if value else None


def resolve_file(spec: DetectorSpec, calibration_dir: Path | None) -> Path:
    """The calibration file a spec names (``params.file``) or implies (``<type>.npz``).

    A relative name is taken inside ``calibration_dir``; a ``.json`` name
    means the ``.npz`` beside it. Raises :class:`~guard.errors.ConfigurationError`
    naming ``<spec.key>.params.file`` when the name is not a ``.npz`` file or
    is relative with no ``calibration_dir``.
    """
    key = f"{spec.key}.params.file" if spec.key else "params.file"
    raw = spec.params.get("file")
    if raw is not None and not (isinstance(raw, str) and raw.strip()):
        raise ConfigurationError(key, f"must be a file name, got {raw!r}")
    name = raw if raw is not None else f"{spec.type}.npz"
    path = Path(name)
    if path.suffix == ".json":
        path = path.with_suffix(".npz")
    if path.suffix != ".npz":
        raise ConfigurationError(key, f"must name a .npz file, got {name!r}")
    if not path.is_absolute():
        if calibration_dir is None:
            raise ConfigurationError(
                key,
                f"the {spec.type!r} detector needs a calibration file: set calibration_dir "
                "(the output directory of `guard calibrate`) or an absolute params.file",
            )
        path = calibration_dir / path
    return path
