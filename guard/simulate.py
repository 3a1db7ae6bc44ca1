"""``guard simulate ATTACK --target URL``: run one attack client against a deployment.

The clients live in the source checkout, in ``benchmarks/attacks/`` (they are
benchmark code, not part of the installed package). They are located from this
file's path and loaded with :mod:`importlib` only when the command runs, so
``guard`` never imports benchmark code otherwise; from a non-editable install
the command says so and exits 2.

Which model: by default the demo's digits model (``guard demo``), on
``/v2/models/digits/infer``. ``--model NAME`` targets any model served over the
Open Inference Protocol v2 (``POST /v2/models/NAME/infer``): the clients learn
its width from ``--reference REF`` (the owner's reference rows, as ``guard
calibrate`` reads them: ``.npz`` with ``X`` and perhaps the model's answers
``labels`` or ``proba``, ``.csv``, ``.npy``, ``.jsonl``), which also gives the
feature ranges and the natural rows the natural clients send; without a
reference, from the model's metadata (``GET /v2/models/NAME``), with the box
``[0, 1]`` per feature (uniform clients only).

Each run is a new client: it draws a fresh random API key (``x-api-key``)
unless ``--api-key`` is given, so a quarantine from one run does not refuse the
next. The output says what the deployment did to the client: rows and requests
sent, the status codes seen, how many answers were rounded (every probability
a round number), how many were *perturbed* (further from the demo model's own
probabilities than their rounding explains: the guard's silent ``degrade``
noise; measured against the demo only), how many requests were blocked, what
the attacker achieved (a stolen model's agreement with the demo model, or with
the answers the reference records, or evasion success), and, when the
deployment's ``/metrics`` answers from here, which detectors fired and how many
clients were quarantined during the run (from the metrics before and after:
every client's, not only this one's). A run in which nothing was answered
exits 1: whatever it printed was learnt from nothing.
"""

from __future__ import annotations

import argparse
import http.client
import importlib
import importlib.util
import json
import secrets
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

from inference_guard.guard.metrics import FLUSH_AFTER_S

__all__ = ["ATTACKS", "add_arguments", "clients_dir", "load_clients", "run"]

#: the attack clients, by name (``benign`` replays natural held-out rows; ``knockoff-natural``
#: queries held-out rows of the victim's own distribution, ``knockoff-open-world`` patches of
#: natural photos)
ATTACKS: tuple[str, ...] = (
    "jbda",
    "knockoff-uniform",
    "knockoff-natural",
    "knockoff-open-world",
    "equation-solving",
    "hopskipjump",
    "boundary",
    "benign",
)

_PACKAGE = "_inference_guard_attack_clients"


def clients_dir() -> Path:
    """Where the attack clients are in a source checkout (it may not exist)."""
    return Path(__file__).resolve().parent.parent / "benchmarks" / "attacks"


