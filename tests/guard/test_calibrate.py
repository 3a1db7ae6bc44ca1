"""``guard calibrate``, the anomaly factories, and the digits demo helper."""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sklearn.datasets import load_digits

from detectors.anomaly import RowAnomalyDetector, TextAnomalyDetector
from detectors.anomaly_rate import AnomalyRateDetector
from detectors.base import Query
from detectors.ood_samples import tag_smuggled, uniform_noise
from detectors.persist import load_model, manifest_path
from detectors.prompt_corpus import benign_prompts
from guard import calibrate as cal
from guard.calibration_files import calibration_key
from guard.config import DetectorSpec, GuardConfig
from guard.errors import ConfigurationError, ModelFileError
from guard.reference_data import DataError, ReferenceData, load_reference
from guard.registry import BuildContext, build_detector
from guard.stores.memory import MemoryStore
from middleware.cli import main

ROW_KINDS = ("envelope", "mahalanobis", "iforest", "knn")


def digits() -> np.ndarray:
    return np.asarray(load_digits().data, dtype=np.float64)


def run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    cal.add_arguments(parser)
    return cal.run(parser.parse_args(list(argv)))


def ctx(calibration_dir: Path | None) -> BuildContext:
    return BuildContext(store=MemoryStore(), calibration_dir=calibration_dir, clock=lambda: 0.0)


def spec(type_: str, key: str = "policies[0].detectors[0]", **params: Any) -> DetectorSpec:
    return DetectorSpec(type=type_, name=type_, params=params, key=key)


def inspect(det: Any, rows: np.ndarray | None = None, texts: tuple[str, ...] = ()) -> Any:
    n = len(texts) if rows is None else len(rows)
    return asyncio.run(det.inspect(Query(client="c", policy="p", rows=rows, texts=texts, n_rows=n)))


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cal")
    data = out / "ref.npy"
    np.save(data, digits())
    assert run_cli("--data", str(data), "--out", str(out), "--target-fpr", "0.01") == 0
    return out


def test_cli_writes_every_row_detector_and_reports(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "ref.npy"
    np.save(data, digits())
    out = tmp_path / "out"
    assert run_cli("--data", str(data), "--out", str(out), "--target-fpr", "0.01",
                   "--seed", "3") == 0
    captured = capsys.readouterr()
    for kind in ROW_KINDS:
        assert (out / f"{kind}.npz").is_file() and manifest_path(out / f"{kind}.npz").is_file()
        assert kind in captured.out
        model = load_model(out / f"{kind}.npz", kind=kind, n_features=64)
        assert model.target_fpr == 0.01 and model.calibration_size_ == round(0.2 * 1797)
    assert "FPR held" in captured.out and "1797 rows x 64 features" in captured.out
    assert "8/8" in captured.err  # the progress bar reached its end


def test_heldout_fpr_never_exceeds_target_and_notes_unresolvable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    reports = cal.calibrate_rows(digits(), tmp_path, target_fpr=0.01)
    assert {r.kind for r in reports} == set(ROW_KINDS)
    for r in reports:
        assert r.heldout_fpr <= 0.01 and r.resolvable and r.n_heldout == 359
        assert r.quantiles[0] == pytest.approx(min(r.quantiles)) and r.threshold >= r.quantiles[0]
    tiny = cal.calibrate_rows(digits(), tmp_path, kinds=["mahalanobis"], target_fpr=0.001)
    assert not tiny[0].resolvable
    text = cal.format_report(tiny, ReferenceData(digits(), (), "x"), holdout=0.2, seed=0)
    assert "cannot resolve a target FPR of 0.001" in text


def test_factories_load_calibrated_detectors(calibrated: Path) -> None:
    noise = uniform_noise(50, 64, low=0, high=16, rng=np.random.default_rng(0))
    for kind in ROW_KINDS:
        det = build_detector(spec(kind, track_rate=True), ctx(calibrated))
        assert isinstance(det, RowAnomalyDetector)
        res = inspect(det, noise)
        assert res.anomalous and res.rows_flagged == 50, kind


def test_model_params_in_config_must_match_the_file(calibrated: Path) -> None:
    build_detector(spec("mahalanobis", shrinkage="ledoit_wolf"), ctx(calibrated))
    with pytest.raises(ConfigurationError) as err:
        build_detector(spec("mahalanobis", shrinkage="oas"), ctx(calibrated))
    assert err.value.key == "policies[0].detectors[0].params.shrinkage"
    with pytest.raises(ConfigurationError) as err:
        build_detector(spec("knn", holdout=0.5), ctx(calibrated))
    assert err.value.key == "policies[0].detectors[0].params.holdout"


def test_missing_calibration_names_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError) as err:
        build_detector(spec("knn", key="policies[1].detectors[2]"), ctx(None))
    assert err.value.key == "policies[1].detectors[2].params.file"
    assert "calibration_dir" in str(err.value)
    with pytest.raises(ConfigurationError) as err:
        build_detector(spec("knn", key="policies[1].detectors[2]"), ctx(tmp_path))
    assert err.value.key == "policies[1].detectors[2]" and "guard calibrate" in str(err.value)
    with pytest.raises(ConfigurationError) as err:
        build_detector(spec("iforest", file="nope.npz"), ctx(tmp_path))
    assert err.value.key == "policies[0].detectors[0].params.file"


