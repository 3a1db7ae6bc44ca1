"""Calibration files on disk: only regular files, bounded before reading, a warning on o+w dirs."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from inference_guard.detectors.envelope import FeatureEnvelope
from inference_guard.detectors.persist import (
    MAX_BYTES,
    CorruptModelFile,
    load_model,
    manifest_path,
    save_model,
)
from tests.detectors.anomaly_helpers import gaussian


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    directory = tmp_path / "calibration"
    directory.mkdir(mode=0o755)
    return save_model(FeatureEnvelope().fit(gaussian(200, d=4)), directory / "envelope.npz")


@pytest.mark.parametrize("which", ["state", "manifest"])
def test_a_symlink_to_a_device_is_refused_at_once(saved: Path, which: str) -> None:
    target = saved if which == "state" else manifest_path(saved)
    target.unlink()
    target.symlink_to("/dev/zero")
    with pytest.raises(CorruptModelFile, match="not a regular file"):
        load_model(saved)


def test_a_fifo_is_refused_without_waiting_for_a_writer(saved: Path) -> None:
    manifest_path(saved).unlink()
    os.mkfifo(manifest_path(saved))
    with pytest.raises(CorruptModelFile, match="not a regular file"):
        load_model(saved)


def test_an_oversized_file_is_refused_before_it_is_read(saved: Path) -> None:
    # sparse: MAX_BYTES + 1 bytes long, no disk used; refused on its size alone
    with open(saved, "r+b") as fh:
        fh.truncate(MAX_BYTES + 1)
    with pytest.raises(CorruptModelFile, match=f"larger than {MAX_BYTES} bytes"):
        load_model(saved)


def test_a_symlink_to_a_regular_file_is_followed(saved: Path, tmp_path: Path) -> None:
    """Deployments mount files through links (Kubernetes ConfigMaps, Secrets)."""
    linked = tmp_path / "linked"
    linked.mkdir()
    for src in (saved, manifest_path(saved)):
        (linked / src.name).symlink_to(src)
    assert load_model(linked / saved.name).n_features_in_ == 4


def test_a_world_writable_directory_is_warned_about_once(
    saved: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="guard.persist"):
        load_model(saved)
        assert not caplog.records
        saved.parent.chmod(0o777)
        load_model(saved)
        load_model(saved)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1
    assert "world-writable" in warnings[0] and str(saved.parent) in warnings[0]
