"""Timed client sessions run through a deployment, and what the guard did to each client.

A :class:`Session` is one client (one API key): when it sends each request and
which rows. :func:`run_sessions` interleaves many sessions' requests in time
order on one transport, moving the simulated clock (``_asgi.SimClock``) to each
request's time, so the guard sees the population's real timing while the run
takes seconds. A session stops at its first refused request (403, 429, ...).

:func:`outcome` reads one client's fate from the guard's audit log (lines
matched by the keyed client hash and the ``x-request-id`` the client got) and
from the statuses the client saw, with the benchmark's definitions:

* *enforced*: an answer degraded, throttled or blocked (the audit line's
  ``enforced`` is ``degrade``, ``throttle`` or ``block``, or the line says
  ``quarantined``), or a 403 or 429 seen by the client;
* *audited*: the client has any audit line at all;
* *first enforcing row*: the rows the client had sent up to and including its
  first enforcing request.
"""

from __future__ import annotations

import hashlib
import heapq
import hmac
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from ._asgi import SimClock
from ._http import Oracle, Refused, Sent

__all__ = ["ENFORCING", "Outcome", "Session", "client_hash", "outcome", "run_sessions"]

#: audit ``enforced`` values that change what the client gets
ENFORCING = frozenset({"degrade", "throttle", "block"})
#: statuses that refuse the client an answer for the guard's reasons
REFUSING = frozenset({403, 429})


@dataclass(frozen=True)
class Session:
    """One client: its key, what it is, and its timed requests."""

    key: str
    #: what kind of client (``benign``, ``probe``, ...), for the report
    kind: str
    #: seconds (simulated) at which each request is sent
    times: tuple[float, ...]
    #: the rows of each request
    batches: tuple[NDArray[np.float64], ...]

    @property
    def n_rows(self) -> int:
        return sum(int(b.shape[0]) for b in self.batches)

    @property
    def n_requests(self) -> int:
        return len(self.batches)


def run_sessions(
    transport: Any,
    clock: SimClock,
    sessions: Sequence[Session],
    *,
    path: str,
    reference: Callable[[NDArray[np.float64]], NDArray[np.float64]] | None = None,
) -> list[Oracle]:
    """Send every session's requests in time order; one oracle (request log) per session."""
    oracles = [
        Oracle("", [s.key], path=path, transport=transport, reference=reference) for s in sessions
    ]
    heap: list[tuple[float, int, int]] = [
        (s.times[0], i, 0) for i, s in enumerate(sessions) if s.times
    ]
    heapq.heapify(heap)
    while heap:
        t, i, j = heapq.heappop(heap)
        clock.at(t)
        try:
            oracles[i].query(sessions[i].batches[j])
        except Refused:
            continue  # the client gives up
        if j + 1 < sessions[i].n_requests:
            heapq.heappush(heap, (sessions[i].times[j + 1], i, j + 1))
    return oracles


def client_hash(secret: str, api_key: str) -> str:
    """The guard's client id for an API key (guard/identity.py ``hash("key", ...)``)."""
    mac = hmac.new(secret.encode(), b"key:" + api_key.encode(), hashlib.sha256)
    return mac.hexdigest()[:32]


@dataclass
class Outcome:
    """What the guard did to one client (or one attacker's keys)."""

    #: rows sent until the first enforcing request (None: never enforced)
    first_enforced: int | None = None
    #: rows sent until the first request with any audit line (None: none)
    first_audit: int | None = None
    #: rows sent until the first quarantine (None: never)
    quarantine: int | None = None
    #: per detector, rows sent until it first fired
    by_detector: dict[str, int] = field(default_factory=dict)
    #: detectors that fired on the first enforcing request
    enforcing: tuple[str, ...] = ()
    #: the decisions enforced on the client, and how many requests each
    enforced_as: dict[str, int] = field(default_factory=dict)
    #: audit lines for the client
    lines: int = 0
    #: keys (of the client's) with an enforcing decision
    keys_enforced: int = 0
    #: keys quarantined
    keys_quarantined: int = 0
    #: keys in all
    keys: int = 1
    #: reasons given by detectors that fired, first enforcing request (for the report)
    reasons: tuple[str, ...] = ()

    @property
    def enforced(self) -> bool:
        return self.first_enforced is not None

    @property
    def audited(self) -> bool:
        return self.lines > 0 or self.enforced


def _min(a: int | None, b: int) -> int:
    return b if a is None else min(a, b)


def outcome(
    logs: Iterable[Sent], lines: Sequence[dict[str, Any]], hashes: dict[str, str]
) -> Outcome:
    """One client's outcome from its request log(s) and the audit lines.

    ``hashes`` maps each of the client's API keys to its client hash. Row counts
    come from the request that the audit line's ``request_id`` names.
    """
    log = list(logs)
    rows_at = {s.request_id: s.cum_rows for s in log if s.request_id}
    mine = set(hashes.values())
    out = Outcome(keys=len(hashes))
    enforced_keys: set[str] = set()
    quarantined: set[str] = set()
    by_hash = {h: k for k, h in hashes.items()}
    for line in lines:
        client = line.get("client")
        if client not in mine:
            continue
        rows = rows_at.get(line.get("request_id", ""))
        if rows is None:
            continue
        out.lines += 1
        out.first_audit = _min(out.first_audit, rows)
        fired = [str(n) for n in line.get("fired", [])]
        for name in fired:
            out.by_detector[name] = _min(out.by_detector.get(name), rows)
        action = str(line.get("enforced", ""))
        if action in ENFORCING or line.get("quarantined"):
            name = "block" if line.get("quarantined") and action not in ENFORCING else action
            out.enforced_as[name] = out.enforced_as.get(name, 0) + 1
            enforced_keys.add(by_hash[client])
            if out.first_enforced is None or rows < out.first_enforced:
                out.first_enforced = rows
                out.enforcing = tuple(fired) or ("quarantine",)
                out.reasons = tuple(
                    f"{d.get('name')}: {d.get('reason')}"
                    for d in line.get("detectors", [])
                    if d.get("anomalous") and d.get("reason")
                )
        if line.get("quarantined"):
            out.quarantine = _min(out.quarantine, rows)
            quarantined.add(by_hash[client])
    for s in log:
        if s.status in REFUSING:
            enforced_keys.add(s.key)
            out.enforced_as[str(s.status)] = out.enforced_as.get(str(s.status), 0) + 1
            if out.first_enforced is None or s.cum_rows < out.first_enforced:
                out.first_enforced = s.cum_rows
                out.enforcing = out.enforcing or (f"status {s.status}",)
    out.keys_enforced = len(enforced_keys)
    out.keys_quarantined = len(quarantined)
    return out
