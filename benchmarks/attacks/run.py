"""Attacks, benign clients and hard cases against every deployment, one config recipe.

Run: ``python benchmarks/attacks/run.py [--quick] [--only NAME ...]``

``--quick`` runs three deployments (one per data set, both model families among
them) with fewer evasion inputs, Knockoff rows and benign clients: a few
minutes. ``guard calibrate`` simulates benign sessions for every stateful
detector, which is most of each deployment's fixed cost.

Deployments (:mod:`._data`): three scikit-learn bundled data sets of different
shapes and scales (digits 64 features in 0..16 and 10 classes; wine 13 features
spanning ~0.1..1680 and 3 classes; breast cancer 30 features spanning ~0..4250
and 2 classes), each served by a linear model (StandardScaler +
LogisticRegression) and a non-linear one (StandardScaler + MLP), fitted on a
seeded stratified 70 % split. Each is an Open Inference Protocol v2 JSON
endpoint (``benchmarks.apps.build_sklearn_app``).

The recipe, the same for every deployment (:func:`recipe`): the demo policy
``guard/demo.yaml`` as shipped, minus its rate limit (so that every attack runs
to completion and what is measured is the detectors), then ``guard calibrate
--config`` on the deployment's training split with the model's answers on it
(:func:`calibrate`, the one call that fits the deployment). No per-data-set
parameter anywhere.

Every client talks to the real ASGI app (the guard's middleware in front of
the model app) in-process, with its own ``x-api-key``; the guard sees a
simulated clock (``_asgi``), so sessions spread over minutes run in seconds.
Every guard is **fresh** per attack scenario and per population (no detector
state, near-duplicate index or quarantine carries over). What the guard did
to a client comes from its audit log (lines matched by keyed client hash and
``x-request-id``) and the statuses the client saw (``_traffic.outcome``):
*enforced* is degraded, throttled or blocked; *audited* is any audit line.

Results go to benchmarks/RESULTS.md (section ``attacks``) and the plot to
benchmarks/attacks/attacks.png.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import io
import json
import math
import os
import re
import statistics
import sys
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))

import numpy as np
import yaml
from numpy.typing import NDArray

from benchmarks._harness import machine, today, write_section
from benchmarks.apps import build_sklearn_app
from benchmarks.attacks import benign, evasion, extraction, hardcases
from benchmarks.attacks._asgi import InProcess, SimClock
from benchmarks.attacks._data import DATASETS, FAMILIES, Victim, victim
from benchmarks.attacks._http import Oracle
from benchmarks.attacks._traffic import Outcome, Session, client_hash, outcome, run_sessions

HERE = Path(__file__).resolve().parent
PLOT = HERE / "attacks.png"
HASH_SECRET = "bench-attacks-client-hash-secret-0001"
FINGERPRINT_SALT = "bench-attacks-fingerprint-salt-0001"
ENV = {"GUARD_HASH_KEY": HASH_SECRET, "GUARD_FINGERPRINT_SALT": FINGERPRINT_SALT}
#: seconds between an attacker's requests (it sends as fast as it gets answers)
ATTACK_TICK = 0.02
#: the target false-positive rate given to guard calibrate
TARGET_FPR = 0.001
#: parameters of the demo policy that describe one data set (must come from calibration)
DATA_PARAMS = ("feature_range", "n_classes", "baseline")


def key_hash(api_key: str) -> str:
    return client_hash(HASH_SECRET, api_key)


# --------------------------------------------------------------------------- the recipe


def demo_policy() -> dict[str, Any]:
    """guard/demo.yaml as shipped."""
    text = files("guard").joinpath("demo.yaml").read_text(encoding="utf-8")
    doc: dict[str, Any] = yaml.safe_load(text)
    return doc


def recipe(calibration_dir: str | Path) -> dict[str, Any]:
    """The demo policy minus its rate limit, pointed at ``calibration_dir``."""
    cfg = demo_policy()
    cfg["calibration_dir"] = str(calibration_dir)
    for policy in cfg["policies"]:
        policy["detectors"] = [d for d in policy.get("detectors", []) if d["type"] != "rate"]
    return cfg


def data_params_left(cfg: dict[str, Any]) -> list[str]:
    """Data-dependent parameters still written in the config (``policy.detector.param``)."""
    return [
        f"{d['type']}.{name}"
        for p in cfg["policies"]
        for d in p.get("detectors", [])
        for name in DATA_PARAMS
        if name in (d.get("params") or {})
    ]


def calibrate(v: Victim, config_path: Path, out_dir: Path) -> str:
    """``guard calibrate --data REF.npz --out DIR --config CONFIG`` on the training split.

    ``REF.npz`` holds ``X`` (the training rows) and ``proba`` (the model's answers
    on them). The one call that adapts the recipe to a deployment; returns its report.
    """
    from guard.cli import main as guard_main

    ref = out_dir.parent / f"{v.name}-reference.npz"
    np.savez(ref, X=v.X_train, proba=v.predict_proba(v.X_train))
    args = [
        "calibrate",
        "--data",
        str(ref),
        "--out",
        str(out_dir),
        "--config",
        str(config_path),
        "--target-fpr",
        str(TARGET_FPR),
    ]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = guard_main(args)
    if code != 0:
        raise RuntimeError(f"guard calibrate failed ({code}) for {v.name}:\n{err.getvalue()}")
    return out.getvalue()


#: what a stateful detector needs by hand when calibration wrote no profile for it
_OVERRIDES: dict[str, Callable[[Victim], dict[str, Any]]] = {
    "near_duplicate": lambda v: {"feature_range": [float(v.lo.min()), float(v.hi.max())]},
    "prada": lambda v: {"delta": 0.9},
    "boundary": lambda v: {
        "threshold": -6.0,
        "feature_range": [float(v.lo.min()), float(v.hi.max())],
        "n_classes": v.n_classes,
    },
}


def interim(cfg: dict[str, Any], v: Victim, calibrated: Path | None = None) -> list[str]:
    """Until calibration fits the stateful detectors: what it should have supplied, by hand.

    Without ``calibrated``: the demo's own data-dependent parameters (digits values)
    are replaced by the deployment's. With it: every stateful detector that has no
    ``<type>.npz`` profile there gets the override it needs. NOT the recipe; the
    report says so wherever this was used.
    """
    notes: list[str] = []
    for p in cfg["policies"]:
        for d in p.get("detectors", []):
            params = d.setdefault("params", {})
            if calibrated is None:
                fix = _OVERRIDES.get(d["type"], lambda v: {})(v)
                for name in DATA_PARAMS:
                    if name in params and name in fix:
                        params[name] = fix[name]
                        notes.append(f"{d['type']}.{name} = {fix[name]}")
            elif d["type"] in _OVERRIDES and not (calibrated / f"{d['type']}.npz").exists():
                for name, value in _OVERRIDES[d["type"]](v).items():
                    if name not in params:
                        params[name] = value
                        notes.append(f"{d['type']}.{name} = {value} (no profile)")
    return notes


@dataclass
class Deployment:
    """A victim, its calibrated recipe config, and what calibration said."""

    v: Victim
    config: dict[str, Any]
    workdir: Path
    calibration: str
    #: data-dependent parameters the recipe had to fill in by hand (empty: pure recipe)
    interim: list[str]
    #: the guard accepts ``exempt:`` (None until tried)
    exempt_ok: bool | None = None

    @property
    def name(self) -> str:
        return self.v.name


def prepare(v: Victim, root: Path) -> Deployment:
    """Calibrate the recipe for ``v`` under ``root``."""
    work = root / v.name
    calib = work / "calibration"
    calib.mkdir(parents=True)
    cfg = recipe(calib)
    notes = interim(cfg, v) if data_params_left(cfg) else []
    path = work / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    report = calibrate(v, path, calib)
    notes += interim(cfg, v, calib)
    return Deployment(v, cfg, work, report, notes)


# --------------------------------------------------------------------------- guards


def model_app(v: Victim) -> Any:
    return build_sklearn_app(v.name, v.predict_proba, v.classes.tolist(), v.n_features)


@dataclass
class Guarded:
    """A fresh guard in front of a deployment's model; its audit lines once closed."""

    transport: InProcess
    clock: SimClock
    audit: list[dict[str, Any]] = field(default_factory=list)


