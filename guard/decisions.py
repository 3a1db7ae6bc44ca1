"""Actions and decisions: the values the policy returns."""

from __future__ import annotations

from enum import StrEnum
from typing import NamedTuple

from inference_guard.detectors.base import DetectorResult

__all__ = ["Action", "Decision", "FailClosed", "FailureMode"]


class Action(StrEnum):
    """What the guard does with a request. Ordered by severity."""

    ALLOW = "allow"  #: pass to the model, record nothing
    FLAG = "flag"  #: pass to the model, record in metrics and the audit log
    DEGRADE = "degrade"  #: pass, then coarsen the model's outputs
    THROTTLE = "throttle"  #: answer 429 with Retry-After
    BLOCK = "block"  #: answer 403 (and optionally quarantine the client)

    @property
    def severity(self) -> int:
        return _SEVERITY[self]


_SEVERITY = {
    Action.ALLOW: 0,
    Action.FLAG: 1,
    Action.DEGRADE: 2,
    Action.THROTTLE: 3,
    Action.BLOCK: 4,
}


class FailureMode(StrEnum):
    """What happens to a request when the guard itself fails."""

    FAIL_OPEN = "fail_open"  #: let it through, log and count the failure
    FAIL_CLOSED = "fail_closed"  #: answer 503, log and count the failure


class FailClosed(Exception):
    """The guard failed on a policy whose failure mode is ``fail_closed`` (answer 503).

    Raised inside the engine by the detector pipeline, caught by admission: a
    signal between the two, never seen by a front end.
    """

    def __init__(self, component: str):
        self.component = component
        super().__init__(component)


class Decision(NamedTuple):
    """The policy's verdict on one request (immutable; a tuple, made once per request)."""

    #: what the guard enforces (``allow`` in shadow mode whatever was intended)
    action: Action
    #: what the policy would have done; differs from ``action`` only in shadow mode
    intended: Action
    #: name of the policy that decided
    policy: str
    #: every detector result, fired or not
    results: tuple[DetectorResult, ...] = ()
    #: the detectors that fired, with the action each one asked for
    fired: tuple[tuple[str, Action], ...] = ()
    #: seconds the client should wait (throttle)
    retry_after: float | None = None
    #: extra response headers (rate-limit fields), sent whatever the action; none in
    #: shadow mode or for an exempt client (nothing is enforced on them)
    headers: tuple[tuple[str, str], ...] = ()
    #: the client is (now) quarantined
    quarantined: bool = False
    #: shadow mode: recorded, not enforced
    shadow: bool = False
    #: the client is exempt (``exempt:`` in the config): detected and recorded, never enforced
    exempt: bool = False
    #: only per-row detectors fired and they asked for ``flag``: counted in the metrics,
    #: but no audit line (a client's abnormal share of such rows is ``anomaly_rate``'s call)
    row_flags_only: bool = False

    @property
    def recorded(self) -> bool:
        """Whether this decision goes into the audit log.

        Every decision but ``allow``, except a ``flag`` that only per-row
        detectors asked for: at their calibrated per-row false-positive rate
        they flag a row of most ordinary clients sooner or later, so such flags
        live in the metrics, and the client-level ``anomaly_rate`` detector
        writes the line when a client's share of flagged rows is abnormal.
        """
        if self.quarantined:
            return True
        return self.intended is not Action.ALLOW and not self.row_flags_only
