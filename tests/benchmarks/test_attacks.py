"""The attack benchmark's parts (benchmarks/attacks), in-process and fast."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from benchmarks.apps import build_sklearn_app
from benchmarks.attacks import benign, extraction, hardcases
from benchmarks.attacks._asgi import InProcess, SimClock
from benchmarks.attacks._data import _area_matrix, digits, photo_patches, victim
from benchmarks.attacks._http import Oracle, Refused, Sent
from benchmarks.attacks._traffic import Session, client_hash, outcome, run_sessions

# --------------------------------------------------------------------------- victims


@pytest.mark.parametrize(("dataset", "family"), [("wine", "linear"), ("breast_cancer", "mlp")])
def test_the_registry_builds_scaled_deployments(dataset: str, family: str) -> None:
    v = victim(dataset, family)
    n_held = v.benign.shape[0]
    assert v.X_train.shape[0] + n_held in (178, 569)
    assert v.pool.shape[0] + v.eval.shape[0] == n_held
    assert np.array_equal(v.benign[v.eval_index], v.eval)
    np.testing.assert_array_equal(v.lo, v.X_train.min(axis=0))
    np.testing.assert_array_equal(v.hi, v.X_train.max(axis=0))
    # the plain-numpy fast path is the estimator's own predict_proba
    assert v.fast is not None
    np.testing.assert_allclose(v.predict_proba(v.benign), v.model.predict_proba(v.benign))
    assert np.mean(v.predict(v.benign) == v.model.predict(v.benign)) == 1.0
    Z = v.normalize(v.X_train)
    assert Z.min() == 0.0 and Z.max() == 1.0
    np.testing.assert_allclose(v.denormalize(Z), v.X_train)
    assert v.path == f"/v2/models/{dataset}-{family}/infer"


def test_linear_deployments_expose_their_raw_scores() -> None:
    v = victim("breast_cancer", "linear")
    assert v.linear is not None and v.n_classes == 2
    coef, intercept = v.linear
    z = v.benign @ coef.T + intercept
    assert np.array_equal(v.classes[np.argmax(z, axis=1)], v.model.predict(v.benign))


# --------------------------------------------------------------------------- model server


_OPEN: list[InProcess] = []


@pytest.fixture(autouse=True)
def _close_transports() -> Any:
    yield
    while _OPEN:
        _OPEN.pop().close()


def _client(v: Any) -> InProcess:
    t = InProcess(build_sklearn_app(v.name, v.predict_proba, v.classes.tolist(), v.n_features))
    _OPEN.append(t)
    return t


def test_the_sklearn_app_answers_like_the_demo() -> None:
    v = victim("wine", "linear")
    t = _client(v)
    o = Oracle("", ["k"], path=v.path, transport=t, reference=v.predict_proba)
    labels, probs = o.query(v.pool[:4])
    assert labels.tolist() == v.predict(v.pool[:4]).tolist()
    np.testing.assert_allclose(probs, v.predict_proba(v.pool[:4]), atol=1e-6)
    assert o.log[-1].rows == 4 and o.log[-1].status == 200 and not o.log[-1].perturbed
    bad = {"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}]}
    status, _, body = t.post(v.path, json.dumps(bad).encode(), {})
    assert status == 400 and b"[n, 13]" in body
    with pytest.raises(Refused):
        Oracle("", ["k"], path="/v2/models/nope/infer", transport=t).query(v.pool[:1])


# --------------------------------------------------------------------------- hard cases


def test_probe_sends_one_identical_row() -> None:
    s = hardcases.probe(victim("wine", "linear"))
    assert s.n_requests == 150 and s.n_rows == 150
    assert all(np.array_equal(b, s.batches[0]) and b.shape[0] == 1 for b in s.batches)
    assert np.allclose(np.diff(s.times), 0.3)


def test_retrier_repeats_each_row_three_times_in_a_row() -> None:
    s = hardcases.retrier(victim("wine", "linear"), rows=10)
    assert s.n_requests == 30
    rows = [b[0] for b in s.batches]
    for i in range(0, 30, 3):
        assert np.array_equal(rows[i], rows[i + 1]) and np.array_equal(rows[i], rows[i + 2])
        if i:
            assert not np.array_equal(rows[i], rows[i - 1])
    assert list(s.times) == sorted(s.times)


def test_batch_job_walks_the_held_out_rows_in_order() -> None:
    v = victim("wine", "linear")
    s = hardcases.batch_job(v)
    assert [b.shape[0] for b in s.batches] == [64] * 4
    flat = np.vstack(s.batches)
    n = v.benign.shape[0]
    np.testing.assert_array_equal(flat, v.benign[np.arange(256) % n])


def test_one_class_client_sends_one_predicted_class() -> None:
    v = victim("breast_cancer", "linear")
    s = hardcases.one_class(v)
    assert s.n_rows == 200
    assert np.unique(v.predict(np.vstack(s.batches))).shape[0] == 1
    assert max(b.shape[0] for b in s.batches) <= 8


def test_what_if_changes_one_feature_per_request() -> None:
    v = victim("breast_cancer", "linear")
    s = hardcases.what_if(v)
    base = v.benign[1]
    assert s.n_rows <= 200
    for b in s.batches:
        changed = np.flatnonzero(np.any(b != base, axis=0))
        assert changed.shape[0] <= 1
        if changed.size:
            j = changed[0]
            assert b[0, j] == v.lo[j] and b[-1, j] == v.hi[j]


def test_monitor_and_framing_stay_within_one_percent_of_their_row() -> None:
    v = victim("wine", "linear")
    sessions = hardcases.monitor(v)
    assert len({s.key for s in sessions}) == 20
    rows = np.vstack([b for s in sessions for b in s.batches])
    assert rows.shape[0] == 200
    assert np.all(np.abs(rows - v.benign[2]) <= 0.01 * v.span + 1e-9)
    framer, framed = hardcases.framing(v)
    assert framer.n_requests == 1 and framer.batches[0].shape[0] == 20
    assert np.all(np.abs(framer.batches[0] - v.benign[3]) <= 0.01 * v.span + 1e-9)
    assert np.array_equal(framed.batches[0], v.benign[3][None])
    assert framed.times[0] > framer.times[0] and framed.n_requests == 21


# --------------------------------------------------------------------------- traffic and outcome


class _Recorder:
    """A transport that answers 200 (or 403 for one key) and records the order of keys."""

    def __init__(self, refuse: str = "") -> None:
        self.keys: list[str] = []
        self.refuse = refuse

    def post(self, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, Any, bytes]:
        key = headers["x-api-key"]
        self.keys.append(key)
        if key == self.refuse:
            return 403, {}, b"{}"
        n = json.loads(body)["inputs"][0]["shape"][0]
        doc = {"outputs": [{"name": "probabilities", "data": [0.5, 0.5] * n}]}
        return 200, {"x-request-id": f"r{len(self.keys)}"}, json.dumps(doc).encode()


def test_sessions_interleave_in_time_and_stop_at_a_refusal() -> None:
    row = np.zeros((1, 2))
    a = Session("a", "x", (1.0, 3.0, 5.0), (row, row, row))
    b = Session("b", "x", (2.0, 4.0), (row, row))
    c = Session("c", "x", (0.5, 6.0), (row, row))
    t = _Recorder(refuse="c")
    clock = SimClock()
    oracles = run_sessions(t, clock, [a, b, c], path="/p")
    assert t.keys == ["c", "a", "b", "a", "b", "a"]
    assert clock.now == 5.0
    assert [o.requests for o in oracles] == [3, 2, 1]


def test_outcome_reads_enforcement_and_audit_lines() -> None:
    log = [Sent(f"r{i}", "k", 10, 10 * (i + 1), 200, False) for i in range(5)]
    h = client_hash("secret", "k")
    lines = [
        {"client": h, "request_id": "r0", "enforced": "flag", "fired": ["knn"]},
        {"client": "someone-else", "request_id": "r1", "enforced": "block", "fired": ["x"]},
        {
            "client": h,
            "request_id": "r2",
            "enforced": "degrade",
            "fired": ["near_duplicate"],
            "detectors": [{"name": "near_duplicate", "anomalous": True, "reason": "why"}],
        },
        {"client": h, "request_id": "r4", "enforced": "block", "quarantined": True, "fired": []},
    ]
    out = outcome(log, lines, {"k": h})
    assert out.audited and out.lines == 3
    assert out.first_audit == 10 and out.first_enforced == 30 and out.quarantine == 50
    assert out.enforcing == ("near_duplicate",) and out.reasons == ("near_duplicate: why",)
    assert out.by_detector == {"knn": 10, "near_duplicate": 30}
    assert out.enforced_as == {"degrade": 1, "block": 1}
    flag_only = outcome(log, lines[:1], {"k": h})
    assert flag_only.audited and not flag_only.enforced
    # a 403 the client saw is enforcement even without an audit line
    refused = [*log[:2], Sent("", "k", 5, 25, 403, False)]
    assert outcome(refused, [], {"k": h}).first_enforced == 25
    assert not outcome(log, [], {"k": h}).audited


def test_client_hash_is_the_guards() -> None:
    from inference_guard.guard.identity import ClientIdentifier

    assert hasattr(ClientIdentifier, "hash")
    assert client_hash("s", "k") != client_hash("s", "k2")
    assert len(client_hash("s", "k")) == 32


def test_medians_count_a_miss_as_never() -> None:
    from benchmarks.attacks._report import _median

    assert _median([10, 20, 30]) == 20
    assert _median([10, None, None]) is None
    assert _median([10, 20, None, 30]) == 25
    assert _median([]) is None


def test_the_recipe_is_the_demo_policy_without_its_rate_limit() -> None:
    from benchmarks.attacks._recipe import demo_policy, recipe

    cfg = recipe("/tmp/calibration")
    demo = demo_policy()
    types = [d["type"] for d in cfg["policies"][0]["detectors"]]
    assert "rate" not in types
    assert types == [d["type"] for d in demo["policies"][0]["detectors"] if d["type"] != "rate"]
    assert cfg["calibration_dir"] == "/tmp/calibration"
    assert cfg["policies"][0]["degrade"] == demo["policies"][0]["degrade"]


# --------------------------------------------------------------------------- attacks


def test_signopt_runs_against_an_in_process_oracle() -> None:
    pytest.importorskip("art", reason="SignOPT needs the bench extra")
    from benchmarks.attacks import evasion

    v = victim("wine", "linear")
    o = Oracle("", ["k"], path=v.path, transport=_client(v))
    res = evasion.signopt(o, victim=v, n_inputs=1, query_limit=150, k=10, num_trial=10, cap=400)
    (r,) = res.inputs
    assert 0 < r.rows <= 400 and o.rows == r.rows
    assert r.opt == pytest.approx(evasion.min_adversarial_l2(v, v.pool[r.index]))
    assert r.misclassified == (r.l2 > 0)


def test_the_exact_minimum_is_below_any_line_search() -> None:
    from benchmarks.attacks import evasion

    v = victim("wine", "linear")
    for x in v.pool[:3]:
        exact = evasion.min_adversarial_l2(v, x)
        assert 0 < exact <= evasion.blend_bound(v, x) + 1e-9


def test_equation_solving_recovers_a_linear_model() -> None:
    v = victim("wine", "linear")
    o = Oracle("", ["k"], path=v.path, transport=_client(v))
    res = extraction.equation_solving(o, victim=v)
    assert res.rows == 2 * (v.n_features + 1) and res.agreement == 1.0
    assert res.param_error is not None and res.param_error < 0.01


def test_substitute_agreement_measures_what_the_labels_teach() -> None:
    data = digits()
    good = extraction.substitute_agreement(data.pool, data.predict(data.pool))
    assert good > 0.85
    ones = np.ones(data.pool.shape[0], dtype=np.int64)
    assert extraction.substitute_agreement(data.pool, ones) == pytest.approx(
        float(np.mean(data.eval_labels == 1))
    )


def test_received_reads_the_answers_back_against_the_plan() -> None:
    v = victim("wine", "linear")
    p = max(benign.plan(30, seed=4, pool_size=v.benign.shape[0]), key=lambda q: len(q.batches))
    oracle = Oracle("", [p.key], path=v.path, transport=_client(v))
    s = benign.session(p, v.benign)
    for b in s.batches[:3]:
        oracle.query(b)
    idx, labels = benign.received(p, oracle)
    assert idx.tolist() == list(p.rows[: sum(p.batches[:3])])
    assert np.array_equal(labels, v.predict(v.benign[idx]))
    from benchmarks.attacks import run

    learner = run.benign_learner(v, [p], [oracle])
    assert learner is not None and learner.distinct == len(set(idx.tolist()))


# --------------------------------------------------------------------------- photo patches


@pytest.fixture(scope="module")
def patches() -> np.ndarray:
    pytest.importorskip("PIL", reason="the sample photos need Pillow (test and bench extras)")
    return photo_patches(300, 0)


def test_photo_patches_are_digits_like_rows(patches: np.ndarray) -> None:
    assert patches.shape == (300, 64)
    assert np.array_equal(patches, np.rint(patches))
    assert patches.min() == 0 and patches.max() == 16
    assert np.all(patches.max(axis=1) == 16)
    assert np.all(np.mean(patches == 0, axis=1) >= 0.5)
    assert np.unique(patches, axis=0).shape[0] == patches.shape[0]


def test_photo_patches_are_seeded(patches: np.ndarray) -> None:
    fresh = photo_patches.__wrapped__(300, 0)  # bypass the cache
    assert np.array_equal(fresh, patches)
    assert np.array_equal(photo_patches.__wrapped__(20, 0), patches[:20])
    assert not np.array_equal(photo_patches.__wrapped__(20, 1), patches[:20])
    with pytest.raises(ValueError):
        patches[0, 0] = 1.0  # cached: shared, so read-only


@pytest.mark.parametrize("size", [8, 16, 21, 64, 100, 128])
def test_area_matrix_averages_by_area(size: int) -> None:
    A = _area_matrix(size)
    assert A.shape == (8, size)
    np.testing.assert_allclose(A.sum(axis=1), 1.0)
    np.testing.assert_allclose(A.sum(axis=0), 8 / size)
    img = np.random.default_rng(size).uniform(0, 255, size=(size, size))
    if size % 8 == 0:
        b = size // 8
        blocks = img.reshape(8, b, 8, b).mean(axis=(1, 3))
        np.testing.assert_allclose(A @ img @ A.T, blocks)


def test_deployment_names_cover_every_data_set_and_family() -> None:
    from benchmarks.attacks import run
    from benchmarks.attacks._data import DATASETS, FAMILIES

    assert len(DATASETS) >= 3 and {"linear", "mlp"} <= set(FAMILIES)
    names = {f"{d}-{f}" for d in DATASETS for f in FAMILIES}
    assert set(run.QUICK) <= names
    assert {n.split("-")[0] for n in run.QUICK} == set(DATASETS)
    assert {n.rsplit("-", 1)[1] for n in run.QUICK} == set(FAMILIES)
    with pytest.raises(SystemExit):
        run.deployments(["no-such-deployment"], 0)


def _fake_result(name: str, *, benign_enforced: int, attack_first: int | None) -> Any:
    from types import SimpleNamespace

    from benchmarks.attacks._results import (
        ClientResult,
        Framing,
        Monitor,
        Population,
        Result,
        Run,
        Scenario,
    )
    from benchmarks.attacks._traffic import Outcome

    def client(kind: str, enforced_at: int | None = None) -> ClientResult:
        s = Session(f"{kind}-key", kind, (1.0,), (np.zeros((1, 2)),))
        o = Oracle("", [s.key], transport=object())
        return ClientResult(s, o, Outcome(first_enforced=enforced_at, enforcing=("boundary",)))

    def run(agreement: float) -> Run:
        oracle = Oracle("", ["a"], transport=object())
        return Run(oracle, extraction.ExtractionResult(agreement, 100, 100), 0.1)

    attacks = [
        Scenario(
            "Knockoff, uniform",
            "extraction",
            "",
            run(0.9),
            run(0.9),
            Outcome(attack_first),
            family="extraction",
        ),
        Scenario(
            "Knockoff, natural (closed world)",
            "extraction",
            "",
            run(0.9),
            run(0.9),
            Outcome(None),
            flaggable=False,
            family="extraction",
        ),
    ]
    benign_clients = [client("benign", 120 if i < benign_enforced else None) for i in range(100)]
    hard = {k: client(k) for k in hardcases.HARD_CASES}
    pop = Population(benign_clients, hard, benign.plan(100, pool_size=10), 0.0)
    monitors = [Monitor(False, [client("monitor", 2)]), Monitor(True, [client("monitor")])]
    dep = SimpleNamespace(name=name, interim=[])
    return Result(
        dep, attacks, pop, monitors, Framing(client("framer", 20), client("framed")), 1.0, 1.0
    )


def test_targets_say_plainly_what_is_not_met() -> None:
    from benchmarks.attacks import _report

    quotas = {"decimals": 2, "per_day": None}
    good = [_fake_result("a", benign_enforced=0, attack_first=32)]
    text = "\n".join(_report.targets(good, quotas))
    assert (
        "every attack enforced against (closed-world natural Knockoff aside): met (1 of 1)" in text
    )
    assert "benign clients enforced against ≤ 0.5 %: met (0 of 100" in text
    assert "framed client never degraded or blocked: met" in text
    assert "as good as without the guard" in text and "a Knockoff, uniform 0.900 -> 0.900" in text
    bad = [_fake_result("b", benign_enforced=3, attack_first=None)]
    text = "\n".join(_report.targets(bad, quotas))
    assert "**NOT met** (0 of 1): missed b Knockoff, uniform" in text
    assert "benign clients enforced against ≤ 0.5 %: **NOT met** (3 of 100, 3.0 %)" in text
    assert "extraction attacks (closed-world Knockoff aside) ≤ 100: **NOT met** (never" in text


# --------------------------------------------------------------------------- across workers


def test_the_workers_policies_keep_the_extraction_detectors_and_can_stop_sharing() -> None:
    from pathlib import Path

    from benchmarks.attacks._recipe import Deployment, recipe
    from benchmarks.attacks.workers import DETECTORS, policy_config

    dep = Deployment(victim("wine", "linear"), recipe("/tmp/c"), Path("/tmp"), "", [])
    full = policy_config(dep, "recipe")
    assert full == dep.config
    cut = policy_config(dep, "extraction", share=False)
    kept = cut["policies"][0]["detectors"]
    assert sorted(d["type"] for d in kept) == sorted(DETECTORS)
    assert all(d["params"]["share"] is False for d in kept)
    assert "share" not in str(dep.config)  # the deployment's own config is left alone


def test_round_robin_deals_requests_over_the_servers_in_turn() -> None:
    import http.server
    import threading

    from benchmarks.attacks.workers import RoundRobin

    hits: list[int] = []

    def handler(i: int) -> type[http.server.BaseHTTPRequestHandler]:
        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers["content-length"]))
                hits.append(i)
                self.send_response(200)
                self.send_header("content-length", "2")
                self.send_header("X-Request-Id", str(i))
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args: Any) -> None:
                pass

        return Handler

    servers = [http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler(i)) for i in range(3)]
    for s in servers:
        threading.Thread(target=s.serve_forever, daemon=True).start()
    rr = RoundRobin([f"http://127.0.0.1:{s.server_address[1]}" for s in servers])
    try:
        got = [rr.post("/x", b"{}", {"content-type": "application/json"}) for _ in range(7)]
    finally:
        rr.close()
        for s in servers:
            s.shutdown()
            s.server_close()
    assert hits == [0, 1, 2, 0, 1, 2, 0]
    assert [h["x-request-id"] for _, h, _ in got] == ["0", "1", "2", "0", "1", "2", "0"]
    assert all(status == 200 and body == b"ok" for status, _, body in got)
