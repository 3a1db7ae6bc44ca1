"""``guard proxy``: the guard as a reverse proxy in front of a model server.

The ASGI app is :func:`middleware.proxy.build_proxy_app`; this module reads the
command line and runs it with uvicorn.
"""

from __future__ import annotations

import argparse
import atexit
import logging
import os
import shutil
import sys
import tempfile
from typing import Any

from inference_guard.guard.config import GuardConfig
from inference_guard.guard.errors import ConfigurationError

__all__ = ["PROXY_DESCRIPTION", "add_proxy_arguments", "serve_proxy"]

PROXY_DESCRIPTION = """\
Serve the guard in front of a model server that runs on its own (MLServer, Triton,
KServe, vLLM, TorchServe): every request goes through the guard's policies and, if
they let it, on to --upstream; the answer comes back the same way, streamed.

  guard proxy --upstream http://127.0.0.1:8080 --port 8000

Without --config the default policy applies: on the inference routes of every
protocol the guard reads (/v2/models/*/infer, /v2/models/*/versions/*/infer,
/v1/models/*:predict, :classify, :regress, /invocations, /v1/chat/completions,
/v1/completions) each payload is validated (JSON, shapes, NaN/Inf, 1 MiB and
1024 rows at most; a 4xx otherwise) and the probabilities in every answer are
rounded to 2 decimals. It has no detectors and no rate limits: those need
choices per deployment (write a config; see guard check-config). Other paths
are proxied untouched. /metrics is served to loopback clients only, the audit
log goes to stderr, and a failure inside the guard lets the request through
(fail_open).

An upstream that cannot be reached or breaks the connection is answered 502,
one that times out 504, each counted in guard_upstream_errors_total{reason}.

With --workers N > 1 each worker keeps its own per-client state unless the
config puts it in Redis (state: {store: redis://...}); metrics are merged across
workers through PROMETHEUS_MULTIPROC_DIR (a temporary directory when unset).
"""

_APP_FACTORY = "inference_guard.middleware.proxy:app_from_env"


def add_proxy_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--upstream",
        required=True,
        help="the model server's base URL, e.g. http://127.0.0.1:8080 (a path is a prefix)",
    )
    p.add_argument("--config", default=None, help="guard config (YAML); default: see above")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--workers", type=int, default=1, help="uvicorn worker processes")
    p.add_argument(
        "--connect-timeout", type=float, default=5.0, help="seconds to connect upstream (504)"
    )
    p.add_argument(
        "--read-timeout",
        type=float,
        default=60.0,
        help="seconds to wait for each part of the upstream's answer (504)",
    )
    p.add_argument("--max-connections", type=int, default=100, help="pooled connections per worker")
    p.add_argument("--log-level", default="info")


def serve_proxy(args: argparse.Namespace) -> int:
    """Run ``guard proxy``; return the exit status."""
    import uvicorn

    for flag, value in (
        ("--workers", args.workers),
        ("--connect-timeout", args.connect_timeout),
        ("--read-timeout", args.read_timeout),
        ("--max-connections", args.max_connections),
    ):
        if not value > 0:
            print(f"proxy: {flag} must be positive, not {value}", file=sys.stderr)
            return 2
    env = {
        "GUARD_PROXY_UPSTREAM": args.upstream,
        "GUARD_PROXY_CONFIG": args.config or "",
        "GUARD_PROXY_CONNECT_TIMEOUT": str(args.connect_timeout),
        "GUARD_PROXY_READ_TIMEOUT": str(args.read_timeout),
        "GUARD_PROXY_MAX_CONNECTIONS": str(args.max_connections),
    }
    from inference_guard.middleware import proxy  # uvicorn and httpx load only for this command
    try:
        config = GuardConfig.load(args.config)
        app = proxy.app_from_env(env)  # checks the upstream URL
    except ConfigurationError as exc:
        for key, problem in exc.problems:
            print(f"proxy: {key or '<config>'}: {problem}", file=sys.stderr)
        return 1
    # httpx logs every request it sends at INFO: the proxy's access log is uvicorn's
    logging.getLogger("httpx").setLevel(logging.WARNING)
    policy = args.config or "the default policy (validation, answers rounded to 2 decimals)"
    print(
        f"inference-guard proxy on http://{args.host}:{args.port} -> {args.upstream}\n"
        f"  policy: {policy}   metrics: {config.metrics.path or 'off'}",
        file=sys.stderr,
    )
    # the guard decides whom to believe about X-Forwarded-For (trusted_proxies), and
    # Date and Server are the upstream's, passed through
    options: dict[str, Any] = {
        "host": args.host,
        "port": args.port,
        "log_level": args.log_level,
        "proxy_headers": False,
        "server_header": False,
        "date_header": False,
        "lifespan": "on",
    }
    if args.workers == 1:
        uvicorn.run(app, **options)
        return 0
    del app  # each worker builds its own from the environment
    os.environ.update(env)
    if config.state.store.startswith("memory://"):
        print(
            f"proxy: {args.workers} workers with state.store memory://: each worker counts "
            "rate limits and quarantines on its own; use state: {store: redis://...}",
            file=sys.stderr,
        )
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        metrics_dir = tempfile.mkdtemp(prefix="guard-proxy-metrics-")
        atexit.register(shutil.rmtree, metrics_dir, True)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    uvicorn.run(_APP_FACTORY, factory=True, workers=args.workers, **options)
    return 0
