"""Hostile traffic over real HTTP: what the project's own hostile corpus gets from the guard.

Run: ``python benchmarks/hostile.py [--requests N] [--concurrency C] [--seed S]``
(default 100 000 requests, 16 at a time).

Issue 13's bar: over at least 100 000 hostile requests the guard causes no 5xx and
drops no connection without an answer; in front of a fragile app, fewer than 1 % of
the requests that crash it bare still reach a 5xx or get no answer.

Three uvicorn servers on 127.0.0.1, one worker each, all up at once, run as
``guard demo`` runs (``--no-proxy-headers``; the audit log on stderr):

``guarded_demo``
    ``inference_guard.middleware.demo:build_demo_app``: the digits model behind the demo policy
    (``guard/demo.yaml``: validation, rate limits, anomaly and extraction detectors,
    rounded answers), calibrated as ``guard demo`` calibrates it (cached in
    ``~/.cache/inference-guard``);
``fragile``
    ``benchmarks.fragile_app:fragile``: a careless server for the same model that
    validates nothing (see ``benchmarks/fragile_app.py``), bare;
``fragile_guarded``
    the same careless server behind ``GuardMiddleware`` with no config
    (``GuardConfig.default()``: validation on every well-known inference route,
    answers rounded, no detectors), so what it stops is what validation stops.

The corpus is ``benchmarks/hostile_corpus.py`` (the fuzz test's generator plus the
kinds it lacks), seeded; each request goes to all three servers at once, the same
bytes on a fresh connection each (``benchmarks/_hostile_http.py``). Requests come
from 1024 loopback addresses (127.77.0.0 to 127.77.3.255) in turn, so that the
demo policy's per-client limits and quarantine meet many clients rather than
shutting out one and never parsing the rest; requests carrying an API key are one
client per key, whatever their address.

Counted per server: answers by status, and exchanges that ended without one
(connection closed or reset before a status line, or nothing in 30 s) or with a
truncated one. For the guarded servers also ``guard_invalid_requests_total``,
``guard_errors_total`` and ``guard_requests_total`` from ``/metrics`` before and
after, set against the refusals the client saw (answers marked ``cache-control:
no-store``, the guard's own), and the tracebacks in the server's log. A
*crasher* is a request the bare fragile server answers with a 5xx or not at all;
the residual is the crashers that still do so behind the guard, grouped by the
exception the fragile app names in its 500. Any 5xx or missing answer from
``guarded_demo``, and any from ``fragile_guarded`` on a request the bare app
survives, is the guard's: each is written, truncated, to the findings file.

The figures are counts; a busy machine makes the run slower, not different. Results
go to benchmarks/RESULTS.md (section ``hostile``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from prometheus_client.parser import text_string_to_metric_families

from benchmarks._harness import ROOT, free_port, machine, today, write_section
from benchmarks._hostile_http import Outcome, exchange
from benchmarks.hostile_corpus import KINDS, HostileRequest, build

#: name -> (uvicorn factory, whether the guard is in front)
SERVERS: dict[str, tuple[str, bool]] = {
    "guarded_demo": ("inference_guard.middleware.demo:build_demo_app", True),
    "fragile": ("benchmarks.fragile_app:fragile", False),
    "fragile_guarded": ("benchmarks.fragile_app:fragile_default", True),
    "fragile_signed": ("benchmarks.fragile_app:fragile_signed", True),
}
#: the app crashes behind this server are compared with the bare ``fragile`` one's
BARE, BEHIND, SIGNED = "fragile", "fragile_guarded", "fragile_signed"
#: the servers with the fragile app behind the guard
BEHIND_ALL = (BEHIND, SIGNED)
#: client source addresses: the corpus's clients
SOURCES = tuple(f"127.77.{i // 256}.{i % 256}" for i in range(1024))
#: crashes behind the guard that only the model's signature rules out, by the fragile app's
#: exception: each is a well-formed request for *some* model (OIP v2, KServe v1), which the
#: guard does not know is not this one (it does not know the model's signature yet)
SIGNATURE = {
    "width": (r"X has N features", "rows of a consistent width other than the model's 64"),
    "rank": (
        r"Found array with dim N|Expected ND array",
        "a tensor of a rank other than 2 (a vector, a 3-d batch)",
    ),
    "strings": (
        r"could not convert string to float",
        "strings where the model takes numbers (a BYTES tensor, text instances)",
    ),
    "objects": (
        r"float\(\) argument must be",
        "objects where the model takes numbers (named-feature instances, an object as an input)",
    ),
}
#: the counters read from /metrics before and after
COUNTERS = ("guard_invalid_requests", "guard_errors", "guard_requests")
FINDINGS = ROOT / "benchmarks" / "hostile_findings.jsonl"
#: the servers' ``XDG_CACHE_HOME``: the demo's calibration, the benchmark's own copy
_USER_CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
CACHE = _USER_CACHE / "inference-guard" / "bench-hostile"


@dataclass
class Served:
    """One server's answers to the corpus."""

    name: str
    guarded: bool
    #: final status per request; 0: no answer
    status: list[int] = field(default_factory=list)
    #: how each exchange ended (see ``Outcome.how``)
    how: Counter[str] = field(default_factory=Counter)
    #: requests whose answer the guard made itself (``cache-control: no-store``), by status
    guard_made: Counter[int] = field(default_factory=Counter)
    #: the indices of those requests
    refused_at: set[int] = field(default_factory=set)
    #: the fragile app's own account of each 5xx (``Type: message``), by request index
    crash: dict[int, str] = field(default_factory=dict)
    #: counter samples from /metrics, before and after the corpus
    before: dict[str, float] = field(default_factory=dict)
    after: dict[str, float] = field(default_factory=dict)
    #: tracebacks in the server's log, and the last line of the first few
    tracebacks: int = 0
    traceback_tails: list[str] = field(default_factory=list)

    def refusals(self) -> dict[int, int]:
        """The guard's own 4xx for invalid input, by status: not its 403 and 429 decisions."""
        made = sorted(self.guard_made.items())
        return {s: v for s, v in made if 400 <= s < 500 and s not in (403, 429)}

    def delta(self, prefix: str) -> dict[str, float]:
        keys = {k for k in (*self.before, *self.after) if k.startswith(prefix)}
        out = {k: self.after.get(k, 0.0) - self.before.get(k, 0.0) for k in keys}
        return {k: v for k, v in sorted(out.items()) if v}


