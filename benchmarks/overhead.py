"""What the guard adds to a request: latency and throughput, side by side.

Run: ``python benchmarks/overhead.py [--quick]``

Variants, all around the same digits model app (``benchmarks/apps.py``):

* ``bare``: the model app alone;
* ``guarded``: the guard with payload validation on, answers untouched
  (identity, validation, metrics, audit log);
* ``guarded_defaults``: the guard with no config at all: validation plus the default
  output policy, which rounds every answer's probabilities to 2 decimals;
* ``anomaly``: validation plus the demo's row input-anomaly detectors (envelope,
  Mahalanobis, k-NN; calibrated);
* ``full_demo``: the whole demo policy (guard/demo.yaml) with its rate limit raised;
* ``metrics_only``: the guard counting requests into Prometheus and nothing else;
* ``starlette_exporter``: starlette_exporter's PrometheusMiddleware on the same app.

Two measurements, each interleaved in rounds so machine noise hits every variant
alike:

1. in process: the ASGI app called directly (no sockets), median per call — the
   cleanest view of the guard's own cost;
2. over real HTTP: uvicorn on 127.0.0.1, sequential keep-alive round trips
   (p50/p99), and throughput from ``wrk`` (if installed) with 16 connections.

Results go to benchmarks/RESULTS.md (section ``overhead``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
from prometheus_client import CollectorRegistry

from benchmarks import apps
from benchmarks._harness import (
    latencies,
    machine,
    median,
    pct,
    serve,
    today,
    write_section,
    wrk,
)
from middleware.asgi import GuardMiddleware
from middleware.demo import build_model_app, train_digits_model
from middleware.types import ASGIApp

PATH = "/v2/models/digits/infer"
VARIANTS = (
    "bare",
    "guarded",
    "guarded_defaults",
    "anomaly",
    "full_demo",
    "metrics_only",
    "starlette_exporter",
)
#: over HTTP the load comes from one client: the full demo policy would (rightly) quarantine
#: a single client replaying one row thousands of times, so it is measured in process only
HTTP_VARIANTS = tuple(v for v in VARIANTS if v != "full_demo")


def request_body() -> bytes:
    model = train_digits_model()
    row = model.X_test[0].astype(float).tolist()
    return json.dumps(
        {"inputs": [{"name": "input-0", "shape": [1, 64], "datatype": "FP32", "data": row}]}
    ).encode()


def in_process_apps() -> dict[str, ASGIApp]:
    from starlette_exporter import PrometheusMiddleware

    model = train_digits_model()
    exporter = build_model_app(model)
    exporter.add_middleware(PrometheusMiddleware, app_name="digits", group_paths=True)
    return {
        "bare": build_model_app(model),
        "guarded": GuardMiddleware(
            build_model_app(model), config=apps.VALIDATION, registry=CollectorRegistry()
        ),
        "guarded_defaults": GuardMiddleware(build_model_app(model), registry=CollectorRegistry()),
        "anomaly": GuardMiddleware(
            build_model_app(model),
            config=apps.anomaly_config(tempfile.mkdtemp(prefix="bench-anomaly-")),
            registry=CollectorRegistry(),
        ),
        "full_demo": GuardMiddleware(
            build_model_app(model),
            config=apps.full_demo_config(tempfile.mkdtemp(prefix="bench-demo-")),
            registry=CollectorRegistry(),
        ),
        "metrics_only": GuardMiddleware(
            build_model_app(model), config=apps.METRICS_ONLY, registry=CollectorRegistry()
        ),
        "starlette_exporter": exporter,
    }


async def _call_times(app: ASGIApp, body: bytes, n: int) -> list[float]:
    scope: dict[str, Any] = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": PATH,
        "raw_path": PATH.encode(),
        "query_string": b"",
        "root_path": "",
        "client": ("127.0.0.1", 40000),
        "server": ("127.0.0.1", 8000),
        "headers": [
            (b"host", b"127.0.0.1"),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ],
    }
    status: list[int] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            status.append(message["status"])

    out: list[float] = []
    # 500 clients take turns (a real service's traffic; one client hammering one row
    # for minutes is what the extraction detectors are there to quarantine)
    peers = [(f"10.0.{i // 250}.{i % 250 + 1}", 40000) for i in range(500)]
    for i in range(n):
        call_scope = dict(scope)
        call_scope["client"] = peers[i % 500]
        t0 = time.perf_counter()
        await app(call_scope, receive, send)
        out.append(time.perf_counter() - t0)
    if any(s != 200 for s in status):
        raise RuntimeError(f"in-process call answered {set(status)}")
    return out


def in_process(body: bytes, rounds: int, n: int) -> dict[str, list[float]]:
    built = in_process_apps()
    times: dict[str, list[float]] = {k: [] for k in built}
    for app in built.values():  # warm-up
        asyncio.run(_call_times(app, body, 200))
    for _ in range(rounds):
        for k, app in built.items():
            times[k].extend(asyncio.run(_call_times(app, body, n)))
    return times


def over_http(
    body: bytes, rounds: int, n: int, wrk_seconds: int
) -> tuple[dict[str, list[float]], dict[str, list[tuple[float, float, float]]]]:
    lat: dict[str, list[float]] = {k: [] for k in HTTP_VARIANTS}
    thr: dict[str, list[tuple[float, float, float]]] = {k: [] for k in HTTP_VARIANTS}
    env: dict[str, str] = {}
    with (
        serve("benchmarks.apps:bare", env=env) as bare,
        serve("benchmarks.apps:validation", env=env) as guarded,
        serve("benchmarks.apps:guarded", env=env) as guarded_defaults,
        serve("benchmarks.apps:anomaly", env=env) as anomaly,
        serve("benchmarks.apps:metrics_only", env=env) as metrics_only,
        serve("benchmarks.apps:starlette_exporter", env=env) as exporter,
    ):
        urls = {
            "bare": bare,
            "guarded": guarded,
            "guarded_defaults": guarded_defaults,
            "anomaly": anomaly,
            "metrics_only": metrics_only,
            "starlette_exporter": exporter,
        }
        for url in urls.values():
            latencies(url, PATH, body, 200)  # warm-up
        for _ in range(rounds):
            for k, url in urls.items():
                lat[k].extend(latencies(url, PATH, body, n))
        for _ in range(2):
            for k, url in urls.items():
                res = wrk(url, PATH, body, seconds=wrk_seconds, connections=16)
                if res is not None:
                    thr[k].append(res)
    return lat, thr


def us(x: float) -> str:
    return f"{x * 1e6:.1f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds (a smoke run)")
    args = parser.parse_args(argv)
    rounds, n_proc, n_http, wrk_s = (2, 300, 200, 2) if args.quick else (5, 2000, 600, 5)
    body = request_body()
    started = time.time()

    proc = in_process(body, rounds, n_proc)
    lat, thr = over_http(body, rounds, n_http, wrk_s)

    pm = {k: median(v) for k, v in proc.items()}
    lines = [
        "## Guard overhead (issue 2)",
        "",
        f"- command: `python benchmarks/overhead.py{' --quick' if args.quick else ''}`",
        f"- machine: {machine()}",
        f"- date: {today()}; took {time.time() - started:.0f} s",
        "- request: one 64-feature row, OIP v2 JSON, `POST /v2/models/digits/infer`",
        f"- method: variants interleaved in {rounds} rounds; medians over all rounds",
        "",
        "### In process (ASGI call, no sockets)",
        "",
        "| variant | median µs/call | p99 µs/call | added vs bare (median µs) |",
        "|---|---:|---:|---:|",
    ]
    for k in proc:
        lines.append(
            f"| {k} | {us(pm[k])} | {us(pct(proc[k], 0.99))} | "
            f"{us(pm[k] - pm['bare']) if k != 'bare' else '—'} |"
        )
    lines += [
        "",
        "### Over real HTTP (uvicorn, 1 worker each, sequential keep-alive client)",
        "",
        "| variant | p50 µs | p99 µs | added p50 vs bare (µs) | throughput req/s (wrk -c16) |",
        "|---|---:|---:|---:|---:|",
    ]
    hm = {k: median(v) for k, v in lat.items()}
    for k in HTTP_VARIANTS:
        rps = f"{median([t[0] for t in thr[k]]):.0f}" if thr[k] else "n/a (wrk not installed)"
        lines.append(
            f"| {k} | {us(hm[k])} | {us(pct(lat[k], 0.99))} | "
            f"{us(hm[k] - hm['bare']) if k != 'bare' else '—'} | {rps} |"
        )
    added = pm["guarded"] - pm["bare"]
    added_defaults = pm["guarded_defaults"] - pm["bare"]
    added_anomaly = pm["anomaly"] - pm["bare"]
    added_demo = pm["full_demo"] - pm["bare"]
    mo, se = pm["metrics_only"] - pm["bare"], pm["starlette_exporter"] - pm["bare"]
    lines += [
        "",
        "### Against the targets",
        "",
        f"- guard with validation, median added per request (in process): **{us(added)} µs** "
        f"(target ≤ 50 µs: {'met' if added <= 50e-6 else 'NOT met'}); over HTTP: "
        f"{us(hm['guarded'] - hm['bare'])} µs",
        f"- guard with its defaults, i.e. validation plus the default output policy that "
        f"rounds every answer to 2 decimals (issue 5): **{us(added_defaults)} µs** in process; "
        f"over HTTP: {us(hm['guarded_defaults'] - hm['bare'])} µs",
        f"- guard with the demo's input-anomaly detectors (envelope, Mahalanobis, k-NN), "
        f"single-row requests: **{us(added_anomaly)} µs** in process (issue 4 target "
        f"≤ 100 µs: {'met' if added_anomaly <= 100e-6 else 'NOT met'}); over HTTP: "
        f"{us(hm['anomaly'] - hm['bare'])} µs",
        f"- guard with the whole demo policy (rate, anomaly, extraction detectors, output "
        f"rounding), 500 clients taking turns: **{us(added_demo)} µs** in process",
        f"- metrics only vs starlette_exporter, added per request (in process): "
        f"**{us(mo)} µs vs {us(se)} µs** (ratio {mo / se:.2f}; target: cheaper — "
        f"{'met' if mo < se else 'NOT met'})",
    ]
    if thr["bare"] and thr["guarded"]:
        ratio = median([t[0] for t in thr["guarded"]]) / median([t[0] for t in thr["bare"]])
        lines.append(f"- guarded throughput / bare throughput: {ratio:.2f}")
    text = "\n".join(lines)
    print(text)
    write_section("overhead", text)


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
