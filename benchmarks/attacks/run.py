"""Extraction and query-attack clients against the bare and the guarded digits demo.

Run: ``python benchmarks/attacks/run.py [--quick]``

Every client talks to a real uvicorn server over HTTP (OIP v2 JSON, its own
``x-api-key``). Servers:

* ``bare``: the model app alone (one server for every attack: it keeps no state);
* ``guarded``: the protective policy below (:func:`protective_config`), a
  **fresh server per scenario** so that no detector state (PRADA sets, the
  global near-duplicate index, boundary windows, quarantines) carries over
  from one attack, or from the benign population, to the next;
* ``decimals N``: no detectors, every answer rounded (``degrade: {always: true,
  decimals: N}``), for the equation-solving precision trade-off.

Scenarios: JbDA, Knockoff (uniform; natural rows of the victim's own
distribution, a closed-world attacker; natural photo patches, the paper's open
world), equation solving, HopSkipJump, Boundary (ART), HopSkipJump spread over
10 API keys round-robin (Sybil), and a benign population of 200+ clients
replaying natural held-out rows.

The closed-world natural Knockoff cannot be flagged without flagging benign
clients: its queries are distinct held-out rows that benign clients send too.
The report says so with figures from the same run's benign population (how
many benign clients sent as many distinct rows, and what the largest of them
could learn from its own answers), computed from their request logs.

When a client was flagged comes from the guard's audit log (``audit.path``, a
temp file): every line carries the ``request_id`` the client also got in
``x-request-id``, and the keyed client hash, computed here with the same
secret (``GUARD_HASH_KEY``) as ``HMAC-SHA256(secret, b"key:" + api_key)[:32]``.
"Rows until first flag" is the client's rows sent up to and including the
request whose audit line first shows a non-allow decision; "rows until
quarantine" the same for the first line with ``quarantined: true``.

Results go to benchmarks/RESULTS.md (section ``attacks``) and the plot to
benchmarks/attacks/attacks.png.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import hmac
import json
import math
import re
import statistics
import sys
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))

import numpy as np
from numpy.typing import NDArray

from benchmarks._harness import machine, serve, today, write_section
from benchmarks.attacks import benign, evasion, extraction
from benchmarks.attacks._data import digits
from benchmarks.attacks._http import Oracle, Sent

HERE = Path(__file__).resolve().parent
PLOT = HERE / "attacks.png"
HASH_SECRET = "bench-attacks-client-hash-secret-0001"
FINGERPRINT_SALT = "bench-attacks-fingerprint-salt-0001"
ENV = {"GUARD_HASH_KEY": HASH_SECRET, "GUARD_FINGERPRINT_SALT": FINGERPRINT_SALT}
ROUTES = ["/v2/models/*/infer", "/v2/models/*/versions/*/infer", "/v1/models/*:predict"]

#: the demo policy (guard/demo.yaml), calibrated once per run, without its rate limit
#: so that every attack runs to completion and what is measured is the detectors
_DEMO: dict[str, Any] = {}


def _demo_policy() -> dict[str, Any]:
    if not _DEMO:
        from middleware.demo import demo_config

        calib = tempfile.mkdtemp(prefix="bench-attacks-calibration-")
        _DEMO.update(demo_config(calib))
    return _DEMO


def _policy() -> dict[str, Any]:
    policy: dict[str, Any] = _demo_policy()["policies"][0]
    return policy


def _escalations() -> dict[str, float]:
    return {
        d["type"]: d["escalate"][0]["score_below"]
        for d in _policy()["detectors"]
        if d.get("escalate")
    }


def protective_config(audit: str, without: Sequence[str] = ()) -> dict[str, Any]:
    """The guard under test: the demo policy (anomaly and extraction detectors, degrade,
    then quarantine), minus its rate limit.

    ``without`` leaves detector types out (a diagnostic for the benign population).
    """
    demo = _demo_policy()
    policy = dict(_policy())
    policy["routes"] = ROUTES
    policy["detectors"] = [
        d for d in policy["detectors"] if d["type"] != "rate" and d["type"] not in without
    ]
    return {
        "audit": {"path": audit},
        "calibration_dir": demo["calibration_dir"],
        "limits": demo.get("limits", {}),
        "policies": [policy],
    }


def decimals_config(audit: str, decimals: int | None) -> dict[str, Any]:
    """No detectors; every answer rounded to ``decimals`` (None: full float32 precision)."""
    return {
        "audit": {"path": audit},
        "policies": [
            {
                "name": "inference",
                "routes": ROUTES,
                "degrade": {"always": True, "decimals": decimals},
            }
        ],
    }


def client_hash(api_key: str) -> str:
    """The guard's client id for an API key (guard/identity.py ``hash("key", ...)``)."""
    mac = hmac.new(HASH_SECRET.encode(), b"key:" + api_key.encode(), hashlib.sha256)
    return mac.hexdigest()[:32]


