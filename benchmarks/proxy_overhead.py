"""What ``guard proxy`` adds in front of a model server, side by side in one run.

Run: ``python benchmarks/proxy_overhead.py [--quick]``

Three real uvicorn servers on 127.0.0.1 (one worker each):

* ``upstream``: the digits demo model app, bare (the model server);
* ``plain proxy``: the proxy's forwarding app alone (pooled, streamed httpx, no
  guard), an empty reverse proxy in front of ``upstream``;
* ``guard proxy``: ``guard proxy --upstream`` as the command builds it, the
  guard's defaults (validation on the inference routes, answers rounded).

A sequential client sends one 64-feature OIP v2 row to each target per cycle,
in a fresh random order each cycle, over one keep-alive connection per target,
so drift on this shared host hits the three alike. Reported: median round trip
per target, and the median paired difference against ``upstream`` (what each
proxy adds) and of ``guard proxy`` against ``plain proxy`` (what the guard adds
on top of forwarding). Results go to benchmarks/RESULTS.md (``proxy-overhead``).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._harness import machine, median, serve, today, write_section
from benchmarks.overhead import PATH, request_body

ENV_UPSTREAM = "BENCH_PROXY_UPSTREAM"


def upstream_app() -> Any:
    """The bare digits model app (uvicorn factory)."""
    from inference_guard.middleware.demo import build_model_app, train_digits_model

    return build_model_app(train_digits_model())


def plain_proxy() -> Any:
    """The forwarding app alone, in front of ``$BENCH_PROXY_UPSTREAM`` (uvicorn factory)."""
    from inference_guard.middleware.proxy import UpstreamProxy

    return UpstreamProxy(os.environ[ENV_UPSTREAM])


def guard_proxy() -> Any:
    """``guard proxy --upstream $BENCH_PROXY_UPSTREAM`` with its defaults (uvicorn factory)."""
    from inference_guard.middleware.proxy import build_proxy_app

    return build_proxy_app(os.environ[ENV_UPSTREAM])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer cycles (a smoke run)")
    args = parser.parse_args(argv)
    rounds, n = (2, 200) if args.quick else (6, 500)
    body = request_body()
    started = time.time()
    rng = random.Random(0)
    targets = ("upstream", "plain proxy", "guard proxy")
    times: dict[str, list[float]] = {t: [] for t in targets}
    with contextlib.ExitStack() as stack:
        up = stack.enter_context(serve("benchmarks.proxy_overhead:upstream_app"))
        env = {ENV_UPSTREAM: up}
        urls = {
            "upstream": up,
            "plain proxy": stack.enter_context(
                serve("benchmarks.proxy_overhead:plain_proxy", env=env)
            ),
            "guard proxy": stack.enter_context(
                serve("benchmarks.proxy_overhead:guard_proxy", env=env)
            ),
        }
        conns = {}
        for t, url in urls.items():
            host, port = url.removeprefix("http://").split(":")
            conns[t] = http.client.HTTPConnection(host, int(port), timeout=10)
        headers = {"content-type": "application/json"}

        def trip(t: str) -> float:
            t0 = time.perf_counter()
            conns[t].request("POST", PATH, body=body, headers=headers)
            resp = conns[t].getresponse()
            resp.read()
            if resp.status != 200:
                raise RuntimeError(f"{t} answered {resp.status}")
            return time.perf_counter() - t0

        for _ in range(200):  # warm-up (pools, caches)
            for t in targets:
                trip(t)
        for _ in range(rounds * n):
            order = list(targets)
            rng.shuffle(order)
            for t in order:
                times[t].append(trip(t))
        for conn in conns.values():
            conn.close()

    def added(a: str, b: str) -> float:
        return median([x - y for x, y in zip(times[a], times[b], strict=True)]) * 1e6

    lines = [
        "## guard proxy against the upstream and a plain proxy (issue 12)",
        "",
        f"- command: `python benchmarks/proxy_overhead.py{' --quick' if args.quick else ''}`",
        f"- request: `POST {PATH}`, one 64-feature row; {rounds * n} cycles, sequential, "
        "keep-alive, one request to each target per cycle in random order",
        f"- machine: {machine()}",
        f"- date: {today()}; took {time.time() - started:.0f} s",
        "- targets: see the script's docstring (uvicorn, 1 worker each, 127.0.0.1); the "
        "`guard proxy` runs the guard's defaults (validation, answers rounded)",
        "",
        "| target | median round trip (µs) | added over upstream, paired median (µs) |",
        "|---|---:|---:|",
    ]
    for t in targets:
        extra = "—" if t == "upstream" else f"{added(t, 'upstream'):.0f}"
        lines.append(f"| {t} | {median(times[t]) * 1e6:.0f} | {extra} |")
    lines += [
        "",
        f"- the guard on top of forwarding (`guard proxy` - `plain proxy`, paired median): "
        f"{added('guard proxy', 'plain proxy'):.0f} µs",
    ]
    text = "\n".join(lines)
    print(text)
    write_section("proxy-overhead", text)


if __name__ == "__main__":
    main()
