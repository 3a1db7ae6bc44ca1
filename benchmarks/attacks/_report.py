"""The attack benchmark's report: per deployment, against the targets, and the plot."""

from __future__ import annotations

import argparse
import math
import statistics
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks._harness import machine, today

from . import benign, evasion, extraction
from ._http import Oracle
from ._recipe import ATTACK_TICK, TARGET_FPR, demo_policy, recipe
from ._results import ClientResult, Result, Scenario
from ._traffic import Outcome

__all__ = [
    "PLOT",
    "deployment_report",
    "fate",
    "plot",
    "report",
    "revision",
    "summary",
    "targets",
]

PLOT = Path(__file__).resolve().parent / "attacks.png"


def _result(r: Any) -> str:
    if isinstance(r, extraction.ExtractionResult):
        err = "" if r.param_error is None else f", parameter error {r.param_error:.3f}"
        return f"agreement {r.agreement:.3f}{err}"
    l2 = "—" if math.isnan(r.median_l2) else f"{r.median_l2:.3f}"
    mis = _pct(r.misclassified_rate)
    wins = sum(map(r.succeeded, r.inputs))
    # inputs the attacker could not even start: every key it had was quarantined
    shut = sum(1 for i in r.inputs if i.rows <= 1 and (i.stopped or "").startswith("refused"))
    out = f"no key left for {shut} of them, " if shut else ""
    return (
        f"success {_pct(r.success_rate)}, {wins} of {len(r.inputs)} inputs "
        f"({out}misclassified {mis}, median L2 {l2})"
    )


def summary(sc: Scenario) -> str:
    assert sc.bare is not None and sc.guard is not None and sc.out is not None
    first = sc.out.first_enforced
    return (
        f"bare {_result(sc.bare.result)} ({sc.bare.oracle.rows} rows, {sc.bare.seconds:.1f} s); "
        f"guarded {_result(sc.guard.result)} ({sc.guard.oracle.rows} rows, "
        f"{sc.guard.seconds:.1f} s); first enforced {first} by {', '.join(sc.out.enforcing)}"
    )


def fate(o: Outcome) -> str:
    if o.enforced:
        return f"ENFORCED after {o.first_enforced} rows ({', '.join(o.enforcing)})"
    if o.audited:
        return f"audited ({o.lines} lines: {', '.join(sorted(o.by_detector)) or '—'})"
    return "untouched"


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
        + f"; the framer: {fate(res.framing.framer.out)}",
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
    kept = [
        (n, sc)
        for n, sc in judged
        if sc.kind == "extraction"
        and sc.bare is not None
        and sc.guard is not None
        and sc.guard.result.agreement >= sc.bare.result.agreement - 0.02
    ]
    if kept:
        out.append(
            "  - enforced, yet the stolen model is as good as without the guard (agreement "
            "within 2 points of bare; degraded answers keep most labels and the attack ran to "
            "its end): "
            + "; ".join(
                f"{n} {sc.name} {sc.bare.result.agreement:.3f} -> {sc.guard.result.agreement:.3f}"
                for n, sc in kept
                if sc.bare is not None and sc.guard is not None
            )
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
            answered = sum(s.rows for s in sc.guard.oracle.log if s.status == 200)
            out.append(
                f"- {n} {sc.name}: first enforcement after {_rows(sc.out.first_enforced)} rows; "
                f"{sc.out.keys_enforced}/{sc.keys} keys enforced, {sc.out.keys_quarantined} "
                f"quarantined; {answered} rows answered in all (about {answered / sc.keys:.0f} "
                f"per key); success with the guard {_pct(sc.guard.result.success_rate)}"
            )
    if any(sc.family == "sybil" for _, sc in scs):
        out.append(
            "  - reading the round-robin runs: a row that only matches other keys' rows convicts "
            "nobody (so nobody can be framed), so each key is enforced on its own "
            "near-duplicates only and the attacker gets the rows above before it runs out of "
            "keys. Whatever it wins, it wins on the first input it attacks; on a low-dimensional "
            "model that can happen inside those rows (the attack's own starting search, about "
            "12 rows of random rows and a blend binary search, sometimes lands within 1.5x "
            "already), so the success rate here is per set of keys, and depends on which "
            "input comes first"
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
        f"{r.dep.name} {k} ({fate(c.out)})"
        for r in results
        for k, c in r.population.hard.items()
        if k != "what_if" and c.out.enforced
    ]
    out.append(
        "- health probe, retrier, batch job, one-class client never degraded or blocked: "
        f"{_met(not bad)}" + (": " + "; ".join(bad) if bad else "")
    )
    wi = [f"{r.dep.name} {fate(r.population.hard['what_if'].out)}" for r in results]
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
            ": " + "; ".join(f"{r.dep.name} ({fate(r.framing.victim.out)})" for r in framed)
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


def revision() -> str:
    """The checkout's commit (``+ local changes`` when the code differs from it)."""
    import subprocess

    root = Path(__file__).resolve().parent.parent.parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            [
                "git",
                "status",
                "--porcelain",
                "--untracked-files=no",
                "--",
                ".",
                ":!benchmarks/RESULTS.md",
                ":!benchmarks/attacks/attacks.png",
            ],
            cwd=root,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        return "unknown revision"
    return (head or "unknown revision") + (" + local changes" if dirty else "")


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
        f"- date: {today()}; took {seconds:.0f} s; seed {args.seed}; code at {args.revision}",
        "- deployments: " + ", ".join(r.dep.name for r in results) + " (scikit-learn's bundled "
        "digits, wine and breast_cancer; StandardScaler + LogisticRegression, StandardScaler + "
        "MLP(64)); seeded stratified 70/30 split; held-out rows halved into the attacker's "
        "pool and the eval rows stolen models are scored on; benign clients replay held-out "
        "rows",
        "- config recipe, the same for every deployment: `guard/demo.yaml` minus its rate "
        f"limit ({dets}; output `degrade: {policy['degrade']}`), then `guard calibrate --data "
        f"REF.npz --out DIR --config CONFIG --target-fpr {TARGET_FPR}` on the training split "
        "(`X` and the model's `proba`); GUARD_HASH_KEY, GUARD_FINGERPRINT_SALT and "
        "GUARD_NOISE_KEY set",
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
