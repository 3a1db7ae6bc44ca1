"""A policy compiled for the hot path: route regex, built detectors, actions."""

from __future__ import annotations

import re
from dataclasses import dataclass

from detectors.base import Detector
from guard.config import PolicyConfig
from guard.decisions import Action, FailureMode

__all__ = ["CompiledPolicy", "compile_routes"]


def compile_routes(patterns: tuple[str, ...]) -> re.Pattern[str]:
    """One regex for a policy's route patterns.

    ``*`` matches within a path segment, ``**`` across segments; ``{name}`` is
    the same as ``*`` (so patterns can be copied from protocol specs).
    """
    parts: list[str] = []
    for pattern in patterns:
        out: list[str] = []
        i = 0
        while i < len(pattern):
            if pattern.startswith("**", i):
                out.append(".*")
                i += 2
            elif pattern[i] == "*":
                out.append("[^/]*")
                i += 1
            elif pattern[i] == "{":
                end = pattern.find("}", i)
                if end < 0:
                    out.append(re.escape(pattern[i:]))
                    break
                out.append("[^/]+")
                i = end + 1
            else:
                out.append(re.escape(pattern[i]))
                i += 1
        parts.append("".join(out))
    return re.compile("(?:" + "|".join(parts) + r")/?\Z")


@dataclass(frozen=True, slots=True)
class CompiledPolicy:
    """Everything the hot path needs about one policy, computed once."""

    config: PolicyConfig
    name: str
    routes: re.Pattern[str]
    methods: frozenset[str]
    #: (detector, action) in config order
    detectors: tuple[tuple[Detector, Action], ...]
    failure_mode: FailureMode
    #: some detector learns from answers, so answers must be parsed
    observes: bool
    #: the policy never needs the body (no validation, no detectors, no degrade)
    passthrough: bool

    @classmethod
    def build(
        cls,
        config: PolicyConfig,
        detectors: tuple[tuple[Detector, Action], ...],
        default_failure_mode: FailureMode,
    ) -> CompiledPolicy:
        degrade_possible = config.degrade.always or any(a is Action.DEGRADE for _, a in detectors)
        return cls(
            config=config,
            name=config.name,
            routes=compile_routes(config.routes),
            methods=frozenset(config.methods),
            detectors=detectors,
            failure_mode=config.failure_mode or default_failure_mode,
            observes=any(d.observes_answers for d, _ in detectors),
            passthrough=not (config.validate or detectors or degrade_possible),
        )

    def matches(self, method: str, path: str) -> bool:
        return method in self.methods and self.routes.match(path) is not None
