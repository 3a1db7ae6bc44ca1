"""Saving and loading fitted detectors without pickle.

A fitted detector is two files side by side:

* ``<name>.npz``: its state as plain numeric arrays (``numpy.savez``), plus a
  ``__meta__`` array holding the canonical JSON of its type, parameters and
  width. Loaded with ``allow_pickle=False``: object arrays, and with them any
  code execution on load, are refused.
* ``<name>.json``: the manifest. Format and version, detector type
  (``kind``), parameters, feature count, the name, size and SHA-256 of the
  ``.npz`` and the dtype and shape of every array; optionally an HMAC-SHA256
  over all of it.

:func:`load_model` refuses, with :class:`CorruptModelFile`, anything that does
not add up: an unknown format or version, a checksum mismatch (a flipped
byte), a manifest that names another file (swapped files), a manifest that
disagrees with the ``__meta__`` copy inside the ``.npz`` (an edited manifest),
unexpected arrays, a wrong detector type or width, a bad or missing HMAC.
Without an HMAC key, the checksums catch corruption and careless edits; only
the key stops someone who can rewrite both files.

The file is read once into memory and checked before it is parsed, so what is
verified is what is loaded.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import logging
import os
import stat
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Final, Protocol, Self

import numpy as np
from numpy.typing import NDArray

from inference_guard.detectors.envelope import FeatureEnvelope
from inference_guard.detectors.iforest import IsolationForestOutlier
from inference_guard.detectors.knn import KNNOutlier
from inference_guard.detectors.mahalanobis import MahalanobisOutlier
from inference_guard.detectors.outlier_base import OutlierBase
from inference_guard.detectors.profile import TrafficProfile
from inference_guard.detectors.text import TextOutlier

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "KINDS",
    "CorruptModelFile",
    "load_model",
    "manifest_path",
    "read_manifest",
    "save_model",
]

FORMAT: Final = "inference-guard/detector"
FORMAT_VERSION: Final = 1


class Persistable(Protocol):
    """What a file can hold: a fitted detector, or a stateful detector's traffic profile."""

    kind: ClassVar[str]

    def get_params(self, deep: bool = True) -> dict[str, Any]: ...

    def export_state(self) -> dict[str, NDArray[Any]]: ...

    @classmethod
    def from_state(cls, params: dict[str, Any], state: dict[str, NDArray[Any]]) -> Self: ...


#: the input-anomaly detector classes a file may hold, by ``kind``
KINDS: Final[dict[str, type[OutlierBase[Any]]]] = {
    cls.kind: cls
    for cls in (
        FeatureEnvelope, MahalanobisOutlier, IsolationForestOutlier, KNNOutlier, TextOutlier
    )
}
#: everything a file may hold: the detectors, and the stateful detectors' profiles
_LOADABLE: Final[dict[str, type[Persistable]]] = {**KINDS, TrafficProfile.kind: TrafficProfile}
#: refuse larger files before reading them (a k-NN reference of 2000 x 784 is 12.5 MB)
MAX_BYTES: Final = 512 << 20
log = logging.getLogger("guard.persist")
_MAX_MANIFEST_BYTES: Final = 1 << 20
_META: Final = "__meta__"