def test_tampered_calibration_is_a_model_file_error(calibrated: Path, tmp_path: Path) -> None:
    for name in ("knn.npz", "knn.json"):
        (tmp_path / name).write_bytes((calibrated / name).read_bytes())
    data = bytearray((tmp_path / "knn.npz").read_bytes())
    data[100] ^= 0xFF
    (tmp_path / "knn.npz").write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match="SHA-256"):
        build_detector(spec("knn"), ctx(tmp_path))
    # a file of another type under the expected name
    (tmp_path / "iforest.npz").write_bytes((calibrated / "knn.npz").read_bytes())
    (tmp_path / "iforest.json").write_bytes((calibrated / "knn.json").read_bytes())
    with pytest.raises(ModelFileError):
        build_detector(spec("iforest"), ctx(tmp_path))


def test_bad_params_are_configuration_errors(calibrated: Path) -> None:
    with pytest.raises(ConfigurationError) as err:
        build_detector(spec("knn", colour="blue"), ctx(calibrated))
    assert err.value.key == "policies[0].detectors[0].params.colour"
    with pytest.raises(ConfigurationError) as err:
        build_detector(spec("knn", on_width_mismatch="ignore"), ctx(calibrated))
    assert err.value.key.endswith("params.on_width_mismatch")
    with pytest.raises(ConfigurationError) as err:
        build_detector(spec("anomaly_rate"), ctx(calibrated))
    assert err.value.key.endswith("params.source")
    with pytest.raises(ConfigurationError) as err:
        build_detector(spec("anomaly_rate", source="knn", max_rate=2), ctx(calibrated))
    assert err.value.key.endswith("params.max_rate")


def test_anomaly_rate_reads_what_the_row_detector_counts(calibrated: Path) -> None:
    shared = ctx(calibrated)
    rows = build_detector(spec("knn", track_rate=True), shared)
    rate = build_detector(spec("anomaly_rate", source="knn", min_rows=10, max_rate=0.2), shared)
    assert isinstance(rate, AnomalyRateDetector)
    noise = uniform_noise(12, 64, low=0, high=16, rng=np.random.default_rng(1))
    assert not inspect(rate).anomalous
    inspect(rows, noise)
    assert inspect(rate).anomalous


def test_config_selects_detectors_params_and_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cal"
    config = {
        "calibration_dir": str(out),
        "policies": [
            {"name": "tab", "detectors": [
                {"type": "mahalanobis", "params": {"shrinkage": "oas", "file": "m-oas.npz"}},
                {"type": "knn", "params": {"n_neighbors": 3, "track_rate": True}},
                {"type": "anomaly_rate", "params": {"source": "knn"}},
                {"type": "text"},
            ]},
            {"name": "tab2", "detectors": [
                {"type": "mahalanobis", "name": "m2",
                 "params": {"shrinkage": "oas", "file": "m-oas.npz"}},
            ]},
        ],
    }
    cfg_file = tmp_path / "guard.json"
    cfg_file.write_text(json.dumps(config))
    data = tmp_path / "ref.npy"
    np.save(data, digits())
    assert run_cli("--data", str(data), "--out", str(out), "--config", str(cfg_file)) == 0
    assert sorted(p.name for p in out.glob("*.npz")) == ["knn.npz", "m-oas.npz"]
    assert "skipped policies[0].detectors[3] (text)" in capsys.readouterr().err
    assert load_model(out / "knn.npz").get_params()["n_neighbors"] == 3
    # the same config now builds at start-up (text still lacks its calibration)
    cfg = GuardConfig.load(config)
    shared = ctx(out)
    for policy in cfg.policies:
        for s in policy.detectors:
            if s.type != "text":
                build_detector(s, shared)


def test_config_conflicting_files_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg_file = tmp_path / "guard.json"
    cfg_file.write_text(json.dumps({"policies": [{"name": "p", "detectors": [
        {"type": "knn", "name": "a", "params": {"n_neighbors": 3}},
        {"type": "knn", "name": "b", "params": {"n_neighbors": 9}},
    ]}]}))
    data = tmp_path / "ref.npy"
    np.save(data, digits())
    assert run_cli("--data", str(data), "--out", str(tmp_path), "--config", str(cfg_file)) == 1
    assert "policies[0].detectors[1].params.file" in capsys.readouterr().err


