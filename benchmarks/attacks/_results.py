"""What one deployment's run produced: attacks, benign population, monitors, framing."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import benign
from ._http import Oracle
from ._recipe import Deployment
from ._traffic import Outcome, Session

__all__ = [
    "Attack",
    "BenignLearner",
    "ClientResult",
    "Framing",
    "Monitor",
    "Population",
    "Result",
    "Run",
    "Scenario",
]


@dataclass
class Run:
    """One client run: what it sent and what it achieved."""

    oracle: Oracle
    result: Any
    seconds: float


@dataclass
class Scenario:
    """An attack, bare and guarded."""

    name: str
    kind: str  # extraction | evasion
    params: str
    bare: Run | None = None
    guard: Run | None = None
    out: Outcome | None = None
    keys: int = 1
    #: False: its traffic is what benign clients send too (the closed-world Knockoff)
    flaggable: bool = True
    #: which target it is judged on: extraction | hopskipjump | boundary | signopt | sybil
    family: str = ""


@dataclass
class ClientResult:
    """A benign or hard-case client: what it sent and what the guard did."""

    session: Session
    oracle: Oracle
    out: Outcome


@dataclass(frozen=True)
class BenignLearner:
    """A substitute fitted on one benign client's answers, as a Knockoff attacker fits its own.

    One row per distinct input (its first answer), only rows outside the eval half
    (on which it is scored): the client also holds answers for eval rows it sent,
    so this understates what it learnt.
    """

    distinct: int
    trained: int
    agreement: float


@dataclass
class Population:
    """The benign population and the hard cases run beside it, in one guard."""

    benign: list[ClientResult]
    hard: dict[str, ClientResult]
    plans: list[benign.BenignPlan]
    seconds: float
    learner: BenignLearner | None = None

    @property
    def enforced(self) -> list[ClientResult]:
        return [c for c in self.benign if c.out.enforced]

    @property
    def audited(self) -> list[ClientResult]:
        return [c for c in self.benign if c.out.audited]


@dataclass
class Monitor:
    """The looping monitor's 20 keys, in one fresh guard."""

    exempt: bool
    clients: list[ClientResult]
    #: the guard rejected ``exempt:`` (not supported yet): the exempt run did not happen
    unsupported: bool = False

    @property
    def enforced(self) -> int:
        return sum(c.out.enforced for c in self.clients)

    @property
    def audited(self) -> int:
        return sum(c.out.audited for c in self.clients)


@dataclass
class Framing:
    framer: ClientResult
    victim: ClientResult


@dataclass
class Result:
    dep: Deployment
    attacks: list[Scenario]
    population: Population
    monitors: list[Monitor]
    framing: Framing
    seconds: float
    accuracy: float


Attack = Callable[[Oracle], Any]
