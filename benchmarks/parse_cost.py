"""The guard's cost on adversarial ~1 MB bodies, with and without the parse budget (issue 13).

Run: ``python benchmarks/parse_cost.py [--quick]``

Each shape is a body of about 1 MB (under the default ``max_body_bytes``, 1 MiB)
built to be dear to decode or validate: lists nested 27 deep, 262 000 one-element
lists, wide rows (JSON and Triton binary), a flat numeric tensor, one long
string, many keys, many objects, escapes, floats with a damaged last byte; and
the largest numeric and record bodies the defaults accept.
Each goes through :class:`~middleware.asgi.GuardMiddleware` in-process (ASGI
calls, no sockets; the app answers ``{}`` without reading the body) under two
configs, each in two variants:

* ``defaults``: the guard with no config (validation, answers rounded; no
  detectors, so the fast lane and no feature matrix);
* ``rate``: one policy with a rate detector (``cost: values``): the full parser
  and the feature matrix;
* ``budget off``: the same with ``max_json_containers``, ``max_json_keys``,
  ``max_json_elements`` and ``max_values`` out of reach and ``offload_bytes`` at
  the body cap (every parse on the loop): the guard as it was before the budget;
* ``budget on``: the defaults of this revision.

Reported per shape: the status, and the guard's CPU time per request (the
process's CPU time, worker threads included; median of N). The worst of the
``budget on`` column, per MB of body, is the figure the README states.

Then an ordinary client's latency while attack bodies flow: one task has a
small valid request due every 2 ms (open loop: latency counts from when it was
due), another sends the dearest shape 8 times a second, on one event loop, as a
server's single worker would see it.

Results go to benchmarks/RESULTS.md (section ``parse-cost``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import struct
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from prometheus_client import CollectorRegistry

from benchmarks._harness import machine, pct, today, write_section
from inference_guard.guard.config import LimitsConfig
from inference_guard.middleware.asgi import GuardMiddleware

V1 = "/v1/models/m:predict"
V2 = "/v2/models/m/infer"
JSON = (b"content-type", b"application/json")
CAP = LimitsConfig().max_body_bytes
TARGET = 1_000_000
ORDINARY = json.dumps({"instances": [[0.25] * 64]}).encode()
#: the ordinary client's request interval (seconds)
INTERVAL = 0.002

BUDGET_OFF = {
    "max_json_containers": 1 << 40,
    "max_json_keys": 1 << 40,
    "max_json_elements": 1 << 40,
    "max_values": 1 << 40,
    "offload_bytes": CAP,
}
RATE_POLICY = {
    "name": "rated",
    "detectors": [
        {
            "type": "rate",
            "name": "values",
            "action": "flag",
            "params": {"cost": "values", "limits": [{"rate": 10**9, "per": "1s", "burst": 10**9}]},
        }
    ],
}


def _fill(head: bytes, unit: bytes, tail: bytes, sep: bytes = b",") -> bytes:
    """``head`` + as many ``unit`` as fit in ~1 MB + ``tail``."""
    n = (TARGET - len(head) - len(tail)) // (len(unit) + len(sep))
    return head + sep.join([unit] * n) + tail


def _binary_rows(rows: int, width: int) -> tuple[bytes, tuple[tuple[bytes, bytes], ...]]:
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "x",
                    "shape": [rows, width],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": rows * width * 4},
                }
            ]
        }
    ).encode()
    data = struct.pack(f"<{rows * width}f", *([0.5] * (rows * width)))
    length = (b"inference-header-content-length", str(len(header)).encode())
    return header + data, ((b"content-type", b"application/octet-stream"), length)


Shape = tuple[str, bytes, tuple[tuple[bytes, bytes], ...]]


def shapes() -> dict[str, Shape]:
    unit27 = b"[" * 27 + b"1" + b"]" * 27
    wide = b"[" + b",".join([b"1"] * 65_500) + b"]"
    n_wide = (TARGET - 20) // (len(wide) + 1)
    n_flat = (TARGET - 100) // 2 // 65_500
    flat = (
        b'{"inputs":[{"name":"x","shape":[%d,65500],"datatype":"FP32","data":[' % n_flat
        + b",".join([b"1"] * (n_flat * 65_500))
        + b"]}]}"
    )
    binary, binary_headers = _binary_rows(4, 65_500)
    out: dict[str, Shape] = {
        "lists nested 27 deep": (V1, _fill(b'{"instances":[', unit27[1:-1], b"]}"), (JSON,)),
        "262 000 one-element lists": (V1, _fill(b'{"instances":[', b"[1]", b"]}"), (JSON,)),
        "wide rows, JSON (65 500 wide)": (
            V1,
            b'{"instances":[' + b",".join([wide] * n_wide) + b"]}",
            (JSON,),
        ),
        "wide rows, binary (4 x 65 500 FP32)": (V2, binary, binary_headers),
        "flat numeric tensor (OIP)": (V2, flat, (JSON,)),
        "floats, last byte damaged": (V1, _fill(b'{"instances":[[', b"0.5", b"]]") + b"x", (JSON,)),
        "one long string": (V1, b'{"instances":["' + b"a" * (TARGET - 20) + b'"]}', (JSON,)),
        "many keys": (
            V1,
            b'{"instances":[[1]],'
            + b",".join(b'"k%07d":1' % i for i in range((TARGET - 30) // 13))
            + b"}",
            (JSON,),
        ),
        "many objects (MLflow records)": (
            "/invocations",
            _fill(b'{"dataframe_records":[', b'{"a":1}', b"]}"),
            (JSON,),
        ),
        "escaped strings": (
            V1,
            b'{"instances":[[1]],"s":"' + b"\\u00e9" * ((TARGET - 30) // 6) + b'"}',
            (JSON,),
        ),
        "nulls": (V1, _fill(b'{"instances":[', b"null", b"]}"), (JSON,)),
        # the largest bodies of their kind the defaults accept
        "1024 rows x 64 floats (accepted)": (
            V1,
            json.dumps({"instances": [[0.123456] * 64] * 1024}).encode(),
            (JSON,),
        ),
        "1024 MLflow records of 16 columns (accepted)": (
            "/invocations",
            json.dumps({"dataframe_records": [{f"c{i:02d}": 0.5 for i in range(16)}] * 1024})
            .replace(" ", "")
            .encode(),
            (JSON,),
        ),
    }
    for name, (_, body, _) in out.items():
        assert len(body) <= CAP, (name, len(body))
    return out


async def _app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": [JSON]})
    await send({"type": "http.response.body", "body": b"{}"})


async def call(
    mw: GuardMiddleware, path: str, body: bytes, headers: tuple[tuple[bytes, bytes], ...]
) -> int:
    sent: list[dict[str, Any]] = []
    delivered = False

    async def receive() -> dict[str, Any]:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [*headers, (b"content-length", str(len(body)).encode())],
        "client": ("127.0.0.1", 5000),
        "server": ("127.0.0.1", 8000),
    }
    await mw(scope, receive, send)
    return int(sent[0]["status"])


def middleware(rate: bool, budget: bool) -> GuardMiddleware:
    config: dict[str, Any] = {"audit": {"enabled": False}}
    if rate:
        config["policies"] = [RATE_POLICY]
    if not budget:
        config["limits"] = BUDGET_OFF
    return GuardMiddleware(_app, config=config, registry=CollectorRegistry())


def cpu_per_request(mw: GuardMiddleware, shape: Shape, n: int) -> tuple[int, float]:
    """The status and the median CPU seconds (all threads) of ``n`` requests."""
    path, body, headers = shape
    loop = asyncio.new_event_loop()
    try:
        status = loop.run_until_complete(call(mw, path, body, headers))  # warm-up
        times = []
        for _ in range(n):
            start = time.process_time()
            loop.run_until_complete(call(mw, path, body, headers))
            times.append(time.process_time() - start)
    finally:
        loop.close()
    return status, statistics.median(times)


async def _under_attack(mw: GuardMiddleware, attack: Shape, seconds: float) -> list[float]:
    """An ordinary client's latencies while ``attack`` arrives 8 times a second."""
    done = time.monotonic() + seconds
    attacks: set[asyncio.Task[int]] = set()

    async def attacker() -> None:
        while time.monotonic() < done:
            task = asyncio.create_task(call(mw, *attack))
            attacks.add(task)
            task.add_done_callback(attacks.discard)
            await asyncio.sleep(0.125)

    async def client() -> list[float]:
        # open loop: each request is due at a fixed time, and its latency counts from
        # then, so that time the loop spent elsewhere before sending it is not lost
        out = []
        start = time.perf_counter()
        k = 0
        while time.monotonic() < done:
            due = start + k * INTERVAL
            k += 1
            wait = due - time.perf_counter()
            if wait > 0:
                await asyncio.sleep(wait)
            await call(mw, V1, ORDINARY, (JSON,))
            out.append(time.perf_counter() - due)
        return out

    runner = asyncio.create_task(attacker())
    latencies = await client()
    await runner
    await asyncio.gather(*attacks)
    return latencies


