"""``payload:`` (custom JSON shapes) and ``unknown_format:`` in a policy's config."""

from __future__ import annotations

from typing import Any

import pytest

from inference_guard.guard.config import GuardConfig, PayloadConfig
from inference_guard.guard.errors import ConfigurationError


def policy(**keys: Any) -> dict[str, Any]:
    return {"policies": [{"name": "scoring", "routes": ["/score"], **keys}]}


def problems(data: dict[str, Any]) -> dict[str, str]:
    with pytest.raises(ConfigurationError) as info:
        GuardConfig.from_dict(data)
    return dict(info.value.problems)


def test_payload_pointers_are_kept() -> None:
    cfg = GuardConfig.from_dict(
        policy(payload={"rows": "/features", "probabilities": "/out/0/probabilities"})
    )
    assert cfg.policies[0].payload == PayloadConfig(
        rows="/features", probabilities="/out/0/probabilities"
    )


def test_defaults_built_in_formats_and_unknown_formats_passed() -> None:
    pc = GuardConfig.from_dict(policy()).policies[0]
    assert pc.payload is None
    assert pc.unknown_format == "pass"
    assert GuardConfig.from_dict(policy(unknown_format="refuse")).policies[0].unknown_format == (
        "refuse"
    )


@pytest.mark.parametrize(
    ("payload", "key", "message"),
    [
        ({"rows": "features"}, "policies[0].payload.rows", "starts with '/'"),
        ({"texts": "/a~2b"}, "policies[0].payload.texts", "'~' must be escaped"),
        (
            {"rows": "/x", "probabilities": "probs"},
            "policies[0].payload.probabilities",
            "starts with '/'",
        ),
        ({"rows": 3}, "policies[0].payload.rows", "a JSON pointer is a string"),
        ({}, "policies[0].payload", "needs rows or texts"),
        ({"probabilities": "/p"}, "policies[0].payload", "needs rows or texts"),
        ({"rows": "/x", "columns": "/c"}, "policies[0].payload.columns", "unknown key"),
        ("/features", "policies[0].payload", "must be a mapping"),
    ],
)
def test_bad_payload_is_named_by_key_path(payload: object, key: str, message: str) -> None:
    found = problems(policy(payload=payload))
    assert key in found, found
    assert message in found[key]


def test_bad_unknown_format_is_named_by_key_path() -> None:
    found = problems(policy(unknown_format="drop"))
    assert found == {"policies[0].unknown_format": "must be one of pass, refuse, got 'drop'"}


def test_every_problem_is_reported_at_once() -> None:
    found = problems(policy(payload={"rows": "x", "texts": "y"}, unknown_format=1))
    assert set(found) == {
        "policies[0].payload.rows",
        "policies[0].payload.texts",
        "policies[0].unknown_format",
    }
