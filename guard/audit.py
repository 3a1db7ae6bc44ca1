"""The audit log: one JSON line per non-allow decision.

Each line holds the timestamp, request id, hashed client id, policy, decision,
every detector result and the MITRE ATLAS technique ids of the detectors that
fired. Never the raw API key, never the payload.

Lines are handed to a background thread through a bounded queue, so a slow disk
never blocks the event loop; if the writer falls that far behind, lines are
dropped and counted (``guard_audit_dropped_total``) rather than growing memory
without bound.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import queue
import sys
import threading
import time
from collections.abc import Callable, Mapping
from typing import IO, Any

from guard.config import AuditConfig
from guard.decisions import Decision
from guard.errors import ConfigurationError

__all__ = ["AuditLog"]

_STOP = object()

log = logging.getLogger("guard.audit")


def _num(x: float) -> float | str | None:
    if math.isnan(x):
        return None
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return round(x, 6)


class AuditLog:
    """Writes audit lines to a file (appending) or stderr, off the event loop."""

    def __init__(
        self,
        config: AuditConfig,
        *,
        clock: Callable[[], float] = time.time,
        on_drop: Callable[[], None] | None = None,
        maxsize: int = 10_000,
    ) -> None:
        self.enabled = config.enabled
        self.path = config.path
        self._clock = clock
        self._on_drop = on_drop
        self._queue: queue.Queue[object] = queue.Queue(maxsize=maxsize)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._out: IO[str] | None = None
        self._failed_open = False
        if self.enabled and self.path != "-":
            # try it now: a bad audit path is a start-up error, not lines silently lost later
            try:
                open(self.path, "a", encoding="utf-8").close()
            except OSError as exc:
                raise ConfigurationError("audit.path", f"cannot open for appending: {exc}") from exc

    def record(
        self,
        decision: Decision,
        *,
        request_id: str,
        client: str,
        client_source: str,
        techniques: Mapping[str, str],
        n_rows: int,
        reason: str | None = None,
    ) -> None:
        """Queue one audit line; never blocks, never raises."""
        if not self.enabled:
            return
        line: dict[str, Any] = {
            "ts": round(self._clock(), 6),
            "request_id": request_id,
            "client": client,
            "client_source": client_source,
            "policy": decision.policy,
            "decision": str(decision.intended),
            "enforced": str(decision.action),
            "shadow": decision.shadow,
            "quarantined": decision.quarantined,
            "rows": n_rows,
            "detectors": [
                {
                    "name": r.detector,
                    "score": _num(r.score),
                    "threshold": _num(r.threshold),
                    "anomalous": r.anomalous,
                    "reason": r.reason,
                    "rows_flagged": r.rows_flagged,
                }
                for r in decision.results
            ],
            "fired": [name for name, _ in decision.fired],
            "techniques": sorted({techniques[n] for n, _ in decision.fired if n in techniques}),
        }
        if reason is not None:
            line["reason"] = reason
        self._put(line)

    def record_invalid(
        self,
        *,
        policy: str,
        request_id: str,
        client: str,
        client_source: str,
        status: int,
        reason: str,
    ) -> None:
        """Queue an audit line for a request refused as malformed."""
        if not self.enabled:
            return
        self._put(
            {
                "ts": round(self._clock(), 6),
                "request_id": request_id,
                "client": client,
                "client_source": client_source,
                "policy": policy,
                "decision": "invalid",
                "enforced": "invalid",
                "status": status,
                "reason": reason,
            }
        )

    def _put(self, line: dict[str, Any]) -> None:
        self._ensure_thread()
        try:
            self._queue.put_nowait(line)
        except queue.Full:
            if self._on_drop is not None:
                self._on_drop()

    def _ensure_thread(self) -> None:
        if self._thread is not None:
            return
        with self._lock:
            if self._thread is None:
                t = threading.Thread(target=self._run, name="guard-audit", daemon=True)
                t.start()
                self._thread = t

    def _run(self) -> None:
        out: IO[str] = sys.stderr
        if self.path != "-":
            try:
                out = self._out = open(self.path, "a", encoding="utf-8")  # noqa: SIM115
            except OSError:
                log.exception("cannot open the audit log; dropping lines")
                out = self._out = open(os.devnull, "w", encoding="utf-8")  # noqa: SIM115
                self._failed_open = True
        failing = False
        while True:
            item = self._queue.get()
            if item is _STOP:
                break
            try:
                if self._failed_open:
                    raise OSError("audit log is not open")
                out.write(json.dumps(item, separators=(",", ":"), allow_nan=False) + "\n")
                if self._queue.empty():
                    out.flush()
                failing = False
            except (OSError, ValueError):
                # disk full, file gone: count the line as dropped and keep draining
                if not failing:
                    log.exception("audit log write failed; dropping lines until it recovers")
                failing = True
                if self._on_drop is not None:
                    self._on_drop()
        with contextlib.suppress(OSError, ValueError):
            out.flush()

    def close(self, timeout: float = 5.0) -> None:
        """Flush queued lines and stop the writer thread (waits at most ``timeout``)."""
        thread = self._thread
        if thread is not None:
            with contextlib.suppress(queue.Full):  # a stuck writer must not hang shutdown
                self._queue.put(_STOP, timeout=timeout)
            thread.join(timeout)
            self._thread = None
        if self._out is not None and (thread is None or not thread.is_alive()):
            self._out.close()
            self._out = None
