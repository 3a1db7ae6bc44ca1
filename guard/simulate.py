"""``guard simulate ATTACK --target URL``: run one attack client against a deployment.

The clients live in the source checkout, in ``benchmarks/attacks/`` (they are
benchmark code, not part of the installed package). They are located from this
file's path and loaded with :mod:`importlib` only when the command runs, so
``guard`` never imports benchmark code otherwise; from a non-editable install
the command says so and exits 2.

The output says what the deployment did to the client: rows and requests
sent, the status codes seen, how many answers were rounded (every probability
a round number), how many were *perturbed* (further from the demo model's own
probabilities than their rounding explains: the guard's silent ``degrade``
noise), how many requests were blocked, and what the attacker achieved
(stolen model's agreement with the demo model, or evasion success). The last
two are judged against the demo's digits model, so they mean something only
when the target serves it.
"""

from __future__ import annotations

import argparse
import http.client
import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

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
    parser.add_argument("--api-key", default="guard-simulate", help="x-api-key to send")
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


def run(args: argparse.Namespace) -> int:
    """Run the client; 0 when it ran (whatever the guard did), 2 when it could not."""
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
    try:
        report = clients.simulate(
            args.attack,
            args.target,
            api_keys=[args.api_key],
            rows=args.rows,
            seed=args.seed,
            inputs=args.inputs,
        )
    except (ImportError, RuntimeError, ValueError, OSError, http.client.HTTPException) as exc:
        # a missing optional dependency (ART), a bad target, a refused connection
        print(f"guard simulate: {args.attack}: {exc}", file=sys.stderr)
        return 2
    oracle = report.oracle
    log = oracle.log
    answered = oracle.statuses.get(200, 0)
    blocked = oracle.statuses.get(403, 0)
    statuses = ", ".join(f"{code}: {n}" for code, n in sorted(oracle.statuses.items()))
    print(f"attack: {report.attack} against {args.target} (seed {args.seed})")
    print(f"rows sent: {oracle.rows} in {oracle.requests} requests")
    print(f"status codes: {statuses or 'none'}")
    print(f"answers with rounded probabilities: {oracle.coarse} of {answered}")
    print(
        f"answers perturbed beyond rounding (degraded; vs the demo model): "
        f"{oracle.perturbed} of {answered}"
    )
    first_blocked = next((s.cum_rows for s in log if s.status == 403), None)
    if blocked:
        print(f"blocked (403): {blocked} requests; first after {first_blocked} rows")
    else:
        print("blocked (403): none")
    first_perturbed = next((s.cum_rows for s in log if s.perturbed), None)
    if first_perturbed is not None:
        print(f"first perturbed answer after {first_perturbed} rows")
    print(f"result: {report.result}")
    return 0
