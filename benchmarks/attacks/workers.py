"""Rows to detection with one worker and with N, the workers sharing a Redis store.

Run: ``python benchmarks/attacks/run.py --workers 4 [--store redis://127.0.0.1:6379/13]
[--only digits-linear]``

Behind a round-robin balancer each of N workers sees 1/N of a client's
requests. This part of the attack benchmark measures whether the extraction
detectors still convict as early as one worker seeing everything, with the
evidence shared through the store (:mod:`detectors.shared_evidence`).

For each deployment (default ``digits-linear``) and each of 1 and N workers,
every scenario gets **fresh servers and fresh state**: N ``uvicorn`` processes
(one worker each, on a port of its own, all with the deployment's calibrated
recipe and ``state.store`` set to the Redis URL under a key prefix of its
own), and a client that deals its requests round-robin over the N ports, as
a round-robin balancer does. (``uvicorn --workers N`` shares one socket and
lets the kernel hand each *connection* to a worker, so one keep-alive client
lands on one worker: round-robin per request is the case the issue describes,
and the worst one, every worker seeing exactly 1/N.) Real sockets, real time,
real Redis; no simulated clock.

Scenarios: JbDA (lambda 0.1), Knockoff with uniform rows (what the
``boundary`` detector's coverage signal is for), HopSkipJump, Boundary and
HopSkipJump spread round-robin over 10 API keys, as in the main benchmark's
``--quick`` sizes;
then the hard-case benign clients (health probe, retrier, batch job,
one-class client; the what-if sweep is a near-duplicate probe and may be
flagged, as in the main benchmark) beside 40 ordinary benign clients, none
of whom may be enforced. Each runs
under two policies: the recipe as calibrated (every detector of the demo
policy but the rate limit), and the recipe cut down to the three extraction
detectors (``near_duplicate``, ``prada``, ``boundary``, same actions and
escalations), so that what is measured is *their* evidence: under the full
recipe a stateless row detector (``envelope``) may convict first, on any
number of workers alike.

What is reported per scenario: the rows the attacker had sent at the first
enforced answer (degraded, throttled or blocked), and at the first alarm of
each extraction detector, from the audit logs of all workers.
"""

from __future__ import annotations

import contextlib
import copy
import http.client
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import yaml

from benchmarks._harness import ROOT, free_port, machine, today
from benchmarks.attacks import benign, hardcases
from benchmarks.attacks._asgi import SimClock
from benchmarks.attacks._data import Victim
from benchmarks.attacks._http import Oracle, Refused
from benchmarks.attacks._recipe import Deployment, key_hash, prepare
from benchmarks.attacks._results import Attack, Scenario
from benchmarks.attacks._traffic import Outcome, outcome, run_sessions

__all__ = ["run_workers"]

#: the scenarios of the main benchmark measured here (by name)
SCENARIOS = (
    "JbDA, lambda 0.1",
    "Knockoff, uniform",
    "HopSkipJump",
    "Boundary",
    "HopSkipJump, 10 keys round-robin",
)
#: the detectors whose first alarm is reported (and the only ones of the "extraction" policy)
DETECTORS = ("near_duplicate", "prada", "boundary")
#: ordinary benign clients run beside the hard cases (``benign.plan``)
BENIGN = 40
#: the policies measured: the calibrated recipe, and its extraction detectors alone
POLICIES = ("recipe", "extraction")


def policy_config(dep: Deployment, policy: str, *, share: bool = True) -> dict[str, Any]:
    """The deployment's calibrated recipe, or the same with its extraction detectors only.

    ``share=False`` sets ``share: false`` on the extraction detectors.
    """
    cfg = copy.deepcopy(dep.config)
    for p in cfg["policies"]:
        if policy == "extraction":
            p["detectors"] = [d for d in p.get("detectors", []) if d["type"] in DETECTORS]
        for d in p.get("detectors", []):
            if d["type"] in DETECTORS and not share:
                d.setdefault("params", {})["share"] = False
    return cfg