@dataclass
class Run:
    """A whole run: the corpus, each server's answers, and how long it took."""

    n: int
    seed: int
    concurrency: int
    kinds: list[str]
    served: dict[str, Served]
    seconds: float

    def fivexx(self, name: str) -> list[int]:
        """Requests ``name`` answered with a 5xx or not at all."""
        return [i for i, s in enumerate(self.served[name].status) if s == 0 or s >= 500]

    def crashers(self) -> list[int]:
        return self.fivexx(BARE)

    def residual(self, behind: str = BEHIND) -> list[int]:
        """Crashers that still get a 5xx or no answer behind the guard (server ``behind``)."""
        status = self.served[behind].status
        return [i for i in self.crashers() if status[i] == 0 or status[i] >= 500]

    def unexplained(self, behind: str = BEHIND) -> list[int]:
        """The residual outside the :data:`SIGNATURE` categories: what validation let through."""
        crash = self.served[behind].crash
        return [i for i in self.residual(behind) if reading(crash.get(i, "")) == "other"]

    def refused_servable(self, behind: str = SIGNED) -> list[int]:
        """Requests the bare app answered 2xx that the guard (``behind``) refused itself."""
        bare, served = self.served[BARE].status, self.served[behind]
        return [
            i
            for i, s in enumerate(served.status)
            if 200 <= bare[i] < 300 and 400 <= s < 500 and i in served.refused_at
        ]

    def guard_faults(self) -> dict[str, list[int]]:
        """Per guarded server, the 5xx and missing answers that are the guard's doing."""
        crashers = set(self.crashers())
        out: dict[str, list[int]] = {}
        for name, served in self.served.items():
            if served.guarded:
                bad = self.fivexx(name)
                out[name] = [i for i in bad if name not in BEHIND_ALL or i not in crashers]
        return out


# --------------------------------------------------------------------------- servers


