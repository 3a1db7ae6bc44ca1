"""The ``guard`` command line."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from inference_guard.middleware.cli import main


def test_check_config_accepts_a_valid_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    f = tmp_path / "ok.yaml"
    f.write_text("policies:\n  - name: inference\n    routes: ['/v2/models/*/infer']\n")
    assert main(["check-config", str(f)]) == 0
    assert "OK (1 policies" in capsys.readouterr().out


def test_check_config_names_each_problem(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text(
        "limits:\n  max_rows: lots\n"
        "policies:\n  - name: p\n    detectors:\n      - {type: no-such-detector}\n"
        "      - {type: rate, action: deny}\n"
    )
    assert main(["check-config", str(f)]) == 1
    err = capsys.readouterr().err
    assert "limits.max_rows: must be an integer" in err
    assert "policies[0].detectors[1].action" in err


def test_check_config_reports_unknown_detector_type(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text("policies:\n  - name: p\n    detectors: [{type: no-such-detector}]\n")
    assert main(["check-config", str(f)]) == 1
    assert "policies[0].detectors[0].type: unknown detector type 'no-such-detector'" in (
        capsys.readouterr().err
    )


def test_check_config_missing_file(tmp_path: Path) -> None:
    assert main(["check-config", str(tmp_path / "nope.yaml")]) == 1


def test_console_script_is_installed() -> None:
    exe = shutil.which("guard")
    assert exe is not None, "the 'guard' console script is not on PATH (pip install -e .)"
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, check=True).stdout
    assert "demo" in out and "check-config" in out


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    import guard

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"guard (inference-guard) {guard.__version__}"


def test_version_from_a_process() -> None:
    import sys

    root = Path(__file__).resolve().parents[2]
    out = subprocess.run(
        [sys.executable, "-m", "inference_guard.middleware.cli", "--version"],
        cwd=root,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.startswith("guard (inference-guard) ")


def test_check_config_names_detector_problems_beside_structural_ones(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text(
        "limits:\n  max_rows: lots\n"
        "metrics: {path: 3}\n"
        "policies:\n"
        "  - name: p\n"
        "    quarantine_s: soon\n"
        "    detectors:\n"
        "      - {type: rate, params: {limits: nope}}\n"
        "      - {type: prada, action: deny, params: {delta: 7, bogus: 1}}\n"
        "      - {type: mahalanobis}\n"
    )
    assert main(["check-config", str(f)]) == 1
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    # structure
    assert any("limits.max_rows: must be an integer" in line for line in lines), err
    assert any("policies[0].quarantine_s" in line for line in lines), err
    assert any("policies[0].detectors[1].action" in line for line in lines), err
    # and each detector's own parameters, in the same run
    assert any("policies[0].detectors[0].params.limits" in line for line in lines), err
    assert any("policies[0].detectors[1].params" in line for line in lines), err
    assert any(
        "policies[0].detectors[2]" in line and "calibration" in line for line in lines
    ), err
    assert len(lines) == len(set(lines)), "each problem once"