@dataclass
class Server:
    """A guarded server: its URL, then (once it has exited) its audit lines."""

    url: str
    audit: list[dict[str, Any]] = field(default_factory=list)


@contextlib.contextmanager
def guarded(config_for: Callable[[str], dict[str, Any]]) -> Iterator[Server]:
    """A fresh guarded server; its audit log is read into ``audit`` when it exits."""
    with tempfile.TemporaryDirectory(prefix="attacks-") as tmp:
        audit = Path(tmp) / "audit.jsonl"
        cfg = Path(tmp) / "guard.json"
        cfg.write_text(json.dumps(config_for(str(audit))))
        with serve("benchmarks.apps:guarded", env={**ENV, "BENCH_CONFIG": str(cfg)}) as url:
            srv = Server(url)
            yield srv
            # the writer thread flushes whenever its queue empties; give the last lines time
            time.sleep(0.3)
        text = audit.read_text() if audit.exists() else ""
        srv.audit = [json.loads(line) for line in text.splitlines() if line.strip()]


# --------------------------------------------------------------------------- detection


@dataclass
class Detection:
    """When the guard noticed one client (or one attacker's keys)."""

    #: rows sent until the first non-allow decision, a single row flagged by a per-row
    #: input-anomaly detector included (None: never)
    first_flag: int | None = None
    #: rows sent until the first decision on the client as a whole (None: never): a
    #: per-client detector fired (ROW_DETECTORS aside), or the answer was degraded,
    #: throttled or blocked. Attacks and benign clients are judged on this
    first_detection: int | None = None
    #: rows sent until the first quarantine (None: never)
    quarantine: int | None = None
    #: per detector, rows sent until it first fired
    by_detector: dict[str, int] = field(default_factory=dict)
    #: keys (of the attacker's) that were ever flagged
    keys_flagged: int = 0
    #: keys that were quarantined
    keys_quarantined: int = 0
    #: rows sent until the last of the client's keys was quarantined (None: some never were)
    all_quarantined: int | None = None

    @property
    def flagged(self) -> bool:
        """Detected as a client (see ``first_detection``), the targets' sense of flagged."""
        return self.first_detection is not None


#: the per-row input-anomaly detectors: each judges one row at a calibrated per-row
#: false-positive rate (about 1 %), so one of them firing on one row says nothing about
#: the client; their per-client aggregate is ``anomaly_rate``
ROW_DETECTORS = frozenset({"envelope", "mahalanobis", "iforest", "knn", "text"})


def _client_level(line: dict[str, Any]) -> bool:
    """An audit line that is a decision on the client, not one odd row."""
    if line.get("enforced") in ("degrade", "throttle", "block") or line.get("quarantined"):
        return True
    if line.get("decision") in ("degrade", "throttle", "block"):
        return True  # shadow mode: what would have been enforced
    return any(name not in ROW_DETECTORS for name in line.get("fired", []))


def detection(log: Sequence[Sent], lines: Sequence[dict[str, Any]]) -> Detection:
    """Match a client's request log with the audit log (by request id and client hash)."""
    rows_at = {s.request_id: s.cum_rows for s in log}
    hashes = {client_hash(k) for k in {s.key for s in log}}
    det = Detection()
    flagged_keys: set[str] = set()
    quarantined: dict[str, int] = {}
    for line in lines:
        if line.get("client") not in hashes or line.get("decision") in ("allow", "invalid"):
            continue
        rows = rows_at.get(line.get("request_id", ""))
        if rows is None:
            continue
        det.first_flag = rows if det.first_flag is None else min(det.first_flag, rows)
        if _client_level(line):
            flagged_keys.add(line["client"])
            det.first_detection = (
                rows if det.first_detection is None else min(det.first_detection, rows)
            )
        if line.get("quarantined"):
            det.quarantine = rows if det.quarantine is None else min(det.quarantine, rows)
            quarantined[line["client"]] = min(quarantined.get(line["client"], rows), rows)
        for name in line.get("fired", []):
            det.by_detector[name] = min(det.by_detector.get(name, rows), rows)
    det.keys_flagged = len(flagged_keys)
    det.keys_quarantined = len(quarantined)
    if quarantined and len(quarantined) == len(hashes):
        det.all_quarantined = max(quarantined.values())
    return det


# --------------------------------------------------------------------------- scenarios


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
    det: Detection | None = None
    keys: int = 1
    #: label for the plot
    short: str = ""
    #: False: its traffic is what benign clients send too, so the "every attack
    #: flagged" target leaves it out and the report backs that with figures
    flaggable: bool = True