@contextlib.contextmanager
def guarded(
    dep: Deployment, *, exempt: Sequence[str] = (), tick: float = ATTACK_TICK
) -> Iterator[Guarded]:
    """A fresh guard (the deployment's recipe config, audit log to a temp file)."""
    from prometheus_client import CollectorRegistry

    from guard.config import GuardConfig
    from guard.pipeline import Guard
    from middleware.asgi import GuardMiddleware

    cfg = copy.deepcopy(dep.config)
    with tempfile.TemporaryDirectory(prefix="attacks-") as tmp:
        audit = Path(tmp) / "audit.jsonl"
        cfg["audit"] = {"path": str(audit)}
        if exempt:
            cfg["exempt"] = {
                "api_keys": [f"sha256:{hashlib.sha256(k.encode()).hexdigest()}" for k in exempt]
            }
        clock = SimClock()
        gcfg = GuardConfig.load(cfg)
        guard = Guard(gcfg, registry=CollectorRegistry(), clock=clock, wall_clock=clock.wall)
        app = GuardMiddleware(model_app(dep.v), config=gcfg, guard=guard, clock=clock)
        g = Guarded(InProcess(app, clock=clock, tick=tick), clock)
        try:
            yield g
        finally:
            guard.audit.close()
            g.transport.close()
            text = audit.read_text() if audit.exists() else ""
            g.audit = [json.loads(line) for line in text.splitlines() if line.strip()]


def exempt_supported(dep: Deployment) -> bool:
    """Whether this guard version accepts ``exempt: {api_keys: [...]}``."""
    from guard.config import GuardConfig
    from guard.errors import ConfigurationError

    cfg = copy.deepcopy(dep.config)
    cfg["exempt"] = {"api_keys": ["sha256:" + hashlib.sha256(b"probe").hexdigest()]}
    try:
        GuardConfig.load(cfg)
    except (ConfigurationError, ValueError, TypeError):
        return False
    return True


def bare(v: Victim) -> InProcess:
    return InProcess(model_app(v))


# --------------------------------------------------------------------------- attacks


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


Attack = Callable[[Oracle], Any]


