"""The ops files in guard/ops: the Grafana dashboard and the Prometheus alerting rules.

Every PromQL expression may name only series the guard really exports, only
labels those series carry (and the target labels job and instance), and must
read counters through rate() or increase(). The exported names come from a
live :class:`guard.metrics.GuardMetrics`, declared for a config, not from a
list kept by hand, so renaming a metric breaks this test.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from inference_guard.guard.config import GuardConfig
from inference_guard.guard.metrics import GuardMetrics
from inference_guard.guard.stores.memory import MemoryStore

OPS = Path(__file__).resolve().parents[2] / "guard" / "ops"
DASHBOARD = OPS / "grafana-dashboard.json"
ALERTS = OPS / "alerts.yaml"
ALERTS_TEST = OPS / "alerts_test.yaml"

#: Grafana's variables, replaced by something PromQL parses
GRAFANA_VARS = {
    "$__rate_interval": "5m",
    "$__interval": "1m",
    "$__range": "1h",
    "${DS_PROMETHEUS}": "prometheus",
    "$policy": ".*",
    "$detector": ".*",
}

METRIC = re.compile(r"\bguard_[a-z_]+\b")
SELECTOR = re.compile(r"\b(guard_[a-z_]+)\s*\{([^}]*)\}")
MATCHER = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)\s*\"([^\"]*)\"")
GROUPING = re.compile(r"\b(by|without)\s*\(([^)]*)\)\s*\(")
MATCHING = re.compile(r"\b(on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
POSTFIX_GROUPING = re.compile(r"\)\s*(by|without)\s*\(")
#: the labels Prometheus adds to every scraped series
TARGET_LABELS = {"job", "instance"}
#: a config with every kind of label value: quarantine, escalation, a shared store's backend
CONFIG = {
    "policies": [
        {
            "name": "inference",
            "quarantine_s": 60,
            "detectors": [
                {"type": "rate", "action": "throttle"},
                {"type": "prada", "action": "degrade",
                 "escalate": [{"margin_below": -0.1, "action": "block"}]},
            ],
        }
    ]
}
COUNTER_SUFFIXES = ("_total", "_bucket", "_sum", "_count")
#: labels that would identify a client or a request: never in an alert or a legend
FORBIDDEN_LABELS = {"client", "client_id", "client_hash", "ip", "path", "request_id", "user"}


# ------------------------------------------------------------------ what the guard exports


def exported_series() -> dict[str, dict[str, set[str]]]:
    """``{sample name: {label name: values seen}}`` from a GuardMetrics exposition.

    One child of every metric is touched, so every family shows all its samples
    (``_total``, ``_bucket``/``_sum``/``_count``). ``_created`` is left out: it is
    missing in multiprocess mode, so nothing may depend on it.
    """
    metrics = GuardMetrics(CollectorRegistry())
    metrics.declare(GuardConfig.from_dict(CONFIG), store=MemoryStore())
    families = [v for v in vars(metrics).values() if isinstance(v, Counter | Histogram)]
    for family in families:
        names: tuple[str, ...] = family._labelnames
        child = family.labels(*(f"v{i}" for i in range(len(names)))) if names else family
        if isinstance(family, Histogram):
            child.observe(0.5)
        else:
            child.inc()
    text = generate_latest(metrics.registry).decode()
    out: dict[str, dict[str, set[str]]] = {}
    n_families = 0
    for fam in text_string_to_metric_families(text):
        samples = [s for s in fam.samples if not s.name.endswith("_created")]
        n_families += bool(samples) and fam.name.startswith("guard_")
        for sample in samples:
            labels = out.setdefault(sample.name, {})
            for k, v in sample.labels.items():
                labels.setdefault(k, set()).add(v)
    # the counters and histograms, guard_build_info and guard_quarantined_clients
    assert n_families == len(families) + 2 > 10, "every GuardMetrics family must be exported"
    return out


@pytest.fixture(scope="module")
def exported() -> dict[str, dict[str, set[str]]]:
    return exported_series()


def family_of(sample: str) -> str:
    for suffix in ("_total", "_bucket", "_sum", "_count"):
        if sample.endswith(suffix):
            return sample[: -len(suffix)]
    return sample


# ------------------------------------------------------------------ a small PromQL checker


def _mask_strings(expr: str) -> str:
    """Blank the inside of string literals (same length), so parens in regexes are inert."""
    return re.sub(r'"[^"]*"', lambda m: '"' + "_" * (len(m.group()) - 2) + '"', expr)


def _closing(expr: str, open_idx: int) -> int:
    depth = 0
    for i in range(open_idx, len(expr)):
        if expr[i] == "(":
            depth += 1
        elif expr[i] == ")":
            depth -= 1
            if depth == 0:
                return i
    raise AssertionError(f"unbalanced parentheses in {expr!r}")


def _enclosing_function(expr: str, idx: int) -> str:
    """Name of the function whose argument list holds position ``idx`` ('' if none)."""
    depth = 0
    for i in range(idx - 1, -1, -1):
        if expr[i] == ")":
            depth += 1
        elif expr[i] == "(":
            if depth == 0:
                m = re.search(r"([A-Za-z_][A-Za-z0-9_]*)\s*$", expr[:i])
                return m.group(1) if m else ""
            depth -= 1
    return ""


def substitute(expr: str) -> str:
    for var, value in GRAFANA_VARS.items():
        expr = expr.replace(var, value)
    assert "$" not in expr, f"unknown Grafana variable in {expr!r}"
    return expr


def grouping_labels(expr: str) -> set[str]:
    """Labels kept by the expression's ``by (...)`` clauses."""
    masked = _mask_strings(expr)
    return {
        lbl.strip()
        for kind, labels in GROUPING.findall(masked)
        if kind == "by"
        for lbl in labels.split(",")
        if lbl.strip()
    }