def _run(url: str, keys: Sequence[str], attack: Callable[[Oracle], Any]) -> Run:
    # with several keys the attacker rotates away from a quarantined one
    oracle = Oracle(
        url, list(keys), drop_blocked=len(keys) > 1, reference=digits().model.predict_proba
    )
    t0 = time.perf_counter()
    try:
        result = attack(oracle)
    finally:
        oracle.close()
    return Run(oracle, result, time.perf_counter() - t0)


def scenarios(quick: bool, seed: int) -> list[tuple[Scenario, Callable[[Oracle], Any]]]:
    n_inputs = 3 if quick else 10
    ku_rows = 500 if quick else 1000
    hsj = dict(n_inputs=n_inputs, seed=seed)
    return [
        (
            Scenario(
                "JbDA (Papernot), lambda 1.6",
                "extraction",
                "10 seed rows, lambda 1.6 (the paper's 0.1 of the range), 6 rounds, 640 rows",
                short="JbDA\nλ 1.6",
            ),
            lambda o: extraction.jbda(o, rows=640, seed=seed, n_seed=10, lam=1.6),
        ),
        (
            Scenario(
                "JbDA (Papernot), lambda 4",
                "extraction",
                "20 seed rows, lambda 4 (best substitute), 5 rounds, 640 rows",
                short="JbDA\nλ 4",
            ),
            lambda o: extraction.jbda(o, rows=640, seed=seed, n_seed=20, lam=4.0),
        ),
        (
            Scenario(
                "Knockoff, uniform",
                "extraction",
                f"{ku_rows} uniform rows in [0,16]^64",
                short="Knockoff\nuniform",
            ),
            lambda o: extraction.knockoff_uniform(o, rows=ku_rows, seed=seed),
        ),
        (
            Scenario(
                "Knockoff, natural (victim's own distribution)",
                "extraction",
                "180 unseen natural rows: the attacker's half of the held-out digits "
                "(closed world)",
                short="Knockoff\nown data",
                flaggable=False,
            ),
            lambda o: extraction.knockoff_natural(o, rows=180, seed=seed),
        ),
        (
            Scenario(
                "Knockoff, natural (open world: photo patches)",
                "extraction",
                f"{ku_rows} 8x8 patches of scikit-learn's 2 sample photos: random 16-128 px "
                "square crops, grayscale, area-averaged, inverted, stretched to 0..16 "
                "(median to 0), rounded",
                short="Knockoff\nphotos",
            ),
            lambda o: extraction.knockoff_open_world(o, rows=ku_rows, seed=seed),
        ),
        (
            Scenario(
                "Equation solving (Tramer)",
                "extraction",
                "130 = 2(d+1) uniform rows",
                short="Equation\nsolving",
            ),
            lambda o: extraction.equation_solving(o, rows=130, seed=seed),
        ),
        (
            Scenario(
                "HopSkipJump (ART)",
                "evasion",
                f"{n_inputs} inputs; max_iter 40, init_eval 10, max_eval 100",
                short="HopSkipJump",
            ),
            lambda o: evasion.hopskipjump(o, **hsj),
        ),
        (
            Scenario(
                "Boundary (ART)",
                "evasion",
                f"{n_inputs} inputs; max_iter 60, num_trial 10, sample_size 20",
                short="Boundary",
            ),
            lambda o: evasion.boundary(o, **hsj),
        ),
        (
            Scenario(
                "HopSkipJump, 10 keys round-robin",
                "evasion",
                f"{n_inputs} inputs, as above; one key per request in turn, a key answered "
                "403 is dropped and the request resent with the next",
                short="HopSkipJump\n10 keys",
                keys=10,
            ),
            lambda o: evasion.hopskipjump(o, **hsj),
        ),
    ]


def attacker_keys(i: int, n: int) -> list[str]:
    return [f"attacker-{i}-{k}" for k in range(n)]


def run_attacks(quick: bool, seed: int) -> list[Scenario]:
    todo = scenarios(quick, seed)
    with serve("benchmarks.apps:bare") as url:
        for i, (sc, attack) in enumerate(todo):
            sc.bare = _run(url, attacker_keys(i, sc.keys), attack)
            print(f"  bare     {sc.name}: {_summary(sc.bare)}", flush=True)
    for i, (sc, attack) in enumerate(todo):
        with guarded(protective_config) as srv:
            sc.guard = _run(srv.url, attacker_keys(i, sc.keys), attack)
        sc.det = detection(sc.guard.oracle.log, srv.audit)
        print(f"  guarded  {sc.name}: {_summary(sc.guard)}; {sc.det}", flush=True)
    return [sc for sc, _ in todo]