def scenarios(v: Victim, quick: bool, seed: int) -> list[tuple[Scenario, Attack]]:
    n_in = 3 if quick else 5
    ku = 300 if quick else 1000
    eq = 2 * (v.n_features + 1)
    ev = dict(victim=v, n_inputs=n_in, seed=seed)
    out: list[tuple[Scenario, Attack]] = [
        (
            Scenario(
                "JbDA, lambda 0.1",
                "extraction",
                "10 seed rows, step 0.1 of each feature's span (the paper's), 640 rows",
                family="extraction",
            ),
            lambda o: extraction.jbda(o, victim=v, rows=640, seed=seed, n_seed=10, lam=0.1),
        ),
        (
            Scenario(
                "JbDA, lambda 0.25",
                "extraction",
                "20 seed rows, step 0.25 of each feature's span, 640 rows",
                family="extraction",
            ),
            lambda o: extraction.jbda(o, victim=v, rows=640, seed=seed, n_seed=20, lam=0.25),
        ),
        (
            Scenario(
                "Knockoff, uniform",
                "extraction",
                f"{ku} rows uniform in the training box",
                family="extraction",
            ),
            lambda o: extraction.knockoff_uniform(o, victim=v, rows=ku, seed=seed),
        ),
        (
            Scenario(
                "Knockoff, natural (closed world)",
                "extraction",
                f"the attacker's {v.pool.shape[0]} held-out rows of the victim's own distribution",
                flaggable=False,
                family="extraction",
            ),
            lambda o: extraction.knockoff_natural(o, victim=v, rows=v.pool.shape[0], seed=seed),
        ),
    ]
    if v.dataset == "digits":
        out.append(
            (
                Scenario(
                    "Knockoff, open world (photo patches)",
                    "extraction",
                    f"{ku} 8x8 patches of scikit-learn's sample photos, digit-like",
                    family="extraction",
                ),
                lambda o: extraction.knockoff_open_world(o, victim=v, rows=ku, seed=seed),
            )
        )
    out += [
        (
            Scenario(
                "Equation solving (Tramer)",
                "extraction",
                f"{eq} = 2(d+1) uniform rows" + ("" if v.linear else "; non-linear victim"),
                family="extraction",
            ),
            lambda o: extraction.equation_solving(o, victim=v, rows=eq, seed=seed),
        ),
        (
            Scenario(
                "HopSkipJump",
                "evasion",
                f"{n_in} inputs; max_iter 40, init_eval 10, max_eval 100",
                family="hopskipjump",
            ),
            lambda o: evasion.hopskipjump(o, **ev),  # type: ignore[arg-type]
        ),
        (
            Scenario(
                "Boundary",
                "evasion",
                f"{n_in} inputs; max_iter 60, num_trial 10, sample_size 20",
                family="boundary",
            ),
            lambda o: evasion.boundary(o, **ev),  # type: ignore[arg-type]
        ),
        (
            Scenario(
                "SignOPT",
                "evasion",
                f"{n_in} inputs; k 50, query_limit 2000, num_trial 20, untargeted",
                family="signopt",
            ),
            lambda o: evasion.signopt(o, **ev),  # type: ignore[arg-type]
        ),
    ]
    out.append(
        (
            Scenario(
                "HopSkipJump, 10 keys round-robin",
                "evasion",
                f"{n_in} inputs as above; one key per request in turn, a key answered "
                "403 is dropped and the rows resent with the next",
                keys=10,
                family="sybil",
            ),
            lambda o: evasion.hopskipjump(o, **ev),  # type: ignore[arg-type]
        )
    )
    return out


def attacker_keys(dep: Deployment, i: int, n: int) -> list[str]:
    return [f"attacker-{dep.name}-{i}-{k}" for k in range(n)]


def _run(transport: InProcess, v: Victim, keys: Sequence[str], attack: Attack) -> Run:
    oracle = Oracle(
        "",
        list(keys),
        path=v.path,
        transport=transport,
        drop_blocked=len(keys) > 1,  # with several keys the attacker rotates away from a 403
        reference=v.predict_proba,
    )
    t0 = time.perf_counter()
    result = attack(oracle)
    return Run(oracle, result, time.perf_counter() - t0)


def run_attacks(dep: Deployment, quick: bool, seed: int) -> list[Scenario]:
    v = dep.v
    todo = scenarios(v, quick, seed)
    plain = bare(v)
    for i, (sc, attack) in enumerate(todo):
        if sc.family == "sybil":
            # against a bare model keys change nothing: the single-key run is this run
            sc.bare = next(s.bare for s, _ in todo if s.family == "hopskipjump")
            continue
        sc.bare = _run(plain, v, attacker_keys(dep, i, sc.keys), attack)
    plain.close()
    _tighten(todo)
    for i, (sc, attack) in enumerate(todo):
        with guarded(dep) as g:
            sc.guard = _run(g.transport, v, attacker_keys(dep, i, sc.keys), attack)
        keys = attacker_keys(dep, i, sc.keys)
        sc.out = outcome(sc.guard.oracle.log, g.audit, {k: key_hash(k) for k in keys})
    _tighten(todo)
    for sc, _ in todo:
        print(f"    {sc.name}: {_summary(sc)}", flush=True)
    return [sc for sc, _ in todo]


def _tighten(todo: Sequence[tuple[Scenario, Attack]]) -> None:
    """Judge every evasion result against the smallest distance any bare run found."""
    best: dict[int, float] = {}
    for sc, _ in todo:
        if sc.kind == "evasion" and sc.bare is not None:
            for r in sc.bare.result.inputs:
                if r.misclassified:
                    best[r.index] = min(best.get(r.index, math.inf), r.l2)
    for sc, _ in todo:
        for run in (sc.bare, sc.guard):
            if sc.kind == "evasion" and run is not None:
                run.result = run.result.with_opt(best)


def _result(r: Any) -> str:
    if isinstance(r, extraction.ExtractionResult):
        err = "" if r.param_error is None else f", parameter error {r.param_error:.3f}"
        return f"agreement {r.agreement:.3f}{err}"
    l2 = "—" if math.isnan(r.median_l2) else f"{r.median_l2:.3f}"
    mis = _pct(r.misclassified_rate)
    return f"success {_pct(r.success_rate)} (misclassified {mis}, median L2 {l2})"


def _summary(sc: Scenario) -> str:
    assert sc.bare is not None and sc.guard is not None and sc.out is not None
    first = sc.out.first_enforced
    return (
        f"bare {_result(sc.bare.result)} ({sc.bare.oracle.rows} rows, {sc.bare.seconds:.1f} s); "
        f"guarded {_result(sc.guard.result)} ({sc.guard.oracle.rows} rows, "
        f"{sc.guard.seconds:.1f} s); first enforced {first} by {', '.join(sc.out.enforcing)}"
    )