def promql_problems(expr: str, exported: dict[str, dict[str, set[str]]]) -> list[str]:
    """Everything wrong with one expression, as readable strings (empty: fine)."""
    problems: list[str] = []
    expr = substitute(expr)
    masked = _mask_strings(expr)
    metrics = METRIC.findall(masked)
    if not metrics:
        return [f"names no guard metric: {expr}"]
    for name in metrics:
        if name not in exported:
            problems.append(f"{name} is not exported (exported: {sorted(exported)})")
    if problems:
        return problems

    # label matchers: the label must exist on that series; le values must be real bounds
    for name, body in SELECTOR.findall(expr):
        for label, value in MATCHER.findall(body):
            if label in TARGET_LABELS:
                continue
            if label not in exported[name]:
                problems.append(f"{name} has no label {label!r}")
            elif label == "le" and value not in exported[name]["le"]:
                problems.append(f"{name} has no bucket le={value!r}")

    # by/without: the label must exist on every series aggregated
    if POSTFIX_GROUPING.search(masked):
        problems.append("write `sum by (...) (x)`, not `sum(x) by (...)`")
    for m in GROUPING.finditer(masked):
        arg_open = m.end() - 1
        inner = masked[arg_open : _closing(masked, arg_open) + 1]
        for label in (lbl.strip() for lbl in m.group(2).split(",")):
            if not label or label in TARGET_LABELS:
                continue
            for name in METRIC.findall(inner):
                if label not in exported[name]:
                    problems.append(f"{m.group(1)} ({label}) but {name} has no label {label!r}")

    # on/ignoring/group_*: the label must exist on some series of the expression
    all_labels = {lbl for name in metrics for lbl in exported[name]} | TARGET_LABELS
    for kind, labels in MATCHING.findall(masked):
        for label in (lbl.strip() for lbl in labels.split(",")):
            if label and label not in all_labels:
                problems.append(f"{kind} ({label}): no series here has that label")

    # every series exists from start-up: no rule guesses at new series with `offset`
    if re.search(r"\boffset\b", masked):
        problems.append("no `offset`: series exist from start-up, increase() sees the first event")

    # counters and histogram series only through rate()/increase(), with a range
    for m in METRIC.finditer(masked):
        if not m.group().endswith(COUNTER_SUFFIXES):
            continue
        fn = _enclosing_function(masked, m.start())
        rest = masked[m.end() :]
        has_range = re.match(r"\s*(\{[^}]*\})?\s*\[[^\]]+\]", rest) is not None
        if fn not in ("rate", "increase") or not has_range:
            problems.append(f"{m.group()} must be read through rate() or increase() over a range")

    # histogram_quantile: over _bucket series, aggregated `by (..., le)`
    for m in re.finditer(r"\bhistogram_quantile\s*\(", masked):
        arg = masked[m.end() - 1 : _closing(masked, m.end() - 1) + 1]
        g = re.match(r"\(\s*[0-9.]+\s*,\s*sum\s+by\s*\(([^)]*)\)", arg)
        if g is None or "le" not in {x.strip() for x in g.group(1).split(",")}:
            problems.append(f"histogram_quantile needs `sum by (..., le)`: {arg}")
        if not all(n.endswith("_bucket") for n in METRIC.findall(arg)):
            problems.append(f"histogram_quantile over something other than _bucket: {arg}")
    return problems


