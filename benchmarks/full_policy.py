"""Throughput of the whole demo policy over HTTP, against the bare model and the defaults.

Run: ``python benchmarks/full_policy.py [--quick] [--no-pin]``

Issue 15's figure: single-row OIP v2 requests (``POST /v2/models/digits/infer``)
to the digits model, uvicorn with one worker, ``wrk -t1 -c16``. One server
process serves every variant under ``/<variant>/`` (``benchmarks.apps.side_by_side``),
so that they share interpreter, allocator, caches and core:

* ``bare``: the model app alone;
* ``defaults``: the guard with no config (validation, answers rounded to 2 decimals);
* ``full_demo``: the whole demo policy (guard/demo.yaml: rate limits and ceilings,
  envelope, Mahalanobis, k-NN, anomaly rate, near-duplicate fingerprints, PRADA,
  boundary/coverage, output rounding) in **shadow mode**: every detector runs on
  every request and is counted, nothing is enforced, so the load generator is
  never refused and every request pays for every detector.

Two workloads, the model's answer unchanged by either:

* ``one row`` (issue 15's own, and its target's): the same body from one client,
  over and over: exact repeats, which the extraction detectors recognise and
  leave out as evidence (the row detectors and rate limits still score every one);
* ``many clients``: 64 API keys take turns, each request a
  fresh row (a digits test row with 1 to 3 pixels moved by one grey level,
  integers in 0..16 as the model's inputs are, drawn by wrk's Lua per request),
  so the stateful detectors index, project and bin new rows all along and
  every client's history grows during the run (the harder case).

Method: each wrk run lasts ``--seconds``; a round runs every (workload, variant)
once, in a shuffled order; ``--rounds`` rounds. The ratio to bare is taken per
round (bare of the same round and workload) and the median of those is
reported, with its range; beside it, the server process's CPU time per request
(from ``/proc``), which a busy machine disturbs far less than requests/s. With
two cores or more the server is pinned to CPU 0
and wrk to CPU 1 (``--no-pin`` leaves both to the scheduler). Results go to
benchmarks/RESULTS.md (section ``full-policy``). About 2 minutes with the
defaults.

``--marginal`` measures instead what each group of the policy's detectors costs
on its own (section ``full-policy-marginal``): beside ``bare`` and ``full_demo``,
the whole policy less one group at a time (the rate limits; the input-anomaly
detectors; the extraction detectors; the rounding of every answer), one row,
served and measured as above; a group's cost is the server CPU per request of
the whole policy less that of the policy without it.

``--profile LABEL`` profiles instead: a server running ``full_demo`` alone, under
wrk load (``--workload``, many clients by default), sampled by py-spy
(``pip install py-spy``) for
``--seconds`` x 4 seconds at 250 Hz with native frames off; the top frames by
own time and by total time, grouped per function, go to the section
``full-policy-profile`` under the heading LABEL (``before``, ``after``: each
label keeps its own table), and the raw py-spy stacks to
``$TMPDIR/full-policy-<label>.txt``. ``--profile LABEL --from-raw FILE`` tables
stacks recorded earlier (another revision's, served from its own checkout).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

from benchmarks._harness import (
    ROOT,
    add_http_argument,
    http_implementation,
    machine,
    median,
    pinned,
    serve,
    today,
    write_section,
)

PATH = "/v2/models/digits/infer"
VARIANTS: tuple[str, ...] = ("bare", "defaults", "full_demo")
#: variant -> the name side_by_side serves it under
SERVED = {"bare": "bare", "defaults": "guarded_defaults", "full_demo": "full_demo"}
WORKLOADS: tuple[str, ...] = ("one row", "many clients")
N_KEYS = 64
#: target of the issue
TARGET = 0.5


def _body(row: list[float]) -> str:
    return json.dumps(
        {"inputs": [{"name": "input-0", "shape": [1, 64], "datatype": "FP32", "data": row}]},
        separators=(",", ":"),
    )


def base_rows() -> list[list[float]]:
    """The digits test split's rows (the many-clients workload perturbs them)."""
    from inference_guard.middleware.demo import train_digits_model

    return [[float(v) for v in row] for row in train_digits_model().X_test]


