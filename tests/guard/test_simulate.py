"""``guard simulate``: attack clients run against a real server."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from inference_guard.guard.simulate import ATTACKS, clients_dir, load_clients
from inference_guard.middleware.cli import main
from tests.conftest import run_server


def test_clients_are_found_in_the_checkout() -> None:
    assert (clients_dir() / "clients.py").is_file()
    clients = load_clients()
    assert clients is not None
    assert tuple(clients.NAMES) == ATTACKS
    assert {"knockoff-natural", "knockoff-open-world"} <= set(ATTACKS)
    assert set(clients.DEFAULT_ROWS) == set(ATTACKS)


@pytest.mark.e2e
def test_benign_client_against_a_guarded_server(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with run_server(tmp_path) as srv:
        code = main(["simulate", "benign", "--target", srv.url, "--rows", "20"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "rows sent: 20 in" in out
    assert "status codes: 200:" in out
    assert "blocked (403): none" in out
    assert "Traceback" not in srv.output()


@pytest.mark.e2e
def test_rounded_answers_are_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = {"policies": [{"name": "p", "degrade": {"always": True, "decimals": 2, "noise": 0.0}}]}
    with run_server(tmp_path, config=config) as srv:
        code = main(["simulate", "knockoff-uniform", "--target", srv.url, "--rows", "40"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "rows sent: 40 in 2 requests" in out
    assert "answers with rounded probabilities: 2 of 2" in out
    assert "answers perturbed beyond rounding (degraded; vs the demo model): 0 of 2" in out
    assert "stolen model agrees with the demo model" in out


@pytest.mark.e2e
def test_open_world_knockoff_queries_photo_patches(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("PIL", reason="the sample photos need Pillow (test and bench extras)")
    with run_server(tmp_path) as srv:
        code = main(["simulate", "knockoff-open-world", "--target", srv.url, "--rows", "64"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "attack: knockoff-open-world against" in out
    assert "rows sent: 64 in 2 requests" in out
    assert "status codes: 200: 2" in out
    assert "stolen model agrees with the demo model" in out
    assert "(learnt from 64 answered rows)" in out
    assert "Traceback" not in srv.output()


def test_unknown_attack_exits_non_zero(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["simulate", "no-such-attack", "--target", "http://127.0.0.1:9"])
    assert code != 0
    assert "unknown attack 'no-such-attack'" in capsys.readouterr().err


def test_unreachable_target_exits_non_zero(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["simulate", "benign", "--target", "http://127.0.0.1:9", "--rows", "5"])
    assert code == 2
    assert "guard simulate: benign:" in capsys.readouterr().err


def test_missing_clients_exit_2(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import inference_guard.guard.simulate as simulate

    monkeypatch.setattr(simulate, "clients_dir", lambda: tmp_path / "nowhere")
    code = main(["simulate", "benign", "--target", "http://127.0.0.1:9"])
    assert code == 2
    assert "attack clients are not installed" in capsys.readouterr().err


@pytest.mark.e2e
def test_a_probing_attack_is_degraded_then_quarantined(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("art", reason="hopskipjump needs the bench extra")
    config = {
        "policies": [
            {
                "name": "p",
                "quarantine_s": 60,
                "degrade": {"always": True, "decimals": 3, "noise": 0.15},
                "detectors": [
                    {
                        "type": "near_duplicate",
                        "action": "degrade",
                        "params": {"feature_range": [0, 16]},
                        "escalate": [{"score_below": 0.3, "action": "block"}],
                    }
                ],
            }
        ]
    }
    env = {"GUARD_FINGERPRINT_SALT": "test-salt-0123456789abcdef"}
    with run_server(tmp_path, config=config, env=env) as srv:
        code = main(["simulate", "hopskipjump", "--target", srv.url, "--rows", "500"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "first perturbed answer after" in out
    assert "blocked (403): 1 requests" in out


# ------------------------------------------------------------------ any deployment


@pytest.fixture(scope="module")
def wine(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The wine model's reference data (rows and its answers) and its calibrated guard config."""
    import numpy as np

    from inference_guard.guard.calibrate import calibrate_rows
    from tests.e2e.apps import wine_model

    tmp = tmp_path_factory.mktemp("wine")
    model, X = wine_model()
    ref = tmp / "wine.npz"
    np.savez(ref, X=X, labels=model.predict(X).astype(np.int64))
    np.savetxt(tmp / "wine.csv", X, delimiter=",")
    calibrate_rows(X, tmp / "calibration", kinds=("envelope",), holdout=0.3)
    config = {
        "calibration_dir": str(tmp / "calibration"),
        "policies": [
            {
                "name": "wine",
                "routes": ["/v2/models/wine/infer"],
                "quarantine_s": 600,
                # every simulated client runs from 127.0.0.1: quarantine the key alone,
                # so that the next run, a new key, is a new client
                "quarantine_address": "off",
                "detectors": [
                    {"type": "envelope", "action": "flag", "params": {"track_rate": True}},
                    {
                        "type": "anomaly_rate",
                        "action": "degrade",
                        "params": {"source": "envelope", "max_rate": 0.2, "min_rows": 64},
                        "escalate": [{"margin_below": -0.3, "action": "block"}],
                    },
                ],
            }
        ],
    }
    return {"ref": str(ref), "csv": str(tmp / "wine.csv"), "config": config}


