"""``guard simulate``: attack clients run against a real server."""

from __future__ import annotations

from pathlib import Path

import pytest

from guard.simulate import ATTACKS, clients_dir, load_clients
from middleware.cli import main
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
    import guard.simulate as simulate

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