def bodies(n: int, seed: int = 0) -> list[str]:
    """``n`` distinct single-row bodies: digits test rows, 1 to 3 pixels moved by one level."""
    from inference_guard.middleware.demo import train_digits_model

    X = train_digits_model().X_test
    rng = np.random.default_rng(seed)
    seen: set[bytes] = set()
    out: list[str] = []
    while len(out) < n:
        row = X[rng.integers(X.shape[0])].copy()
        cols = rng.choice(64, size=int(rng.integers(1, 4)), replace=False)
        row[cols] = np.clip(row[cols] + rng.choice((-1.0, 1.0), size=cols.shape[0]), 0.0, 16.0)
        key = row.tobytes()
        if key in seen:
            continue
        seen.add(key)
        out.append(_body(row.tolist()))
    return out


def _lua_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def wrk_script(path: str, base_rows: list[list[float]] | None, one: str) -> str:
    """A wrk script that sends ``one`` (``base_rows`` is None), or a fresh row each request.

    A fresh row is one of ``base_rows`` with 1 to 3 pixels moved by one grey level
    (clamped to 0..16), drawn by wrk's Lua, and goes out under one of
    :data:`N_KEYS` API keys in turn: no client repeats itself exactly, so every
    request is new evidence for the stateful detectors.
    """
    lines = ['wrk.method = "POST"', 'wrk.headers["Content-Type"] = "application/json"']
    if base_rows is None:
        lines.append(f"wrk.body = {_lua_string(one)}")
        return "\n".join(lines) + "\n"
    rows = ",\n".join("  {" + ",".join(f"{v:g}" for v in row) + "}" for row in base_rows)
    prefix = '{"inputs":[{"name":"input-0","shape":[1,64],"datatype":"FP32","data":['
    lines += [
        f"local rows = {{\n{rows}\n}}",
        f"local prefix = {_lua_string(prefix)}",
        'local suffix = "]}]}"',
        "local n = 0",
        "local row = {}",
        "function init(args)",
        "  math.randomseed(os.time())",
        "  n = math.random(1000)",
        "end",
        "function request()",
        "  n = n + 1",
        "  local base = rows[math.random(#rows)]",
        "  for k = 1, #base do row[k] = base[k] end",
        "  for _ = 1, math.random(3) do",
        "    local k = math.random(#base)",
        "    local v = row[k] + (math.random(2) == 1 and -1 or 1)",
        "    if v < 0 then v = 1 elseif v > 16 then v = 15 end",
        "    row[k] = v",
        "  end",
        f'  local h = {{["Content-Type"] = "application/json", '
        f'["x-api-key"] = "bench-key-" .. (n % {N_KEYS})}}',
        '  local body = prefix .. table.concat(row, ",") .. suffix',
        f'  return wrk.format("POST", "{path}", h, body)',
        "end",
    ]
    return "\n".join(lines) + "\n"


def run_wrk(
    url: str, path: str, script: Path, seconds: int, cpu: int | None, pid: int | None = None
) -> tuple[float, float | None]:
    """One wrk run: requests/s, and the server's CPU µs per request (``pid``'s, else None)."""
    exe = shutil.which("wrk")
    if exe is None:
        raise SystemExit("wrk is not installed (apt-get install wrk)")
    cmd = [exe, "-t1", "-c16", f"-d{seconds}s", "-s", str(script), url + path]
    if cpu is not None:
        cmd = ["taskset", "-c", str(cpu), *cmd]
    before = None if pid is None else _cpu_seconds(pid)
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    used = None if pid is None or before is None else _cpu_seconds(pid) - before
    errors = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    if errors:
        raise RuntimeError(f"{path}: {errors.group(1)} answers were not 2xx:\n{out}")
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    done = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    return rps, None if used is None or done == 0 else used / done * 1e6


