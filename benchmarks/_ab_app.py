"""The app ``benchmarks/overhead_ab.py`` serves for one revision.

Served as ``_ab_app:app`` with ``PYTHONPATH=<revision's tree>:benchmarks/``. It
must not put the repository on ``sys.path`` nor import the benchmark package: the
guard and the demo app must come from the revision under test, which
``BENCH_AB_TREE`` names and :func:`app` checks.
"""

from __future__ import annotations

import importlib
import os
import sys
import types
from pathlib import Path
from typing import Any

#: the guard config of the 50 µs target: validation on, answers untouched, no audit
VALIDATION: dict[str, Any] = {
    "policies": [{"name": "inference", "degrade": {"always": False}}],
    "audit": {"enabled": False},
}


def full_demo_config(demo: Any) -> dict[str, Any]:
    """The demo policy as shipped, calibrated by the revision's own ``demo`` module
    (``middleware.demo``) into a fresh directory, in shadow mode (every detector runs
    on every request, nothing is enforced), audit log off: issue 15's full policy.

    The twin of ``benchmarks.apps.full_demo_shadow_config``, which builds it from the
    installed guard; this one must take the revision's own ``demo``."""
    import tempfile

    config: dict[str, Any] = demo.demo_config(tempfile.mkdtemp(prefix="bench-ab-demo-"))
    config["audit"] = {"enabled": False}
    config["policies"][0]["shadow"] = True
    return config


def guarded_variants(policy: str) -> tuple[str, ...]:
    """The guarded variants of ``BENCH_AB_POLICY`` (``validation``: the two lean ones)."""
    return ("full_demo",) if policy == "full_demo" else ("guarded", "default")


def guard_configs(policy: str, demo: Any) -> dict[str, dict[str, Any] | None]:
    """Each guarded variant's config (``None``: the guard's defaults)."""
    if policy == "full_demo":
        return {"full_demo": full_demo_config(demo)}
    return {"guarded": VALIDATION, "default": None}


def _import_root(tree: Path) -> str:
    """How the revision in ``tree`` is imported: ``"inference_guard."`` or ``""``.

    Since the three folders install as ``inference_guard.{guard,detectors,middleware}``,
    a revision's tree is not importable as it stands; a bare ``inference_guard``
    package whose path is the tree makes it so (``inference_guard.guard`` is then
    ``tree/guard``). Older revisions import ``middleware.asgi`` from the tree itself.
    """
    if "inference_guard" not in (tree / "middleware" / "asgi.py").read_text(encoding="utf-8"):
        return ""
    package = types.ModuleType("inference_guard")
    package.__path__ = [str(tree)]
    sys.modules["inference_guard"] = package
    return "inference_guard."


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
    """``bare``, ``bare_again`` and the guarded variants, from the revision in
    ``BENCH_AB_TREE``: ``guarded`` (validation only) and ``default`` (the guard's
    defaults: validation, answers rounded), or with ``BENCH_AB_POLICY=full_demo``
    ``full_demo`` (:func:`full_demo_config`)."""
    from prometheus_client import CollectorRegistry

    tree = os.environ["BENCH_AB_TREE"]
    root = _import_root(Path(tree))
    asgi = importlib.import_module(f"{root}middleware.asgi")
    demo = importlib.import_module(f"{root}middleware.demo")
    GuardMiddleware = asgi.GuardMiddleware
    build_model_app, train_digits_model = demo.build_model_app, demo.train_digits_model
    served = str(Path(asgi.__file__).resolve())
    if not served.startswith(tree + os.sep):
        raise RuntimeError(f"serving {served}, not the revision in {tree}")
    model = train_digits_model()
    configs = guard_configs(os.environ.get("BENCH_AB_POLICY", "validation"), demo)
    return Router(
        {
            "bare": build_model_app(model),
            "bare_again": build_model_app(model),
            **{
                name: GuardMiddleware(
                    build_model_app(model), config=config, registry=CollectorRegistry()
                )
                for name, config in configs.items()
            },
        }
    )