def _start(name: str, factory: str, log: Path) -> tuple[subprocess.Popen[bytes], int]:
    """``uvicorn --factory`` on 127.0.0.1, its output into ``log``; (process, port)."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "XDG_CACHE_HOME": str(CACHE)}
    if not env.get("PROMETHEUS_MULTIPROC_DIR"):
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    cmd = [
        sys.executable,
        "-m",
        "uvicorn",
        factory,
        "--factory",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--no-proxy-headers",
        "--no-access-log",
        # h11 whatever else is installed: the findings depend on the HTTP parser
        "--http",
        "h11",
        # the bare fragile app's crashes are re-raised for the server to log, a traceback each
        "--log-level",
        "warning" if SERVERS[name][1] else "critical",
    ]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    return proc, port


def _ready(name: str, proc: subprocess.Popen[bytes], port: int, log: Path, deadline: float) -> None:
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}: {log.read_text()}")
        with contextlib.suppress(OSError):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/healthz")
            status = conn.getresponse().status
            conn.close()
            if status == 200:
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{name} did not start")
        time.sleep(0.2)


@contextlib.contextmanager
def serve_all(logdir: Path) -> Iterator[dict[str, tuple[int, Path]]]:
    """Every server of :data:`SERVERS`, started together; name -> (port, log file)."""
    procs: dict[str, tuple[subprocess.Popen[bytes], int, Path]] = {}
    try:
        for name, (factory, _) in SERVERS.items():
            log = logdir / f"{name}.log"
            procs[name] = (*_start(name, factory, log), log)
        deadline = time.monotonic() + 120
        for name, (proc, port, log) in procs.items():
            _ready(name, proc, port, log, deadline)
        yield {name: (port, log) for name, (_, port, log) in procs.items()}
    finally:
        for proc, _, _ in procs.values():
            proc.terminate()
        for proc, _, _ in procs.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def calibrate_demo() -> None:
    """Calibrate the demo policy into the servers' cache now, if it is not already.

    ``build_demo_app`` calibrates at its first start for the code at hand (about
    30 s here), into ``$XDG_CACHE_HOME/inference-guard/demo-calibration``. Under
    ``uvicorn --factory`` that start runs inside uvicorn's event loop, where
    calibration's own ``asyncio.run`` fails, so it is done here first. The cache is
    the benchmark's own, so that a ``guard demo`` of other code does not recalibrate
    it under a starting server.
    """
    from inference_guard.middleware.demo import demo_config

    demo_config(CACHE / "inference-guard" / "demo-calibration")


def counters(port: int) -> dict[str, float]:
    """The guard's counters from its /metrics, by sample name and labels."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name not in COUNTERS:
            continue
        for s in family.samples:
            if s.name.endswith("_total"):
                labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
                out[f"{s.name}{{{labels}}}"] = s.value
    return out


def read_log(served: Served, log: Path) -> None:
    """Count the tracebacks in a guarded server's log; keep the last line of the first five.

    A chained exception's traceback (``During handling of the above exception`` ...)
    is part of the one before it.
    """
    lines = log.read_text(errors="replace").splitlines()
    for i, line in enumerate(lines):
        chained = any(
            x.startswith(("During handling", "The above exception"))
            for x in lines[max(0, i - 2) : i]
        )
        if line.startswith("Traceback") and not chained:
            served.tracebacks += 1
            if len(served.traceback_tails) < 5:
                tail = next(
                    (x for x in lines[i + 1 :] if x and not x.startswith((" ", "Traceback"))), ""
                )
                served.traceback_tails.append(tail[:200])


# --------------------------------------------------------------------------- the run


def _signature(body: bytes) -> str:
    """The fragile app's ``Type: message`` with numbers and quoted values folded."""
    text = body.decode("utf-8", "replace").split("\n")[0]
    text = re.sub(r"(?<![A-Za-z])'[^']*('|$)|\"[^\"]*(\"|$)", "'…'", text)
    return re.sub(r"0x[0-9a-fA-F]+|\d+(\.\d+)?", "N", text)[:90]


def _record(served: Served, i: int, outcome: Outcome) -> None:
    status = outcome.status or 0
    served.status[i] = status
    served.how[outcome.how] += 1
    if outcome.no_store:
        served.guard_made[status] += 1
        served.refused_at.add(i)
    if status >= 500 or status == 0:
        served.crash[i] = _signature(outcome.body) if status else outcome.how