def _cpu_seconds(pid: int) -> float | None:
    """User plus system CPU seconds of process ``pid`` so far (Linux ``/proc``)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _frame(raw: str) -> str:
    """``func (path/to/module.py:line)`` -> ``module.py:func`` (py-spy's raw frames)."""
    m = re.fullmatch(r"(.*) \((.*?):\d+\)", raw.strip())
    if m is None:
        return raw.strip()
    func, path = m.groups()
    parts = Path(path).parts
    for root in ("inference_guard", "wt-perf", "site-packages", "python3.11", "lib"):
        if root in parts:
            parts = parts[len(parts) - parts[::-1].index(root) :]
            break
    return f"{'/'.join(parts[-2:])}:{func}"


#: where a sample's time goes, by the first of these frames on its stack (innermost
#: category first: an observation drained inside a request counts as observation)
COMPONENTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("guard: detectors before the model (`Guard.decide`)", ("pipeline.py:Guard.decide",)),
    (
        "guard: observing answers (`Guard.observe`, the observation queue)",
        ("pipeline.py:Guard.observe", "pipeline.py:Observations.", "pipeline.py:Guard.drain"),
    ),
    ("guard: metrics (`Tally.flush`)", ("metrics.py:Tally.flush",)),
    ("guard: reading and rewriting the answer (`review_answer`)", ("review.py:review_answer",)),
    (
        "guard: parsing the request (`parse_request`, or the plain reader)",
        ("adapters.py:parse_request", "admission.py:Admission._plain"),
    ),
    (
        "server: writing answers, reading requests (h11, transport)",
        (
            "h11_impl.py:RequestResponseCycle.send",
            "h11_impl.py:RequestResponseCycle.receive",
            "asyncio/selector_events.py:",
        ),
    ),
    ("model app (Starlette and the digits model's handler)", ("demo.py:", "starlette/")),
    ("guard: the rest (identity, quarantine, admission, ASGI)", ("middleware/asgi.py:",)),
)


def summarise(
    stacks: str, top: int
) -> tuple[int, list[tuple[str, float]], list[tuple[str, float]], list[tuple[str, float]]]:
    """Samples, the share of each component, and the top functions by own time and
    (guard and detector code only) by total time, from py-spy's raw stacks."""
    own: dict[str, int] = {}
    total: dict[str, int] = {}
    parts: dict[str, int] = {name: 0 for name, _ in COMPONENTS}
    parts["server: the rest (uvicorn, h11, asyncio)"] = 0
    samples = 0
    for line in stacks.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [_frame(f) for f in stack.split(";")]
        samples += n
        own[frames[-1]] = own.get(frames[-1], 0) + n
        for f in set(frames):
            if f.startswith(("guard/", "detectors/", "stores/", "payload/")):
                total[f] = total.get(f, 0) + n
        where = "server: the rest (uvicorn, h11, asyncio)"
        for name, marks in COMPONENTS:
            if any(f.startswith(m) or f"/{m}" in f"/{f}" for f in frames for m in marks):
                where = name
                break
        parts[where] += n

    def best(d: dict[str, int]) -> list[tuple[str, float]]:
        return [(k, v / samples) for k, v in sorted(d.items(), key=lambda kv: -kv[1])[:top]]

    return samples, [(k, v / samples) for k, v in parts.items()], best(own), best(total)


def profile_table(label: str, raw: str, header: str, rps: float | None = None) -> str:
    """The tables of one profile; with the run's requests/s, each component's µs per
    request too (the worker busy all along: its samples' share of 1/rps)."""
    samples, parts, own, total = summarise(raw, 15)
    lines = [
        f"### {label}",
        "",
        header.format(samples=samples),
        "",
        "| component | share of samples | µs per request |",
        "|---|---:|---:|",
    ]
    lines += [
        f"| {name} | {share:.1%} | {'n/a' if not rps else f'{share * 1e6 / rps:.0f}'} |"
        for name, share in parts
    ]
    if rps:
        lines.append(f"| **all** | 100% | **{1e6 / rps:.0f}** |")
    lines += [
        "",
        "| own time: function | share | total time: guard function | share |",
        "|---|---:|---|---:|",
    ]
    for (fo, so), (ft, st) in zip(own, total, strict=False):
        lines.append(f"| `{fo}` | {so:.1%} | `{ft}` | {st:.1%} |")
    return "\n".join(lines)