@pytest.mark.e2e
def test_simulate_against_another_model(
    tmp_path: Path, wine: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    """A 13-feature model on /v2/models/wine/infer: the attack is quarantined, the
    metrics name the detectors, and the next run is a new client."""
    app = "tests.e2e.apps:wine_app"
    with run_server(tmp_path, config=wine["config"], app=app) as srv:
        common = ["--target", srv.url, "--model", "wine", "--reference", wine["ref"]]
        code = main(["simulate", "knockoff-uniform", *common, "--rows", "320"])
        out = capsys.readouterr().out
        assert code == 0, out
        assert "model wine" in out
        assert "(fresh for this run)" in out
        assert "blocked (403): 1 requests" in out, out
        assert "stolen model agrees with the answers the reference records on" in out
        assert "answers perturbed beyond rounding: not measured" in out
        fired = next(line for line in out.splitlines() if line.startswith("detectors fired"))
        assert "envelope (flag): " in fired and "anomaly_rate (block): 1" in fired, fired
        assert "clients quarantined during the run (all clients): 1" in out
        attacker = next(line for line in out.splitlines() if line.startswith("api key: "))
        attacker_key = attacker.split()[2]

        # the next run draws a fresh key: the attacker's quarantine does not refuse it
        code = main(["simulate", "benign", *common, "--rows", "40"])
        out = capsys.readouterr().out
        assert code == 0, out
        assert "blocked (403): none" in out
        assert "status codes: 200:" in out
        assert attacker_key not in out

        # the attacker's own key again: refused before anything is answered
        code = main(["simulate", "benign", *common, "--rows", "40", "--api-key", attacker_key])
        captured = capsys.readouterr()
        assert code == 1, captured.out
        assert "status codes: 403: 1" in captured.out
        assert "nothing was answered" in captured.err
        assert "stopped before any answer" in captured.err

        # a .csv reference, and no reference at all: the width from GET /v2/models/wine
        code = main(["simulate", "equation-solving", *common[:4], "--reference", wine["csv"]])
        out = capsys.readouterr().out
        assert code == 0, out
        assert "agreement not measured: the reference records no answers" in out
        code = main(["simulate", "knockoff-uniform", *common[:4], "--rows", "32"])
        out = capsys.readouterr().out
        assert code == 0, out
        assert "rows sent: 32 in 1 requests" in out
    assert "Traceback" not in srv.output()


@pytest.mark.e2e
def test_simulate_fails_loudly_when_nothing_is_answered(
    tmp_path: Path, wine: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    with run_server(tmp_path, config=wine["config"], app="tests.e2e.apps:wine_app") as srv:
        # a model the target does not serve: 404 on its route
        code = main(
            ["simulate", "knockoff-uniform", "--target", srv.url, "--model", "nosuch",
             "--reference", wine["ref"], "--rows", "32"]
        )
        captured = capsys.readouterr()
        assert code == 1
        assert "status codes: 404: 1" in captured.out
        assert "nothing was answered" in captured.err and "'nosuch'" in captured.err
        assert "result:" not in captured.out
        # the demo's digits rows against a 13-feature model: refused as malformed
        code = main(["simulate", "knockoff-uniform", "--target", srv.url, "--rows", "32"])
        captured = capsys.readouterr()
        assert code == 1, captured.out
        assert "nothing was answered" in captured.err and "input width" in captured.err
        # without a reference the width must come from the metadata
        code = main(["simulate", "knockoff-uniform", "--target", srv.url, "--model", "nosuch"])
        assert code == 2
        assert "pass --reference" in capsys.readouterr().err
        # a reference of another width than the metadata says
        narrow = tmp_path / "narrow.csv"
        narrow.write_text("1,2,3\n4,5,6\n7,8,9\n")
        code = main(
            ["simulate", "knockoff-uniform", "--target", srv.url, "--model", "wine",
             "--reference", str(narrow)]
        )
        assert code == 2
        assert "features but the target's metadata" in capsys.readouterr().err
        # the evasion clients judge their success with the demo model itself
        code = main(
            ["simulate", "hopskipjump", "--target", srv.url, "--model", "wine",
             "--reference", wine["ref"]]
        )
        assert code == 2
        assert "demo's digits model only" in capsys.readouterr().err

