"""The app ``benchmarks/overhead_ab.py`` serves for one revision.

Served as ``_ab_app:app`` with ``PYTHONPATH=<revision's tree>:benchmarks/``. It
must not put the repository on ``sys.path`` nor import the benchmark package: the
guard and the demo app must come from the revision under test, which
``BENCH_AB_TREE`` names and :func:`app` checks.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

#: the guard config of the 50 µs target: validation on, answers untouched, no audit
VALIDATION: dict[str, Any] = {
    "policies": [{"name": "inference", "degrade": {"always": False}}],
    "audit": {"enabled": False},
}


class Router:
    """``/<variant>/<path>`` to that variant (the cut-down twin of apps.PrefixRouter)."""

    def __init__(self, variants: dict[str, Any]) -> None:
        self.variants = {f"/{k}".encode(): app for k, app in variants.items()}
        self.default = variants["bare"]

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.default(scope, receive, send)
            return
        raw: bytes = scope.get("raw_path") or scope["path"].encode()
        cut = raw.find(b"/", 1)
        app = self.variants.get(raw[:cut]) if cut > 0 else None
        if app is None:
            await self.default(scope, receive, send)
            return
        scope = dict(scope)
        scope["raw_path"] = raw[cut:]
        scope["path"] = scope["path"][cut:]
        await app(scope, receive, send)


def app() -> Any:
    """``bare``, ``bare_again``, ``guarded`` (validation only) and ``default`` (the guard's
    defaults: validation, answers rounded), from the revision in ``BENCH_AB_TREE``."""
    from prometheus_client import CollectorRegistry

    import middleware.asgi
    from middleware.asgi import GuardMiddleware
    from middleware.demo import build_model_app, train_digits_model

    tree = os.environ["BENCH_AB_TREE"]
    served = str(Path(middleware.asgi.__file__).resolve())
    if not served.startswith(tree + os.sep):
        raise RuntimeError(f"serving {served}, not the revision in {tree}")
    model = train_digits_model()
    return Router(
        {
            "bare": build_model_app(model),
            "bare_again": build_model_app(model),
            "guarded": GuardMiddleware(
                build_model_app(model), config=VALIDATION, registry=CollectorRegistry()
            ),
            "default": GuardMiddleware(
                build_model_app(model), config=None, registry=CollectorRegistry()
            ),
        }
    )
