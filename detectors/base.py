"""The contract between the guard and its detectors.

A detector knows nothing of HTTP. The guard turns each inference request into a
:class:`Query` (a float matrix of rows, or a tuple of texts) and each answer into
an :class:`Answer`, and hands them to every detector of the matching policy:

* :meth:`Detector.inspect` runs *before* the model, so a detector can stop a
  request before it costs anything;
* :meth:`Detector.observe` runs *after* the model answered, for stateful
  detectors that learn from what the client was told (predicted class,
  probabilities).

Both return an immutable :class:`DetectorResult`. Scores follow scikit-learn's
outlier convention everywhere, online detectors included: **higher is more
normal**, and a result is anomalous when ``score < threshold``. That way the
policy compares like with like, and one Grafana panel can show any detector.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple

import numpy as np
from numpy.typing import NDArray

__all__ = ["Answer", "Detector", "DetectorResult", "Query"]


@dataclass(frozen=True, slots=True)
class Query:
    """One parsed inference request, as detectors see it."""

    #: keyed hash of the client identity; never the raw API key or IP
    client: str
    #: name of the policy whose detectors are running
    policy: str
    #: ``(n_rows, n_features)`` float64 matrix, or ``None`` for text or unparsed payloads
    rows: NDArray[np.float64] | None
    #: prompt texts (chat/completions), one per row; empty for tabular payloads
    texts: tuple[str, ...] = ()
    #: rows (or prompts) the request carries: the unit that rates and detectors count
    n_rows: int = 1
    #: payload format the adapter recognised (``oip_v2``, ``kserve_v1``, ``mlflow``,
    #: ``openai_chat``, ``openai_completion``, ``json_array``, ``unknown``)
    fmt: str = "unknown"
    #: clock reading when the request arrived, in seconds
    now: float = 0.0
    #: the guard's request id, for correlating audit lines
    request_id: str = ""
    #: free-form extras an adapter may attach (e.g. ``max_tokens`` for token cost)
    extra: dict[str, Any] = field(default_factory=dict)
    #: keyed hash of the client's address, whatever credential it presented
    #: (``""``: not known; what is keyed on it then falls back to ``client``)
    ip: str = ""
    #: keyed hash of the client's subnet (``""``: not known)
    subnet: str = ""
    #: what detectors computed from this request for each other (the rows' digests,
    #: scaled rows, row scores), so that the work is done once per request; never
    #: compared or shown. Keys are the computing module's; values are read-only
    memo: dict[Any, Any] = field(default_factory=dict, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class Answer:
    """What the model told the client, as far as the guard could parse it."""

    #: HTTP status of the model's answer
    status: int = 200
    #: predicted class index per row, when present
    labels: NDArray[np.int64] | None = None
    #: ``(n_rows, n_classes)`` class probabilities, when present
    probabilities: NDArray[np.float64] | None = None


class DetectorResult(NamedTuple):
    """A detector's verdict on one request (or on the client, after it).

    Immutable; a named tuple (a detector returns one per request, and a tuple
    costs a quarter of a frozen dataclass to make).
    """

    #: name of the detector instance (as configured), a metric label
    detector: str
    #: the detector's statistic; higher is more normal
    score: float
    #: anomalous when ``score < threshold``
    threshold: float
    #: the verdict: did this detector fire?
    anomalous: bool
    #: a short reason for ops (audit log); never sent to the client
    reason: str = ""
    #: how many of the request's rows the detector found anomalous
    rows_flagged: int = 0
    #: for rate-like detectors: seconds until a retry can succeed
    retry_after: float | None = None
    #: response headers the detector asks for (e.g. ``RateLimit``), whatever the action
    headers: tuple[tuple[str, str], ...] = ()

    @staticmethod
    def ok(detector: str, score: float = 0.0, threshold: float = 0.0) -> DetectorResult:
        """A normal result, for detectors that have nothing to report."""
        return DetectorResult(detector, score, threshold, False)


class Detector(ABC):
    """An online detector: one instance per policy entry, shared by all requests.

    Subclasses set :attr:`technique` (the MITRE ATLAS technique the detector
    addresses; it goes into the audit log) and implement :meth:`inspect`. They
    must not keep per-request state on ``self``; per-client state lives in the
    store the detector was built with.
    """

    #: MITRE ATLAS technique id of the threat this detector addresses
    technique: ClassVar[str] = "AML.T0000"
    #: True when :meth:`observe` must see parsed answers (the guard then parses them)
    observes_answers: ClassVar[bool] = False
    #: True when the verdict is about single rows (input anomalies) at a per-row
    #: false-positive rate: a ``flag`` from such detectors alone is counted, not audited
    per_row: ClassVar[bool] = False

    def __init__(self, name: str) -> None:
        self.name = name

    @abstractmethod
    async def inspect(self, query: Query) -> DetectorResult:
        """Score the request before the model sees it."""

    async def observe(self, query: Query, answer: Answer) -> DetectorResult | None:
        """Learn from the model's answer; return a result to escalate, else ``None``."""
        return None

    async def observe_many(
        self, items: Sequence[tuple[Query, Answer]]
    ) -> list[DetectorResult | Exception | None]:
        """:meth:`observe` of several answers, in order: one outcome per item.

        The guard drains its observation queue through this call when several
        answers wait (one alone goes to :meth:`observe`), so that a detector
        can share the per-row work of a batch (one projection, one set of
        digests). Its state must end as if :meth:`observe` had been
        called on each item in turn, and each item's outcome be what that
        call would have returned. An item whose observation raised gets the
        exception as its outcome; the others are still observed.
        """
        out: list[DetectorResult | Exception | None] = []
        for query, answer in items:
            try:
                out.append(await self.observe(query, answer))
            except Exception as exc:  # the guard counts it, as for observe()
                out.append(exc)
        return out

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release resources (connections, files). Called once at shutdown."""