# ------------------------------------------------------------------ the files


def load_dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return data


def load_alerts() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    return data


def iter_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from iter_panels(panel.get("panels", []))  # rows (collapsed ones hold panels)


def dashboard_targets() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for panel in iter_panels(load_dashboard()["panels"]):
        for target in panel.get("targets", []):
            out.append((f"{panel['title']}/{target['refId']}", target))
    return out


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in load_alerts()["groups"] for rule in group["rules"]]


# ------------------------------------------------------------------ the checker itself can fail


@pytest.mark.parametrize(
    ("expr", "fragment"),
    [
        ("sum(rate(guard_request_total[5m]))", "guard_request_total is not exported"),
        ("sum(rate(guard_audit_dropped_created[5m]))", "is not exported"),
        ("sum by (client) (rate(guard_requests_total[5m]))", "has no label 'client'"),
        ("sum by (policy) (rate(guard_errors_total[5m]))", "has no label 'policy'"),
        ('sum(rate(guard_errors_total{policy="p"}[5m]))', "has no label 'policy'"),
        ('sum(rate(guard_overhead_seconds_bucket{le="0.003"}[5m]))', "no bucket le='0.003'"),
        ('sum(rate(guard_overhead_seconds_count{le="0.01"}[5m]))', "has no label 'le'"),
        ("sum(guard_requests_total)", "must be read through rate() or increase()"),
        ("guard_quarantines_total > 0", "must be read through rate() or increase()"),
        ("sum(rate(guard_rows_total)) ", "must be read through rate() or increase()"),
        (
            "histogram_quantile(0.99, sum by (policy) (rate(guard_overhead_seconds_bucket[5m])))",
            "needs `sum by (..., le)`",
        ),
        (
            "histogram_quantile(0.99, rate(guard_overhead_seconds_bucket[5m]))",
            "needs `sum by (..., le)`",
        ),
        ("sum(rate(guard_rows_total[5m])) by (policy)", "not `sum(x) by (...)`"),
        (
            "sum(rate(guard_rows_total[5m]))"
            " / ignoring (component) sum(rate(guard_rows_total[5m]))",
            "ignoring (component)",
        ),
        ("guard_errors_total > 0 unless guard_errors_total offset 5m", "no `offset`"),
        ("sum(rate(up[5m]))", "names no guard metric"),
    ],
)
def test_the_promql_checker_rejects(
    expr: str, fragment: str, exported: dict[str, dict[str, set[str]]]
) -> None:
    problems = promql_problems(expr, exported)
    assert any(fragment in p for p in problems), problems


