"""``guard replay``: recorded or generated traffic through the guard's engine, offline.

Each JSON line (what ``capture:`` writes, or what a script generates; the
format is in README.md, "Replaying traffic") becomes the :class:`Query` the
middleware would have built, and goes through the same engine calls: the
quarantine check, :meth:`Guard.decide`, and, when the request got through and
the line holds the model's answer, :meth:`Guard.observe`. No HTTP, no model:
as fast as the detectors run. Time is the lines' ``ts``, in order, for both the
monotonic and the wall clock, so rate limits and windows follow recorded time.
State lives in a fresh memory store and metrics in a fresh registry whatever the
config says; the audit log is off unless asked for.

Policies are replayed as enforcing, ``shadow: true`` or not (the point is to see
what a config would enforce before it does); ``keep_shadow`` honours it.

Exemption comes from the lines' ``exempt`` field, as the live guard decided it:
a capture holds keyed client hashes, never the keys or addresses that
``exempt:`` lists. ``ignore_exempt`` replays everyone as not exempt.

From Python (the attack benchmark does)::

    from inference_guard.guard.replay import compare, replay
    a = replay("capture.jsonl", "guard.yaml")
    b = replay(lines, candidate_config_dict)
    diff = compare(a, b)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry

from inference_guard.detectors.base import Answer, Query
from inference_guard.guard.config import AuditConfig, CaptureConfig, GuardConfig, StateConfig
from inference_guard.guard.decisions import Action, Decision
from inference_guard.guard.errors import ConfigurationError, GuardError
from inference_guard.guard.pipeline import Guard
from inference_guard.guard.policy import CompiledPolicy

__all__ = [
    "ENFORCING",
    "ClientReport",
    "ReplayComparison",
    "ReplayError",
    "ReplayLine",
    "ReplayReport",
    "add_arguments",
    "areplay",
    "compare",
    "read_lines",
    "replay",
    "run",
]

#: the enforced actions that count as enforcing against a client
ENFORCING = frozenset({Action.DEGRADE, Action.THROTTLE, Action.BLOCK})

ConfigSource = str | os.PathLike[str] | Mapping[str, Any] | GuardConfig
LineSource = str | os.PathLike[str] | Iterable[str | bytes | Mapping[str, Any]]


class ReplayError(GuardError, ValueError):
    """A line of the traffic file cannot be replayed; names the line (1-based)."""

    def __init__(self, line: int, problem: str):
        self.line = line
        self.problem = problem
        super().__init__(f"line {line}: {problem}")


@dataclass(frozen=True, slots=True)
class ReplayLine:
    """One request to replay, validated."""

    #: 1-based line number in the source
    line: int
    #: seconds (wall clock when captured); drives every clock of the replay
    ts: float
    #: the client's keyed hash (or any name, for generated traffic)
    client: str
    #: the request path the policies are matched on; ``None``: use ``policy``
    route: str | None
    #: the policy name, used when there is no route
    policy: str | None
    method: str
    fmt: str
    #: ``(n, d)`` float64 rows, or ``None``
    rows: np.ndarray[Any, np.dtype[np.float64]] | None
    texts: tuple[str, ...]
    n_rows: int
    exempt: bool
    request_id: str
    #: the model's answer, when the line holds one (``labels`` or ``probabilities``)
    answer: Answer | None


@dataclass(frozen=True, slots=True)
class ClientReport:
    """What the replayed config did to one client."""

    #: the client's keyed hash
    client: str
    #: the client's lines were marked exempt
    exempt: bool
    #: requests replayed (matched by a policy)
    requests: int
    #: rows (or prompts) in those requests
    rows: int
    #: requests by enforced action (``allow flag degrade throttle block``)
    decisions: Mapping[str, int]
    #: requests by intended action (differs for exempt clients and shadow policies)
    intended: Mapping[str, int]
    #: rows sent up to and including the first request enforced against
    #: (degrade, throttle or block); ``None``: never enforced against
    first_enforcing_row: int | None
    #: the enforced action of that request
    first_enforcing_action: str | None
    #: the client was put in quarantine at some point
    quarantined: bool
    #: decisions that would have written an audit line (after-answer ones included)
    audit_lines: int
    #: detector name -> times it fired (before and after the answer)
    fired: Mapping[str, int]

    @property
    def enforced(self) -> bool:
        """Whether any request of the client was degraded, throttled or blocked."""
        return self.first_enforcing_row is not None

    @property
    def audited(self) -> bool:
        """Whether the client got any audit line."""
        return self.audit_lines > 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "client": self.client,
            "exempt": self.exempt,
            "requests": self.requests,
            "rows": self.rows,
            "decisions": dict(self.decisions),
            "intended": dict(self.intended),
            "first_enforcing_row": self.first_enforcing_row,
            "first_enforcing_action": self.first_enforcing_action,
            "quarantined": self.quarantined,
            "audit_lines": self.audit_lines,
            "fired": dict(self.fired),
        }


@dataclass(frozen=True, slots=True)
class ReplayReport:
    """The outcome of replaying one traffic file through one config."""

    #: per client, in order of first appearance
    clients: Mapping[str, ClientReport]
    #: requests replayed through a policy
    requests: int
    #: rows in those requests
    rows: int
    #: lines no policy of the config matches (passed through, as live)
    unmatched: int = 0

    @property
    def enforced_clients(self) -> tuple[str, ...]:
        """Clients degraded, throttled or blocked at least once."""
        return tuple(c for c, r in self.clients.items() if r.enforced)

    @property
    def audited_clients(self) -> tuple[str, ...]:
        """Clients with at least one audit-worthy decision."""
        return tuple(c for c, r in self.clients.items() if r.audited)

    def to_dict(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "rows": self.rows,
            "unmatched": self.unmatched,
            "clients": [r.to_dict() for r in self.clients.values()],
            "enforced_clients": len(self.enforced_clients),
            "audited_clients": len(self.audited_clients),
        }


@dataclass(frozen=True, slots=True)
class ReplayComparison:
    """Two configs on the same traffic: what changes per client."""

    a: ReplayReport
    b: ReplayReport
    #: clients enforced against under A and not under B
    enforced_only_a: tuple[str, ...]
    #: clients enforced against under B and not under A
    enforced_only_b: tuple[str, ...]
    #: ``(client, first_enforcing_row under A, under B)`` where they differ
    first_row_changed: tuple[tuple[str, int | None, int | None], ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "a": self.a.to_dict(),
            "b": self.b.to_dict(),
            "enforced_only_a": list(self.enforced_only_a),
            "enforced_only_b": list(self.enforced_only_b),
            "first_row_changed": [
                {"client": c, "a": ra, "b": rb} for c, ra, rb in self.first_row_changed
            ],
        }


# --------------------------------------------------------------------------- reading lines


def read_lines(source: LineSource) -> list[ReplayLine]:
    """Parse and validate every line; raise :class:`ReplayError` naming the first bad one.

    ``source`` is a path to a JSON-lines file, or an iterable of lines (JSON
    strings or bytes, or already-decoded mappings). Blank lines are skipped.
    """
    if isinstance(source, str | os.PathLike):
        path = Path(source)
        try:
            with path.open(encoding="utf-8") as fh:
                return [r for n, raw in enumerate(fh, 1) if (r := _parse_line(n, raw)) is not None]
        except OSError as exc:
            raise ReplayError(0, f"cannot read {str(path)!r}: {exc}") from exc
        except UnicodeDecodeError as exc:
            raise ReplayError(0, f"{str(path)!r} is not UTF-8: {exc}") from exc
    out: list[ReplayLine] = []
    for n, raw in enumerate(source, 1):
        parsed = _parse_line(n, raw)
        if parsed is not None:
            out.append(parsed)
    return out


def _parse_line(n: int, raw: str | bytes | Mapping[str, Any]) -> ReplayLine | None:
    if isinstance(raw, Mapping):
        doc: Any = raw
    else:
        text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
        if not text.strip():
            return None
        try:
            doc = json.loads(text)
        except ValueError as exc:
            raise ReplayError(n, f"not valid JSON: {exc}") from None
    if not isinstance(doc, Mapping):
        raise ReplayError(n, "must be a JSON object")
    ts = doc.get("ts")
    if isinstance(ts, bool) or not isinstance(ts, int | float) or not math.isfinite(ts):
        raise ReplayError(n, "ts: must be a finite number (seconds)")
    client = doc.get("client")
    if not isinstance(client, str) or not client:
        raise ReplayError(n, "client: must be a non-empty string")
    route, policy = doc.get("route"), doc.get("policy")
    if route is not None and (not isinstance(route, str) or not route.startswith("/")):
        raise ReplayError(n, "route: must be a path starting with '/'")
    if policy is not None and not isinstance(policy, str):
        raise ReplayError(n, "policy: must be a string")
    if route is None and policy is None:
        raise ReplayError(n, "needs a route (or a policy name)")
    rows = _rows(n, doc.get("rows"))
    texts_raw = doc.get("texts", [])
    if not isinstance(texts_raw, list) or not all(isinstance(t, str) for t in texts_raw):
        raise ReplayError(n, "texts: must be a list of strings")
    texts = tuple(texts_raw)
    default_rows = rows.shape[0] if rows is not None else (len(texts) or 1)
    n_rows = doc.get("n_rows", default_rows)
    if isinstance(n_rows, bool) or not isinstance(n_rows, int) or n_rows < 1:
        raise ReplayError(n, "n_rows: must be a positive integer")
    exempt = doc.get("exempt", False)
    if not isinstance(exempt, bool):
        raise ReplayError(n, "exempt: must be true or false")
    method = doc.get("method", "POST")
    fmt = doc.get("fmt", "unknown")
    request_id = doc.get("request_id", f"replay-{n}")
    if not (isinstance(method, str) and isinstance(fmt, str) and isinstance(request_id, str)):
        raise ReplayError(n, "method, fmt and request_id must be strings")
    return ReplayLine(
        line=n,
        ts=float(ts),
        client=client,
        route=route,
        policy=policy,
        method=method.upper(),
        fmt=fmt,
        rows=rows,
        texts=texts,
        n_rows=n_rows,
        exempt=exempt,
        request_id=request_id,
        answer=_answer(n, doc),
    )


def _rows(n: int, raw: object) -> np.ndarray[Any, np.dtype[np.float64]] | None:
    if raw is None:
        return None
    try:
        rows = np.asarray(raw, dtype=np.float64)
    except (ValueError, TypeError):
        raise ReplayError(n, "rows: must be a list of equal-length lists of numbers") from None
    if rows.ndim != 2 or rows.shape[0] == 0:
        raise ReplayError(n, "rows: must be a non-empty list of equal-length lists of numbers")
    if not np.isfinite(rows).all():
        raise ReplayError(n, "rows: must hold finite numbers only")
    return rows


def _answer(n: int, doc: Mapping[str, Any]) -> Answer | None:
    status = doc.get("status", 200)
    if isinstance(status, bool) or not isinstance(status, int):
        raise ReplayError(n, "status: must be an integer")
    labels_raw, probs_raw = doc.get("labels"), doc.get("probabilities")
    if labels_raw is None and probs_raw is None:
        return None
    labels = probs = None
    try:
        if labels_raw is not None:
            labels = np.asarray(labels_raw, dtype=np.int64).ravel()
        if probs_raw is not None:
            probs = np.asarray(probs_raw, dtype=np.float64)
    except (ValueError, TypeError, OverflowError):
        raise ReplayError(n, "labels / probabilities: must be numbers") from None
    if probs is not None and (probs.ndim != 2 or not np.isfinite(probs).all()):
        raise ReplayError(n, "probabilities: must be a list of equal-length lists of numbers")
    return Answer(status=status, labels=labels, probabilities=probs)


# --------------------------------------------------------------------------- replaying


class _Clock:
    """The replay's time: set to each line's ``ts`` before it is replayed."""

    __slots__ = ("now",)

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@dataclass
class _Tally:
    exempt: bool = False
    requests: int = 0
    rows: int = 0
    decisions: Counter[str] = field(default_factory=Counter)
    intended: Counter[str] = field(default_factory=Counter)
    first_row: int | None = None
    first_action: str | None = None
    quarantined: bool = False
    audit_lines: int = 0
    fired: Counter[str] = field(default_factory=Counter)

    def add(self, decision: Decision, n_rows: int) -> None:
        self.requests += 1
        self.rows += n_rows
        self.decisions[str(decision.action)] += 1
        self.intended[str(decision.intended)] += 1
        if self.first_row is None and decision.action in ENFORCING:
            self.first_row = self.rows
            self.first_action = str(decision.action)
        self.after(decision)

    def after(self, decision: Decision) -> None:
        """What any decision adds: quarantine, audit line, fired detectors."""
        self.quarantined = self.quarantined or decision.quarantined
        self.audit_lines += int(decision.recorded)
        self.fired.update(name for name, _ in decision.fired)

    def report(self, client: str) -> ClientReport:
        return ClientReport(
            client=client,
            exempt=self.exempt,
            requests=self.requests,
            rows=self.rows,
            decisions=dict(self.decisions),
            intended=dict(self.intended),
            first_enforcing_row=self.first_row,
            first_enforcing_action=self.first_action,
            quarantined=self.quarantined,
            audit_lines=self.audit_lines,
            fired=dict(self.fired),
        )


def _offline(config: GuardConfig, audit_path: str | None, keep_shadow: bool) -> GuardConfig:
    """The config with its state in memory, no capture, the audit log off (or to a file),
    and its policies enforcing unless ``keep_shadow``."""
    policies = (
        config.policies if keep_shadow else tuple(replace(p, shadow=False) for p in config.policies)
    )
    return replace(
        config,
        policies=policies,
        state=replace(config.state, store=StateConfig().store),
        audit=AuditConfig(enabled=audit_path is not None, path=audit_path or "-"),
        capture=CaptureConfig(),
    )


async def areplay(
    source: LineSource | Iterable[ReplayLine],
    config: ConfigSource,
    *,
    ignore_exempt: bool = False,
    keep_shadow: bool = False,
    audit_path: str | None = None,
    registry: CollectorRegistry | None = None,
) -> ReplayReport:
    """:func:`replay`, as a coroutine (for callers already in an event loop)."""
    lines = _lines(source)
    cfg = _offline(GuardConfig.load(config), audit_path, keep_shadow)
    clock = _Clock()
    guard = Guard(
        cfg,
        registry=registry if registry is not None else CollectorRegistry(),
        clock=clock,
        wall_clock=clock,
        identity_secret=b"replay: clients are hashed already",
    )
    tallies: dict[str, _Tally] = {}
    requests = rows = unmatched = 0
    try:
        for line in sorted(lines, key=lambda x: x.ts):  # stable: equal ts keep file order
            policy = _policy(guard, line)
            if policy is None:
                unmatched += 1
                continue
            clock.now = line.ts
            exempt = line.exempt and not ignore_exempt
            tally = tallies.get(line.client)
            if tally is None:
                tally = tallies[line.client] = _Tally()
            tally.exempt = tally.exempt or exempt
            decision, query = await _decide(guard, policy, line, exempt)
            tally.add(decision, line.n_rows)
            requests += 1
            rows += line.n_rows
            if decision.recorded and decision is not policy.allow:
                guard.audit.record(
                    decision,
                    request_id=line.request_id,
                    client=line.client,
                    client_source="replay",
                    techniques=guard.techniques,
                    n_rows=line.n_rows,
                )
            answer = line.answer
            if (
                query is not None
                and answer is not None
                and policy.observes
                and decision.action not in (Action.THROTTLE, Action.BLOCK)
                and 200 <= answer.status < 300
            ):
                observed = await guard.observe(
                    policy, query, answer, client_source="replay", exempt=exempt
                )
                if observed is not None:
                    tally.after(observed)
    finally:
        await guard.aclose()
    return ReplayReport(
        clients={c: t.report(c) for c, t in tallies.items()},
        requests=requests,
        rows=rows,
        unmatched=unmatched,
    )


def replay(
    source: LineSource | Iterable[ReplayLine],
    config: ConfigSource,
    *,
    ignore_exempt: bool = False,
    keep_shadow: bool = False,
    audit_path: str | None = None,
    registry: CollectorRegistry | None = None,
) -> ReplayReport:
    """Replay traffic through ``config``'s engine, offline; return per-client outcomes.

    Parameters
    ----------
    source
        A JSON-lines file (path), an iterable of JSON lines or mappings, or
        :class:`ReplayLine` values from :func:`read_lines`.
    config
        A YAML path, a mapping or a :class:`~guard.config.GuardConfig`. Its
        state store is replaced by a fresh ``memory://`` one, its capture is
        off, and so is its audit log unless ``audit_path`` names a file.
    ignore_exempt
        Replay every line as not exempt.
    keep_shadow
        Honour ``shadow: true`` (by default every policy is replayed as enforcing).
    registry
        Where the replay's metrics go (a fresh registry by default).

    Raises
    ------
    ReplayError
        A line is not valid (its number is in the message).
    ConfigurationError
        The config is not valid.
    """
    return asyncio.run(
        areplay(
            source,
            config,
            ignore_exempt=ignore_exempt,
            keep_shadow=keep_shadow,
            audit_path=audit_path,
            registry=registry,
        )
    )


def compare(a: ReplayReport, b: ReplayReport) -> ReplayComparison:
    """What changes per client between two replays of the same traffic."""
    only_a = tuple(c for c in a.enforced_clients if not _enforced(b, c))
    only_b = tuple(c for c in b.enforced_clients if not _enforced(a, c))
    changed: list[tuple[str, int | None, int | None]] = []
    for client in dict.fromkeys([*a.clients, *b.clients]):
        ra = a.clients[client].first_enforcing_row if client in a.clients else None
        rb = b.clients[client].first_enforcing_row if client in b.clients else None
        if ra != rb:
            changed.append((client, ra, rb))
    return ReplayComparison(a, b, only_a, only_b, tuple(changed))


def _enforced(report: ReplayReport, client: str) -> bool:
    r = report.clients.get(client)
    return r is not None and r.enforced


def _lines(source: LineSource | Iterable[ReplayLine]) -> list[ReplayLine]:
    if isinstance(source, str | os.PathLike):
        return read_lines(source)
    items = list(source)
    if all(isinstance(x, ReplayLine) for x in items):
        return [x for x in items if isinstance(x, ReplayLine)]
    return read_lines([x for x in items if not isinstance(x, ReplayLine)])


def _policy(guard: Guard, line: ReplayLine) -> CompiledPolicy | None:
    if line.route is not None:
        return guard.match(line.method, line.route)
    for policy in guard.policies:
        if policy.name == line.policy:
            return policy
    return None


async def _decide(
    guard: Guard, policy: CompiledPolicy, line: ReplayLine, exempt: bool
) -> tuple[Decision, Query | None]:
    """What the middleware asks of the engine for one request, in its order."""
    quarantined = (
        await guard.check_quarantine(policy, line.client, exempt=exempt)
        if guard.quarantine_enabled
        else None
    )
    if quarantined is not None:
        return quarantined, None
    if policy.allow is not None:
        return guard.allow(policy, line.n_rows, line.fmt), None
    query = Query(
        client=line.client,
        policy=policy.name,
        rows=line.rows,
        texts=line.texts,
        n_rows=line.n_rows,
        fmt=line.fmt,
        now=line.ts,
        request_id=line.request_id,
    )
    return await guard.decide(policy, query, exempt=exempt), query


# --------------------------------------------------------------------------- the command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("capture", help="JSON-lines traffic: a capture: file, or generated")
    parser.add_argument("--config", required=True, help="the guard config to replay through")
    parser.add_argument("--compare", default=None, help="a second config to diff against")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument(
        "--ignore-exempt", action="store_true", help="replay every client as not exempt"
    )
    parser.add_argument(
        "--keep-shadow",
        action="store_true",
        help="honour shadow: true (by default policies are replayed as enforcing)",
    )


def run(args: argparse.Namespace) -> int:
    """``guard replay``: exit 0 with the report, 1 on bad input or a bad config."""
    try:
        lines = read_lines(args.capture)
        a = replay(
            lines, args.config, ignore_exempt=args.ignore_exempt, keep_shadow=args.keep_shadow
        )
        b = (
            replay(
                lines, args.compare, ignore_exempt=args.ignore_exempt, keep_shadow=args.keep_shadow
            )
            if args.compare
            else None
        )
    except ReplayError as exc:
        print(f"{args.capture}: {exc}", file=sys.stderr)
        return 1
    except ConfigurationError as exc:
        for key, problem in exc.problems:
            print(f"config: {key or '<file>'}: {problem}", file=sys.stderr)
        return 1
    except GuardError as exc:
        print(f"replay failed: {exc}", file=sys.stderr)
        return 1
    if args.json:
        doc = a.to_dict() if b is None else compare(a, b).to_dict()
        print(json.dumps(doc, indent=2))
        return 0
    print(f"== {args.config}")
    _print_report(a)
    if b is not None:
        print(f"\n== {args.compare}")
        _print_report(b)
        _print_comparison(compare(a, b), args.config, args.compare)
    return 0


def _print_report(report: ReplayReport) -> None:
    header = (
        f"{'client':<34} {'exempt':<6} {'requests':>8} {'rows':>7} {'first_enf':>9} "
        f"{'quar':<4} {'audit':>5}  decisions / fired"
    )
    print(header)
    for r in report.clients.values():
        decisions = " ".join(f"{k}={v}" for k, v in sorted(r.decisions.items()))
        fired = " ".join(f"{k}={v}" for k, v in sorted(r.fired.items()))
        first = "-" if r.first_enforcing_row is None else f"{r.first_enforcing_row}"
        if r.first_enforcing_action is not None:
            first += f" {r.first_enforcing_action}"
        print(
            f"{r.client:<34} {'yes' if r.exempt else 'no':<6} {r.requests:>8} {r.rows:>7} "
            f"{first:>9} {'yes' if r.quarantined else 'no':<4} {r.audit_lines:>5}  "
            f"{decisions}" + (f" | fired: {fired}" if fired else "")
        )
    print(
        f"summary: {len(report.clients)} clients, {report.requests} requests, {report.rows} rows; "
        f"clients enforced against: {len(report.enforced_clients)}; "
        f"clients with audit lines: {len(report.audited_clients)}"
        + (f"; lines no policy matched: {report.unmatched}" if report.unmatched else "")
    )


def _print_comparison(diff: ReplayComparison, name_a: str, name_b: str) -> None:
    print(f"\n== differences ({name_a} -> {name_b})")
    for client in diff.enforced_only_a:
        print(f"{client}: enforced by {name_a} only")
    for client in diff.enforced_only_b:
        print(f"{client}: enforced by {name_b} only")
    for client, ra, rb in diff.first_row_changed:
        print(f"{client}: first enforcing row {_row(ra)} -> {_row(rb)}")
    if not (diff.enforced_only_a or diff.enforced_only_b or diff.first_row_changed):
        print("none")
    print(
        f"totals: enforced {len(diff.a.enforced_clients)} -> {len(diff.b.enforced_clients)}, "
        f"audited {len(diff.a.audited_clients)} -> {len(diff.b.audited_clients)}"
    )


def _row(value: int | None) -> str:
    return "never" if value is None else str(value)