def test_text_calibration_from_chat_jsonl(tmp_path: Path) -> None:
    data = tmp_path / "chats.jsonl"
    with data.open("w") as fh:
        for i, prompt in enumerate(benign_prompts(2500, seed=4)):
            msg: dict[str, object]
            if i % 2:
                msg = {"messages": [{"role": "system", "content": "You are helpful."},
                                    {"role": "user", "content": prompt}]}
            else:
                msg = {"prompt": prompt}
            fh.write(json.dumps(msg) + "\n")
    out = tmp_path / "cal"
    assert run_cli("--data", str(data), "--out", str(out), "--target-fpr", "0.01") == 0
    assert [p.name for p in out.glob("*.npz")] == ["text.npz"]
    det = build_detector(spec("text"), ctx(out))
    assert isinstance(det, TextAnomalyDetector)
    assert not inspect(det, texts=("Can you explain how compound interest works?",)).anomalous
    assert inspect(det, texts=(tag_smuggled("Summarize this email."),)).anomalous


def test_reference_formats_agree(tmp_path: Path) -> None:
    X = digits()[:40]
    (tmp_path / "a.csv").write_text(
        ",".join(f"p{i}" for i in range(64)) + "\n"
        + "\n".join(",".join(str(v) for v in row) for row in X) + "\n"
    )
    np.savez(tmp_path / "a.npz", X=X, y=np.arange(40))
    lines = [
        json.dumps({"inputs": [{"name": "x", "datatype": "FP64", "shape": [10, 64],
                                "data": X[:10].ravel().tolist()}]}),
        json.dumps({"instances": X[10:20].tolist()}),
        json.dumps(X[20:30].tolist()),
        json.dumps({"dataframe_split": {"columns": list(range(64)), "data": X[30:39].tolist()}}),
        json.dumps(X[39].tolist()),
    ]
    (tmp_path / "a.jsonl").write_text("\n".join(lines) + "\n")
    for name in ("a.csv", "a.npz", "a.jsonl"):
        ref = load_reference(tmp_path / name)
        assert ref.rows is not None and np.array_equal(ref.rows, X), name


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("bad.csv", "1,2\n3,nan\n", "NaN"),
        ("bad.csv", "1,2\n3\n", "columns"),
        ("bad.jsonl", '{"instances": [[1, 2]]}\n"text"\n', "mixes"),
        ("bad.jsonl", '{"foo": 1}\n', "unrecognised"),
        ("bad.pkl", "x", "unsupported"),
    ],
)
def test_bad_reference_data(tmp_path: Path, name: str, content: str, message: str) -> None:
    (tmp_path / name).write_text(content)
    with pytest.raises(DataError, match=message):
        load_reference(tmp_path / name)


def test_pickled_npy_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    assert run_cli("--data", str(tmp_path / "obj.npy"), "--out", str(tmp_path / "o")) == 1
    assert "error" in capsys.readouterr().err


def test_too_little_data(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    np.save(tmp_path / "few.npy", np.ones((3, 4)))
    assert run_cli("--data", str(tmp_path / "few.npy"), "--out", str(tmp_path / "o")) == 1
    assert "too few" in capsys.readouterr().err


def test_hmac_key_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GUARD_CALIBRATION_KEY", "k3y")
    cal.calibrate_rows(digits(), tmp_path, kinds=["envelope"], target_fpr=0.01,
                       hmac_key=calibration_key())
    assert "hmac_sha256" in json.loads((tmp_path / "envelope.json").read_text())
    build_detector(spec("envelope"), ctx(tmp_path))
    monkeypatch.setenv("GUARD_CALIBRATION_KEY", "wrong")
    with pytest.raises(ModelFileError, match="HMAC"):
        build_detector(spec("envelope"), ctx(tmp_path))
    monkeypatch.delenv("GUARD_CALIBRATION_KEY")
    with pytest.raises(ModelFileError, match="signed"):
        build_detector(spec("envelope"), ctx(tmp_path))


def test_calibrate_digits_uses_the_demo_training_split(tmp_path: Path) -> None:
    reports = cal.calibrate_digits(tmp_path, target_fpr=0.01)
    assert {r.kind for r in reports} == set(ROW_KINDS)
    assert reports[0].n_fit + reports[0].n_heldout == int(0.8 * 1797)
    demo = pytest.importorskip("middleware.demo")
    model = demo.train_digits_model(0)
    again = cal.calibrate_digits(tmp_path / "b", target_fpr=0.01, X=model.X_train)
    assert [r.threshold for r in again] == [r.threshold for r in reports]
    # the demo's own test rows are mostly normal for every detector
    for kind in ROW_KINDS:
        det = load_model(tmp_path / f"{kind}.npz")
        assert np.mean(det.predict(model.X_test) == -1) < 0.05, kind


def test_guard_cli_dispatches_to_calibrate(tmp_path: Path) -> None:
    np.save(tmp_path / "ref.npy", digits())
    out = tmp_path / "o"
    assert main(["calibrate", "--data", str(tmp_path / "ref.npy"), "--out", str(out),
                 "--detectors", "envelope,mahalanobis"]) == 0
    assert sorted(p.name for p in out.glob("*.npz")) == ["envelope.npz", "mahalanobis.npz"]
    assert main(["calibrate", "--data", str(tmp_path / "ref.npy"), "--out", str(out),
                 "--detectors", "text"]) == 1
