"""A policy compiled for the hot path: route regex, built detectors, actions."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import NamedTuple

from inference_guard.detectors.base import Detector, DetectorResult
from inference_guard.guard.config import PolicyConfig
from inference_guard.guard.decisions import Action, Decision, FailureMode

__all__ = ["Armed", "CompiledPolicy", "compile_routes", "detectors_may_degrade"]


class Armed(NamedTuple):
    """A built detector with the action it triggers and its escalation ladder."""

    detector: Detector
    #: the action when the detector fires
    action: Action
    #: ``(score_below, action)`` pairs, ascending: lower scores, stronger actions
    escalate: tuple[tuple[float, Action], ...] = ()
    #: ``(margin_below, action)`` pairs: the same, relative to the result's threshold
    escalate_margin: tuple[tuple[float, Action], ...] = ()

    def action_for(self, result: DetectorResult) -> Action:
        """The action a firing result asks for, escalated by how low its score is."""
        action = self.action
        for below, stronger in self.escalate:
            if result.score < below and stronger.severity > action.severity:
                action = stronger
        margin = result.score - result.threshold
        for below, stronger in self.escalate_margin:
            if margin < below and stronger.severity > action.severity:
                action = stronger
        return action


def detectors_may_degrade(detectors: tuple[Armed, ...]) -> bool:
    """Whether one of ``detectors`` may ask for ``degrade`` (its action or an escalation)."""
    return any(
        a.action is Action.DEGRADE
        or any(e is Action.DEGRADE for _, e in (*a.escalate, *a.escalate_margin))
        for a in detectors
    )


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
    detectors: tuple[Armed, ...]
    failure_mode: FailureMode
    #: some detector learns from answers, so answers must be parsed
    observes: bool
    #: the policy never needs the body (no validation, no detectors, no degrade, and
    #: unknown formats passed)
    passthrough: bool
    #: answers may be rewritten (rounding for everyone, or a degrade action)
    rewrites: bool = False
    #: the decision on every request when there are no detectors (immutable, shared)
    allow: Decision | None = None
    #: the detectors whose flags are per row: a decision that only they flagged is
    #: counted, not audited (:attr:`Decision.row_flags_only`)
    row_detectors: frozenset[str] = frozenset()
    #: the detectors that learn from answers, in config order (derived from ``detectors``)
    observers: tuple[Armed, ...] = field(init=False, default=())

    def __post_init__(self) -> None:
        observers = tuple(a for a in self.detectors if a.detector.observes_answers)
        object.__setattr__(self, "observers", observers)

    @classmethod
    def build(
        cls,
        config: PolicyConfig,
        detectors: tuple[Armed, ...],
        default_failure_mode: FailureMode,
    ) -> CompiledPolicy:
        degrade_possible = config.degrade.always or detectors_may_degrade(detectors)
        return cls(
            config=config,
            name=config.name,
            routes=compile_routes(config.routes),
            methods=frozenset(config.methods),
            detectors=detectors,
            failure_mode=config.failure_mode or default_failure_mode,
            observes=any(a.detector.observes_answers for a in detectors),
            passthrough=not (
                config.validate
                or detectors
                or degrade_possible
                or config.unknown_format == "refuse"
            ),
            rewrites=degrade_possible,
            allow=None
            if detectors
            else Decision(
                action=Action.ALLOW,
                intended=Action.ALLOW,
                policy=config.name,
                shadow=config.shadow,
            ),
            row_detectors=frozenset(a.detector.name for a in detectors if a.detector.per_row),
        )

    def matches(self, method: str, path: str) -> bool:
        return method in self.methods and self.routes.match(path) is not None

    def route_of(self, path: str) -> str:
        """The first of the policy's route patterns that ``path`` matches (``""``: none).

        For messages about a route: a label from the config, never the
        client-chosen path. Off the hot path (``re`` caches the compiled patterns).
        """
        for pattern in self.config.routes:
            if compile_routes((pattern,)).match(path) is not None:
                return pattern
        return ""
