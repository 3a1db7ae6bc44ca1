"""Stateful detectors fitted by calibration alone: sessions, profiles, the demo recipe.

The recipe under test is the one the README gives a new user: take the demo
policy file as it ships, run ``guard calibrate --config`` on another model's
training rows and answers, and serve. Nothing in it may carry a number
chosen on the digits demo, and ordinary clients (health probes, retriers,
one-class clients) must pass while probing is caught.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
from importlib.resources import files
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from sklearn.datasets import load_breast_cancer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from inference_guard.detectors.persist import load_model
from inference_guard.detectors.profile import TrafficProfile, robust_range
from inference_guard.guard import calibrate as cal
from inference_guard.guard.config import DetectorSpec
from inference_guard.guard.reference_data import DataError, ReferenceData, load_reference
from inference_guard.guard.sessions import (
    calibrate_profile,
    simulate_sessions,
    traffic_from_capture,
)
from inference_guard.middleware.asgi import GuardMiddleware
from inference_guard.middleware.cli import main

SESSIONS = 80  # enough to exercise everything; the CLI's default is 400


@functools.cache
def cancer() -> tuple[np.ndarray, np.ndarray, Any]:
    """Breast-cancer rows (features from ~0.001 to ~4000) and a model, split 75/25."""
    X, y = load_breast_cancer(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(X))
    train, test = order[:427], order[427:]
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000))
    model.fit(X[train], y[train])
    return X[train].astype(np.float64), X[test].astype(np.float64), model


def demo_policy() -> dict[str, Any]:
    text = files("inference_guard.guard").joinpath("demo.yaml").read_text(encoding="utf-8")
    config: dict[str, Any] = yaml.safe_load(text)
    return config


def test_the_demo_policy_holds_no_data_dependent_parameter() -> None:
    """The shipped policy names no range, class count, baseline or absolute threshold."""
    for det in demo_policy()["policies"][0]["detectors"]:
        params = det.get("params", {})
        assert not {"feature_range", "n_classes", "baseline", "threshold", "delta"} & set(params)
        for step in det.get("escalate", []):
            assert "score_below" not in step, det["type"]


# --------------------------------------------------------------------------- pieces


def test_robust_range_is_per_feature_and_never_degenerate() -> None:
    rng = np.random.default_rng(0)
    X = np.column_stack(
        [rng.uniform(0.0, 0.2, 500), rng.uniform(0.0, 4000.0, 500), np.zeros(500)]
    )
    X[0, 0] = 1e6  # one wild row does not stretch the scale
    low, high = robust_range(X)
    width = high - low
    assert 0.15 < width[0] < 0.2 and 3500 < width[1] < 4000
    assert width[2] == pytest.approx(np.median(width[:2]))  # constant: the others' median
    assert (high > low).all()


def test_simulated_sessions_are_what_they_claim() -> None:
    predicted = np.repeat([0, 1, 2], 100)
    sessions = simulate_sessions(300, 600, predicted=predicted, seed=3)
    kinds = {s.kind for s in sessions}
    assert kinds == {"ordinary", "health_probe", "retrier", "batch_job", "one_class"}
    for s in sessions:
        rows = np.concatenate(s.batches)
        if s.kind == "health_probe":
            assert np.unique(rows).shape[0] == 1 and all(b.shape == (1,) for b in s.batches)
        elif s.kind == "retrier":
            assert (rows[0::3] == rows[1::3]).all() and (rows[0::3] == rows[2::3]).all()
        elif s.kind == "batch_job":
            assert ((np.diff(rows) == 1) | (np.diff(rows) == -299)).all()  # stored order
            assert max(b.shape[0] for b in s.batches) <= 64
        elif s.kind == "one_class":
            assert np.unique(predicted[rows]).shape[0] == 1
    assert len({s.client for s in sessions}) == len(sessions)


def test_reference_npz_carries_the_models_answers(tmp_path: Path) -> None:
    X, _, model = cancer()
    path = tmp_path / "ref.npz"
    np.savez(path, X=X, proba=model.predict_proba(X))
    data = load_reference(path)
    assert data.probabilities is not None and data.probabilities.shape == (len(X), 2)
    assert (data.predicted == model.predict(X)).all()
    np.savez(path, X=X, proba=model.predict_proba(X)[:10])
    with pytest.raises(DataError, match="proba"):
        load_reference(path)
    np.savez(path, X=X, labels=np.full(len(X), -1))
    with pytest.raises(DataError, match="labels"):
        load_reference(path)


def test_a_profile_needs_the_models_answers_for_prada_and_boundary(tmp_path: Path) -> None:
    X, _, _ = cancer()
    data = ReferenceData(X, (), "rows only")
    with pytest.raises(DataError, match="proba"):
        calibrate_profile(DetectorSpec(type="prada", name="prada"), data, tmp_path)
    report = calibrate_profile(
        DetectorSpec(type="near_duplicate", name="near_duplicate"), data, tmp_path, n_sessions=40
    )
    profile = load_model(report.path)
    assert isinstance(profile, TrafficProfile) and profile.detector == "near_duplicate"
    assert profile.n_features_in_ == X.shape[1]


# --------------------------------------------------------------------------- the recipe


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """``guard calibrate --config demo.yaml`` on the breast-cancer model; (dir, report)."""
    X, _, model = cancer()
    out = tmp_path_factory.mktemp("calibration")
    ref = out.parent / "cancer.npz"
    np.savez(ref, X=X, proba=model.predict_proba(X))
    config = out.parent / "guard.yaml"
    config.write_text(yaml.safe_dump(demo_policy()))
    parser = argparse.ArgumentParser()
    cal.add_arguments(parser)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = cal.run(
            parser.parse_args(
                ["--data", str(ref), "--out", str(out), "--config", str(config),
                 "--sessions", str(SESSIONS)]
            )
        )
    assert rc == 0
    return out, buf.getvalue()


def test_calibrate_fits_and_reports_every_detector_of_the_policy(
    calibrated: tuple[Path, str],
) -> None:
    out, report = calibrated
    for kind in ("envelope", "mahalanobis", "knn", "near_duplicate", "prada", "boundary"):
        assert (out / f"{kind}.npz").is_file() and (out / f"{kind}.json").is_file(), kind
    for kind in ("near_duplicate", "prada", "boundary"):
        line = next(ln for ln in report.splitlines() if ln.startswith(kind + " "))
        assert "ordinary" in report and "client FPR" in report, line
    nd = load_model(out / "near_duplicate.npz")
    X, _, _ = cancer()
    width = nd.high_ - nd.low_
    # per-feature scales: the widest feature is thousands of times the narrowest
    assert width.max() / width.min() > 1000
    assert (width == pytest.approx(robust_range(X)[1] - robust_range(X)[0]))
    boundary = load_model(out / "boundary.npz")
    assert boundary.n_classes == 2 and np.isfinite(boundary.baseline_[:3]).all()
    # the anomaly_rate detector has nothing to fit: it is measured on simulated sessions
    detectors = demo_policy()["policies"][0]["detectors"]
    at = next(i for i, d in enumerate(detectors) if d["type"] == "anomaly_rate")
    assert f"anomaly_rate policies[0].detectors[{at}]: counts envelope, mahalanobis, knn's" in (
        report
    )


def test_check_config_names_the_detectors_that_lack_calibration(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], calibrated: tuple[Path, str]
) -> None:
    config = demo_policy()
    path = tmp_path / "guard.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["check-config", str(path)]) == 1
    err = capsys.readouterr().err
    for kind in ("near_duplicate", "prada", "boundary"):
        assert kind in err or "not calibrated" in err
    assert err.count("not calibrated") == 3
    config["calibration_dir"] = str(calibrated[0])
    path.write_text(yaml.safe_dump(config))
    assert main(["check-config", str(path)]) == 0


def _model_app(model: Any) -> Starlette:
    async def infer(request: Request) -> JSONResponse:
        body = await request.json()
        tensor = body["inputs"][0]
        rows = np.asarray(tensor["data"], dtype=np.float64).reshape(tensor["shape"])
        probs = model.predict_proba(rows)
        return JSONResponse(
            {
                "model_name": "cancer",
                "outputs": [
                    {"name": "label", "datatype": "INT64", "shape": [len(rows)],
                     "data": probs.argmax(axis=1).tolist()},
                    {"name": "probabilities", "datatype": "FP64", "shape": list(probs.shape),
                     "data": probs.ravel().tolist()},
                ],
            }
        )

    return Starlette(routes=[Route("/v2/models/cancer/infer", infer, methods=["POST"])])


def _payload(rows: np.ndarray) -> dict[str, Any]:
    return {
        "inputs": [
            {"name": "x", "datatype": "FP64", "shape": list(rows.shape),
             "data": rows.ravel().tolist()}
        ]
    }


def test_the_calibrated_demo_policy_spares_ordinary_clients_and_stops_probing(
    calibrated: tuple[Path, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a model it was never tuned on, ordinary clients pass and probing does not."""
    monkeypatch.setenv("GUARD_FINGERPRINT_SALT", "a test salt of sixteen bytes or more")
    X, held_out, model = cancer()
    config = demo_policy()
    config["calibration_dir"] = str(calibrated[0])
    config["audit"] = {"path": str(tmp_path / "audit.jsonl")}
    policy = config["policies"][0]
    policy["detectors"] = [d for d in policy["detectors"] if d["type"] != "rate"]
    app = GuardMiddleware(_model_app(model), config=config)
    url = "/v2/models/cancer/infer"
    rng = np.random.default_rng(5)

    def send(key: str, rows: np.ndarray) -> int:
        r = client.post(url, json=_payload(rows), headers={"x-api-key": key})
        return r.status_code

    with TestClient(app, client=("127.0.0.1", 50000)) as client:
        ordinary = [send("ordinary", held_out[i : i + 4]) for i in range(0, 140, 4)]
        probe = [send("probe", held_out[:1]) for _ in range(150)]
        retrier = [send("retrier", held_out[i : i + 1]) for i in range(50) for _ in range(3)]
        benign_class = held_out[model.predict(held_out) == 1]
        one_class = [
            send("one-class", benign_class[i : i + 2]) for i in range(0, len(benign_class) - 1, 2)
        ]
        # probing: tiny perturbations around one input (HopSkipJump's gradient estimates)
        x0 = held_out[7]
        scale = robust_range(X)[1] - robust_range(X)[0]
        probing = [
            send("prober", x0 + rng.normal(0.0, 0.01, size=(4, x0.shape[0])) * scale)
            for _ in range(40)
        ]
    assert len(one_class) >= 30
    assert set(ordinary) == set(probe) == set(retrier) == set(one_class) == {200}
    assert 403 in probing  # quarantined after a few requests
    lines = [json.loads(x) for x in (tmp_path / "audit.jsonl").read_text().splitlines() if x]
    enforced = {x["client"] for x in lines if x["enforced"] in ("degrade", "throttle", "block")}
    assert len(enforced) == 1  # the prober alone
    assert len({x["client"] for x in lines}) == 1  # and no one else has an audit line


