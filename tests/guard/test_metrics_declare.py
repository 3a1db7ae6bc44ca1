"""GuardMetrics.declare: every series from start-up, build info, quarantined clients, layouts."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

import guard
from inference_guard.detectors.persist import read_manifest
from inference_guard.guard._process_metrics import ProcessMetrics, worker_pids
from inference_guard.guard.calibrate import calibrate_rows
from inference_guard.guard.config import GuardConfig
from inference_guard.guard.errors import PayloadError
from inference_guard.guard.metrics import DECISIONS, GuardMetrics, code_class, config_sha
from inference_guard.guard.score_buckets import DEFAULT_BUCKETS, calibrated_buckets, score_buckets
from inference_guard.guard.stores.memory import MemoryStore
from tests.stores_fixture import FakeClock

ALERTS = Path(__file__).resolve().parents[2] / "guard" / "ops" / "alerts.yaml"

CONFIG: dict[str, Any] = {
    "policies": [
        {
            "name": "inference",
            "quarantine_s": 60,
            "detectors": [
                {"type": "rate", "action": "throttle"},
                {
                    "type": "prada",
                    "action": "degrade",
                    "escalate": [{"margin_below": -0.1, "action": "block"}],
                },
                {"type": "near_duplicate", "name": "probes", "action": "flag",
                 "escalate": [{"score_below": 0.2, "action": "degrade"}]},
            ],
        },
        {"name": "watch", "shadow": True, "routes": ["/v1/**"]},
    ]
}


def declared(config: dict[str, Any] = CONFIG, **kw: Any) -> GuardMetrics:
    metrics = GuardMetrics(CollectorRegistry())
    metrics.declare(GuardConfig.from_dict(config), **kw)
    return metrics


def samples(metrics: GuardMetrics) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """The guard's own samples (``process_*`` left out: they move by themselves)."""
    text = generate_latest(metrics.registry).decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
        if s.name.startswith("guard_")
    }