def _summary(run: Run) -> str:
    r = run.result
    if isinstance(r, extraction.ExtractionResult):
        what = f"agreement {r.agreement:.3f}"
    else:
        what = f"success {r.success_rate:.2f}, median L2 {r.median_l2:.2f}"
    return f"{what}, {run.oracle.rows} rows, {run.seconds:.1f} s"


# --------------------------------------------------------------------------- benign


@dataclass(frozen=True)
class BenignLearner:
    """A substitute fitted on one benign client's answers, as a Knockoff attacker fits its own.

    One row per distinct input (its first answer), like the attacker's transfer
    set, and only rows outside the eval half (on which it is scored), i.e. rows
    of the attacker's half. The client also holds the answers for the eval rows
    it sent, so this understates what it learnt.
    """

    #: distinct rows the client got answers for
    distinct: int
    #: distinct answered rows outside the eval half: the substitute's data
    trained: int
    #: the substitute's agreement with the real model on the eval half
    agreement: float


@dataclass
class BenignOutcome:
    policy: str
    clients: int
    rows: int
    requests: int
    flagged: int
    degraded_clients: int
    blocked_clients: int
    by_detector: Counter[str]
    tested_prada: int
    #: rows the plans would send if nobody were blocked
    planned_rows: int
    seconds: float
    flagged_rows: list[int]
    coarse_answers: int
    perturbed_answers: int
    #: flagged clients whose first near-duplicate flag matched other clients' rows
    cross_client: int
    #: clients whose answers were degraded or who were blocked: what the target counts
    #: (a ``flag`` alone passes the request unchanged: one odd row flagged by an
    #: input-anomaly detector at its calibrated per-row FPR)
    sanctioned: int = 0
    #: clients detected as clients (Detection.flagged): what the target counts, in the
    #: same sense as for the attacks
    detected: int = 0
    #: per client, distinct held-out rows it sent
    distinct_rows: list[int] = field(default_factory=list)
    #: what the client with the most distinct answered rows could learn from its answers
    learner: BenignLearner | None = None


