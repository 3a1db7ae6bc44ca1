"""The config recipe every deployment gets, and fresh guards built from it.

:func:`recipe` is the demo policy ``guard/demo.yaml`` as shipped, minus its rate
limit (so that attacks run to completion and what is measured is the
detectors); :func:`calibrate` is the one call that fits it to a deployment
(``guard calibrate --config`` on the training split and the model's answers).
:func:`prepare` does both; :func:`guarded` builds a fresh guard (fresh detector
state, its audit log in a temp file, a simulated clock) in front of the
deployment's model app, and reads the audit log back when it is closed.

Until calibration fitted the stateful detectors, :func:`interim` filled in what
they lacked by hand; a deployment that needed it says so in the report.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from benchmarks.apps import build_sklearn_app

from ._asgi import InProcess, SimClock
from ._data import Victim
from ._traffic import client_hash

__all__ = [
    "ATTACK_TICK",
    "ENV",
    "TARGET_FPR",
    "Deployment",
    "Guarded",
    "bare",
    "calibrate",
    "demo_policy",
    "guarded",
    "key_hash",
    "prepare",
    "recipe",
]

HASH_SECRET = "bench-attacks-client-hash-secret-0001"
FINGERPRINT_SALT = "bench-attacks-fingerprint-salt-0001"
NOISE_KEY = "bench-attacks-degrade-noise-key-0001"
#: the guard's secrets, fixed so that runs repeat (client hashes, fingerprints, degrade noise)
ENV = {
    "GUARD_HASH_KEY": HASH_SECRET,
    "GUARD_FINGERPRINT_SALT": FINGERPRINT_SALT,
    "GUARD_NOISE_KEY": NOISE_KEY,
}
#: seconds between an attacker's requests (it sends as fast as it gets answers)
ATTACK_TICK = 0.02
#: the target false-positive rate given to guard calibrate
TARGET_FPR = 0.001
#: parameters of the demo policy that describe one data set (must come from calibration)
DATA_PARAMS = ("feature_range", "n_classes", "baseline")


def key_hash(api_key: str) -> str:
    """The guard's client id for an API key, under the benchmark's GUARD_HASH_KEY."""
    return client_hash(HASH_SECRET, api_key)


def demo_policy() -> dict[str, Any]:
    """guard/demo.yaml as shipped."""
    text = files("inference_guard.guard").joinpath("demo.yaml").read_text(encoding="utf-8")
    doc: dict[str, Any] = yaml.safe_load(text)
    return doc


def recipe(calibration_dir: str | Path) -> dict[str, Any]:
    """The demo policy minus its rate limits and address quarantine, at ``calibration_dir``."""
    cfg = demo_policy()
    cfg["calibration_dir"] = str(calibration_dir)
    for policy in cfg["policies"]:
        policy["detectors"] = [d for d in policy.get("detectors", []) if d["type"] != "rate"]
        # every simulated client runs in-process from one address: what is measured is
        # each client's own detection, so a quarantine stays with the client's key
        policy["quarantine_address"] = "off"
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
    from inference_guard.middleware.cli import main as guard_main

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

    from inference_guard.guard.config import GuardConfig
    from inference_guard.guard.pipeline import Guard
    from inference_guard.middleware.asgi import GuardMiddleware

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
    from inference_guard.guard.config import GuardConfig
    from inference_guard.guard.errors import ConfigurationError

    cfg = copy.deepcopy(dep.config)
    cfg["exempt"] = {"api_keys": ["sha256:" + hashlib.sha256(b"probe").hexdigest()]}
    try:
        GuardConfig.load(cfg)
    except (ConfigurationError, ValueError, TypeError):
        return False
    return True


def bare(v: Victim) -> InProcess:
    return InProcess(model_app(v))