# --------------------------------------------------------------------------- benign traffic


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


def _results(
    sessions: Sequence[Session], oracles: Sequence[Oracle], lines: Sequence[dict[str, Any]]
) -> list[ClientResult]:
    by_client: dict[str, list[dict[str, Any]]] = {}
    for line in lines:
        by_client.setdefault(str(line.get("client", "")), []).append(line)
    out = []
    for s, o in zip(sessions, oracles, strict=True):
        h = key_hash(s.key)
        out.append(ClientResult(s, o, outcome(o.log, by_client.get(h, []), {s.key: h})))
    return out


def run_population(dep: Deployment, quick: bool, seed: int) -> Population:
    v = dep.v
    n = 100 if quick else 200
    plans = benign.plan(
        n,
        seed=seed,
        key_prefix=f"benign-{dep.name}",
        pool_size=v.benign.shape[0],
        start_window=60.0,
    )
    sessions = [benign.session(p, v.benign) for p in plans]
    hard = [
        hardcases.probe(v),
        hardcases.retrier(v, seed=seed),
        hardcases.batch_job(v),
        hardcases.one_class(v, seed=seed),
        hardcases.what_if(v),
    ]
    t0 = time.perf_counter()
    with guarded(dep, tick=0.0) as g:
        oracles = run_sessions(
            g.transport, g.clock, [*sessions, *hard], path=v.path, reference=v.predict_proba
        )
    results = _results([*sessions, *hard], oracles, g.audit)
    pop = Population(
        benign=results[: len(sessions)],
        hard={r.session.kind: r for r in results[len(sessions) :]},
        plans=plans,
        seconds=time.perf_counter() - t0,
    )
    pop.learner = benign_learner(v, plans, [r.oracle for r in pop.benign])
    return pop


def benign_learner(
    v: Victim, plans: Sequence[benign.BenignPlan], oracles: Sequence[Oracle]
) -> BenignLearner | None:
    """What the benign client with the most distinct answered rows learnt (no extra traffic)."""
    best: tuple[int, NDArray[np.int64], NDArray[np.int64]] | None = None
    for p, o in zip(plans, oracles, strict=True):
        idx, labels = benign.received(p, o)
        n = int(np.unique(idx).shape[0])
        if best is None or n > best[0]:
            best = (n, idx, labels)
    if best is None:
        return None
    n, idx, labels = best
    keep = ~np.isin(idx, v.eval_index)
    rows, first = np.unique(idx[keep], return_index=True)
    return BenignLearner(
        distinct=n,
        trained=int(rows.shape[0]),
        agreement=extraction.substitute_agreement(v.benign[rows], labels[keep][first], v),
    )


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


def run_monitor(dep: Deployment, seed: int, *, exempt: bool) -> Monitor:
    v = dep.v
    sessions = hardcases.monitor(v, seed=seed)
    if exempt and not dep.exempt_ok:
        return Monitor(True, [], unsupported=True)
    keys = [s.key for s in sessions] if exempt else []
    with guarded(dep, exempt=keys, tick=0.0) as g:
        oracles = run_sessions(
            g.transport, g.clock, sessions, path=v.path, reference=v.predict_proba
        )
    return Monitor(exempt, _results(sessions, oracles, g.audit))


@dataclass
class Framing:
    framer: ClientResult
    victim: ClientResult


def run_framing(dep: Deployment, seed: int) -> Framing:
    v = dep.v
    framer, victim_s = hardcases.framing(v, seed=seed)
    with guarded(dep, tick=0.0) as g:
        oracles = run_sessions(
            g.transport, g.clock, [framer, victim_s], path=v.path, reference=v.predict_proba
        )
    a, b = _results([framer, victim_s], oracles, g.audit)
    return Framing(a, b)


# --------------------------------------------------------------------------- one deployment


@dataclass
class Result:
    dep: Deployment
    attacks: list[Scenario]
    population: Population
    monitors: list[Monitor]
    framing: Framing
    seconds: float
    accuracy: float


def run_deployment(v: Victim, root: Path, quick: bool, seed: int) -> Result:
    t0 = time.perf_counter()
    dep = prepare(v, root)
    dep.exempt_ok = exempt_supported(dep)
    print(
        f"  {v.name}: calibrated"
        + (f" (INTERIM, not the recipe: {', '.join(dep.interim)})" if dep.interim else ""),
        flush=True,
    )
    attacks = run_attacks(dep, quick, seed)
    pop = run_population(dep, quick, seed)
    print(
        f"    benign: {len(pop.enforced)} of {len(pop.benign)} enforced, "
        f"{len(pop.audited)} audited; hard cases: "
        + ", ".join(f"{k} {_fate(c.out)}" for k, c in pop.hard.items()),
        flush=True,
    )
    monitors = [run_monitor(dep, seed, exempt=False), run_monitor(dep, seed, exempt=True)]
    framing = run_framing(dep, seed)
    print(
        f"    monitor: {monitors[0].enforced}/20 keys enforced plain, "
        f"{monitors[1].enforced}/20 exempt{' (unsupported)' if monitors[1].unsupported else ''}; "
        f"framed victim {_fate(framing.victim.out)}",
        flush=True,
    )
    return Result(dep, attacks, pop, monitors, framing, time.perf_counter() - t0, _accuracy(v))