class CorruptModelFile(ValueError):
    """A detector file is missing, corrupt, tampered with, or not the expected detector."""

    def __init__(self, path: str | os.PathLike[str], problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


def manifest_path(path: str | os.PathLike[str]) -> Path:
    """The manifest beside a state file: ``x.npz`` -> ``x.json``."""
    return Path(path).with_suffix(".json")


def _canonical(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _jsonable_params(params: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in params.items():
        if isinstance(value, np.generic):
            value = value.item()
        if value is not None and not isinstance(value, bool | int | float | str):
            raise TypeError(f"parameter {key}={value!r} is not a JSON scalar")
        out[key] = value
    return out


def _sign(manifest: dict[str, Any], key: bytes) -> str:
    body = {k: v for k, v in manifest.items() if k != "hmac_sha256"}
    return hmac.new(key, _canonical(body), hashlib.sha256).hexdigest()


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; the serving user may differ
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_model(
    model: Persistable,
    path: str | os.PathLike[str],
    *,
    hmac_key: bytes | None = None,
    calibration: Mapping[str, Any] | None = None,
) -> Path:
    """Write a fitted detector to ``path`` (``.npz``) and its manifest beside it; return ``path``.

    Both files are written atomically (temporary file, then rename).
    ``calibration`` (plain JSON values: the threshold and benign score
    quantiles ``guard calibrate`` measured) is kept in the manifest under that
    key, covered by the HMAC; loading ignores it.
    """
    path = Path(path)
    if path.suffix != ".npz":
        raise ValueError(f"detector files end in .npz, got {path.name!r}")
    if _LOADABLE.get(type(model).kind) is not type(model):
        raise TypeError(f"cannot save {type(model).__name__}: not a known detector type")
    state = model.export_state()  # raises NotFittedError before fit
    if _META in state:
        raise ValueError(f"{_META} is a reserved array name")
    n_features = getattr(model, "n_features_in_", None)
    meta = {
        "format_version": FORMAT_VERSION,
        "kind": model.kind,
        "params": _jsonable_params(model.get_params()),
        "n_features": n_features,
    }
    arrays: dict[str, NDArray[Any]] = {k: np.asarray(v) for k, v in state.items()}
    for name, arr in arrays.items():
        if arr.dtype.kind not in "biuf":
            raise TypeError(f"state array {name!r} has dtype {arr.dtype}, not numeric")
    arrays[_META] = np.frombuffer(_canonical(meta), dtype=np.uint8)
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)  # type: ignore[arg-type]
    data = buf.getvalue()
    manifest: dict[str, Any] = {
        "format": FORMAT,
        **meta,
        "file": path.name,
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "arrays": {
            name: {"dtype": arr.dtype.str, "shape": list(arr.shape)} for name, arr in arrays.items()
        },
        "library": {"numpy": np.__version__},
    }
    if calibration is not None:
        manifest["calibration"] = json.loads(json.dumps(dict(calibration), allow_nan=False))
    if hmac_key is not None:
        manifest["hmac_sha256"] = _sign(manifest, hmac_key)
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(path, data)
    _atomic_write(manifest_path(path), json.dumps(manifest, indent=2, sort_keys=True).encode())
    return path


def read_manifest(
    path: str | os.PathLike[str], *, hmac_key: bytes | None = None
) -> dict[str, Any]:
    """The verified manifest of the state file ``path`` (format, version and HMAC checked)."""
    mpath = manifest_path(path)
    _warn_if_world_writable(mpath.parent)
    try:
        raw = _read_capped(mpath, _MAX_MANIFEST_BYTES)
        manifest = json.loads(raw)
    except FileNotFoundError:
        raise CorruptModelFile(mpath, "manifest is missing") from None
    except (OSError, ValueError) as exc:
        raise CorruptModelFile(mpath, f"manifest is unreadable: {exc}") from exc
    if not isinstance(manifest, dict):
        raise CorruptModelFile(mpath, "manifest is not a JSON object")
    if manifest.get("format") != FORMAT:
        raise CorruptModelFile(mpath, f"not an inference-guard detector manifest ({FORMAT!r})")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CorruptModelFile(
            mpath,
            f"format version {manifest.get('format_version')!r} is not supported "
            f"(this version reads {FORMAT_VERSION}); rerun guard calibrate",
        )
    signature = manifest.get("hmac_sha256")
    if hmac_key is not None:
        if not isinstance(signature, str):
            raise CorruptModelFile(mpath, "manifest is not signed but a calibration key is set")
        if not hmac.compare_digest(signature, _sign(manifest, hmac_key)):
            raise CorruptModelFile(mpath, "manifest HMAC does not match: tampered or wrong key")
    elif signature is not None:
        raise CorruptModelFile(mpath, "manifest is signed but no calibration key was given")
    return manifest


def _read_capped(path: Path, limit: int) -> bytes:
    """The bytes of the regular file ``path``, refused before reading if over ``limit``.

    Symbolic links are followed (deployments mount files through them), but what
    they lead to must be a regular file: a device (``/dev/zero``), a FIFO or a
    directory is refused at once. ``O_NONBLOCK`` keeps the open itself from
    waiting on a FIFO, and the checks are on the open descriptor, so the file
    cannot be swapped between the check and the read.
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    with os.fdopen(fd, "rb") as fh:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise CorruptModelFile(path, "not a regular file")
        if info.st_size > limit:
            raise CorruptModelFile(path, f"file is larger than {limit} bytes")
        data = fh.read(limit + 1)  # it may have grown since
    if len(data) > limit:
        raise CorruptModelFile(path, f"file is larger than {limit} bytes")
    return data


#: calibration directories already warned about (once per directory and process)
_WARNED_DIRS: set[str] = set()


def _warn_if_world_writable(directory: Path) -> None:
    """Log once when anyone may write where calibration files are read from."""
    key = str(directory)
    if key in _WARNED_DIRS:
        return
    try:
        mode = os.stat(directory).st_mode
    except OSError:
        return  # the read that follows reports the problem
    if mode & stat.S_IWOTH:
        _WARNED_DIRS.add(key)
        log.warning(
            "calibration directory %s is world-writable: any local user can replace the "
            "detectors' files (sign them with GUARD_CALIBRATION_KEY, and chmod o-w)",
            key,
        )


def load_model(
    path: str | os.PathLike[str],
    *,
    kind: str | None = None,
    n_features: int | None = None,
    hmac_key: bytes | None = None,
) -> Any:
    """Load and verify a detector saved by :func:`save_model`.

    Parameters
    ----------
    path : path-like
        The ``.npz`` state file; the manifest is read from the ``.json`` beside it.
    kind : str, optional
        Refuse any other detector type.
    n_features : int, optional
        Refuse a row detector fitted on another width.
    hmac_key : bytes, optional
        Require, and check, the manifest's HMAC-SHA256.

    Raises
    ------
    CorruptModelFile
        Whatever the reason the file cannot be trusted or used.
    """
    path = Path(path)
    manifest = read_manifest(path, hmac_key=hmac_key)
    file_kind = manifest.get("kind")
    if not isinstance(file_kind, str) or file_kind not in _LOADABLE:
        raise CorruptModelFile(path, f"unknown detector type {file_kind!r}")
    if kind is not None and file_kind != kind:
        raise CorruptModelFile(path, f"holds a {file_kind!r} detector, expected {kind!r}")
    if manifest.get("file") != path.name:
        raise CorruptModelFile(
            path, f"manifest describes {manifest.get('file')!r}, not {path.name!r} (swapped files?)"
        )
    try:
        data = _read_capped(path, MAX_BYTES)
    except FileNotFoundError:
        raise CorruptModelFile(path, "state file is missing") from None
    except OSError as exc:
        raise CorruptModelFile(path, f"state file is unreadable: {exc}") from exc
    if len(data) != manifest.get("bytes") or not hmac.compare_digest(
        hashlib.sha256(data).hexdigest(), str(manifest.get("sha256"))
    ):
        raise CorruptModelFile(path, "SHA-256 does not match the manifest: corrupt or tampered")
    arrays = _parse_npz(path, data)
    meta = {k: manifest.get(k) for k in ("format_version", "kind", "params", "n_features")}
    if _canonical(meta) != arrays.pop(_META).tobytes():
        raise CorruptModelFile(path, "manifest does not match the state file (edited manifest?)")
    expected = manifest.get("arrays")
    if not isinstance(expected, dict) or set(expected) != set(arrays) | {_META}:
        raise CorruptModelFile(path, "the arrays in the state file differ from the manifest")
    for name, arr in arrays.items():
        spec = expected[name]
        if spec != {"dtype": arr.dtype.str, "shape": list(arr.shape)}:
            raise CorruptModelFile(path, f"array {name!r} differs from the manifest")
    width = manifest.get("n_features")
    if n_features is not None and width != n_features:
        raise CorruptModelFile(path, f"fitted on {width} features, expected {n_features}")
    params = manifest.get("params")
    if not isinstance(params, dict):
        raise CorruptModelFile(path, "manifest params are not a mapping")
    try:
        model = _LOADABLE[file_kind].from_state(params, arrays)
    except (KeyError, TypeError, ValueError) as exc:
        raise CorruptModelFile(path, f"inconsistent {file_kind} state: {exc}") from exc
    if getattr(model, "n_features_in_", None) != width:
        raise CorruptModelFile(path, "manifest width differs from the state")
    return model


def _parse_npz(path: Path, data: bytes) -> dict[str, NDArray[Any]]:
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as exc:
        # ValueError includes "Object arrays cannot be loaded when allow_pickle=False"
        raise CorruptModelFile(path, f"state file is not a plain numpy archive: {exc}") from exc
    if _META not in arrays:
        raise CorruptModelFile(path, f"state file has no {_META} record")
    for name, arr in arrays.items():
        if arr.dtype.kind not in "biuf":
            raise CorruptModelFile(path, f"array {name!r} has non-numeric dtype {arr.dtype}")
    return arrays