def profile(label: str, seconds: int, pin: bool, workload: str = "many clients") -> None:
    """py-spy on a server running ``full_demo`` alone, under wrk load (``workload``)."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists():
        raise SystemExit("py-spy is not installed (pip install py-spy)")
    server_cpu, wrk_cpu = (0, 1) if pin else (None, None)
    tmp = Path(os.environ.get("TMPDIR", "/tmp"))
    path = f"/full_demo{PATH}"
    script = tmp / f"full-policy-{os.getpid()}-profile.lua"
    if workload == "one row":
        script.write_text(wrk_script(path, None, bodies(1)[0]))
    else:
        script.write_text(wrk_script(path, base_rows(), ""))
    raw = tmp / f"full-policy-{label}.txt"
    duration = 4 * seconds
    try:
        with (
            pinned(server_cpu),
            serve("benchmarks.apps:side_by_side", env={"BENCH_VARIANTS": "full_demo"}) as url,
        ):
            run_wrk(url, path, script, 2, wrk_cpu)  # warm-up
            port = url.rsplit(":", 1)[1]
            pid = _listening_pid(int(port))
            load = subprocess.Popen(
                ["taskset", "-c", str(wrk_cpu)] * (wrk_cpu is not None)
                + ["wrk", "-t1", "-c16", f"-d{duration + 4}s", "-s", str(script), url + path],
                stdout=subprocess.PIPE,
                text=True,
            )
            time.sleep(1)
            subprocess.run(
                [
                    spy,
                    "record",
                    "--pid",
                    str(pid),
                    "--duration",
                    str(duration),
                    "--rate",
                    "250",
                    "--format",
                    "raw",
                    "--output",
                    str(raw),
                    "--nonblocking",
                ],
                check=True,
                capture_output=True,
            )
            out, _ = load.communicate()
    finally:
        script.unlink(missing_ok=True)
    found = re.search(r"Requests/sec:\s+([\d.]+)", out or "")
    rps = float(found.group(1)) if found else None
    if rps:
        raw.with_suffix(".rps").write_text(f"{rps}\n")
    header = (
        f"- {today()}; `python benchmarks/full_policy.py --profile {label}`; {{samples}} "
        f"samples over {duration} s of wrk -c16 ({workload}), py-spy 250 Hz, idle left out; "
        + (f"{rps:.0f} requests/s" if rps else "requests/s not known")
    )
    text = profile_table(label, raw.read_text(), header, rps)
    print(text)
    _write_profile(label, text)


def _listening_pid(port: int) -> int:
    """The pid of the process listening on ``port`` (uvicorn's, one worker)."""
    out = subprocess.run(["ss", "-ltnpH", f"sport = :{port}"], capture_output=True, text=True)
    m = re.search(r"pid=(\d+)", out.stdout)
    if m is None:
        raise RuntimeError(f"no process listens on {port}: {out.stdout!r}")
    return int(m.group(1))


_PROFILE_HEAD = """## Where the full policy's time goes (issue 15)

py-spy on a uvicorn worker serving the whole demo policy (shadow mode) under
`wrk -t1 -c16`, pinned as in `full-policy`, for the workload named (see
`full-policy`). *Before* is the code before issue 15's cost work (its raw stacks
summarised with `--from-raw`), *after* this revision's. A component's µs per
request is its share of the samples times the time a request took (the worker
busy all along, 1/throughput). *Own*: samples whose innermost frame is the
function; *total*: samples with the function anywhere on the stack (one
function per row, grouped over its lines)."""


def _write_profile(label: str, text: str) -> None:
    from benchmarks._harness import RESULTS

    current = RESULTS.read_text() if RESULTS.exists() else ""
    start, end = "<!-- full-policy-profile:start -->", "<!-- full-policy-profile:end -->"
    sections: dict[str, str] = {}
    if start in current and end in current:
        body = current.split(start, 1)[1].split(end, 1)[0]
        for part in body.split("\n### ")[1:]:
            name = part.split("\n", 1)[0].strip()
            sections[name] = "### " + part.strip()
    sections[label] = text.strip()
    write_section("full-policy-profile", "\n\n".join([_PROFILE_HEAD, *sections.values()]))


def marginal(rounds: int, seconds: int, pin: bool, http: str, no_write: bool) -> None:
    """Each detector group's own cost: the whole policy against the policy without it."""
    from benchmarks.apps import FULL_DEMO_GROUPS, WITHOUT

    server_cpu, wrk_cpu = (0, 1) if pin else (None, None)
    started = time.time()
    variants = ["bare", "full_demo", *(WITHOUT + g for g in FULL_DEMO_GROUPS)]
    tmp = Path(os.environ.get("TMPDIR", "/tmp"))
    one = bodies(1)[0]
    scripts = {}
    for v in variants:
        script = tmp / f"full-policy-{os.getpid()}-marginal-{v}.lua"
        script.write_text(wrk_script(f"/{v}{PATH}", None, one))
        scripts[v] = script
    rps: dict[str, list[float]] = {v: [] for v in variants}
    cpu: dict[str, list[float]] = {v: [] for v in variants}
    order = random.Random(15)
    try:
        with (
            pinned(server_cpu),
            serve(
                "benchmarks.apps:side_by_side",
                env={"BENCH_VARIANTS": ",".join(variants)},
                http_impl=http,
            ) as url,
        ):
            pid = _listening_pid(int(url.rsplit(":", 1)[1]))
            for v in variants:  # warm-up
                run_wrk(url, f"/{v}{PATH}", scripts[v], 1, wrk_cpu)
            for _ in range(rounds):
                for v in order.sample(variants, len(variants)):
                    r, used = run_wrk(url, f"/{v}{PATH}", scripts[v], seconds, wrk_cpu, pid)
                    rps[v].append(r)
                    if used is not None:
                        cpu[v].append(used)
    finally:
        for script in scripts.values():
            script.unlink(missing_ok=True)
    if not all(cpu.values()):
        raise SystemExit("the server's CPU time could not be read (/proc): no table")
    c = {v: median(cpu[v]) for v in variants}
    own = c["full_demo"] - c["bare"]
    lines = [
        "## What each part of the full demo policy costs (issue 15)",
        "",
        f"- command: `python benchmarks/full_policy.py --marginal"
        f"{' --http httptools' if http == 'httptools' else ''}`",
        f"- machine: {machine()}; "
        + ("server pinned to CPU 0, wrk to CPU 1" if pin else "not pinned"),
        f"- date: {today()}; took {time.time() - started:.0f} s",
        f"- as `full-policy`'s *one row* (uvicorn ({http}), 1 worker, every variant in one "
        f"process, `wrk -t1 -c16`, {rounds} rounds of {seconds} s per variant, shuffled "
        "within a round), with the demo policy (shadow mode) less one group of detectors "
        "at a time; server CPU µs per request, median of the rounds",
        "- a group's cost: the whole policy's CPU per request less that of the policy "
        "without the group (what serving it adds, its share of the policy's cost over "
        "bare in the last column); what no group accounts for is the guard's own "
        "(identity, parsing, reading the answer, the observation queue, metrics)",
        "",
        "| variant | req/s (median) | server CPU µs/request | group's cost, µs | "
        "share of the policy's cost |",
        "|---|---:|---:|---:|---:|",
        f"| bare | {median(rps['bare']):.0f} | {c['bare']:.0f} | — | — |",
        f"| full_demo | {median(rps['full_demo']):.0f} | {c['full_demo']:.0f} | "
        f"{own:.0f} (the policy over bare) | 100% |",
    ]
    accounted = 0.0
    for g, names in FULL_DEMO_GROUPS.items():
        v = WITHOUT + g
        cost = c["full_demo"] - c[v]
        accounted += cost
        what = ", ".join(names) if names else "answers not rounded for everyone"
        lines.append(
            f"| less {g} ({what}) | {median(rps[v]):.0f} | {c[v]:.0f} | {cost:.0f} | "
            f"{cost / own:.0%} |"
        )
    lines += [
        "",
        f"- the groups together: {accounted:.0f} µs of the policy's {own:.0f} µs over "
        f"bare; the rest, {own - accounted:.0f} µs, is the guard's own work on a request "
        f"with detectors. Issue 15's target (≥ {TARGET}x bare) allows the policy "
        f"{c['bare'] * (1 / TARGET - 1):.0f} µs here (bare's own CPU per request)",
    ]
    text = "\n".join(lines)
    print(text)
    if not no_write:
        write_section(
            "full-policy-marginal" if http == "h11" else f"full-policy-marginal-{http}", text
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 rounds of 2 s (a smoke run)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds (default 5)")
    parser.add_argument("--seconds", type=int, default=None, help="seconds per wrk run (4)")
    parser.add_argument("--no-pin", action="store_true", help="do not pin server and wrk")
    parser.add_argument("--no-write", action="store_true", help="print, leave RESULTS.md alone")
    add_http_argument(parser, "full-policy")
    parser.add_argument("--profile", metavar="LABEL", help="py-spy the full policy instead")
    parser.add_argument(
        "--workload",
        choices=WORKLOADS,
        default="many clients",
        help="with --profile: the workload profiled (default: many clients)",
    )
    parser.add_argument(
        "--from-raw",
        metavar="FILE",
        help="with --profile: summarise py-spy raw stacks recorded earlier (another revision's)",
    )
    parser.add_argument(
        "--marginal",
        action="store_true",
        help="the cost of each group of detectors: the policy less one group at a time",
    )
    args = parser.parse_args(argv)
    rounds = args.rounds or (2 if args.quick else 5)
    seconds = args.seconds or (2 if args.quick else 4)
    pin = not args.no_pin and (os.cpu_count() or 1) >= 2 and shutil.which("taskset") is not None
    if args.profile and args.from_raw:
        raw = Path(args.from_raw)
        rps_file = raw.with_suffix(".rps")
        rps = float(rps_file.read_text()) if rps_file.exists() else None
        header = f"- {today()}; py-spy raw stacks from `{raw.name}`: {{samples}} samples" + (
            f"; {rps:.0f} requests/s" if rps else ""
        )
        text = profile_table(args.profile, raw.read_text(), header, rps)
        print(text)
        _write_profile(args.profile, text)
        return
    if args.profile:
        profile(args.profile, seconds, pin, args.workload)
        return
    if args.marginal:
        marginal(rounds, seconds, pin, http_implementation(args.http), args.no_write)
        return
    server_cpu, wrk_cpu = (0, 1) if pin else (None, None)
    http = http_implementation(args.http)
    started = time.time()

    many = base_rows()
    one = bodies(1)[0]
    scripts: dict[tuple[str, str], Path] = {}
    tmp = Path(os.environ.get("TMPDIR", "/tmp"))
    for v in VARIANTS:
        path = f"/{SERVED[v]}{PATH}"
        for w in WORKLOADS:
            script = tmp / f"full-policy-{os.getpid()}-{v}-{w.replace(' ', '-')}.lua"
            script.write_text(wrk_script(path, many if w == "many clients" else None, one))
            scripts[(v, w)] = script
    rps: dict[tuple[str, str], list[float]] = {k: [] for k in scripts}
    ratios: dict[tuple[str, str], list[float]] = {k: [] for k in scripts}
    cpu: dict[tuple[str, str], list[float]] = {k: [] for k in scripts}
    order = random.Random(15)
    env = {"BENCH_VARIANTS": ",".join(SERVED[v] for v in VARIANTS)}
    try:
        with (
            pinned(server_cpu),
            serve("benchmarks.apps:side_by_side", env=env, http_impl=http) as url,
        ):
            pid = _listening_pid(int(url.rsplit(":", 1)[1]))
            paths = {v: f"/{SERVED[v]}{PATH}" for v in VARIANTS}
            for key, script in scripts.items():  # warm-up
                run_wrk(url, paths[key[0]], script, 1, wrk_cpu)
            for _ in range(rounds):
                this: dict[tuple[str, str], float] = {}
                for key in order.sample(list(scripts), len(scripts)):
                    this[key], used = run_wrk(
                        url, paths[key[0]], scripts[key], seconds, wrk_cpu, pid
                    )
                    rps[key].append(this[key])
                    if used is not None:
                        cpu[key].append(used)
                for (v, w), value in this.items():
                    ratios[(v, w)].append(value / this[("bare", w)])
    finally:
        for script in scripts.values():
            script.unlink(missing_ok=True)

    def cpu_of(key: tuple[str, str]) -> float | None:
        return median(cpu[key]) if cpu[key] else None

    lines = [
        "## The full demo policy over HTTP: throughput against bare (issue 15)"
        + ("" if http == "h11" else f" (uvicorn on {http})"),
        "",
        f"- command: `python benchmarks/full_policy.py{' --quick' if args.quick else ''}"
        f"{' --http httptools' if http == 'httptools' else ''}`",
        f"- machine: {machine()}; "
        + ("server pinned to CPU 0, wrk to CPU 1" if pin else "not pinned"),
        f"- date: {today()}; took {time.time() - started:.0f} s",
        "- request: one 64-feature row, OIP v2 JSON, `POST /v2/models/digits/infer`; "
        f"uvicorn ({http}), 1 worker, every variant in one process under `/<variant>/`; "
        f"`wrk -t1 -c16`, {rounds} rounds of {seconds} s per (workload, variant), "
        "shuffled within a round; ratio to bare per round, median (min-max)",
        "- workloads: *one row* (issue 15's): one body from one client, repeated; "
        f"*many clients*: {N_KEYS} API keys take turns, a fresh row each request (a digits "
        "test row with 1-3 pixels moved by one grey level, drawn by wrk), so that the "
        "stateful detectors index, project and bin new rows all along",
        "- full_demo: guard/demo.yaml as shipped, in shadow mode (every detector runs, "
        "nothing enforced)",
        "- server CPU: the uvicorn process's user+system CPU over each wrk run divided by "
        "the requests it served (what a dedicated core's throughput follows; other "
        "tenants of the machine move it far less than requests/s)",
        "",
        "| workload | variant | req/s (median) | vs bare (median) | vs bare (min-max) "
        "| server CPU µs/request | vs bare, by CPU |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for w in WORKLOADS:
        base = cpu_of(("bare", w))
        for v in VARIANTS:
            r = ratios[(v, w)]
            c = cpu_of((v, w))
            lines.append(
                f"| {w} | {v} | {median(rps[(v, w)]):.0f} | "
                + ("—" if v == "bare" else f"**{median(r):.2f}**")
                + f" | {'—' if v == 'bare' else f'{min(r):.2f}-{max(r):.2f}'} | "
                + ("n/a" if c is None else f"{c:.0f}")
                + " | "
                + ("—" if v == "bare" or c is None or base is None else f"{base / c:.2f}")
                + " |"
            )
    one = median(ratios[("full_demo", "one row")])
    many = median(ratios[("full_demo", "many clients")])
    lines += [
        "",
        f"- target (issue 15): the full demo policy at ≥ {TARGET}x bare throughput on "
        f"the single-row request (one row): **{one:.3f}x** "
        f"({'met' if one >= TARGET else 'NOT met'}); with many clients and fresh rows "
        f"{many:.2f}x",
    ]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        write_section("full-policy" if http == "h11" else f"full-policy-{http}", text)


if __name__ == "__main__":
    os.chdir(ROOT)
    main()