async def _drive(
    n: int, seed: int, concurrency: int, ports: dict[str, int], served: dict[str, Served]
) -> list[str]:
    kinds = [""] * n
    for s in served.values():
        s.status = [0] * n
    todo = iter(range(n))
    names = list(ports)
    started = time.monotonic()

    async def worker() -> None:
        for i in todo:
            req = build(seed, i)
            kinds[i] = req.kind
            source = SOURCES[i % len(SOURCES)]
            outcomes = await asyncio.gather(
                *(exchange(req, ports[k], source=source) for k in names)
            )
            for k, outcome in zip(names, outcomes, strict=True):
                _record(served[k], i, outcome)
            if (i + 1) % 10_000 == 0:
                took = time.monotonic() - started
                print(f"  {i + 1} requests, {took:.0f} s", file=sys.stderr, flush=True)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return kinds


def run(n: int, *, seed: int = 0, concurrency: int = 16) -> Run:
    """Start the servers, send them the corpus's first ``n`` requests, count."""
    served = {k: Served(k, guarded) for k, (_, guarded) in SERVERS.items()}
    calibrate_demo()
    with tempfile.TemporaryDirectory(prefix="bench-hostile-") as tmp:
        with serve_all(Path(tmp)) as up:
            ports = {k: port for k, (port, _) in up.items()}
            for k, s in served.items():
                if s.guarded:
                    s.before = counters(ports[k])
            started = time.monotonic()
            kinds = asyncio.run(_drive(n, seed, concurrency, ports, served))
            seconds = time.monotonic() - started
            for k, s in served.items():
                if s.guarded:
                    s.after = counters(ports[k])
        # the servers have stopped: their logs are complete
        for k, s in served.items():
            if s.guarded:
                read_log(s, up[k][1])
    return Run(n, seed, concurrency, kinds, served, seconds)


# --------------------------------------------------------------------------- the report


def _classes(statuses: list[int]) -> Counter[str]:
    return Counter("none" if s == 0 else f"{s // 100}xx" for s in statuses)


def _request_text(req: HostileRequest, limit: int = 600) -> dict[str, Any]:
    if req.raw is not None:
        return {"kind": req.kind, "raw": req.raw[:limit].decode("latin-1")}
    return {
        "kind": req.kind,
        "method": req.method,
        "path": req.path,
        "headers": [[k.decode("latin-1"), v[:80].decode("latin-1")] for k, v in req.headers[:20]],
        "body": req.body[:limit].decode("latin-1"),
        "body_bytes": len(req.body),
        "chunks": len(req.chunks),
    }


def write_findings(result: Run, path: Path) -> int:
    """One JSON line per finding, the request truncated; no file when there are none.

    Findings: a 5xx or a missing answer that is the guard's doing (:meth:`Run.guard_faults`),
    and a crash of the app behind the guard outside the signature categories
    (:meth:`Run.unexplained`).
    """
    found = [(name, i, "guard fault") for name, idx in result.guard_faults().items() for i in idx]
    found += [
        (name, i, "crash through the guard")
        for name in BEHIND_ALL
        for i in result.unexplained(name)
    ]
    lines = []
    for name, i, what in found:
        served = result.served[name]
        line = {
            "finding": what,
            "server": name,
            "seed": result.seed,
            "index": i,
            "status": served.status[i] or None,
            "answer": served.crash.get(i, ""),
            "request": _request_text(build(result.seed, i)),
        }
        lines.append(json.dumps(line))
    if lines:
        path.write_text("\n".join(lines) + "\n")
    else:
        path.unlink(missing_ok=True)
    return len(lines)


def _revision() -> str:
    """The checkout's commit (``+ local changes`` when tracked code differs from it)."""
    git = ["git", "-C", str(ROOT)]
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    outputs = [":!benchmarks/RESULTS.md", f":!{FINDINGS.relative_to(ROOT)}"]
    dirty = subprocess.run(
        [*git, "status", "--porcelain", "--untracked-files=no", "--", ".", *outputs],
        capture_output=True,
        text=True,
    )
    return (head.stdout.strip() or "unknown") + (" + local changes" if dirty.stdout.strip() else "")


def _pct(part: int, whole: int) -> str:
    return f"{100 * part / whole:.2f} %" if whole else "n/a"