def test_the_exported_set_is_real(exported: dict[str, dict[str, set[str]]]) -> None:
    assert set(exported["guard_requests_total"]) == {"policy", "decision"}
    assert set(exported["guard_build_info"]) == {"version", "config_sha"}
    assert set(exported["guard_quarantined_clients"]) == {"policy"}
    assert set(exported["guard_upstream_responses_total"]) == {"policy", "code_class"}
    assert "process_resident_memory_bytes" in exported
    assert "le" in exported["guard_detector_score_bucket"]
    assert "le" not in exported["guard_detector_score_count"]
    assert exported["guard_audit_dropped_total"] == {}
    assert "guard_requests" not in exported and "guard_requests_created" not in exported


# ------------------------------------------------------------------ the dashboard


def test_dashboard_is_an_importable_grafana_dashboard() -> None:
    dash = load_dashboard()
    assert dash["title"] and dash["uid"]
    assert 36 <= dash["schemaVersion"] <= 41
    panels = list(iter_panels(dash["panels"]))
    assert len([p for p in panels if p["type"] != "row"]) >= 12
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in panels:
        pos = p["gridPos"]
        assert pos["x"] + pos["w"] <= 24, p["title"]

    variables = {v["name"]: v for v in dash["templating"]["list"]}
    ds = variables["DS_PROMETHEUS"]
    assert (ds["type"], ds["query"]) == ("datasource", "prometheus")
    for name, metric in (("policy", "guard_requests_total"), ("detector", "guard_detector")):
        var = variables[name]
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        assert var["type"] == "query"
        assert re.fullmatch(rf"label_values\(({metric}\w*),\s*{name}\)", query), query
        assert var["datasource"]["uid"] == "${DS_PROMETHEUS}"

    for p in panels:
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}, p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${DS_PROMETHEUS}", p["title"]


def test_dashboard_variables_query_exported_labels(
    exported: dict[str, dict[str, set[str]]],
) -> None:
    for var in load_dashboard()["templating"]["list"]:
        if var["type"] != "query":
            continue
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        m = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", query)
        assert m is not None, query
        metric, label = m.groups()
        assert metric in exported, metric
        assert label in exported[metric], (metric, label)


@pytest.mark.parametrize(
    ("where", "target"), [pytest.param(w, t, id=w) for w, t in dashboard_targets()]
)
def test_dashboard_promql(
    where: str, target: dict[str, Any], exported: dict[str, dict[str, set[str]]]
) -> None:
    expr = target["expr"]
    assert promql_problems(expr, exported) == [], where
    # the legend may only use labels the expression keeps
    legend_labels = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", target.get("legendFormat", "")))
    kept = grouping_labels(expr) | ({"le"} if target.get("format") == "heatmap" else set())
    assert legend_labels <= kept, (where, legend_labels - kept)
    assert not legend_labels & FORBIDDEN_LABELS


def test_dashboard_covers_every_metric(exported: dict[str, dict[str, set[str]]]) -> None:
    shown = {family_of(m) for _, t in dashboard_targets() for m in METRIC.findall(t["expr"])}
    families = {family_of(name) for name in exported if name.startswith("guard_")}
    assert families - shown == set(), "metrics without a panel"


def test_dashboard_has_the_requested_panels() -> None:
    exprs = [t["expr"] for _, t in dashboard_targets()]

    def has(pattern: str) -> bool:
        return any(re.search(pattern, e) for e in exprs)

    assert has(r"sum by \(decision\) \(rate\(guard_requests_total")
    assert has(r"sum by \(decision\) \(rate\(guard_rows_total")
    assert has(r'decision!="allow"')
    assert has(r"sum by \(reason\) \(rate\(guard_invalid_requests_total")
    assert has(r"sum by \(detector, action\) \(rate\(guard_detections_total")
    assert has(r"histogram_quantile\(0\.\d+, sum by \(detector, le\)")
    assert has(r"histogram_quantile\(0\.5, sum by \(policy, le\).*guard_overhead_seconds_bucket")
    assert has(r"histogram_quantile\(0\.99, sum by \(policy, le\).*guard_overhead_seconds_bucket")
    assert has(r"sum by \(component\) \(rate\(guard_errors_total")
    assert has(r"sum by \(outcome\) \(rate\(guard_degraded_responses_total")
    by_decision = "sum by (decision) (rate(guard_requests_total"
    stacked = [
        p
        for p in iter_panels(load_dashboard()["panels"])
        if any(by_decision in t["expr"] for t in p.get("targets", []))
        and p["fieldConfig"]["defaults"]["custom"]["stacking"]["mode"] == "normal"
    ]
    assert stacked, "request rate by decision must be stacked"