def load_clients() -> ModuleType | None:
    """The ``clients`` module of ``benchmarks/attacks``, or ``None`` when it is absent."""
    root = clients_dir()
    init = root / "__init__.py"
    if not (init.is_file() and (root / "clients.py").is_file()):
        return None
    if _PACKAGE not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            _PACKAGE, init, submodule_search_locations=[str(root)]
        )
        if spec is None or spec.loader is None:
            return None
        package = importlib.util.module_from_spec(spec)
        sys.modules[_PACKAGE] = package
        try:
            spec.loader.exec_module(package)
        except BaseException:
            del sys.modules[_PACKAGE]
            raise
    return importlib.import_module(f"{_PACKAGE}.clients")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("attack", help=f"one of: {', '.join(ATTACKS)}")
    parser.add_argument(
        "--target", required=True, help="base URL of the deployment, e.g. http://127.0.0.1:8000"
    )
    parser.add_argument(
        "--model",
        default=None,
        help="model name on the OIP v2 routes (/v2/models/NAME/infer); default: the demo's "
        "digits model",
    )
    parser.add_argument(
        "--reference",
        default=None,
        metavar="REF",
        help="the model's reference rows (.npz with X and perhaps labels or proba, .csv, .npy, "
        ".jsonl): width, feature ranges and natural rows; without it the width comes from "
        "GET /v2/models/NAME",
    )
    parser.add_argument(
        "--api-key", default=None, help="x-api-key to send; default: a fresh random key per run"
    )
    parser.add_argument(
        "--rows",
        type=int,
        default=None,
        help="rows to send (evasion attacks: the cap per attacked input); default per attack",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the attack's randomness")
    parser.add_argument(
        "--inputs", type=int, default=1, help="hopskipjump/boundary: inputs to attack"
    )
    parser.add_argument(
        "--metrics-path", default="/metrics", help="the guard's metrics on the target"
    )


class _Failed(Exception):
    """The run cannot start; the message says why (exit 2)."""


def _get(url: str, path: str, timeout: float = 10.0) -> tuple[int, bytes]:
    parts = urlsplit(url)
    if parts.scheme != "http" or parts.hostname is None:
        raise _Failed(f"target must be http://host:port, got {url!r}")
    conn = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=timeout)
    try:
        conn.request("GET", parts.path.rstrip("/") + path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def _metadata_width(url: str, model: str) -> int | None:
    """The input width from ``GET /v2/models/{model}`` (OIP v2 metadata), if it says."""
    try:
        status, body = _get(url, f"/v2/models/{model}")
    except (OSError, http.client.HTTPException):
        return None
    if status != 200:
        return None
    try:
        shape = json.loads(body)["inputs"][0]["shape"]
        width = int(shape[-1])
    except (ValueError, KeyError, IndexError, TypeError):
        return None
    return width if width > 0 else None


def _victim(clients: ModuleType, args: argparse.Namespace) -> Any:
    """The deployment as the clients see it: ``None`` for the demo, else a recorded victim."""
    model = args.model
    if model is None and args.reference is None:
        return None
    model = model or "digits"
    data = importlib.import_module(f"{_PACKAGE}._data")
    width = _metadata_width(args.target, model)
    if args.reference is None:
        if width is None:
            raise _Failed(
                f"the width of model {model!r} is unknown: GET /v2/models/{model} on the target "
                "does not give it; pass --reference with the model's reference rows"
            )
        return data.recorded(model, None, n_features=width, seed=args.seed)
    from inference_guard.guard.reference_data import DataError, load_reference

    try:
        ref = load_reference(args.reference)
    except DataError as exc:
        raise _Failed(str(exc)) from exc
    if ref.rows is None:
        raise _Failed(f"{args.reference}: holds texts; the attack clients send numeric rows")
    if width is not None and width != ref.rows.shape[1]:
        raise _Failed(
            f"{args.reference} has {ref.rows.shape[1]} features but the target's metadata for "
            f"model {model!r} says {width}"
        )
    n_classes = 0 if ref.probabilities is None else int(ref.probabilities.shape[1])
    return data.recorded(
        model,
        ref.rows,
        n_features=int(ref.rows.shape[1]),
        answers=ref.predicted,
        n_classes=n_classes,
        seed=args.seed,
    )


# ------------------------------------------------------------------ the guard's metrics

#: a family's samples we compare before and after: name -> the labels that tell them apart
_WATCHED = {
    "guard_detections_total": ("detector", "action"),
    "guard_quarantines_total": ("policy",),
}


def _read_metrics(url: str, path: str) -> dict[str, dict[tuple[str, ...], float]] | None:
    """The watched counters on the target's ``/metrics``, summed by their labels; None if none."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        status, body = _get(url, path)
    except (OSError, http.client.HTTPException):
        return None
    if status != 200:
        return None
    out: dict[str, dict[tuple[str, ...], float]] = {name: {} for name in _WATCHED}
    found = False
    try:
        for family in text_string_to_metric_families(body.decode("utf-8", "replace")):
            for sample in family.samples:
                keys = _WATCHED.get(sample.name)
                if keys is None:
                    continue
                found = True
                key = tuple(sample.labels.get(k, "") for k in keys)
                out[sample.name][key] = out[sample.name].get(key, 0.0) + sample.value
    except ValueError:
        return None
    return out if found else None


def _increase(
    before: Mapping[tuple[str, ...], float], after: Mapping[tuple[str, ...], float]
) -> dict[tuple[str, ...], float]:
    return {
        k: v - before.get(k, 0.0) for k, v in sorted(after.items()) if v - before.get(k, 0.0) > 0
    }


def _report_metrics(
    before: dict[str, dict[tuple[str, ...], float]] | None,
    after: dict[str, dict[tuple[str, ...], float]] | None,
    path: str,
) -> None:
    if before is None or after is None:
        print(
            f"detectors fired: not known ({path} on the target does not answer here with the "
            "guard's metrics; it answers only networks in metrics.allow_from)"
        )
        return
    fired = _increase(before["guard_detections_total"], after["guard_detections_total"])
    quarantined = _increase(before["guard_quarantines_total"], after["guard_quarantines_total"])
    listed = ", ".join(f"{d} ({a}): {n:g}" for (d, a), n in fired.items())
    print(f"detectors fired during the run (all clients, from {path}): {listed or 'none'}")
    total = sum(quarantined.values())
    print(f"clients quarantined during the run (all clients): {total:g}")


#: what stops a run: the target or reference unusable, a missing optional dependency (ART),
#: a refused connection
_CANNOT_RUN = (_Failed, ImportError, RuntimeError, ValueError, OSError, http.client.HTTPException)


def run(args: argparse.Namespace) -> int:
    """Run the client; 0 when it ran and was answered, 1 when nothing was answered,
    2 when it could not run."""
    if args.attack not in ATTACKS:
        print(
            f"guard simulate: unknown attack {args.attack!r} (choose from {', '.join(ATTACKS)})",
            file=sys.stderr,
        )
        return 2
    if args.rows is not None and args.rows < 1:
        print("guard simulate: --rows must be >= 1", file=sys.stderr)
        return 2
    if args.inputs < 1:
        print("guard simulate: --inputs must be >= 1", file=sys.stderr)
        return 2
    clients = load_clients()
    if clients is None:
        print(
            f"guard simulate: the attack clients are not installed (looked in {clients_dir()}); "
            "they ship with the source checkout: run from a clone with `pip install -e .`",
            file=sys.stderr,
        )
        return 2
    api_key = args.api_key or f"simulate-{secrets.token_hex(8)}"
    try:
        victim = _victim(clients, args)
        before = _read_metrics(args.target, args.metrics_path)
        report = clients.simulate(
            args.attack,
            args.target,
            api_keys=[api_key],
            rows=args.rows,
            seed=args.seed,
            inputs=args.inputs,
            victim=victim,
        )
    except _CANNOT_RUN as exc:
        print(f"guard simulate: {args.attack}: {exc}", file=sys.stderr)
        return 2
    after = None
    if before is not None:
        time.sleep(FLUSH_AFTER_S)  # other workers' updates reach the shared metrics by then
        after = _read_metrics(args.target, args.metrics_path)
    oracle = report.oracle
    log = oracle.log
    answered = oracle.statuses.get(200, 0)
    blocked = oracle.statuses.get(403, 0)
    statuses = ", ".join(f"{code}: {n}" for code, n in sorted(oracle.statuses.items()))
    model = "digits" if victim is None else str(victim.name)
    shown = "digits (the demo)" if victim is None else model
    print(f"attack: {report.attack} against {args.target}, model {shown} (seed {args.seed})")
    print(f"api key: {api_key if args.api_key else api_key + ' (fresh for this run)'}")
    print(f"rows sent: {oracle.rows} in {oracle.requests} requests")
    print(f"status codes: {statuses or 'none'}")
    print(f"answers with rounded probabilities: {oracle.coarse} of {answered}")
    if victim is None:
        print(
            f"answers perturbed beyond rounding (degraded; vs the demo model): "
            f"{oracle.perturbed} of {answered}"
        )
    else:
        print("answers perturbed beyond rounding: not measured (the model is not known here)")
    first_blocked = next((s.cum_rows for s in log if s.status == 403), None)
    if blocked:
        print(f"blocked (403): {blocked} requests; first after {first_blocked} rows")
    else:
        print("blocked (403): none")
    first_perturbed = next((s.cum_rows for s in log if s.perturbed), None)
    if first_perturbed is not None:
        print(f"first perturbed answer after {first_perturbed} rows")
    _report_metrics(before, after, args.metrics_path)
    if answered == 0:
        if oracle.statuses and set(oracle.statuses) <= {403, 429}:
            why = "the deployment refused every request: this client was stopped before any answer"
        else:
            why = f"is model {model!r} served at {args.target} (--model), with this input width?"
        seen = statuses or "no answer at all"
        print(
            f"guard simulate: {args.attack}: nothing was answered ({seen}); no result to "
            f"report: {why}",
            file=sys.stderr,
        )
        return 1
    print(f"result: {report.result}")
    return 0
