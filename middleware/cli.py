"""The ``guard`` command: ``demo``, ``proxy``, ``check-config``, ``calibrate``, ``simulate``,
``replay``, ``hash-key``."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from inference_guard.guard.config import GuardConfig
from inference_guard.guard.errors import ConfigurationError, GuardError
from inference_guard.middleware.proxy_cli import PROXY_DESCRIPTION, add_proxy_arguments, serve_proxy

__all__ = ["main"]


def _check_config(args: argparse.Namespace) -> int:
    """Validate a config file: every problem at once, detector parameters included.

    Detectors are built (their parameters and calibration files checked) even
    when the file has structural problems elsewhere, so one run names them all.
    """
    from inference_guard.guard.registry import BuildContext, build_detector
    from inference_guard.guard.stores.memory import MemoryStore

    config, problems = GuardConfig.check_file(args.file)
    if config is not None:
        ctx = BuildContext(
            store=MemoryStore(max_keys=16),
            calibration_dir=Path(config.calibration_dir) if config.calibration_dir else None,
            limits=config.limits,
        )
        for policy in config.policies:
            for spec in policy.detectors:
                try:
                    build_detector(spec, ctx)
                except ConfigurationError as exc:
                    problems.extend(exc.problems)
                except GuardError as exc:
                    problems.append((spec.key, str(exc)))
                except Exception as exc:  # a factory meeting a value the structure check refused
                    problems.append((spec.key, f"cannot be built: {type(exc).__name__}: {exc}"))
    if problems:
        for key, problem in dict.fromkeys(problems):
            print(f"{args.file}: {key or '<file>'}: {problem}", file=sys.stderr)
        return 1
    assert config is not None
    n = sum(len(p.detectors) for p in config.policies)
    print(f"{args.file}: OK ({len(config.policies)} policies, {n} detectors)")
    return 0


def _demo(args: argparse.Namespace) -> int:
    import uvicorn

    from inference_guard.middleware import demo
    try:
        app = demo.build_demo_app(args.config)
    except ConfigurationError as exc:
        for key, problem in exc.problems:
            print(f"config: {key or '<file>'}: {problem}", file=sys.stderr)
        return 1
    print(
        f"inference-guard demo: digits classifier behind the guard on http://{args.host}:{args.port}\n"
        f"  POST /v2/models/digits/infer   POST /v1/models/digits:predict\n"
        f"  GET  /v2/models/digits   GET /healthz   GET /metrics",
        file=sys.stderr,
    )
    # the guard itself decides whom to believe about X-Forwarded-For (trusted_proxies);
    # uvicorn's own proxy handling would rewrite the peer address before the guard sees it
    uvicorn.run(
        app, host=args.host, port=args.port, log_level=args.log_level, proxy_headers=False
    )
    return 0


def _hash_key(args: argparse.Namespace) -> int:
    """Print ``sha256:<hex>`` of the API key on stdin, for ``exempt.api_keys``."""
    import hashlib

    key = sys.stdin.buffer.read().strip()
    if not key:
        print("hash-key: no key on stdin (printf %s KEY | guard hash-key)", file=sys.stderr)
        return 1
    print(f"sha256:{hashlib.sha256(key).hexdigest()}")
    return 0


def _optional(module: str, name: str) -> object | None:
    try:
        value: object = getattr(importlib.import_module(module), name)
        return value
    except (ImportError, AttributeError):
        return None


def build_parser() -> argparse.ArgumentParser:
    from inference_guard.guard import __version__

    parser = argparse.ArgumentParser(
        prog="guard", description="inference-guard: a security-first runtime guard for model APIs."
    )
    parser.add_argument(
        "--version", action="version", version=f"guard (inference-guard) {__version__}"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="serve a digits classifier behind the guard")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--config", default=None, help="guard config (YAML); default: the demo policy")
    p.add_argument("--log-level", default="info")
    p.set_defaults(func=_demo)

    p = sub.add_parser(
        "proxy",
        help="serve the guard in front of a model server (MLServer, Triton, KServe, vLLM)",
        description=PROXY_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_proxy_arguments(p)
    p.set_defaults(func=serve_proxy)

    p = sub.add_parser("check-config", help="validate a config file; exit 0 if valid, 1 if not")
    p.add_argument("file")
    p.set_defaults(func=_check_config)

    p = sub.add_parser(
        "hash-key", help="print sha256:<hex> of the API key read from stdin (for exempt:)"
    )
    p.set_defaults(func=_hash_key)

    for name, module, help_text in (
        ("calibrate", "calibrate", "fit input-anomaly detectors on reference data"),
        ("simulate", "simulate", "run an attack client against a deployment"),
        ("replay", "replay", "run captured or generated traffic through a config, offline"),
    ):
        module = f"inference_guard.guard.{module}"
        add = _optional(module, "add_arguments")
        run = _optional(module, "run")
        if add is None or run is None:
            continue
        p = sub.add_parser(name, help=help_text)
        add(p)  # type: ignore[operator]
        p.set_defaults(func=run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