def _accuracy(v: Victim) -> float:
    """Held-out accuracy: the split's true labels, re-derived from the data set."""
    from sklearn.model_selection import train_test_split

    X, y = DATASETS[v.dataset]()
    _, X_te, _, y_te = train_test_split(X, y, test_size=0.3, stratify=y, random_state=0)
    if v.name == "digits" or X_te.shape != v.benign.shape or not np.array_equal(X_te, v.benign):
        return math.nan
    return float(np.mean(v.predict(X_te) == y_te))


def _fate(o: Outcome) -> str:
    if o.enforced:
        return f"ENFORCED after {o.first_enforced} rows ({', '.join(o.enforcing)})"
    if o.audited:
        return f"audited ({o.lines} lines: {', '.join(sorted(o.by_detector)) or '—'})"
    return "untouched"


# --------------------------------------------------------------------------- report


def _pct(x: float) -> str:
    return f"{100 * x:.1f} %"


def _rows(v: int | None) -> str:
    return "—" if v is None else str(v)


def _statuses(o: Oracle) -> str:
    parts = [f"{v}x {k}" for k, v in sorted(o.statuses.items())]
    return ", ".join(parts) + f"; {o.perturbed} perturbed"


def _detectors(o: Outcome) -> str:
    return (
        ", ".join(f"{k} {v}" for k, v in sorted(o.by_detector.items(), key=lambda x: x[1])) or "—"
    )


def deployment_report(res: Result) -> list[str]:
    dep, v = res.dep, res.dep.v
    acc = "" if math.isnan(res.accuracy) else f", held-out accuracy {res.accuracy:.3f}"
    lines = [
        f"### {v.name}",
        "",
        f"- {v.dataset}: {v.X_train.shape[0]} training rows x {v.n_features} features "
        f"(spans {v.span[v.movable].min():.3g} to {v.span.max():.4g}), {v.n_classes} classes; "
        f"{v.benign.shape[0]} held-out rows ({v.pool.shape[0]} attacker pool, "
        f"{v.eval.shape[0]} eval); model {v.family}{acc}; took {res.seconds:.0f} s",
    ]
    p_low = _p_low(dep.config)
    low_train = float(np.mean(v.predict_proba(v.X_train).max(axis=1) < p_low))
    low_held = float(np.mean(v.predict_proba(v.benign).max(axis=1) < p_low))
    lines.append(
        f"- answers with top probability below {p_low:g} (`boundary`'s low-confidence signal): "
        f"{_pct(low_train)} on the training rows calibration sees, {_pct(low_held)} on the "
        "held-out rows benign clients send"
    )
    if dep.interim:
        lines.append(
            "- **INTERIM config, not the recipe**: calibration does not yet fit the stateful "
            f"detectors, so these data-dependent values were filled in: {'; '.join(dep.interim)}"
        )
    lines += [
        "",
        "| attack | parameters | enforced after (rows) | quarantined after (rows) | "
        "detectors, first firing (rows) | bare: result (rows) | guarded: result (rows; statuses) |",
        "|---|---|---:|---:|---|---|---|",
    ]
    for sc in res.attacks:
        assert sc.bare is not None and sc.guard is not None and sc.out is not None
        o = sc.out
        first = _rows(o.first_enforced) if o.enforced else "**never**"
        if sc.keys > 1:
            first += (
                f" ({o.keys_enforced}/{sc.keys} keys enforced, {o.keys_quarantined} quarantined)"
            )
        lines.append(
            f"| {sc.name} | {sc.params} | {first} | {_rows(o.quarantine)} | {_detectors(o)} | "
            f"{_result(sc.bare.result)} ({sc.bare.oracle.rows}) | {_result(sc.guard.result)} "
            f"({sc.guard.oracle.rows}; {_statuses(sc.guard.oracle)}) |"
        )
    pop = res.population
    ben = pop.benign
    enf_by: Counter[str] = Counter(d for c in pop.enforced for d in c.out.enforcing)
    aud_by: Counter[str] = Counter(d for c in pop.audited for d in c.out.by_detector)
    rows = sum(c.oracle.rows for c in ben)
    lines += [
        "",
        f"Benign population: {len(ben)} clients, {rows} rows in "
        f"{sum(c.oracle.requests for c in ben)} requests over "
        f"{max((c.session.times[-1] for c in ben), default=0):.0f} s (simulated); "
        f"**{len(pop.enforced)} enforced ({_pct(len(pop.enforced) / len(ben))})**"
        + (f" by {', '.join(f'{k} {n}' for k, n in enf_by.most_common())}" if enf_by else "")
        + f"; **{len(pop.audited)} with an audit line ({_pct(len(pop.audited) / len(ben))})**"
        + (
            f" (detectors: {', '.join(f'{k} {n}' for k, n in aud_by.most_common())})"
            if aud_by
            else ""
        )
        + ".",
        *_examples(pop.enforced),
        "",
        "| client | rows (requests) | enforced | first enforcing row (detectors) | audit lines | "
        "detectors, first firing (rows) |",
        "|---|---:|---|---|---:|---|",
    ]
    hard_rows = [
        *pop.hard.values(),
    ]
    for c in hard_rows:
        lines.append(_client_row(c.session.kind.replace("_", " "), [c]))
    for m in res.monitors:
        label = "monitor, 20 keys" + (", exempt" if m.exempt else "")
        if m.unsupported:
            lines.append(f"| {label} | — | not run: this guard rejects `exempt:` | — | — | — |")
        else:
            lines.append(_client_row(label, m.clients))
    lines.append(_client_row("framer (throwaway key)", [res.framing.framer]))
    lines.append(_client_row("framed victim", [res.framing.victim]))
    fv = res.framing.victim.out
    lines += [
        "",
        "- framing: "
        + (
            f"**the victim was enforced against** after {fv.first_enforced} rows "
            f"({', '.join(fv.enforcing)}; {'; '.join(fv.reasons)})"
            if fv.enforced
            else "the victim was never degraded or blocked"
            + (f" (audited: {_detectors(fv)})" if fv.audited else "")
        )
        + f"; the framer: {_fate(res.framing.framer.out)}",
        "",
    ]
    return lines


