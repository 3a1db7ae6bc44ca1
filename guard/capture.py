"""Traffic capture for ``guard replay``: one JSON line per sampled request.

With ``capture: {path: FILE}`` in the config, every sampled request on a
policy route that was parsed into rows or texts is written, once its answer is
known (or its refusal: a throttle, a block), as one line::

    {"ts": 1764750000.123456, "request_id": "...", "client": "<keyed hash>",
     "exempt": false, "policy": "inference", "route": "/v2/models/m/infer",
     "method": "POST", "fmt": "oip_v2", "n_rows": 1, "rows": [[0.0, 5.0, ...]],
     "decision": "allow", "status": 200, "labels": [3], "probabilities": [[...]]}

``texts`` replaces ``rows`` for chat and completion payloads; ``labels`` and
``probabilities`` are what :func:`guard.payload.adapters.parse_response` read from
the model's answer (before any rounding or noise), when it held them. The
client is the keyed hash the guard knows it by, never a raw key or address, and
no header is kept. Still, the file holds the clients' inputs and the model's
exact outputs: it is created with permissions 0600 and is sensitive data.

Sampling is by client (a share ``sample`` of the keyed client hashes), so a
sampled client's session is recorded whole, as replaying rate limits and
per-client detectors needs. Requests refused before their body is read
(quarantine, malformed input) are not recorded. Lines go to a background
thread through a bounded queue (:class:`guard.audit.LineWriter`); a line that
does not fit is dropped and counted (``guard_capture_dropped_total``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from inference_guard.detectors.base import Answer
from inference_guard.guard.audit import LineWriter
from inference_guard.guard.config import CaptureConfig

__all__ = ["CaptureLog", "CapturedRequest"]

#: file permissions of a new capture file: it holds inputs and answers
CAPTURE_MODE = 0o600


@dataclass(frozen=True, slots=True)
class CapturedRequest:
    """The request half of a capture line, taken when the request was decided."""

    #: wall-clock seconds when the request was decided
    ts: float
    #: the guard's request id
    request_id: str
    #: keyed hash of the client
    client: str
    #: whether the client was exempt
    exempt: bool
    #: the policy that decided
    policy: str
    #: the request path
    route: str
    #: the HTTP method
    method: str
    #: the payload format
    fmt: str
    #: rows (or prompts) in the request
    n_rows: int
    #: the parsed feature matrix, if any
    rows: NDArray[np.float64] | None
    #: the parsed prompts, if any
    texts: tuple[str, ...]


class CaptureLog:
    """Appends capture lines to ``config.path`` from a background thread."""

    def __init__(self, config: CaptureConfig, *, on_drop: Callable[[], None] | None = None) -> None:
        if config.path is None:
            raise ValueError("capture.path is not set")
        self.path = config.path
        self.sample = config.sample
        # a client is sampled when the top 32 bits of its (uniform) keyed hash fall below this
        self._cutoff = math.floor(config.sample * 2**32)
        self._writer = LineWriter(
            config.path,
            key="capture.path",
            name="guard-capture",
            on_drop=on_drop,
            maxsize=config.max_queue,
            mode=CAPTURE_MODE,
            encode=_encode,
        )

    def sampled(self, client: str) -> bool:
        """Whether ``client`` (a hex keyed hash) is recorded: the same answer all along."""
        if self._cutoff >= 2**32:
            return True
        try:
            return int(client[:8], 16) < self._cutoff
        except ValueError:
            return False

    def record(
        self, request: CapturedRequest, *, decision: str, status: int, answer: Answer | None
    ) -> None:
        """Queue the line of one request and its outcome; never blocks, never raises."""
        self._writer.put((request, decision, status, answer))

    def close(self, timeout: float = 5.0) -> None:
        """Flush queued lines and stop the writer thread."""
        self._writer.close(timeout)


def _encode(item: tuple[CapturedRequest, str, int, Answer | None]) -> str:
    """One capture line, built in the writer thread (lists and JSON off the event loop)."""
    req, decision, status, answer = item
    line: dict[str, Any] = {
        "ts": round(req.ts, 6),
        "request_id": req.request_id,
        "client": req.client,
        "exempt": req.exempt,
        "policy": req.policy,
        "route": req.route,
        "method": req.method,
        "fmt": req.fmt,
        "n_rows": req.n_rows,
    }
    if req.rows is not None:
        line["rows"] = np.asarray(req.rows, dtype=np.float64).tolist()
    if req.texts:
        line["texts"] = list(req.texts)
    line["decision"] = decision
    line["status"] = status
    if answer is not None:
        if answer.labels is not None:
            line["labels"] = np.asarray(answer.labels).ravel().tolist()
        if answer.probabilities is not None:
            line["probabilities"] = np.asarray(answer.probabilities, dtype=np.float64).tolist()
    return json.dumps(line, separators=(",", ":"), allow_nan=False)
