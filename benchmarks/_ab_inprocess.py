"""One revision's side of ``benchmarks/overhead_ab.py --in-process``: CPU time per call.

Run by ``overhead_ab.py`` as ``python _ab_inprocess.py`` with
``PYTHONPATH=<revision's tree>:benchmarks/`` and ``BENCH_AB_TREE`` naming the
tree, as :mod:`_ab_app` is served (it builds the guard from the revision the
same way). Each revision runs in a process of its own, so two revisions that
import under the same names never meet; the parent interleaves rounds between
them over the pipes.

Protocol: one JSON line in (``{"path": ..., "body": <latin-1 str>, "n": ...,
"policy": ..., "downstream": ...}``), ``ready`` out; then per line ``round`` in,
one JSON line out: each variant's CPU seconds per call (``time.thread_time``)
over ``n`` calls, the variants in a shuffled order. The guarded variants are
:func:`_ab_app.guarded_variants` of ``policy``. With ``downstream`` ``canned``
the app behind the guard (and ``bare``) is a no-op that answers what the demo
model answered to the same request, so that the guard's own work is all that
differs between ``bare`` and the guarded variants; with ``model`` it is the demo
model app itself, so that the difference also holds what the guard's work costs
the app (caches the two share), as a served process pays it.
"""

from __future__ import annotations

import asyncio
import gc
import importlib
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import _ab_app
from _harness import post_scope  # this script's folder: the head's, whatever revision runs
from prometheus_client import CollectorRegistry


class _Canned:
    """A no-op model app: reads the body, answers the fixed ``start`` and ``body``."""

    def __init__(self, start: dict[str, Any], body: bytes) -> None:
        self.headers = list(start.get("headers", ()))
        self.status = start["status"]
        self.body = body

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        while (await receive()).get("more_body"):
            pass
        await send(
            {"type": "http.response.start", "status": self.status, "headers": list(self.headers)}
        )
        await send({"type": "http.response.body", "body": self.body})


async def _answer(app: Any, scope: dict[str, Any], body: bytes) -> tuple[dict[str, Any], bytes]:
    """What ``app`` answers to one request: its start message and whole body."""
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(dict(scope), receive, send)
    chunks = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return sent[0], chunks


async def _per_call(app: Any, scope: dict[str, Any], body: bytes, n: int) -> float:
    """CPU seconds per call of ``app`` over ``n`` calls (statuses checked)."""
    message = {"type": "http.request", "body": body, "more_body": False}
    statuses: list[int] = []

    async def receive() -> dict[str, Any]:
        return dict(message)

    async def send(m: dict[str, Any]) -> None:
        if m["type"] == "http.response.start":
            statuses.append(m["status"])

    gc.collect()
    t0 = time.thread_time()
    for _ in range(n):
        await app(dict(scope), receive, send)
    seconds = time.thread_time() - t0
    if statuses.count(200) != n:
        raise RuntimeError(f"in-process calls answered {set(statuses)}")
    return seconds / n


def main() -> None:
    setup = json.loads(sys.stdin.readline())
    path, body, n = setup["path"], setup["body"].encode("latin-1"), int(setup["n"])
    policy, downstream = setup.get("policy", "validation"), setup.get("downstream", "canned")
    tree = Path(os.environ["BENCH_AB_TREE"])
    root = _ab_app._import_root(tree)

    asgi = importlib.import_module(f"{root}middleware.asgi")
    demo = importlib.import_module(f"{root}middleware.demo")
    if not str(Path(asgi.__file__).resolve()).startswith(str(tree) + os.sep):
        raise RuntimeError(f"measuring {asgi.__file__}, not the revision in {tree}")
    scope = post_scope(path, body)
    loop = asyncio.new_event_loop()
    model_app = demo.build_model_app(demo.train_digits_model())
    inner = (
        model_app
        if downstream == "model"
        else _Canned(*loop.run_until_complete(_answer(model_app, scope, body)))
    )
    variants: dict[str, Any] = {"bare": inner}
    for name, config in _ab_app.guard_configs(policy, demo).items():
        variants[name] = asgi.GuardMiddleware(inner, config=config, registry=CollectorRegistry())
    for app in variants.values():  # warm-up
        loop.run_until_complete(_per_call(app, scope, body, max(n // 2, 100)))
    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip() != "round":
            break
        order = list(variants)
        random.shuffle(order)
        out = {v: loop.run_until_complete(_per_call(variants[v], scope, body, n)) for v in order}
        print(json.dumps(out), flush=True)
    # what the guard left running (the observation queue's timed drain) ends before the loop
    pending = asyncio.all_tasks(loop)
    if pending:
        loop.run_until_complete(asyncio.wait(pending, timeout=5))
    loop.close()


if __name__ == "__main__":
    main()