# ------------------------------------------------------------------ the alerts


def test_alert_rules_are_well_formed() -> None:
    rules = alert_rules()
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names))
    assert {
        "GuardMetricsAbsent",
        "GuardInternalErrors",
        "GuardStoreDown",
        "GuardOverheadHigh",
        "GuardAttackSuspected",
        "GuardClientQuarantined",
        "GuardInvalidFlood",
        "GuardAuditDropping",
    } <= set(names)
    for rule in rules:
        assert set(rule) == {"alert", "expr", "for", "labels", "annotations"}, rule["alert"]
        assert re.fullmatch(r"\d+[smh]", str(rule["for"])), rule["alert"]
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, rule["alert"]
        annotations = rule["annotations"]
        assert set(annotations) == {"summary", "description", "runbook"}, rule["alert"]
        assert annotations["runbook"].startswith("First response: "), rule["alert"]
    severity = {r["alert"]: r["labels"]["severity"] for r in rules}
    # what pages: an attack the guard quarantined, a state store that is down
    assert {a for a, s in severity.items() if s == "critical"} == {
        "GuardClientQuarantined",
        "GuardStoreDown",
    }


def test_the_metrics_absent_rule_watches_the_guard_job() -> None:
    rule = next(r for r in alert_rules() if r["alert"] == "GuardMetricsAbsent")
    assert 'absent(up{job="guard"})' in rule["expr"]
    assert 'up{job="guard"} == 0' in rule["expr"]
    assert "guard_build_info" in rule["expr"]


@pytest.mark.parametrize("rule", alert_rules(), ids=lambda r: r["alert"])
def test_alert_promql(rule: dict[str, Any], exported: dict[str, dict[str, set[str]]]) -> None:
    assert promql_problems(rule["expr"], exported) == [], rule["alert"]


@pytest.mark.parametrize("rule", alert_rules(), ids=lambda r: r["alert"])
def test_alert_annotations_use_only_kept_labels(rule: dict[str, Any]) -> None:
    kept = grouping_labels(rule["expr"])
    for text in rule["annotations"].values():
        used = set(re.findall(r"\$labels\.(\w+)", text))
        assert used <= kept, (rule["alert"], used - kept)
        assert not used & FORBIDDEN_LABELS
        assert "client_id" not in text and "$labels.client" not in text


# ------------------------------------------------------------------ promtool, where installed

PROMTOOL = shutil.which("promtool")
# in CI (.ci/run installs Debian's prometheus package) a missing promtool fails the tests
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None and os.environ.get("CI") != "true",
    reason="promtool is not on PATH (Debian: apt-get install prometheus); "
    "the rules and the dashboard PromQL are still checked above",
)


def _promtool(*args: str, cwd: Path = OPS) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None, "CI=true but promtool is not on PATH"
    return subprocess.run(
        [PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )


@needs_promtool
def test_promtool_check_rules() -> None:
    done = _promtool("check", "rules", ALERTS.name)
    assert done.returncode == 0, done.stdout + done.stderr


@needs_promtool
def test_promtool_rule_unit_tests() -> None:
    done = _promtool("test", "rules", ALERTS_TEST.name)
    assert done.returncode == 0, done.stdout + done.stderr


@needs_promtool
def test_promtool_parses_every_dashboard_expression(tmp_path: Path) -> None:
    rules = [
        {"record": f"dashboard:expr_{i}", "expr": substitute(t["expr"])}
        for i, (_, t) in enumerate(dashboard_targets())
    ]
    f = tmp_path / "dashboard_rules.yaml"
    f.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    done = _promtool("check", "rules", str(f), cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