def run_under_attack(mw: GuardMiddleware, attack: Shape | None, seconds: float) -> list[float]:
    if attack is None:
        quiet: Shape = (V1, ORDINARY, (JSON,))
        return asyncio.run(_under_attack(mw, quiet, seconds))
    return asyncio.run(_under_attack(mw, attack, seconds))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions, no write")
    args = parser.parse_args(argv)
    n = 3 if args.quick else 15
    seconds = 2.0 if args.quick else 8.0
    started = time.monotonic()
    built = shapes()
    rows = []
    worst: dict[bool, tuple[float, str]] = {True: (0.0, ""), False: (0.0, "")}
    dearest_request: dict[bool, tuple[float, str]] = {True: (0.0, ""), False: (0.0, "")}
    variants = {(r, b): middleware(r, b) for r in (False, True) for b in (False, True)}
    for name, shape in built.items():
        mb = len(shape[1]) / 1e6
        cells = []
        for rate in (False, True):
            for budget in (False, True):
                status, cpu = cpu_per_request(variants[rate, budget], shape, n)
                cells.append(f"{status} {cpu * 1e3:.1f}")
                where = f"{name}, {'rate' if rate else 'defaults'}"
                if cpu / mb > worst[budget][0]:
                    worst[budget] = (cpu / mb, where)
                if cpu > dearest_request[budget][0]:
                    dearest_request[budget] = (cpu, where)
        rows.append(f"| {name} | {len(shape[1]):,} | " + " | ".join(cells) + " |")
        print(rows[-1], flush=True)
    dearest = max(built, key=lambda k: cpu_per_request(variants[True, False], built[k], 1)[1])
    attack_rows = []
    for label, attack, budget in (
        ("no attack", None, True),
        (f"{dearest}, budget off", built[dearest], False),
        (f"{dearest}, budget on", built[dearest], True),
    ):
        lat = run_under_attack(variants[True, budget], attack, seconds)
        attack_rows.append(
            f"| {label} | {len(lat)} | {pct(lat, 0.5) * 1e3:.2f} | {pct(lat, 0.99) * 1e3:.2f} |"
            f" {max(lat) * 1e3:.1f} |"
        )
        print(attack_rows[-1], flush=True)
    cmd = "python benchmarks/parse_cost.py" + (" --quick" if args.quick else "")
    text = "\n".join(
        [
            "## Parse cost of adversarial ~1 MB bodies (issue 13)",
            "",
            f"- command: `{cmd}`",
            f"- machine: {machine()}",
            f"- date: {today()}; took {time.monotonic() - started:.0f} s",
            f"- in-process through `GuardMiddleware` (no sockets); CPU time of the process "
            f"(worker threads included) per request, median of {n}; cells are `status ms`",
            "- `defaults`: the guard with no config (no detectors: fast lane, no matrix); "
            "`rate`: a policy with a rate detector charging values (full parser, matrix)",
            "- `budget off`: `max_json_containers`, `max_json_keys`, `max_json_elements`, "
            "`max_values` out of reach and every parse on the loop (the guard before the "
            "budget); `budget on`: this revision's defaults",
            "",
            "| shape | bytes | defaults, budget off | defaults, budget on "
            "| rate, budget off | rate, budget on |",
            "|---|---:|---:|---:|---:|---:|",
            *rows,
            "",
            f"- dearest request, budget off: **{dearest_request[False][0] * 1e3:.1f} ms** "
            f"({dearest_request[False][1]})",
            f"- dearest request, budget on: **{dearest_request[True][0] * 1e3:.1f} ms** "
            f"({dearest_request[True][1]})",
            f"- worst per MB, budget off: **{worst[False][0] * 1e3:.0f} ms/MB** "
            f"({worst[False][1]})",
            f"- worst per MB, budget on: **{worst[True][0] * 1e3:.0f} ms/MB** ({worst[True][1]})",
            "",
            f"An ordinary client (one 64-feature KServe row due every 2 ms, open loop, latency "
            f"counted from when it was due; policy `rate`) while "
            f"the dearest shape with the budget off ({dearest}) arrives 8 times a second, "
            f"{seconds:.0f} s each, one event loop:",
            "",
            "| traffic | requests | median (ms) | p99 (ms) | max (ms) |",
            "|---|---:|---:|---:|---:|",
            *attack_rows,
        ]
    )
    print(text)
    if not args.quick:
        write_section("parse-cost", text)


if __name__ == "__main__":
    main()