def benign_learner(
    plans: Sequence[benign.BenignPlan], oracles: Sequence[Oracle]
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
    data = digits()
    keep = ~np.isin(idx, data.eval_index)
    rows, first = np.unique(idx[keep], return_index=True)
    return BenignLearner(
        distinct=n,
        trained=int(rows.shape[0]),
        agreement=extraction.substitute_agreement(data.benign[rows], labels[keep][first]),
    )


def run_benign(quick: bool, seed: int, without: Sequence[str] = ()) -> BenignOutcome:
    plans = benign.plan(200 if quick else 240, seed=seed)
    scale = 0.25 if quick else 1.0
    t0 = time.perf_counter()
    with guarded(lambda audit: protective_config(audit, without)) as srv:
        oracles = benign.run_population(srv.url, plans, time_scale=scale)
    seconds = time.perf_counter() - t0
    lines = srv.audit
    by_client: dict[str, list[dict[str, Any]]] = {}
    for line in lines:
        by_client.setdefault(line.get("client", ""), []).append(line)
    flagged = degraded = blocked = sanctioned = detected = 0
    by_detector: Counter[str] = Counter()
    flagged_rows: list[int] = []
    cross = 0
    for p, o in zip(plans, oracles, strict=True):
        mine = [x for x in by_client.get(client_hash(p.key), []) if x["decision"] != "invalid"]
        if mine:
            flagged += 1
            cross += _cross_client(mine)
            det = detection(o.log, mine)
            if det.first_flag is not None:
                flagged_rows.append(det.first_flag)
            detected += det.flagged
            by_detector.update({n for x in mine for n in x.get("fired", [])})
        degraded += any(x["enforced"] == "degrade" for x in mine)
        was_blocked = any(x["enforced"] == "block" for x in mine) or o.statuses.get(403, 0) > 0
        was_degraded = any(x["enforced"] == "degrade" for x in mine)
        blocked += was_blocked
        sanctioned += was_blocked or was_degraded
    return BenignOutcome(
        policy="protective" + (f", without {', '.join(without)}" if without else ""),
        clients=len(plans),
        rows=sum(o.rows for o in oracles),
        requests=sum(o.requests for o in oracles),
        flagged=flagged,
        degraded_clients=degraded,
        blocked_clients=blocked,
        by_detector=by_detector,
        tested_prada=sum(p.n_rows > 110 for p in plans),
        planned_rows=sum(p.n_rows for p in plans),
        seconds=seconds,
        flagged_rows=flagged_rows,
        coarse_answers=sum(o.coarse for o in oracles),
        perturbed_answers=sum(o.perturbed for o in oracles),
        cross_client=cross,
        sanctioned=sanctioned,
        detected=detected,
        distinct_rows=[
            len(set(benign.sent_rows(p, o))) for p, o in zip(plans, oracles, strict=True)
        ],
        learner=benign_learner(plans, oracles),
    )


_CROSS = re.compile(r"(\d+) of them other clients' rows")


def _cross_client(lines: Sequence[dict[str, Any]]) -> bool:
    """The client's first near-duplicate flag came with matches to other clients' rows."""
    for line in lines:
        for d in line.get("detectors", []):
            if d.get("anomalous") and (m := _CROSS.search(d.get("reason", ""))):
                return int(m.group(1)) > 0
    return False


# --------------------------------------------------------------------------- precision


DECIMALS: tuple[int | None, ...] = (None, 4, 3, 2, 1)


Precision = dict[int | None, dict[int, extraction.ExtractionResult]]


def run_precision(seed: int, budgets: Sequence[int]) -> Precision:
    out: Precision = {}
    for dec in DECIMALS:
        out[dec] = {}
        with guarded(lambda audit, dec=dec: decimals_config(audit, dec)) as srv:
            for rows in budgets:
                run = _run(
                    srv.url,
                    [f"tramer-{dec}-{rows}"],
                    lambda o, rows=rows: extraction.equation_solving(o, rows=rows, seed=seed),
                )
                out[dec][rows] = run.result
        cells = {r: (round(x.agreement, 3), x.param_error) for r, x in out[dec].items()}
        print(f"  decimals {dec}: (agreement, parameter error) {cells}", flush=True)
    return out


# --------------------------------------------------------------------------- report


def _fmt_rows(v: int | None) -> str:
    return "—" if v is None else str(v)


def _pct(x: float) -> str:
    return f"{100 * x:.1f} %"


def _result_cell(r: Any) -> str:
    if isinstance(r, extraction.ExtractionResult):
        return f"agreement {r.agreement:.3f}"
    l2 = "—" if math.isnan(r.median_l2) else f"{r.median_l2:.1f}"
    return f"success {_pct(r.success_rate)}, median L2 {l2}"


def report(
    args: argparse.Namespace,
    attacks: list[Scenario],
    benigns: list[BenignOutcome],
    precision: Precision,
    budgets: Sequence[int],
    seconds: float,
) -> str:
    cmd = "python benchmarks/attacks/run.py" + (" --quick" if args.quick else "")
    lines = [
        "## Extraction and query-attack clients (issue 5)",
        "",
        f"- command: `{cmd}`",
        f"- machine: {machine()}; numpy {np.__version__}",
        f"- date: {today()}; took {seconds:.0f} s; seed {args.seed}",
        "- victim: the demo digits model (multinomial logistic regression, 64 pixels in 0..16, "
        "10 classes) over real HTTP (uvicorn, 1 worker), OIP v2 JSON, one `x-api-key` per client",
        "- data: the demo's 360 held-out rows; attackers draw natural rows from one half "
        "(180), stolen models are scored on the other half (180, never queried); benign "
        "clients replay all 360. The open-world Knockoff attacker holds none of them: it "
        "queries 8x8 patches cut from scikit-learn's two sample photos (china.jpg, "
        "flower.jpg), seeded",
        "- guarded policy: the demo policy `guard/demo.yaml` without its rate limit: "
        "`envelope`, `mahalanobis`, `knn` (flag), `anomaly_rate`, `near_duplicate`, `prada`, "
        "`boundary` (degrade), escalating to `block` (quarantine_s "
        f"{_policy()['quarantine_s']}) below "
        + ", ".join(f"{k} {v:g}" for k, v in _escalations().items())
        + f"; output policy `degrade: {_policy()['degrade']}`: every answer rounded "
        "(the guard's default), degraded clients' answers also perturbed by the noise; "
        "GUARD_FINGERPRINT_SALT and GUARD_HASH_KEY set",
        "- each guarded scenario runs in a **fresh server** (fresh detector state and global "
        "near-duplicate index); the benign population runs in its own server too",
        "- rows: every count is in rows (a request carries 1 to 64); flags and quarantines "
        "come from the audit log, matched by request id and keyed client hash",
        "- evasion success: the returned row is misclassified by the real model and within "
        f"{evasion.MAX_RATIO:g}x the smallest L2 change that can flip that input's label "
        "(exact for the linear victim); median L2 over misclassified rows (pixel units)",
        "",
        "### Attacks, bare and guarded",
        "",
        "*Detected* means a decision on the client as a whole: a per-client detector "
        "fired (anomaly_rate, near_duplicate, prada, boundary, rate) or its answers were "
        "degraded, throttled or blocked. A single row flagged by a per-row input-anomaly "
        f"detector ({', '.join(sorted(ROW_DETECTORS))}; each at its calibrated ~1 % per-row "
        "false-positive rate) is not a detection of the client; rows until the first such "
        "row flag are given too. Benign clients below are judged the same way.",
        "",
        "| attack | parameters | detected | rows to detection | rows to first row flag | "
        "rows to quarantine | first firing by detector (rows) | bare: result (rows) | "
        "guarded: result (rows) |",
        "|---|---|---|---:|---:|---:|---|---|---|",
    ]
    for sc in attacks:
        assert sc.bare is not None and sc.guard is not None and sc.det is not None
        det = sc.det
        by = ", ".join(f"{k} {v}" for k, v in sorted(det.by_detector.items(), key=lambda x: x[1]))
        flagged = "yes" if det.flagged else "**no**"
        if sc.keys > 1:
            flagged += (
                f" ({det.keys_flagged}/{sc.keys} keys detected, {det.keys_quarantined} "
                "quarantined"
                + (f", the last after {det.all_quarantined} rows" if det.all_quarantined else "")
                + ")"
            )
        lines.append(
            f"| {sc.name} | {sc.params} | {flagged} | {_fmt_rows(det.first_detection)} | "
            f"{_fmt_rows(det.first_flag)} | "
            f"{_fmt_rows(det.quarantine)} | {by or '—'} | {_result_cell(sc.bare.result)} "
            f"({sc.bare.oracle.rows}) | {_result_cell(sc.guard.result)} "
            f"({sc.guard.oracle.rows}; {_statuses(sc.guard.oracle)}) |"
        )
    lines += [
        "",
        "Guarded result cells also give the statuses the attacker saw (requests) and how many "
        "answers were *perturbed*: further from the real model's probabilities than their "
        f"{_policy()['degrade']['decimals']}-decimal rounding explains, i.e. degraded with "
        "noise (the client cannot tell from one answer; this check needs the real model).",
        "",
        "### Benign clients",
        "",
        f"{benigns[0].clients} clients, each with its own key, replaying held-out rows in its own "
        "order: 3 to 40 requests, 1 to 32 rows per request, 1 to 40 requests/s, 10 % of rows "
        "resent; run concurrently (48 at a time) in a fresh server per row of the table. "
        f"{benigns[0].tested_prada} clients send more than 110 rows (enough for PRADA's first test "
        "and a full boundary window). The 360 held-out rows recur across clients "
        f"(the plans send {benigns[0].planned_rows} rows: each row about "
        f"{benigns[0].planned_rows / 360:.0f} times). The second row leaves `near_duplicate` out "
        "(a diagnostic: with it on, flagged clients are quarantined early and the other "
        "detectors see less of their traffic).",
        "",
        "| policy | rows (requests) | detected | degraded | blocked or quarantined | "
        "with a row flagged | flagged by detector | first near-duplicate flag matched other "
        "clients' rows | rows sent when a row was first flagged (median, min-max) | "
        "perturbed answers |",
        "|---|---:|---:|---:|---:|---:|---|---:|---|---:|",
    ]
    for b in benigns:
        fr = b.flagged_rows
        rows_cell = f"{statistics.median(fr):.0f} ({min(fr)}-{max(fr)})" if fr else "—"
        lines.append(
            f"| {b.policy} | {b.rows} ({b.requests}) | "
            f"**{b.detected} ({_pct(b.detected / b.clients)})** | {b.degraded_clients} | "
            f"{b.blocked_clients} | {b.flagged} ({_pct(b.flagged / b.clients)}) | "
            + (", ".join(f"{k} {v}" for k, v in b.by_detector.most_common()) or "—")
            + f" | {b.cross_client} | {rows_cell} | {b.perturbed_answers} |"
        )
    lines += [
        "",
        "### Equation solving vs output precision",
        "",
        "No detectors; every answer rounded by `degrade: {always: true, decimals: N}`; "
        "uniform random query rows. Agreement of the solved model with the real one on the "
        "180 eval rows, and the relative error of the recovered parameters "
        "(|theta - theta_real| / |theta_real|, both shifted so class 0 is zero):",
        "",
        "| decimals | "
        + " | ".join(f"agreement, {b} rows | parameter error, {b} rows" for b in budgets)
        + " |",
        "|---|" + "---:|---:|" * len(budgets),
    ]
    for dec, by_rows in precision.items():
        label = "full (float32)" if dec is None else str(dec)
        cells = [f"{by_rows[b].agreement:.3f} | {by_rows[b].param_error or 0:.3f}" for b in budgets]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    ben = benigns[0]
    lines += ["", "### Against the targets", ""]
    lines += targets(attacks, ben)
    lines += ["", "Plot: `benchmarks/attacks/attacks.png`."]
    return "\n".join(lines)


def _statuses(o: Oracle) -> str:
    parts = [f"{v}x {k}" for k, v in sorted(o.statuses.items())]
    return ", ".join(parts) + f"; {o.perturbed} perturbed"


def targets(attacks: list[Scenario], ben: BenignOutcome) -> list[str]:
    out: list[str] = []
    single = [sc for sc in attacks if sc.keys == 1]
    judged = [sc for sc in attacks if sc.flaggable and sc.det is not None]
    caught = [sc for sc in judged if sc.det is not None and sc.det.flagged]
    out.append(
        f"- every attack flagged: **{'met' if len(caught) == len(judged) else 'NOT met'}** "
        f"({len(caught)} of {len(judged)} detected as clients; the closed-world natural "
        "Knockoff is "
        "judged on its own line below):"
    )
    for sc in judged:
        assert sc.det is not None
        out.append(
            f"  - {sc.name}: "
            + (f"detected after {sc.det.first_detection} rows" if sc.det.flagged else "**missed**")
        )
    for sc in attacks:
        if not sc.flaggable:
            out.append(_unflaggable(sc, ben))
    ext = [sc for sc in single if sc.kind == "extraction" and sc.det is not None]
    ext_med = _median_rows([sc.det.first_detection for sc in ext if sc.det is not None])
    flaggable_med = _median_rows(
        [sc.det.first_detection for sc in ext if sc.det is not None and sc.flaggable]
    )
    out.append(
        f"- median rows until detection, extraction ≤ 100: **{_fmt_med(ext_med)}** "
        f"({'met' if ext_med is not None and ext_med <= 100 else 'NOT met'}; over the "
        f"{len(ext)} extraction attacks: "
        + "; ".join(
            f"{sc.name}: {_fmt_never(sc.det.first_detection)}" for sc in ext if sc.det is not None
        )
        + "; a missed attack counts as never; without the closed-world natural Knockoff: "
        f"{_fmt_med(flaggable_med)})"
    )
    for sc in single:
        if sc.kind != "evasion" or sc.det is None:
            continue
        v = sc.det.first_detection
        out.append(
            f"- {sc.name}, rows until detection ≤ 20: **{_fmt_rows(v)}** "
            f"({'met' if v is not None and v <= 20 else 'NOT met'})"
        )
        g = sc.guard.result if sc.guard else None
        if g is not None:
            out.append(
                f"- {sc.name} succeeds on ≤ 10 % of inputs with the guard on: "
                f"**{_pct(g.success_rate)}** ({'met' if g.success_rate <= 0.10 else 'NOT met'})"
            )
    for sc in attacks:
        if sc.keys == 1 or sc.det is None or sc.guard is None:
            continue
        g = sc.guard.result
        out.append(
            f"- {sc.name} (cross-client): first detection after "
            f"**{_fmt_rows(sc.det.first_detection)}** "
            f"rows; {sc.det.keys_flagged}/{sc.keys} keys flagged, {sc.det.keys_quarantined} "
            f"quarantined; success with the guard on {_pct(g.success_rate)}"
        )
    rate = ben.detected / ben.clients
    out.append(
        f"- benign clients flagged ≤ 0.5 %: **{_pct(rate)}** detected as clients, in the "
        f"attacks' sense ({'met' if rate <= 0.005 else 'NOT met'}; degraded "
        f"{_pct(ben.degraded_clients / ben.clients)}, blocked "
        f"{_pct(ben.blocked_clients / ben.clients)}). Clients with at least one row "
        f"flagged by a per-row input-anomaly detector (passed unchanged, audit only): "
        f"{_pct(ben.flagged / ben.clients)}, as expected of detectors calibrated to ~1 % of "
        "rows for clients sending tens to hundreds of rows"
    )
    return out


def _unflaggable(sc: Scenario, ben: BenignOutcome) -> str:
    """The closed-world natural Knockoff: why no detector can flag it, in measured figures."""
    assert sc.bare is not None and sc.guard is not None and sc.det is not None
    sent = sc.bare.oracle.rows
    as_many = sum(n >= sent for n in ben.distinct_rows)
    largest = max(ben.distinct_rows, default=0)
    seen = (
        f"detected in this run after {sc.det.first_detection} rows"
        if sc.det.flagged
        else "not flagged in this run"
    )
    line = (
        f"- {sc.name}: **not flaggable by construction** ({seen}). Its {sent} queries are "
        "distinct held-out rows of the victim's own distribution, the rows benign clients "
        f"send too: **{as_many} of {ben.clients}** benign clients sent at least {sent} "
        f"distinct rows (the most: {largest})."
    )
    lrn = ben.learner
    if lrn is not None:
        attacker = float(sc.bare.result.agreement)
        gap = lrn.agreement - attacker
        line += (
            " A substitute fitted as the Knockoff attacker fits its own, on the answers the "
            f"benign client with the most distinct answered rows ({lrn.distinct}) got for the "
            f"{lrn.trained} distinct rows it sent from the attacker's half (of "
            f"{digits().pool.shape[0]}; one answer per row, eval rows left out), "
            f"agrees with the real model on **{_pct(lrn.agreement)}** of the eval rows; the "
            f"attacker's own substitute: {_pct(attacker)} bare, "
            f"{_pct(sc.guard.result.agreement)} guarded: that benign client learnt "
            + (
                "at least as much as the attacker."
                if gap >= 0
                else f"{100 * -gap:.1f} points less than the attacker."
            )
        )
    return line


def _fmt_never(v: int | None) -> str:
    return "never" if v is None else f"{v} rows"


def _median_rows(values: Sequence[int | None]) -> float | None:
    if not values:
        return None
    # a missed attack is "never": it sorts after every number
    ordered = sorted(values, key=lambda v: math.inf if v is None else v)
    mid = ordered[len(ordered) // 2] if len(ordered) % 2 else None
    if len(ordered) % 2 == 0:
        a, b = ordered[len(ordered) // 2 - 1], ordered[len(ordered) // 2]
        return None if a is None or b is None else (a + b) / 2
    return None if mid is None else float(mid)


def _fmt_med(v: float | None) -> str:
    return "never" if v is None else f"{v:.0f} rows"


# --------------------------------------------------------------------------- plot


def plot(attacks: list[Scenario], precision: Precision, budgets: Sequence[int]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 5.2))
    names = [sc.short for sc in attacks]
    x = np.arange(len(attacks))
    rows = [sc.guard.oracle.rows for sc in attacks if sc.guard is not None]
    never = 1.5 * max([*rows, 100])
    for off, attr, label, color in (
        (-0.2, "first_detection", "detection", "tab:orange"),
        (0.2, "quarantine", "quarantine", "tab:red"),
    ):
        vals = [getattr(sc.det, attr) if sc.det else None for sc in attacks]
        heights = [never if v is None else v for v in vals]
        bars = ax1.bar(x + off, heights, 0.4, label=label, color=color)
        for bar, v in zip(bars, vals, strict=True):
            if v is None:
                bar.set_hatch("//")
                bar.set_alpha(0.35)
                ax1.text(
                    bar.get_x() + bar.get_width() / 2,
                    math.sqrt(bar.get_height() * 10),
                    "never",
                    ha="center",
                    va="center",
                    rotation=90,
                    fontsize=8,
                )
            else:
                ax1.text(
                    bar.get_x() + bar.get_width() / 2,
                    bar.get_height(),
                    str(v),
                    ha="center",
                    va="bottom",
                    fontsize=7,
                )
    ax1.axhline(100, ls="--", color="grey", lw=1, label="target, extraction (100)")
    ax1.axhline(20, ls=":", color="grey", lw=1, label="target, evasion (20)")
    ax1.set_yscale("log")
    ax1.set_xticks(x, names, fontsize=8)
    ax1.set_ylabel("rows the attacker had sent (log scale)")
    ax1.set_title("Rows until the guard detected / quarantined the attacker")
    ax1.legend(fontsize=7, loc="upper right")
    labels = ["full" if d is None else str(d) for d in precision]
    for b, color in zip(budgets, ("tab:blue", "tab:green", "tab:purple"), strict=False):
        ax2.plot(
            labels,
            [precision[d][b].agreement for d in precision],
            marker="o",
            color=color,
            label=f"agreement, {b} rows",
        )
        ax2.plot(
            labels,
            [precision[d][b].param_error or 0.0 for d in precision],
            marker="s",
            ls="--",
            color=color,
            label=f"parameter error, {b} rows",
        )
    ax2.set_ylim(0, 1.05)
    ax2.set_xlabel("decimals in every answer (degrade: always)")
    ax2.set_title("Equation solving vs output rounding (no detectors)")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(PLOT, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer inputs and clients")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    np.seterr(all="ignore")
    started = time.time()
    budgets = (130, 650)
    print("attacks:", flush=True)
    attacks = run_attacks(args.quick, args.seed)
    print("benign population:", flush=True)
    benigns = [
        run_benign(args.quick, args.seed),
        run_benign(args.quick, args.seed, ["near_duplicate"]),
    ]
    for ben in benigns:
        print(
            f"  {ben.policy}: flagged {ben.flagged} of {ben.clients}, {ben.by_detector}", flush=True
        )
    print("precision trade-off:", flush=True)
    precision = run_precision(args.seed, budgets)
    text = report(args, attacks, benigns, precision, budgets, time.time() - started)
    plot(attacks, precision, budgets)
    print(text)
    write_section("attacks", text)


if __name__ == "__main__":
    main()