class RoundRobin:
    """``post(path, body, headers)`` to N servers in turn, one keep-alive connection each."""

    def __init__(self, urls: Sequence[str]) -> None:
        self.conns = [
            http.client.HTTPConnection("127.0.0.1", int(u.rsplit(":", 1)[1]), timeout=30)
            for u in urls
        ]
        self._next = itertools.cycle(range(len(self.conns)))

    def post(
        self, path: str, body: bytes, headers: dict[str, str]
    ) -> tuple[int, dict[str, str], bytes]:
        conn = self.conns[next(self._next)]
        conn.request("POST", path, body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data

    def close(self) -> None:
        for conn in self.conns:
            conn.close()


@dataclass
class Served:
    """N guarded workers up; their audit lines once they stopped."""

    transport: RoundRobin
    audit: list[dict[str, Any]] = field(default_factory=list)


@contextlib.contextmanager
def served(
    dep: Deployment, policy: str, var: Variant, store: str, seed: int, tmp: Path
) -> Iterator[Served]:
    """Fresh workers of the deployment's ``policy``, sharing ``store`` under a fresh prefix."""
    run = uuid.uuid4().hex[:12]
    n = var.workers
    cfg = policy_config(dep, policy, share=var.share)
    cfg["state"] = {"store": store, "key_prefix": f"bench-workers-{run}:"}
    path = tmp / f"config-{run}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    audits = [tmp / f"audit-{run}-{i}.jsonl" for i in range(n)]
    env = {
        "BENCH_ATTACKS_CONFIG": str(path),
        "BENCH_ATTACKS_VICTIM": dep.name,
        "BENCH_ATTACKS_SEED": str(seed),
    }
    with _servers([{**env, "BENCH_ATTACKS_AUDIT": str(a)} for a in audits]) as urls:
        s = Served(RoundRobin(urls))
        try:
            yield s
        finally:
            s.transport.close()
    # the workers have stopped: their audit logs are complete
    for a in audits:
        if a.exists():
            s.audit += [json.loads(x) for x in a.read_text().splitlines() if x.strip()]
    _forget(store, f"bench-workers-{run}:")


@contextlib.contextmanager
def _servers(envs: Sequence[dict[str, str]]) -> Iterator[list[str]]:
    """One ``uvicorn --factory benchmarks.attacks._served:app`` per env, started together."""
    ports = [free_port() for _ in envs]
    procs = []
    try:
        for port, env in zip(ports, envs, strict=True):
            cmd = [
                sys.executable,
                "-m",
                "uvicorn",
                "benchmarks.attacks._served:app",
                "--factory",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--log-level",
                "error",
                "--no-access-log",
                "--http",
                "h11",  # as every benchmark's server, whatever else is installed
            ]
            full = {**os.environ, "PYTHONPATH": str(ROOT), **env}
            full.pop("PROMETHEUS_MULTIPROC_DIR", None)
            procs.append(subprocess.Popen(cmd, cwd=ROOT, env=full))
        deadline = time.monotonic() + 180
        for port, proc in zip(ports, procs, strict=True):
            while not _ready(port):
                if proc.poll() is not None:
                    raise RuntimeError(f"a worker exited with {proc.returncode}")
                if time.monotonic() > deadline:
                    raise RuntimeError("the workers did not start")
                time.sleep(0.2)
        yield [f"http://127.0.0.1:{p}" for p in ports]
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()


def _ready(port: int) -> bool:
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
        conn.request("GET", "/healthz")
        ok = conn.getresponse().status == 200
        conn.close()
        return ok
    except OSError:
        return False


def _forget(store: str, prefix: str) -> None:
    import redis

    client = redis.Redis.from_url(store)
    try:
        for key in list(client.scan_iter(match=prefix + "*", count=1000)):
            client.delete(key)
    finally:
        client.close()


@dataclass
class Measured:
    """One scenario on one worker count."""

    rows: int
    out: Outcome
    seconds: float


def _attack(
    dep: Deployment,
    policy: str,
    var: Variant,
    store: str,
    seed: int,
    tmp: Path,
    keys: list[str],
    attack: Attack,
) -> Measured:
    v = dep.v
    t0 = time.perf_counter()
    with served(dep, policy, var, store, seed, tmp) as s:
        oracle = Oracle(
            "",
            keys,
            path=v.path,
            transport=s.transport,
            drop_blocked=len(keys) > 1,
            reference=v.predict_proba,
        )
        with contextlib.suppress(Refused):
            attack(oracle)
    out = outcome(oracle.log, s.audit, {k: key_hash(k) for k in keys})
    return Measured(oracle.rows, out, time.perf_counter() - t0)


def _hard(
    dep: Deployment, policy: str, var: Variant, store: str, seed: int, tmp: Path
) -> tuple[dict[str, Outcome], list[Outcome]]:
    """The hard cases' outcomes by kind, and the ordinary benign clients', all in one run."""
    v = dep.v
    hard = [
        hardcases.probe(v),
        hardcases.retrier(v, seed=seed),
        hardcases.batch_job(v),
        hardcases.one_class(v, seed=seed),
        hardcases.what_if(v),
    ]
    plans = benign.plan(
        BENIGN,
        seed=seed,
        key_prefix=f"benign-{dep.name}",
        pool_size=v.benign.shape[0],
        start_window=60.0,
    )
    sessions = [*hard, *(benign.session(p, v.benign) for p in plans)]
    with served(dep, policy, var, store, seed, tmp) as s:
        # in time order, as fast as the workers answer (the servers keep real time)
        oracles = run_sessions(
            s.transport, SimClock(), sessions, path=v.path, reference=v.predict_proba
        )
    outs = [
        outcome(o.log, s.audit, {sess.key: key_hash(sess.key)})
        for sess, o in zip(sessions, oracles, strict=True)
    ]
    return {sess.kind: out for sess, out in zip(hard, outs, strict=False)}, outs[len(hard) :]


class Variant(NamedTuple):
    """How a scenario is served."""

    #: as the report names it
    label: str
    #: uvicorn workers
    workers: int
    #: the extraction detectors share their evidence (``share: false``: only flags are)
    share: bool


def run_workers(
    victims: Sequence[Victim], *, workers: int, store: str, seed: int, command: str
) -> str:
    """Measure every deployment with 1 and ``workers`` workers; the RESULTS.md section."""
    from benchmarks.attacks.run import scenarios

    one = Variant("1", 1, True)
    apart = Variant(f"{workers}, not shared", workers, False)
    shared = Variant(f"{workers}, shared", workers, True)
    lines = [
        "## Extraction detection across workers (shared Redis store)",
        "",
        f"- command: `{command}`",
        f"- machine: {machine()}; date: {today()}",
        f"- store: `{store}` (a fresh key prefix per scenario); workers: uvicorn processes, "
        "one port each, requests dealt round-robin per request by the client; every "
        "scenario on fresh workers and fresh state",
        f"- workers `{workers}, shared`: the extraction detectors share their evidence "
        f"(the default with Redis); `{workers}, not shared`: `share: false`, only flags "
        "and quarantine are shared (how every worker behaved before evidence was shared)",
        "- rows: what the attacker had sent at the first enforced answer (degraded, "
        "throttled or blocked; `-` never), and at each extraction detector's first alarm "
        "(audit logs of all workers)",
        "",
    ]
    with tempfile.TemporaryDirectory(prefix="bench-workers-") as tmp_name:
        tmp = Path(tmp_name)
        for v in victims:
            dep = prepare(v, tmp)
            todo = [(sc, a) for sc, a in scenarios(v, True, seed) if sc.name in SCENARIOS]
            for policy in POLICIES:
                variants = [one, shared] if policy == "recipe" else [one, apart, shared]
                lines += _measure(dep, policy, todo, variants, store, seed, tmp)
    return "\n".join(lines)


def _measure(
    dep: Deployment,
    policy: str,
    todo: Sequence[tuple[Scenario, Attack]],
    variants: Sequence[Variant],
    store: str,
    seed: int,
    tmp: Path,
) -> list[str]:
    from benchmarks.attacks.run import attacker_keys

    name = "the calibrated recipe" if policy == "recipe" else "the extraction detectors only"
    lines = [
        f"### {dep.name}, {name}",
        "",
        "| scenario | workers | rows sent | first enforced at row | "
        + " | ".join(DETECTORS)
        + " | keys enforced | seconds |",
        "|---|---|---|---|" + "---|" * len(DETECTORS) + "---|---|",
    ]
    ratios: list[str] = []
    for i, (sc, attack) in enumerate(todo):
        first: dict[Variant, int | None] = {}
        for var in variants:
            keys = attacker_keys(dep, i, sc.keys)
            m = _attack(dep, policy, var, store, seed, tmp, keys, attack)
            first[var] = m.out.first_enforced
            alarms = " | ".join(_row(m.out.by_detector.get(d)) for d in DETECTORS)
            lines.append(
                f"| {sc.name} | {var.label} | {m.rows} | {_row(m.out.first_enforced)} | "
                f"{alarms} | {m.out.keys_enforced}/{m.out.keys} | {m.seconds:.0f} |"
            )
            print(
                f"  {dep.name} [{policy}] {sc.name} workers={var.label}: rows {m.rows}, first "
                f"enforced {m.out.first_enforced}, {m.out.by_detector}, keys "
                f"{m.out.keys_enforced}/{m.out.keys}, {m.seconds:.0f}s",
                flush=True,
            )
        base = first[variants[0]]
        ratios.append(
            f"{sc.name}: "
            + "; ".join(f"{v.label}: {_row(first[v])} ({_ratio(first[v], base)})" for v in variants)
        )
    lines += ["", "Rows to the first enforced answer (ratio to 1 worker):", ""]
    lines += [f"- {r}" for r in ratios]
    lines += [
        "",
        "| benign client | " + " | ".join(f"workers {v.label}" for v in variants) + " |",
        "|---|" + "---|" * len(variants),
    ]
    runs = {v: _hard(dep, policy, v, store, seed, tmp) for v in variants}
    for kind in runs[variants[0]][0]:
        cells = " | ".join(_fate(runs[v][0][kind]) for v in variants)
        label = (
            f"{kind} (allowed to be flagged: a near-duplicate sweep)" if kind == "what_if" else kind
        )
        lines.append(f"| {label} | {cells} |")
        print(f"  {dep.name} [{policy}] hard case {kind}: {cells}", flush=True)
    cells = " | ".join(
        f"{sum(o.first_enforced is not None for o in runs[v][1])} of {BENIGN} enforced, "
        f"{sum(o.lines > 0 for o in runs[v][1])} audited"
        for v in variants
    )
    lines += [f"| {BENIGN} ordinary benign clients | {cells} |", ""]
    print(f"  {dep.name} [{policy}] benign population: {cells}", flush=True)
    return lines


def _ratio(n: int | None, base: int | None) -> str:
    return f"{n / base:.2f}x" if n and base else "n/a"


def _row(n: int | None) -> str:
    return "-" if n is None else str(n)


def _fate(out: Outcome) -> str:
    if out.first_enforced is None:
        return f"not enforced ({out.lines} audit lines)"
    return f"ENFORCED at row {out.first_enforced} ({', '.join(out.enforcing)})"