def value(metrics: GuardMetrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_every_event_series_exists_at_zero_once_declared() -> None:
    m = declared()
    for policy in ("inference", "watch"):
        for decision in DECISIONS:
            assert value(m, "guard_requests_total", policy=policy, decision=decision) == 0.0
            assert value(m, "guard_rows_total", policy=policy, decision=decision) == 0.0
        for reason in PayloadError.REASONS:
            assert value(m, "guard_invalid_requests_total", policy=policy, reason=reason) == 0.0
        assert value(m, "guard_quarantines_total", policy=policy) == 0.0
        assert value(m, "guard_exempt_requests_total", policy=policy) == 0.0
        assert value(m, "guard_upstream_responses_total", policy=policy, code_class="5xx") == 0.0
        assert value(m, "guard_overhead_seconds_count", policy=policy) == 0.0
    detections = {
        (dict(labels)["detector"], dict(labels)["action"])
        for (name, labels), v in samples(m).items()
        if name == "guard_detections_total" and v == 0.0
    }
    # each detector with its action and every action its escalations can reach
    assert detections == {
        ("rate", "throttle"),
        ("prada", "degrade"),
        ("prada", "block"),
        ("probes", "flag"),
        ("probes", "degrade"),
    }
    for component in ("detector", "store", "internal", "parse", "response"):
        assert value(m, "guard_errors_total", component=component) == 0.0
    assert value(m, "guard_store_fallback_total", backend="memory") == 0.0
    assert value(m, "guard_store_evictions_total", backend="memory") == 0.0
    assert value(m, "guard_audit_dropped_total") == 0.0


def test_a_shared_store_has_its_breaker_series(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GUARD_HASH_KEY", "k" * 32)
    m = declared({**CONFIG, "state": {"store": "redis://127.0.0.1:1/0"}})
    for state in ("open", "half_open", "closed"):
        assert value(m, "guard_store_breaker_transitions_total", backend="redis", state=state) == 0
    assert value(m, "guard_store_fallback_total", backend="redis") == 0.0


def _alert_selectors() -> list[tuple[str, dict[str, str]]]:
    """(metric, {label: regex}) for every guard_ counter selector in the alert rules."""
    rules = [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]
    out = []
    for rule in rules:
        for name, body in re.findall(r"\b(guard_[a-z_]+_total)\b(?:\{([^}]*)\})?", rule["expr"]):
            matchers = dict(re.findall(r'(\w+)\s*=~?\s*"([^"]*)"', body or ""))
            out.append((name, matchers))
    return out


@pytest.mark.parametrize(("metric", "matchers"), _alert_selectors(), ids=lambda x: str(x))
def test_every_counter_an_alert_reads_exists_at_zero(
    metric: str, matchers: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """So that increase() sees the first event: no alert waits for a second one."""
    monkeypatch.setenv("GUARD_HASH_KEY", "k" * 32)
    config = {**CONFIG, "state": {"store": "redis://127.0.0.1:1/0"}}
    found = [
        labels
        for (name, labels), v in samples(declared(config)).items()
        if name == metric
        and v == 0.0
        and all(re.fullmatch(rx, dict(labels).get(k, "")) for k, rx in matchers.items())
    ]
    assert found, f"{metric}{matchers} does not exist at start-up"


def test_declaring_twice_changes_nothing() -> None:
    m = declared()
    before = samples(m)
    m.declare(GuardConfig.from_dict(CONFIG))
    assert samples(m) == before


def test_build_info_names_the_version_and_the_loaded_config(tmp_path: Path) -> None:
    a = tmp_path / "a.yaml"
    a.write_text(yaml.safe_dump(CONFIG))
    # the same config, otherwise written: comments, key order, defaults spelled out
    b = tmp_path / "b.yaml"
    b.write_text(
        "# the same policies\nfailure_mode: fail_open\n" + yaml.safe_dump(CONFIG, sort_keys=False)
    )
    sha_a = config_sha(GuardConfig.from_file(a))
    assert re.fullmatch(r"[0-9a-f]{12}", sha_a)
    assert config_sha(GuardConfig.from_file(b)) == sha_a
    other = {**CONFIG, "policies": [{**CONFIG["policies"][0], "quarantine_s": 61}]}
    assert config_sha(GuardConfig.from_dict(other)) != sha_a
    m = declared()
    info = {k: v for k, v in samples(m).items() if k[0] == "guard_build_info"}
    assert info == {
        (
            "guard_build_info",
            frozenset({("version", guard.__version__), ("config_sha", sha_a)}),
        ): 1.0
    }


def test_no_build_info_before_declare() -> None:
    m = GuardMetrics(CollectorRegistry())
    assert not any(k[0] == "guard_build_info" for k in samples(m))


@pytest.mark.anyio
async def test_quarantined_clients_is_read_from_the_store() -> None:
    clock = FakeClock()
    store = MemoryStore(clock=clock)
    m = declared(store=store)
    m.quarantined_now._clock = clock  # the count's cache on the same clock
    assert value(m, "guard_quarantined_clients", policy="inference") == 0.0
    # shadow policies neither quarantine nor refuse quarantined clients
    assert value(m, "guard_quarantined_clients", policy="watch") is None
    await store.set("quarantine:a", b"1", 60.0)
    await store.set("quarantine:b", b"1", 10.0)
    assert value(m, "guard_quarantined_clients", policy="inference") == 0.0  # cached
    clock.advance(1.0)
    assert value(m, "guard_quarantined_clients", policy="inference") == 2.0
    clock.advance(10.0)
    assert value(m, "guard_quarantined_clients", policy="inference") == 1.0


def test_quarantined_clients_only_where_a_policy_quarantines() -> None:
    m = declared({"policies": [{"name": "p"}]}, store=MemoryStore())
    assert not any(k[0] == "guard_quarantined_clients" for k in samples(m))


def test_upstream_answers_counted_by_status_class() -> None:
    m = declared()
    for status in (200, 200, 204, 404, 503, 0):
        m.count_upstream("inference", status)
    assert value(m, "guard_upstream_responses_total", policy="inference", code_class="2xx") == 3
    assert value(m, "guard_upstream_responses_total", policy="inference", code_class="4xx") == 1
    assert value(m, "guard_upstream_responses_total", policy="inference", code_class="5xx") == 1
    assert value(m, "guard_upstream_responses_total", policy="inference", code_class="other") == 1
    classes = [code_class(s) for s in (100, 299, 599, 600, 42)]
    assert classes == ["1xx", "2xx", "5xx", "other", "other"]


def test_statuses_appended_on_the_hot_path_are_counted_at_the_next_flush() -> None:
    """A front end appends the app's statuses to a list (one C call); the tally counts them."""
    m = declared()
    statuses = m.upstream_statuses("inference")
    assert m.upstream_statuses("inference") is statuses  # one list per policy, reloads too
    statuses.extend([200, 503, "200", None])  # an app's odd status counts as "other"
    assert value(m, "guard_upstream_responses_total", policy="inference", code_class="2xx") == 1
    assert value(m, "guard_upstream_responses_total", policy="inference", code_class="other") == 2
    assert statuses == []  # drained by the flush the scrape ran
    statuses.append(201)
    m.tally.flush()
    m.tally.flush()  # counted once, not once per flush
    assert value(m, "guard_upstream_responses_total", policy="inference", code_class="2xx") == 2


# ------------------------------------------------------------------ score buckets


def _uppers(m: GuardMetrics, detector: str) -> list[float]:
    return [
        float(dict(labels)["le"])
        for (name, labels), _ in samples(m).items()
        if name == "guard_detector_score_bucket" and dict(labels)["detector"] == detector
    ]


def test_calibrated_detectors_get_buckets_from_their_benign_scores(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(2000, 6)) * np.array([1, 10, 100, 1, 1, 1])
    calibrate_rows(X, tmp_path, kinds=("mahalanobis", "iforest"))
    config = {
        "calibration_dir": str(tmp_path),
        "policies": [{"name": "p", "detectors": ["mahalanobis", "iforest", "prada", "custom"]}],
    }
    m = declared(config)
    for kind in ("mahalanobis", "iforest"):
        block = read_manifest(tmp_path / f"{kind}.npz")["calibration"]
        quantiles = dict((q, v) for q, v in block["quantiles"])
        median_margin = quantiles[0.5] - block["threshold"]
        layout = calibrated_buckets(block)
        assert layout is not None
        uppers = _uppers(m, kind)
        assert uppers[:-1] == list(layout) and uppers[-1] == float("inf")
        assert 0.0 in layout
        # the benign median sits inside the layout, and attack margins 1000x past it too
        assert min(x for x in layout if x > 0) < median_margin < max(layout)
        assert min(layout) <= -1000 * median_margin * 0.999
    assert _uppers(m, "prada")[:-1] == list(score_buckets(_spec("prada"), None))
    assert max(_uppers(m, "prada")[:-1]) == 1.0
    assert _uppers(m, "custom")[:-1] == list(DEFAULT_BUCKETS)


def test_a_file_without_quantiles_falls_back_to_the_default(tmp_path: Path) -> None:
    import json

    calibrate_rows(np.random.default_rng(1).normal(size=(500, 3)), tmp_path, kinds=("knn",))
    manifest = tmp_path / "knn.json"
    data = json.loads(manifest.read_text())
    del data["calibration"]
    manifest.write_text(json.dumps(data))
    assert score_buckets(_spec("knn"), tmp_path) == DEFAULT_BUCKETS
    assert score_buckets(_spec("knn"), tmp_path / "missing") == DEFAULT_BUCKETS


def _spec(kind: str) -> Any:
    config = GuardConfig.from_dict({"policies": [{"name": "p", "detectors": [kind]}]})
    return config.policies[0].detectors[0]


def test_observations_land_in_the_detectors_own_buckets() -> None:
    m = declared()
    m.score.labels("prada").observe(-0.05)
    m.score.labels("other").observe(-50.0)  # never declared: the default layout
    assert value(m, "guard_detector_score_bucket", detector="prada", le="-0.03") == 1.0
    assert value(m, "guard_detector_score_bucket", detector="prada", le="-0.1") == 0.0
    assert value(m, "guard_detector_score_bucket", detector="other", le="-10.0") == 1.0


# ------------------------------------------------------------------ process metrics


def test_process_metrics_of_this_process() -> None:
    m = GuardMetrics(CollectorRegistry())
    rss = value(m, "process_resident_memory_bytes")
    assert rss is not None and rss > 1e6
    assert (value(m, "process_open_fds") or 0) > 0


def test_multiprocess_process_metrics_sum_the_live_workers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        dead = 2**22 + 7  # above pid_max on most systems: never a live process
        for pid in (os.getpid(), worker.pid, dead):
            (tmp_path / f"counter_{pid}.db").write_bytes(b"")
        (tmp_path / f"gauge_livesum_{worker.pid}.db").write_bytes(b"")
        assert worker_pids(tmp_path) == sorted([os.getpid(), worker.pid])
        monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
        families = {f.name: f for f in ProcessMetrics().collect()}
        monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR")
        own = {f.name: f for f in ProcessMetrics().collect()}
        fds = families["process_open_fds"].samples[0].value
        assert fds > own["process_open_fds"].samples[0].value  # ours and the worker's
        start = families["process_start_time_seconds"].samples[0].value
        assert start == pytest.approx(own["process_start_time_seconds"].samples[0].value)
        rss = families["process_resident_memory_bytes"]
        assert "Summed over the live workers" in rss.documentation
        assert families["process_cpu_seconds"].samples[0].name == "process_cpu_seconds_total"
    finally:
        worker.kill()
        worker.wait()