def _examples(enforced: Sequence[ClientResult]) -> list[str]:
    """One reason per enforcing detector, as the audit log gave it, and the rows it took."""
    seen: dict[str, str] = {}
    for c in enforced:
        for reason in c.out.reasons:
            name = reason.split(":", 1)[0]
            if name not in seen:
                seen[name] = f"{reason} (client's row {c.out.first_enforced})"
    if not seen:
        return []
    rows = sorted(c.out.first_enforced or 0 for c in enforced)
    return [
        "",
        f"Benign clients enforced after {rows[0]} to {rows[-1]} rows (median "
        f"{statistics.median(rows):.0f}); a first enforcing reason per detector: "
        + "; ".join(f"`{r}`" for r in seen.values()),
    ]


def _p_low(cfg: dict[str, Any]) -> float:
    """``boundary``'s ``p_low`` in the config (its default, 0.6, when not set)."""
    for p in cfg["policies"]:
        for d in p.get("detectors", []):
            if d["type"] == "boundary":
                return float((d.get("params") or {}).get("p_low", 0.6))
    return 0.6


def _client_row(label: str, clients: Sequence[ClientResult]) -> str:
    rows = sum(c.oracle.rows for c in clients)
    reqs = sum(c.oracle.requests for c in clients)
    enforced = [c for c in clients if c.out.enforced]
    audited = sum(c.out.lines for c in clients)
    if len(clients) > 1:
        bold = "**" if enforced else ""
        enf = f"{bold}{len(enforced)}/{len(clients)} keys{bold}"
    else:
        enf = "**yes**" if enforced else "no"
    first = (
        "; ".join(f"{c.out.first_enforced} ({', '.join(c.out.enforcing)})" for c in enforced[:3])
        + (" …" if len(enforced) > 3 else "")
        if enforced
        else "—"
    )
    by: dict[str, int] = {}
    for c in clients:
        for k, v in c.out.by_detector.items():
            by[k] = min(by.get(k, v), v)
    dets = ", ".join(f"{k} {v}" for k, v in sorted(by.items(), key=lambda x: x[1])) or "—"
    return f"| {label} | {rows} ({reqs}) | {enf} | {first} | {audited} | {dets} |"


