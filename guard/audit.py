"""The audit log: one JSON line per decision worth a look.

Each line holds the timestamp, request id, hashed client id, policy, decision,
every detector result and the MITRE ATLAS technique ids of the detectors that
fired. Never the raw API key, never the payload. Which decisions get a line is
:attr:`guard.decisions.Decision.recorded`: every one but ``allow``, except a
``flag`` that only per-row detectors asked for.

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

from inference_guard.guard.config import AuditConfig
from inference_guard.guard.decisions import Decision
from inference_guard.guard.errors import ConfigurationError

__all__ = ["AuditLog", "LineWriter"]

_STOP = object()

log = logging.getLogger("guard.audit")


def _num(x: float) -> float | str | None:
    if math.isnan(x):
        return None
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return round(x, 6)


class LineWriter:
    """JSON lines appended to a file (or stderr) by a background thread.

    :meth:`put` never blocks and never raises: past ``maxsize`` queued lines,
    or when a write fails, the line is dropped and ``on_drop`` called. Items
    are turned into JSON in the writer thread by ``encode`` (``json.dumps`` of
    a mapping by default), so the caller pays only for the queueing. With
    ``mode`` a file that does not exist yet is created with those permissions
    (0o600 for sensitive data).
    """

    def __init__(
        self,
        path: str,
        *,
        key: str,
        name: str,
        on_drop: Callable[[], None] | None = None,
        maxsize: int = 10_000,
        mode: int | None = None,
        encode: Callable[[Any], str] | None = None,
    ) -> None:
        self.path = path
        self._name = name
        self._on_drop = on_drop
        self._mode = mode
        self._encode = encode or _dumps
        self._queue: queue.Queue[object] = queue.Queue(maxsize=maxsize)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._out: IO[str] | None = None
        self._failed_open = False
        if self.path != "-":
            # try it now: a bad path is a start-up error, not lines silently lost later
            try:
                self._open().close()
            except OSError as exc:
                raise ConfigurationError(key, f"cannot open for appending: {exc}") from exc

    def _open(self) -> IO[str]:
        if self._mode is None:
            return open(self.path, "a", encoding="utf-8")
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, self._mode)
        return os.fdopen(fd, "a", encoding="utf-8")

    def put(self, item: object) -> None:
        """Queue one item for writing; never blocks, never raises."""
        self._ensure_thread()
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            if self._on_drop is not None:
                self._on_drop()

    def _ensure_thread(self) -> None:
        if self._thread is not None:
            return
        with self._lock:
            if self._thread is None:
                t = threading.Thread(target=self._run, name=self._name, daemon=True)
                t.start()
                self._thread = t

    def _run(self) -> None:
        out: IO[str] = sys.stderr
        if self.path != "-":
            try:
                out = self._out = self._open()
            except OSError:
                log.exception("cannot open %s; dropping lines", self.path)
                out = self._out = open(os.devnull, "w", encoding="utf-8")  # noqa: SIM115
                self._failed_open = True
        failing = False
        while True:
            item = self._queue.get()
            if item is _STOP:
                break
            try:
                if self._failed_open:
                    raise OSError(f"{self.path} is not open")
                out.write(self._encode(item) + "\n")
                if self._queue.empty():
                    out.flush()
                failing = False
            except (OSError, ValueError, TypeError):
                # disk full, file gone, a value JSON cannot hold: count the line as
                # dropped and keep draining
                if not failing:
                    log.exception("writing %s failed; dropping lines until it recovers", self.path)
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


def _dumps(item: Any) -> str:
    return json.dumps(item, separators=(",", ":"), allow_nan=False)


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
        self._writer = (
            LineWriter(
                config.path, key="audit.path", name="guard-audit", on_drop=on_drop, maxsize=maxsize
            )
            if self.enabled
            else None
        )

    @property
    def _out(self) -> IO[str] | None:
        """The writer's open file, if any (tests make it fail under the writer)."""
        return self._writer._out if self._writer is not None else None

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
        if self._writer is None:
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
            "exempt": decision.exempt,
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
        self._writer.put(line)

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
        if self._writer is None:
            return
        self._writer.put(
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

    def close(self, timeout: float = 5.0) -> None:
        """Flush queued lines and stop the writer thread (waits at most ``timeout``)."""
        if self._writer is not None:
            self._writer.close(timeout)
