"""``guard proxy``'s command line: what it refuses before it starts a server."""

from __future__ import annotations

from pathlib import Path

import pytest

from inference_guard.middleware.cli import build_parser, main


def test_help_names_the_default_policy(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["proxy", "--help"])
    out = capsys.readouterr().out
    assert "--upstream" in out
    assert "rounded to 2 decimals" in out
    assert "guard_upstream_errors_total" in out


def test_upstream_is_required() -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["proxy"])


@pytest.mark.parametrize(
    ("upstream", "problem"),
    [
        ("ftp://127.0.0.1:21", "must be an http:// or https:// URL"),
        ("http://127.0.0.1:8080/?x=1", "must not carry a query"),
        ("http://user:pw@127.0.0.1:8080", "must not carry a query, a fragment or credentials"),
    ],
)
def test_bad_upstreams_are_refused(
    upstream: str, problem: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["proxy", "--upstream", upstream]) == 1
    err = capsys.readouterr().err
    assert "upstream" in err
    assert problem in err


def test_bad_config_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "guard.yaml"
    config.write_text("policies: [{name: p, detectors: [{type: rate, action: deny}]}]\n")
    assert main(["proxy", "--upstream", "http://127.0.0.1:8080", "--config", str(config)]) == 1
    assert "policies[0].detectors[0].action" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--read-timeout", "--connect-timeout", "--workers"])
def test_bad_numbers_are_refused(flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["proxy", "--upstream", "http://127.0.0.1:8080", flag, "0"]) == 2
    assert f"{flag} must be positive" in capsys.readouterr().err