def _label(sample: str, name: str) -> str:
    """The value of label ``name`` in a ``metric{a=b,c=d}`` key of :func:`counters`."""
    found = re.search(rf"[{{,]{name}=([^,}}]*)", sample)
    return found.group(1) if found else "?"


def _answers(result: Run) -> list[str]:
    lines = [
        "| server | 2xx | 3xx | 4xx | 5xx | no answer | truncated | statuses |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, served in result.served.items():
        c = _classes(served.status)
        statuses = ", ".join(
            f"{s or 'none'}: {v}" for s, v in sorted(Counter(served.status).items())
        )
        lines.append(
            f"| {name} | {c['2xx']} | {c['3xx']} | {c['4xx']} | {c['5xx']} | {c['none']} "
            f"| {served.how['truncated']} | {statuses} |"
        )
    ends = "; ".join(
        f"{name}: " + ", ".join(f"{k} {v}" for k, v in served.how.most_common())
        for name, served in result.served.items()
    )
    return [*lines, "", f"How the exchanges ended: {ends}."]


def _counters(served: Served) -> str:
    def listed(counts: Mapping[Any, float], label: str | None = None) -> str:
        return ", ".join(f"{_label(k, label) if label else k} {v:.0f}" for k, v in counts.items())

    invalid = served.delta("guard_invalid_requests_total")
    errors = served.delta("guard_errors_total")
    refused = served.refusals()
    match = "equal" if sum(refused.values()) == sum(invalid.values()) else "NOT equal"
    text = (
        f"- {served.name}: invalid-input refusals the client saw from the guard (4xx with "
        f"`cache-control: no-store`, 403 and 429 aside): {sum(refused.values())} "
        f"({listed(refused)}); `guard_invalid_requests_total` +{sum(invalid.values()):.0f} "
        f"({listed(invalid, 'reason')}), {match}; `guard_errors_total` "
        f"+{sum(errors.values()):.0f}"
        + (f" ({listed(errors)})" if errors else "")
        + "; `guard_requests_total` by decision: "
        + listed(served.delta("guard_requests_total"), "decision")
        + f"; tracebacks in its log: {served.tracebacks}"
    )
    if served.traceback_tails:
        text += f" (the first ones end: {'; '.join(served.traceback_tails)})"
    return text


def _targets(result: Run, findings: int) -> list[str]:
    n = result.n
    crashers = result.crashers()
    faults = result.guard_faults()
    demo = _classes(result.served["guarded_demo"].status)
    lines = [
        f"- guarded demo: **{demo['5xx']} 5xx, {demo['none']} exchanges without an answer** "
        f"over {n} requests (target 0 and 0: {'NOT met' if faults['guarded_demo'] else 'met'})",
        f"- fragile app bare: {len(crashers)} crashers ({_pct(len(crashers), n)} of the corpus) "
        "get a 5xx or no answer",
    ]
    for name, what in ((BEHIND, "the guard's defaults"), (SIGNED, "defaults + signature")):
        residual = result.residual(name)
        behind = result.served[name].status
        fate = Counter(
            "5xx" if behind[i] >= 500 else str(behind[i] or "no answer") for i in crashers
        )
        met = len(residual) < 0.01 * len(crashers)
        lines += [
            f"- behind {what} (`{name}`): **{len(residual)} of the {len(crashers)} crashers "
            f"({_pct(len(residual), len(crashers))})** still get a 5xx or no answer "
            f"(target < 1 %: {'met' if met else 'NOT met'}); what the crashers get: "
            + ", ".join(f"{k} {v}" for k, v in fate.most_common()),
            "  - of those, outside the signature categories below: "
            f"{len(result.unexplained(name))}",
            f"  - 5xx or no answer on requests the bare app survives: {len(faults[name])}",
        ]
    refused = result.refused_servable(SIGNED)
    by_kind = Counter(result.kinds[i].split(":")[0] for i in refused)
    lines += [
        f"- the price of the signature: requests the bare app answered 2xx that `{SIGNED}` "
        f"refuses itself: {len(refused)} ({_pct(len(refused), n)} of the corpus"
        + (
            ", by kind: " + ", ".join(f"{k} {v}" for k, v in by_kind.most_common())
            if refused
            else ""
        )
        + "); each is well-formed for some model, and not for this one (another input "
        "name or datatype: the careless app reads whatever comes, an OIP server does not)",
        f"- findings (guard faults, and crashes through the guard outside the signature "
        f"categories) written to `{FINDINGS.relative_to(ROOT)}`: {findings}",
    ]
    return lines


def _by_kind(result: Run) -> list[str]:
    demo = result.served["guarded_demo"].status
    crash_set = set(result.crashers())
    residual_sets = {name: set(result.residual(name)) for name in BEHIND_ALL}
    per_kind: dict[str, list[int]] = {}
    for i, kind in enumerate(result.kinds):
        per_kind.setdefault(kind.split(":")[0], []).append(i)
    lines = [
        "| kind | requests | guarded_demo 4xx | guarded_demo 5xx or none | fragile bare: crashes "
        "| behind the defaults: still crash | behind defaults + signature: still crash |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for kind in KINDS:
        idx = per_kind.get(kind, [])
        d4 = sum(1 for i in idx if 400 <= demo[i] < 500)
        d5 = sum(1 for i in idx if demo[i] == 0 or demo[i] >= 500)
        crashes = sum(1 for i in idx if i in crash_set)
        still = [sum(1 for i in idx if i in residual_sets[name]) for name in BEHIND_ALL]
        lines.append(f"| {kind} | {len(idx)} | {d4} | {d5} | {crashes} | {still[0]} | {still[1]} |")
    return lines


READING = (
    "- Counts, not timings: a busy machine makes the run slower, not different, except "
    "where the demo policy's rate limits and quarantine read the clock (its 403 and 429).",
    "- `guarded_demo`'s 4xx include the demo model app's own 400s and 404s (it checks its "
    "input, and serves no OpenAI or MLflow route): its line says that the guard adds no 5xx "
    "and loses no answer, not which layer refused what.",
    "- Behind the defaults, the residual is the signature gap. `GuardConfig.default()` "
    "checks the wire format (JSON, encodings, finite numbers, shapes consistent with their "
    "data, types, sizes) but not the model's input signature (one numeric input of rank 2 "
    "and width 64), so a well-formed request for another model passes and the careless app "
    "crashes on it. `fragile_signed` is the same guard told the signature (`signature:`; "
    "`learn: true` reads it from a model server's metadata endpoint, which the careless app "
    "does not have); what crashes through it, listed request by request, are findings.",
    "- Tracebacks in a guarded server's log that end in `h11._util.LocalProtocolError: can't "
    "handle event type Response when role=SERVER and state=MUST_CLOSE` are uvicorn's (h11): "
    "on a malformed chunk uvicorn answers 400 itself, and an app that then answers without "
    "having read the body (the guard's 403 to a quarantined client) gets that exception "
    "from `send`. The client has its 400; a five-line ASGI app that answers 403 without "
    "reading the body does the same.",
    "- Over HTTP, Content-Length is the framing: the corpus's lies in it are replaced by the "
    "true length (`benchmarks/_hostile_http.py`), and a body the corpus cuts into pieces "
    "goes chunked; the fuzz test (`tests/middleware/test_fuzz.py`) sends the lies as ASGI "
    "headers.",
)


def reading(signature: str) -> str:
    """The :data:`SIGNATURE` category of a crash behind the guard, or ``other``."""
    return next(
        (k for k, (pattern, _) in SIGNATURE.items() if re.search(pattern, signature)), "other"
    )


def _residual(result: Run, behind: str) -> list[str]:
    crash = result.served[behind].crash
    residual = result.residual(behind)
    if not residual:
        return ["None."]
    readings = Counter(reading(crash.get(i, "")) for i in residual)
    groups = Counter((result.kinds[i].split(":")[0], crash.get(i, "?")) for i in residual)
    lines = [
        "Each of these is well-formed for *some* model, and only the model's signature "
        "rules it out:",
        "",
        *(f"- {k}: {text}: {readings[k]}" for k, (_, text) in SIGNATURE.items()),
        "",
        f"Outside them: **{readings['other']}**.",
        "",
        "| kind | the fragile app's exception (numbers and quoted values folded) | reading "
        "| requests |",
        "|---|---|---|---:|",
    ]
    lines += [f"| {k} | `{sig}` | {reading(sig)} | {v} |" for (k, sig), v in groups.most_common(30)]
    other = result.unexplained(behind)
    if other:
        lines += [
            "",
            "Outside the signature categories, request by request (the findings file has more):",
            "",
        ]
        lines += [
            f"- #{i}: {_describe(build(result.seed, i))} -> `{crash.get(i, '')}`"
            for i in other[:30]
        ]
    return lines


def _describe(req: HostileRequest) -> str:
    """One line on a request: method, target, content type, the start of the body."""
    if req.raw is not None:
        first = req.raw.split(b"\r\n")[0].decode("latin-1")[:80]
        return f"{req.kind}: `{first}`"
    ctypes = [v.decode("latin-1") for k, v in req.headers if k == b"content-type"]
    binary = any(k == b"inference-header-content-length" for k, _ in req.headers)
    body = req.body[:110].decode("latin-1").encode("unicode_escape").decode("ascii")
    body = body.replace("`", "'")
    return (
        f"`{req.method} {req.path}`, content-type {ctypes or 'none'}"
        + (", binary extension" if binary else "")
        + f", {len(req.body)} bytes: `{body}`"
    )


def report(result: Run, cmd: str, findings: int) -> str:
    """The RESULTS.md section."""
    bare = Counter(result.served[BARE].crash.values())
    return "\n".join(
        [
            "## Hostile traffic (issue 13)",
            "",
            f"- command: `{cmd}`",
            f"- machine: {machine()}",
            f"- date: {today()}; the corpus took {result.seconds:.0f} s; code at {_revision()}",
            f"- corpus: {result.n} requests, seed {result.seed} (`benchmarks/hostile_corpus.py`), "
            "each sent to all four servers at once on a fresh connection, "
            f"{result.concurrency} requests in flight, from 1024 loopback addresses in turn",
            "- servers (uvicorn, 1 worker each, `--no-proxy-headers`): `guarded_demo` = "
            "`inference_guard.middleware.demo:build_demo_app` (what `guard demo` serves: "
            "the demo policy); "
            "`fragile` = a careless digits server that validates nothing "
            "(`benchmarks/fragile_app.py`), bare; `fragile_guarded` = the same behind "
            "`GuardMiddleware` with no config (`GuardConfig.default()`: validation and "
            "rounding, no detectors); `fragile_signed` = the same, the policy also given "
            "the model's signature (one FP32 input `input-0` of shape `[-1, 64]`, what the "
            "demo's model server declares; `benchmarks/fragile_app.py`), which holds KServe v1 "
            "and MLflow rows too",
            "",
            "### Answers",
            "",
            *_answers(result),
            "",
            "### The guard's own counters (from /metrics, after minus before)",
            "",
            *(_counters(s) for s in result.served.values() if s.guarded),
            "",
            "### Against the targets",
            "",
            *_targets(result, findings),
            "",
            "### By kind of request",
            "",
            *_by_kind(result),
            "",
            "### The residual: crashers that still crash the app behind the guard's defaults",
            "",
            *_residual(result, BEHIND),
            "",
            "### The residual behind the defaults and the model's signature",
            "",
            *_residual(result, SIGNED),
            "",
            "What crashes the fragile app bare, most common first: "
            + "; ".join(f"`{sig}` {v}" for sig, v in bare.most_common(12)),
            "",
            "### Reading the figures",
            "",
            *READING,
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=100_000, help="corpus size (100000)")
    parser.add_argument("--concurrency", type=int, default=16, help="requests in flight (16)")
    parser.add_argument("--seed", type=int, default=0, help="corpus seed (0)")
    args = parser.parse_args(argv)
    chosen = {"requests": args.requests, "concurrency": args.concurrency, "seed": args.seed}
    defaults = {"requests": 100_000, "concurrency": 16, "seed": 0}
    cmd = "python benchmarks/hostile.py" + "".join(
        f" --{k} {v}" for k, v in chosen.items() if v != defaults[k]
    )
    result = run(args.requests, seed=args.seed, concurrency=args.concurrency)
    findings = write_findings(result, FINDINGS)
    text = report(result, cmd, findings)
    write_section("hostile", text)
    print(text)
    return 1 if any(result.guard_faults().values()) else 0


if __name__ == "__main__":
    sys.exit(main())
