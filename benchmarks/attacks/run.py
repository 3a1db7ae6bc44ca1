"""Attacks, benign clients and hard cases against every deployment, one config recipe.

Run: ``python benchmarks/attacks/run.py [--quick] [--only NAME ...]``

``--workers N [--store redis://...]`` runs the scaling part instead
(:mod:`.workers`): JbDA, uniform Knockoff, HopSkipJump, Boundary and HopSkipJump
over 10 keys,
plus the hard-case benign clients, against 1 and N uvicorn workers sharing a
Redis store, dealt round-robin (section ``attacks-workers``; default
deployment ``digits-linear``).

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

The recipe and fresh guards are in :mod:`._recipe`, the figures' containers in
:mod:`._results`, the report and plot in :mod:`._report`. Results go to
benchmarks/RESULTS.md (section ``attacks``) and the plot to
benchmarks/attacks/attacks.png.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))

import numpy as np
from numpy.typing import NDArray

from benchmarks._harness import write_section
from benchmarks.attacks import _report, benign, evasion, extraction, hardcases
from benchmarks.attacks._asgi import InProcess
from benchmarks.attacks._data import DATASETS, FAMILIES, Victim, victim
from benchmarks.attacks._http import Oracle
from benchmarks.attacks._recipe import (
    ENV,
    Deployment,
    bare,
    exempt_supported,
    guarded,
    key_hash,
    prepare,
)
from benchmarks.attacks._results import (
    Attack,
    BenignLearner,
    ClientResult,
    Framing,
    Monitor,
    Population,
    Result,
    Run,
    Scenario,
)
from benchmarks.attacks._traffic import Session, outcome, run_sessions

# --------------------------------------------------------------------------- attacks


def scenarios(v: Victim, quick: bool, seed: int) -> list[tuple[Scenario, Attack]]:
    n_in = 3 if quick else 10
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
        print(f"    {sc.name}: {_report.summary(sc)}", flush=True)
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


# --------------------------------------------------------------------------- benign traffic


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
        + ", ".join(f"{k} {_report.fate(c.out)}" for k, c in pop.hard.items()),
        flush=True,
    )
    monitors = [run_monitor(dep, seed, exempt=False), run_monitor(dep, seed, exempt=True)]
    framing = run_framing(dep, seed)
    print(
        f"    monitor: {monitors[0].enforced}/20 keys enforced plain, "
        f"{monitors[1].enforced}/20 exempt{' (unsupported)' if monitors[1].unsupported else ''}; "
        f"framed victim {_report.fate(framing.victim.out)}",
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
    parser.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="instead: 1 vs N uvicorn workers sharing --store, requests dealt round-robin",
    )
    parser.add_argument(
        "--store",
        default="redis://127.0.0.1:6379/13",
        help="the Redis URL the workers share (with --workers; keys under a fresh prefix, "
        "deleted afterwards)",
    )
    args = parser.parse_args(argv)
    if args.workers is not None:
        _scaling(args, argv)
        return
    warnings.simplefilter("ignore")
    np.seterr(all="ignore")
    os.environ.update(ENV)
    started = time.time()
    args.revision = _report.revision()  # what the run imports, before anyone changes the tree
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="bench-attacks-") as tmp:
        for v in deployments(args.only, args.seed, args.quick):
            results.append(run_deployment(v, Path(tmp), args.quick, args.seed))
    text = _report.report(args, results, time.time() - started)
    print(text)
    if not args.no_write:
        _report.plot(results)
        write_section("attacks", text)


def _scaling(args: argparse.Namespace, argv: list[str] | None) -> None:
    from benchmarks.attacks.workers import run_workers

    if args.workers < 2:
        raise SystemExit("--workers must be at least 2 (1 worker is always measured beside it)")
    warnings.simplefilter("ignore")
    np.seterr(all="ignore")
    os.environ.update(ENV)
    words = sys.argv[1:] if argv is None else argv
    command = " ".join(["python benchmarks/attacks/run.py", *words])
    victims = deployments(args.only or ["digits-linear"], args.seed)
    text = run_workers(
        victims, workers=args.workers, store=args.store, seed=args.seed, command=command
    )
    print(text)
    if not args.no_write:
        write_section("attacks-workers", text)


if __name__ == "__main__":
    main()
