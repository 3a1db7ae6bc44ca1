"""The guard's added latency at two git revisions, measured side by side in one run.

Run: ``python benchmarks/overhead_ab.py --base REV [--head REV] [--quick] [--protocol P]
[--policy full_demo] [--downstream model]``

On this shared host the same code measures 40-100 µs apart from one hour to the
next, so a before/after claim needs both revisions measured in the same run.
Each revision is checked out into a temporary git worktree (``--head`` defaults
to the working tree itself) and served by its own uvicorn process on 127.0.0.1.
Each server holds ``bare``, ``bare_again``, ``guarded`` (payload validation on,
answers untouched: the lean lane) and ``default`` (the guard with no config:
validation, answers rounded to 2 decimals) under ``/<variant>/``. The served factory is
``benchmarks/_ab_app.py``, which imports nothing from the repository but the
revision's own ``middleware.asgi.GuardMiddleware`` and ``middleware.demo``, so an
old revision needs no benchmark code of its own.

``--policy full_demo`` measures issue 15's full policy instead of the two lean
variants: one guarded variant, ``full_demo``, the demo policy as shipped,
calibrated by each revision's own ``middleware.demo.demo_config`` and run in
shadow mode (every detector on every request, nothing enforced). ``--downstream
model`` puts the demo model app itself behind the guard in process, in place of
the no-op (see step 1).

Two measurements, both revisions side by side in each:

1. In process, first (the deciding figure: over HTTP this 2-core shared host's
   noise is larger than the difference between revisions). Each revision runs in
   a worker process of its own (``benchmarks/_ab_inprocess.py``, importing only
   that revision), which calls ``bare`` (a no-op app answering what the demo model
   answers to the request; with ``--downstream model`` the model app itself, so
   that the figure also holds what the guard's work costs the app through the
   caches they share, as in a served process) and the guarded variants directly,
   ``n`` calls per variant in a shuffled order, and reports CPU time per call
   (``time.thread_time``). Rounds alternate between the two workers. Reported
   per revision: the median over rounds of each guarded variant's CPU time per
   call minus ``bare``'s in the same round, and its range; and head minus base,
   paired round by round.
2. Over HTTP: rounds alternate between the two servers. In each round a
   sequential Python client alternates between the variants request by request,
   and every guarded request is paired with the bare request of the same cycle.
   Reported per revision: the median paired difference ("added"), for each
   guarded variant; the range of the first one's per-round medians;
   ``bare_again``'s paired difference: the noise floor.

Results go to benchmarks/RESULTS.md (section ``overhead-ab``; ``-full-demo`` is
added to its name with ``--policy full_demo``, ``-kserve`` with ``--protocol
kserve_v1``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._ab_app import guarded_variants
from benchmarks._harness import (
    ROOT,
    alternating_latencies,
    machine,
    median,
    serve,
    today,
    write_section,
)
from benchmarks.overhead import PATH, request_body

#: what each guarded variant is called in the tables
NAMES = {
    "guarded": "validation only",
    "default": "defaults",
    "full_demo": "full demo policy (shadow)",
}


def _kserve_request() -> tuple[str, bytes]:
    from inference_guard.middleware.demo import train_digits_model

    row = train_digits_model().X_test[0].astype(float).tolist()
    return "/v1/models/digits:predict", json.dumps({"instances": [row]}).encode()


#: the request each protocol sends: (path, body)
PROTOCOLS: dict[str, Callable[[], tuple[str, bytes]]] = {
    "oip_v2": lambda: (PATH, request_body()),
    "kserve_v1": _kserve_request,
}


class _Worker:
    """One revision's in-process measurer (``benchmarks/_ab_inprocess.py``), over pipes."""

    def __init__(
        self, env: dict[str, str], path: str, body: bytes, n: int, policy: str, downstream: str
    ) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve().parent / "_ab_inprocess.py")],
            env={**os.environ, **env},
            cwd=tempfile.gettempdir(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        setup = {
            "path": path,
            "body": body.decode("latin-1"),
            "n": n,
            "policy": policy,
            "downstream": downstream,
        }
        self._send(json.dumps(setup))
        if self._line() != "ready":
            raise RuntimeError("the in-process worker did not start")

    def round(self) -> dict[str, float]:
        self._send("round")
        out: dict[str, float] = json.loads(self._line())
        return out

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(timeout=30)

    def _send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def _line(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the in-process worker exited ({self.proc.wait()})")
        return line.strip()


def in_process(
    envs: dict[str, dict[str, str]],
    path: str,
    body: bytes,
    rounds: int,
    n: int,
    policy: str = "validation",
    downstream: str = "canned",
) -> dict[str, dict[str, list[float]]]:
    """Per revision and guarded variant: the per-round CPU seconds per call over ``bare``.

    Rounds alternate between the revisions' workers (the first to go alternates too).
    """
    guarded = guarded_variants(policy)
    workers: dict[str, _Worker] = {}
    try:
        for label, env in envs.items():
            workers[label] = _Worker(env, path, body, n, policy, downstream)
        added: dict[str, dict[str, list[float]]] = {
            label: {v: [] for v in guarded} for label in workers
        }
        labels = list(workers)
        for i in range(rounds):
            for label in labels if i % 2 == 0 else labels[::-1]:
                cpu = workers[label].round()
                for v in guarded:
                    added[label][v].append(cpu[v] - cpu["bare"])
        return added
    finally:
        for worker in workers.values():
            worker.close()


@contextlib.contextmanager
def checkout(rev: str | None) -> Iterator[tuple[Path, str]]:
    """A directory holding ``rev`` (``None``: the working tree), and its short hash."""
    if rev is None:
        short = _git("rev-parse", "--short", "HEAD")
        dirty = " + uncommitted changes" if _git("status", "--porcelain") else ""
        yield ROOT, f"working tree ({short}{dirty})"
        return
    short = _git("rev-parse", "--short", rev)
    with tempfile.TemporaryDirectory(prefix="bench-ab-") as tmp:
        where = Path(tmp) / "tree"
        _git("worktree", "add", "--detach", str(where), rev)
        try:
            yield where, short
        finally:
            _git("worktree", "remove", "--force", str(where))


def _git(*args: str) -> str:
    out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True)
    return out.stdout.strip()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="the earlier revision (any git rev)")
    parser.add_argument("--head", default=None, help="the later revision (default: working tree)")
    parser.add_argument("--quick", action="store_true", help="fewer rounds (a smoke run)")
    parser.add_argument(
        "--protocol",
        choices=sorted(PROTOCOLS),
        default="oip_v2",
        help="the request: OIP v2 (default) or KServe v1, one 64-feature row",
    )
    parser.add_argument(
        "--policy",
        choices=("validation", "full_demo"),
        default="validation",
        help="validation only and the defaults (default), or the full demo policy in shadow mode",
    )
    parser.add_argument(
        "--downstream",
        choices=("canned", "model"),
        default="canned",
        help="in process, the app behind the guard: a no-op replaying the model's answer "
        "(default) or the demo model app itself",
    )
    args = parser.parse_args(argv)
    rounds, n = (2, 200) if args.quick else (6, 500)
    cpu_rounds, cpu_n = (5, 500) if args.quick else (31, 2000)
    path, body = PROTOCOLS[args.protocol]()
    guarded = guarded_variants(args.policy)
    started = time.time()
    paths = {v: f"/{v}{path}" for v in ("bare", "bare_again", *guarded)}
    bench_dir = str(Path(__file__).resolve().parent)
    # per revision: each guarded variant's paired differences, and the first one's
    # per-round medians; the noise floor (bare_again less bare)
    added: dict[str, dict[str, list[float]]] = {}
    noise: dict[str, list[float]] = {}
    per_round: dict[str, list[float]] = {}
    with contextlib.ExitStack() as stack:
        envs: dict[str, dict[str, str]] = {}
        for rev in (args.base, args.head):
            tree, label = stack.enter_context(checkout(rev))
            # the revision's own packages first; this file's directory for the factory
            envs[label] = {
                "PYTHONPATH": os.pathsep.join([str(tree), bench_dir]),
                "BENCH_AB_TREE": str(tree.resolve()),
                "BENCH_AB_POLICY": args.policy,
            }
        cpu = in_process(envs, path, body, cpu_rounds, cpu_n, args.policy, args.downstream)
        urls: dict[str, str] = {}
        for label, env in envs.items():
            # from a neutral directory: python -m puts the cwd first on sys.path
            urls[label] = stack.enter_context(
                serve("_ab_app:app", env=env, cwd=Path(tempfile.gettempdir()))
            )
        for label, url in urls.items():
            alternating_latencies(url, paths, body, 300)  # warm-up
            added[label] = {v: [] for v in guarded}
            noise[label], per_round[label] = [], []
        for _ in range(rounds):
            for label, url in urls.items():
                lat = alternating_latencies(url, paths, body, n)
                for v in guarded:
                    diffs = [g - b for g, b in zip(lat[v], lat["bare"], strict=True)]
                    added[label][v].extend(diffs)
                    if v == guarded[0]:
                        per_round[label].append(median(diffs))
                noise[label].extend(
                    a - b for a, b in zip(lat["bare_again"], lat["bare"], strict=True)
                )
    full = args.policy == "full_demo"
    flags = "".join(
        (
            f" --head {args.head}" if args.head else "",
            " --quick" if args.quick else "",
            f" --protocol {args.protocol}" if args.protocol != "oip_v2" else "",
            f" --policy {args.policy}" if full else "",
            f" --downstream {args.downstream}" if args.downstream != "canned" else "",
        )
    )
    what = (
        "full demo policy: guard/demo.yaml as shipped, calibrated by each revision's own "
        "demo_config, in shadow mode (every detector runs, nothing enforced), audit off"
        if full
        else "validation only: the guard validates payloads and leaves answers untouched; "
        "defaults: no config (validation, answers rounded to 2 decimals)"
    )
    behind = (
        "the demo model app itself"
        if args.downstream == "model"
        else "a no-op replaying the model's answer"
    )
    title = (
        "A/B"
        + (", full demo policy" if full else "")
        + (", KServe v1" if args.protocol == "kserve_v1" else "")
    )
    lines = [
        f"## Guard overhead at two revisions ({title})",
        "",
        f"- command: `python benchmarks/overhead_ab.py --base {args.base}{flags}`",
        f"- request: `POST {path}`, one 64-feature row",
        f"- machine: {machine()}",
        f"- date: {today()}; took {time.time() - started:.0f} s",
        f"- method: see the script's docstring; over HTTP, {rounds} rounds of {n} alternating "
        f"requests per variant and revision; in process, {cpu_rounds} rounds of {cpu_n} calls "
        f"per variant and revision, behind the guard {behind}; {what}",
        "",
        "In process (CPU time per call over the bare app, the deciding figure on a shared host):",
        "",
        "| revision | "
        + " | ".join(f"{NAMES[v]}: added CPU per call (µs) | per-round range (µs)" for v in guarded)
        + " |",
        "|---|" + "---:|---|" * len(guarded),
    ]
    for label, by_variant in cpu.items():
        cells = " | ".join(
            f"**{median(by_variant[v]) * 1e6:.1f}** | {_span(by_variant[v])}" for v in guarded
        )
        lines.append(f"| {label} | {cells} |")
    base_label, head_label = list(cpu)
    lines.append("")
    for v in guarded:
        paired = [h - b for h, b in zip(cpu[head_label][v], cpu[base_label][v], strict=True)]
        lines.append(
            f"- {NAMES[v]}: head minus base, paired by round: "
            f"**{median(paired) * 1e6:+.1f} µs** (per-round {_span(paired)} µs)"
        )
    lines += [
        "",
        "Over HTTP (round trip of a guarded request minus the bare one of the same cycle):",
        "",
        f"| revision | {NAMES[guarded[0]]}: added p50 over HTTP, paired (µs) "
        "| per-round medians (µs) | "
        + "".join(f"{NAMES[v]}: added p50 (µs) | " for v in guarded[1:])
        + "noise floor (µs) |",
        "|---|---:|---|" + "---:|" * (len(guarded) - 1) + "---:|",
    ]
    for label in added:
        rest = "".join(f"**{median(added[label][v]) * 1e6:.1f}** | " for v in guarded[1:])
        lines.append(
            f"| {label} | **{median(added[label][guarded[0]]) * 1e6:.1f}** | "
            f"{', '.join(f'{r * 1e6:.1f}' for r in per_round[label])} | "
            f"{rest}{median(noise[label]) * 1e6:.1f} |"
        )
    text = "\n".join(lines)
    print(text)
    section = "overhead-ab" + ("-full-demo" if full else "")
    write_section(section + ("-kserve" if args.protocol == "kserve_v1" else ""), text)


def _span(seconds: list[float]) -> str:
    """``min to max`` of per-round figures, in µs."""
    return f"{min(seconds) * 1e6:.1f} to {max(seconds) * 1e6:.1f}"


if __name__ == "__main__":
    main()
