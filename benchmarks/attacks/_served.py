"""The app every uvicorn worker of the workers benchmark serves (``uvicorn --factory``).

A guard built from the deployment's calibrated recipe (the YAML file named by
``BENCH_ATTACKS_CONFIG``, its ``state`` pointing at the shared store) in front
of the deployment's model (``BENCH_ATTACKS_VICTIM``, e.g. ``digits-linear``,
rebuilt from ``BENCH_ATTACKS_SEED`` exactly as the benchmark built it), its
audit log written to ``BENCH_ATTACKS_AUDIT`` (one file per worker). Real time,
real sockets: nothing of :mod:`._asgi`'s simulated clock.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

__all__ = ["app"]


def app() -> Any:
    from prometheus_client import CollectorRegistry

    from benchmarks.attacks._data import victim
    from benchmarks.attacks._recipe import model_app
    from inference_guard.middleware.asgi import GuardMiddleware

    dataset, family = os.environ["BENCH_ATTACKS_VICTIM"].rsplit("-", 1)
    v = victim(dataset, family, int(os.environ.get("BENCH_ATTACKS_SEED", "0")))
    cfg = yaml.safe_load(Path(os.environ["BENCH_ATTACKS_CONFIG"]).read_text())
    cfg["audit"] = {"path": os.environ["BENCH_ATTACKS_AUDIT"]}
    return GuardMiddleware(model_app(v), config=cfg, registry=CollectorRegistry())