def _median(values: Sequence[int | None]) -> float | None:
    """Median with ``None`` (never) sorting after every number."""
    if not values:
        return None
    ordered = sorted(values, key=lambda x: math.inf if x is None else x)
    n = len(ordered)
    if n % 2:
        mid = ordered[n // 2]
        return None if mid is None else float(mid)
    a, b = ordered[n // 2 - 1], ordered[n // 2]
    return None if a is None or b is None else (a + b) / 2


def _fmt_med(v: float | None) -> str:
    return "never" if v is None else f"{v:.0f} rows"


def _met(ok: bool) -> str:
    return "met" if ok else "**NOT met**"


def targets(results: Sequence[Result], quotas: dict[str, Any]) -> list[str]:
    """The issue's targets, aggregated over every deployment."""
    out: list[str] = []
    scs = [(r.dep.name, sc) for r in results for sc in r.attacks]
    judged = [(n, sc) for n, sc in scs if sc.flaggable and sc.out is not None]
    missed = [(n, sc) for n, sc in judged if sc.out is not None and not sc.out.enforced]
    out.append(
        f"- every attack enforced against (closed-world natural Knockoff aside): "
        f"{_met(not missed)} ({len(judged) - len(missed)} of {len(judged)})"
        + (": missed " + "; ".join(f"{n} {sc.name}" for n, sc in missed) if missed else "")
    )
    ev = [(n, sc) for n, sc in scs if sc.kind == "evasion" and sc.guard is not None]
    over = [(n, sc) for n, sc in ev if sc.guard is not None and sc.guard.result.success_rate > 0.10]
    worst = max((sc.guard.result.success_rate for _, sc in ev if sc.guard), default=0.0)
    out.append(
        f"- evasion success with the guard ≤ 10 %: {_met(not over)} (worst {_pct(worst)}"
        + (
            "; over: "
            + "; ".join(
                f"{n} {sc.name} {_pct(sc.guard.result.success_rate)}" for n, sc in over if sc.guard
            )
            if over
            else ""
        )
        + ")"
    )
    for fam, label, limit in (
        ("hopskipjump", "HopSkipJump", 50),
        ("boundary", "Boundary", 50),
        ("signopt", "SignOPT", 50),
        ("extraction", "extraction attacks (closed-world Knockoff aside)", 100),
    ):
        vals = [
            sc.out.first_enforced
            for _, sc in scs
            if sc.family == fam and sc.flaggable and sc.out is not None and sc.keys == 1
        ]
        med = _median(vals)
        out.append(
            f"- median rows to first enforcement, {label} ≤ {limit}: "
            f"{_met(med is not None and med <= limit)} ({_fmt_med(med)} over {len(vals)} runs; "
            f"per run: {', '.join(_rows(x) if x is not None else 'never' for x in vals)})"
        )
    for n, sc in scs:
        if sc.family == "sybil" and sc.out is not None and sc.guard is not None:
            out.append(
                f"- {n} {sc.name}: first enforcement after {_rows(sc.out.first_enforced)} rows; "
                f"{sc.out.keys_enforced}/{sc.keys} keys enforced, {sc.out.keys_quarantined} "
                f"quarantined; success with the guard {_pct(sc.guard.result.success_rate)}"
            )
    pops = [r.population for r in results]
    n_ben = sum(len(p.benign) for p in pops)
    n_enf = sum(len(p.enforced) for p in pops)
    n_aud = sum(len(p.audited) for p in pops)
    per = "; ".join(
        f"{r.dep.name} {len(r.population.enforced)}/{len(r.population.audited)}" for r in results
    )
    out.append(
        f"- benign clients enforced against ≤ 0.5 %: {_met(n_enf / n_ben <= 0.005)} "
        f"({n_enf} of {n_ben}, {_pct(n_enf / n_ben)})"
    )
    out.append(
        f"- benign clients with any audit line ≤ 5 %: {_met(n_aud / n_ben <= 0.05)} "
        f"({n_aud} of {n_ben}, {_pct(n_aud / n_ben)}; enforced/audited per deployment: {per})"
    )
    bad = [
        f"{r.dep.name} {k} ({_fate(c.out)})"
        for r in results
        for k, c in r.population.hard.items()
        if k != "what_if" and c.out.enforced
    ]
    out.append(
        "- health probe, retrier, batch job, one-class client never degraded or blocked: "
        f"{_met(not bad)}" + (": " + "; ".join(bad) if bad else "")
    )
    wi = [f"{r.dep.name} {_fate(r.population.hard['what_if'].out)}" for r in results]
    out.append(f"- what-if sweep (allowed to be flagged): {'; '.join(wi)}")
    plain = [f"{r.dep.name} {r.monitors[0].enforced}/20" for r in results]
    out.append(f"- looping monitor, plain (keys enforced): {'; '.join(plain)}")
    if any(r.monitors[1].unsupported for r in results):
        out.append(
            "- looping monitor with its keys in `exempt:`: **NOT measured**: this guard "
            "rejects the `exempt:` key (not implemented yet)"
        )
    else:
        ex = [r for r in results if r.monitors[1].enforced]
        out.append(
            f"- looping monitor with its keys in `exempt:` never enforced: {_met(not ex)} ("
            + "; ".join(f"{r.dep.name} {r.monitors[1].enforced}/20" for r in results)
            + ")"
        )
    framed = [r for r in results if r.framing.victim.out.enforced]
    out.append(
        f"- framed client never degraded or blocked: {_met(not framed)}"
        + (
            ": " + "; ".join(f"{r.dep.name} ({_fate(r.framing.victim.out)})" for r in framed)
            if framed
            else ""
        )
    )
    interim_deps = [r.dep.name for r in results if r.dep.interim]
    if interim_deps:
        out.append(
            "- **the recipe is not pure yet**: "
            + ", ".join(interim_deps)
            + " ran with hand-filled data-dependent parameters (see each deployment)"
        )
    out += ["", "Closed-world natural Knockoff (not flaggable: benign clients send the same rows):"]
    for r in results:
        out.append(_closed_world(r, quotas))
    return out


def _closed_world(r: Result, quotas: dict[str, Any]) -> str:
    sc = next(s for s in r.attacks if not s.flaggable)
    assert sc.bare is not None and sc.guard is not None and sc.out is not None
    pop = r.population
    sent = sc.bare.oracle.rows
    distinct = [
        len(set(benign.sent_rows(p, c.oracle))) for p, c in zip(pop.plans, pop.benign, strict=True)
    ]
    as_many = sum(n >= sent for n in distinct)
    seen = (
        f"enforced in this run after {sc.out.first_enforced} rows"
        if sc.out.enforced
        else "not enforced in this run"
    )
    line = (
        f"- {r.dep.name}: {sent} queries ({seen}); the substitute agrees with the model on "
        f"{_pct(sc.bare.result.agreement)} bare, {_pct(sc.guard.result.agreement)} guarded "
        f"(answers rounded to {quotas['decimals']} decimals: labels are what it learns from, "
        "rounding leaves them); "
        f"{as_many} of {len(distinct)} benign clients sent as many distinct rows"
    )
    lrn = pop.learner
    if lrn is not None:
        line += (
            f"; the benign client with the most distinct rows ({lrn.distinct}) could fit a "
            f"substitute agreeing on {_pct(lrn.agreement)} from its own answers"
        )
    if quotas.get("per_day"):
        line += (
            f"; the demo's row quota ({quotas['per_day']} rows a day per key) lets one key "
            f"ask {quotas['per_day'] // max(sent, 1)} times this set a day"
        )
    return line + "."


def quotas() -> dict[str, Any]:
    """The demo's output rounding and daily row quota (from guard/demo.yaml)."""
    doc = demo_policy()
    policy = doc["policies"][0]
    per_day = None
    for d in policy.get("detectors", []):
        if d["type"] == "rate":
            for lim in (d.get("params") or {}).get("limits", []):
                if lim.get("per") == "1d" and "limit" in lim:
                    per_day = int(lim["limit"])
    return {"decimals": policy.get("degrade", {}).get("decimals"), "per_day": per_day}


def report(args: argparse.Namespace, results: Sequence[Result], seconds: float) -> str:
    cmd = "python benchmarks/attacks/run.py" + (" --quick" if args.quick else "")
    if args.only:
        cmd += " --only " + " ".join(args.only)
    q = quotas()
    policy = recipe("DIR")["policies"][0]
    dets = ", ".join(f"`{d['type']}` ({d['action']})" for d in policy["detectors"])
    lines = [
        "## Attacks, benign clients and hard cases on six deployments (issue 10)",
        "",
        f"- command: `{cmd}`",
        f"- machine: {machine()}; numpy {np.__version__}",
        f"- date: {today()}; took {seconds:.0f} s; seed {args.seed}",
        "- deployments: " + ", ".join(r.dep.name for r in results) + " (scikit-learn's bundled "
        "digits, wine and breast_cancer; StandardScaler + LogisticRegression, StandardScaler + "
        "MLP(64)); seeded stratified 70/30 split; held-out rows halved into the attacker's "
        "pool and the eval rows stolen models are scored on; benign clients replay held-out "
        "rows",
        "- config recipe, the same for every deployment: `guard/demo.yaml` minus its rate "
        f"limit ({dets}; output `degrade: {policy['degrade']}`), then `guard calibrate --data "
        f"REF.npz --out DIR --config CONFIG --target-fpr {TARGET_FPR}` on the training split "
        "(`X` and the model's `proba`); GUARD_HASH_KEY and GUARD_FINGERPRINT_SALT set",
        "- every client talks OIP v2 JSON with its own `x-api-key` to the real ASGI app "
        "(guard middleware + model app), in-process, on a simulated clock (attackers send "
        f"a request every {ATTACK_TICK} s); a fresh guard per attack scenario, per benign "
        "population (the hard cases run inside it, beside the benign clients), per monitor "
        "run and for the framing test",
        "- *enforced*: an answer degraded, throttled or blocked (audit `enforced`, or 403/429 "
        "seen by the client); *audit line*: any audit line for the client; rows to first "
        "enforcement count the client's rows up to and including its first enforcing request",
        "- attack parameters are relative to each data set's scale: the box is the training "
        "rows' per-feature [min, max]; JbDA steps are fractions of each feature's span; "
        "evasion clients work in the unit box `(x - min) / span` and distances are L2 there. "
        f"Evasion success: misclassified within {evasion.MAX_RATIO:g}x the smallest known "
        "label-changing distance (exact for linear models; for MLPs the smallest of a line "
        "search towards every differently-labelled data row and every bare attack's result)",
        "- benign population: ~200 clients per deployment (100 with --quick), 3 to 40 requests "
        "of 1 to 32 rows, 1 to 40 requests/s, 10 % of rows resent, starts spread over 60 s. "
        "Hard cases (one key each): health probe (same row every 0.3 s, 150 requests); "
        "retrier (60 rows, each sent 3 times in a row); batch job (4 x 64 rows, in order); "
        "one-class client (~200 rows of one predicted class); what-if sweep (one row, "
        "features swept one at a time in 8 steps, ≤ 200 rows); looping monitor (one row "
        "+-1 % noise, 20 keys x 10 requests), plain and with its keys in `exempt:`; framing "
        "(a throwaway key sends 20 noisy copies of a row in one request, then the victim "
        "sends that row and an ordinary session)",
        "",
        "### Against the targets",
        "",
        *targets(results, q),
        "",
    ]
    for r in results:
        lines += deployment_report(r)
    lines += ["Plot: `benchmarks/attacks/attacks.png`."]
    return "\n".join(lines)


# --------------------------------------------------------------------------- plot


def plot(results: Sequence[Result]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [sc.name for sc in results[0].attacks if sc.flaggable and sc.keys == 1]
    names = [n for n in names if all(any(s.name == n for s in r.attacks) for r in results)]
    fig, ax = plt.subplots(figsize=(13, 5))
    width = 0.8 / len(results)
    x = np.arange(len(names))
    cap = 0
    for r in results:
        for sc in r.attacks:
            if sc.guard is not None:
                cap = max(cap, sc.guard.oracle.rows)
    never = 1.5 * max(cap, 100)
    for i, r in enumerate(results):
        vals = []
        for n in names:
            sc = next(s for s in r.attacks if s.name == n)
            vals.append(sc.out.first_enforced if sc.out and sc.out.enforced else None)
        heights = [never if v is None else v for v in vals]
        bars = ax.bar(x - 0.4 + (i + 0.5) * width, heights, width, label=r.dep.name)
        for bar, v in zip(bars, vals, strict=True):
            if v is None:
                bar.set_hatch("//")
                bar.set_alpha(0.35)
    ax.axhline(100, ls="--", color="grey", lw=1, label="target, extraction (100)")
    ax.axhline(50, ls=":", color="grey", lw=1, label="target, evasion (50)")
    ax.set_yscale("log")
    ax.set_xticks(x, [n.replace(", ", "\n") for n in names], fontsize=8)
    ax.set_ylabel("rows until first enforcement (log; hatched: never)")
    ax.set_title("Rows each attacker sent before the guard first enforced, per deployment")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(PLOT, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- main


#: --quick runs one deployment per data set, both model families among them
QUICK = ("digits-linear", "wine-mlp", "breast_cancer-linear")


def deployments(only: Sequence[str] | None, seed: int, quick: bool = False) -> list[Victim]:
    names = [f"{d}-{f}" for d in DATASETS for f in FAMILIES]
    if quick and not only:
        only = QUICK
    if only:
        unknown = set(only) - set(names)
        if unknown:
            raise SystemExit(f"unknown deployments {sorted(unknown)}; choose from {names}")
        names = [n for n in names if n in only]
    return [victim(*n.rsplit("-", 1), seed) for n in names]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"three deployments ({', '.join(QUICK)}), fewer inputs, rows and clients",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", nargs="+", metavar="NAME", help="deployments to run")
    parser.add_argument("--no-write", action="store_true", help="print, leave RESULTS.md alone")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    np.seterr(all="ignore")
    os.environ.update(ENV)
    started = time.time()
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="bench-attacks-") as tmp:
        for v in deployments(args.only, args.seed, args.quick):
            results.append(run_deployment(v, Path(tmp), args.quick, args.seed))
    text = report(args, results, time.time() - started)
    print(text)
    if not args.no_write:
        plot(results)
        write_section("attacks", text)


_CROSS = re.compile(r"(\d+) of them other clients' rows")

if __name__ == "__main__":
    main()
