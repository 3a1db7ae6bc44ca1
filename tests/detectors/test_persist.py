"""Saving and loading detectors: no pickle, checksums, refusal of tampered files."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sklearn.exceptions import NotFittedError

from inference_guard.detectors.envelope import FeatureEnvelope
from inference_guard.detectors.iforest import IsolationForestOutlier
from inference_guard.detectors.knn import KNNOutlier
from inference_guard.detectors.mahalanobis import MahalanobisOutlier
from inference_guard.detectors.persist import (
    CorruptModelFile,
    load_model,
    manifest_path,
    save_model,
)
from inference_guard.detectors.prompt_corpus import benign_prompts
from inference_guard.detectors.text import TextOutlier
from tests.detectors.anomaly_helpers import gaussian

X = gaussian(1500, d=6)
PROBES = np.vstack([gaussian(50, d=6, seed=2), gaussian(20, d=6, seed=3) * 4])


def fitted_rows() -> list[Any]:
    return [
        FeatureEnvelope().fit(X),
        MahalanobisOutlier(shrinkage="oas").fit(X),
        IsolationForestOutlier(n_estimators=20).fit(X),
        KNNOutlier(n_neighbors=3, max_reference=500).fit(X),
    ]


@pytest.fixture
def saved(tmp_path: Path) -> dict[str, Path]:
    return {m.kind: save_model(m, tmp_path / f"{m.kind}.npz") for m in fitted_rows()}


@pytest.mark.parametrize("model", fitted_rows(), ids=lambda m: m.kind)
def test_roundtrip_rows(model: Any, tmp_path: Path) -> None:
    path = save_model(model, tmp_path / "m.npz")
    loaded = load_model(path, kind=model.kind, n_features=6)
    assert type(loaded) is type(model) and loaded.get_params() == model.get_params()
    assert loaded.offset_ == model.offset_
    np.testing.assert_array_equal(loaded.score_samples(PROBES), model.score_samples(PROBES))
    manifest = json.loads(manifest_path(path).read_text())
    assert manifest["kind"] == model.kind and manifest["n_features"] == 6
    assert manifest["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()


def test_roundtrip_text(tmp_path: Path) -> None:
    model = TextOutlier().fit(benign_prompts(1500))
    loaded = load_model(save_model(model, tmp_path / "text.npz"), kind="text")
    probes = ["Summarize this article.", "ZZ}}{{qq", "hi\u200b"]
    np.testing.assert_array_equal(loaded.score_samples(probes), model.score_samples(probes))


def test_unfitted_model_is_not_saved(tmp_path: Path) -> None:
    with pytest.raises(NotFittedError):
        save_model(KNNOutlier(), tmp_path / "knn.npz")
    assert not list(tmp_path.iterdir())


def test_flipped_byte_is_refused(saved: dict[str, Path]) -> None:
    path = saved["mahalanobis"]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptModelFile, match="SHA-256"):
        load_model(path)


def test_swapped_state_file_is_refused(saved: dict[str, Path]) -> None:
    shutil.copyfile(saved["knn"], saved["mahalanobis"])
    with pytest.raises(CorruptModelFile, match="SHA-256"):
        load_model(saved["mahalanobis"])


def test_swapped_pair_is_refused(saved: dict[str, Path]) -> None:
    # both files of the knn detector copied over the mahalanobis ones
    shutil.copyfile(saved["knn"], saved["mahalanobis"])
    shutil.copyfile(manifest_path(saved["knn"]), manifest_path(saved["mahalanobis"]))
    with pytest.raises(CorruptModelFile, match="swapped"):
        load_model(saved["mahalanobis"])
    with pytest.raises(CorruptModelFile, match="expected 'mahalanobis'"):
        load_model(saved["mahalanobis"], kind="mahalanobis")


def test_renamed_pair_of_another_type_is_refused(saved: dict[str, Path], tmp_path: Path) -> None:
    # a consistent knn pair cannot stand in where the config expects iforest
    with pytest.raises(CorruptModelFile, match="expected 'iforest'"):
        load_model(saved["knn"], kind="iforest")


@pytest.mark.parametrize(
    "edit",
    [
        lambda m: m["params"].update(n_neighbors=1),
        lambda m: m.update(n_features=7),
        lambda m: m.update(kind="mahalanobis"),
        lambda m: m["arrays"]["reference_"].update(shape=[1, 6]),
        lambda m: m.update(format_version=2),
        lambda m: m.update(format="something-else"),
    ],
    ids=["params", "n_features", "kind", "arrays", "version", "format"],
)
def test_edited_manifest_is_refused(saved: dict[str, Path], edit: Any) -> None:
    mpath = manifest_path(saved["knn"])
    manifest = json.loads(mpath.read_text())
    edit(manifest)
    mpath.write_text(json.dumps(manifest))
    with pytest.raises(CorruptModelFile):
        load_model(saved["knn"])


def test_missing_files_are_refused(saved: dict[str, Path]) -> None:
    manifest_path(saved["envelope"]).unlink()
    with pytest.raises(CorruptModelFile, match="manifest is missing"):
        load_model(saved["envelope"])
    saved["iforest"].unlink()
    with pytest.raises(CorruptModelFile, match="missing"):
        load_model(saved["iforest"])


def test_width_mismatch_is_refused(saved: dict[str, Path]) -> None:
    with pytest.raises(CorruptModelFile, match="expected 64"):
        load_model(saved["knn"], n_features=64)


def _rewrite(path: Path, arrays: dict[str, np.ndarray], *, allow_pickle: bool = False) -> None:
    """Forge a state file and a manifest whose checksums match it (no HMAC key)."""
    buf = io.BytesIO()
    np.savez(buf, allow_pickle=allow_pickle, **arrays)
    data = buf.getvalue()
    path.write_bytes(data)
    mpath = manifest_path(path)
    manifest = json.loads(mpath.read_text())
    manifest.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    mpath.write_text(json.dumps(manifest))


def test_pickled_object_arrays_are_never_loaded(saved: dict[str, Path]) -> None:
    path = saved["envelope"]
    with np.load(path) as npz:
        arrays = {k: npz[k] for k in npz.files}
    arrays["low_"] = np.array([object()] * 6, dtype=object)
    _rewrite(path, arrays, allow_pickle=True)
    with pytest.raises(CorruptModelFile, match="plain numpy"):
        load_model(path)


def test_inconsistent_state_is_refused(saved: dict[str, Path]) -> None:
    # a forged iforest whose child index points outside the node arrays
    path = saved["iforest"]
    with np.load(path) as npz:
        arrays = {k: npz[k] for k in npz.files}
    arrays["left"] = arrays["left"].copy()
    arrays["left"][0] = 10**9
    _rewrite(path, arrays)
    with pytest.raises(CorruptModelFile, match="out of range"):
        load_model(path)


def test_not_a_zip_is_refused(saved: dict[str, Path]) -> None:
    _path = saved["envelope"]
    _path.write_bytes(b"not a zip at all")
    mpath = manifest_path(_path)
    manifest = json.loads(mpath.read_text())
    manifest.update(bytes=16, sha256=hashlib.sha256(b"not a zip at all").hexdigest())
    mpath.write_text(json.dumps(manifest))
    with pytest.raises(CorruptModelFile):
        load_model(_path)
    assert not zipfile.is_zipfile(_path)


def test_hmac_signed_manifest(tmp_path: Path) -> None:
    model = MahalanobisOutlier().fit(X)
    path = save_model(model, tmp_path / "m.npz", hmac_key=b"secret")
    assert load_model(path, hmac_key=b"secret").offset_ == model.offset_
    with pytest.raises(CorruptModelFile, match="HMAC"):
        load_model(path, hmac_key=b"other")
    with pytest.raises(CorruptModelFile, match="signed"):
        load_model(path)  # a signed manifest needs the key
    unsigned = save_model(model, tmp_path / "u.npz")
    with pytest.raises(CorruptModelFile, match="not signed"):
        load_model(unsigned, hmac_key=b"secret")


def test_hmac_catches_a_consistent_forgery(tmp_path: Path) -> None:
    path = save_model(MahalanobisOutlier().fit(X), tmp_path / "m.npz", hmac_key=b"secret")
    with np.load(path) as npz:
        arrays = {k: npz[k] for k in npz.files}
    arrays["offset_"] = np.asarray(-1e12)  # a threshold nothing falls below
    _rewrite(path, arrays)
    with pytest.raises(CorruptModelFile, match="HMAC"):
        load_model(path, hmac_key=b"secret")


def test_only_npz_paths(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="npz"):
        save_model(FeatureEnvelope().fit(X), tmp_path / "model.pkl")