def test_thresholds_can_be_set_on_recorded_traffic(tmp_path: Path) -> None:
    """A capture file of benign sessions replaces the simulated ones; exempt lines are ignored."""
    X, held_out, model = cancer()
    rng = np.random.default_rng(2)
    lines = []
    for c in range(30):
        for i in rng.permutation(len(held_out))[:20]:
            row = held_out[i : i + 1]
            lines.append(
                {"ts": float(len(lines)), "client": f"client-{c}", "route": "/v2/models/m/infer",
                 "rows": row.tolist(), "probabilities": model.predict_proba(row).tolist(),
                 "exempt": False}
            )
    lines.append({"ts": 1e6, "client": "monitor", "route": "/v2/models/m/infer",
                  "rows": held_out[:1].tolist(), "labels": [0], "exempt": True})
    capture = tmp_path / "capture.jsonl"
    capture.write_text("\n".join(json.dumps(x) for x in lines))
    traffic = traffic_from_capture(capture)
    assert len(traffic.sessions) == 30 and traffic.rows.shape == (600, X.shape[1])
    assert traffic.probabilities is not None and traffic.labels is not None
    report = calibrate_profile(
        DetectorSpec(type="prada", name="prada"),
        ReferenceData(X, (), "train", model.predict_proba(X)),
        tmp_path,
        traffic=traffic,
    )
    assert (report.sessions, report.check_sessions) == (20, 10)
    assert "recorded clients" in report.note and "client-" in report.note
    assert set(report.by_kind) == {"recorded"}


def test_calibration_runs_its_async_steps_from_inside_a_running_loop() -> None:
    """An ASGI server may call an app factory that calibrates (``uvicorn --factory``
    with a cold cache) from its event loop's thread, where asyncio.run refuses."""
    import asyncio
    import threading

    from inference_guard.guard.sessions import run_to_completion

    async def work() -> tuple[int, str]:
        await asyncio.sleep(0)
        return 42, threading.current_thread().name

    assert run_to_completion(work())[0] == 42  # no loop: run here

    async def factory() -> tuple[int, str]:  # what the server's loop runs
        return run_to_completion(work())

    value, thread = asyncio.run(factory())
    assert value == 42 and thread.startswith("guard-calibrate")
