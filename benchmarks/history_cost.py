"""Detector cost per row as a client's history grows (issue 15: "flat from 10 to 100 000 rows").

Run: ``python benchmarks/history_cost.py [--quick] [--no-write]``

The whole demo policy (guard/demo.yaml, calibrated on the digits training
split, in shadow mode so that every detector runs and nothing is enforced)
on an engine with a fake clock. For each history size H (10, 100, 1 000,
10 000, 100 000 rows; ``--quick`` stops at 10 000), subject clients are
brought to exactly H rows of benign history (fresh digits rows: a test row
with 1 to 3 pixels moved by one grey level, the model's own answers, fed in
requests of 256 rows, 20 ms apart on the fake clock), among the rows of 32
background clients that keep the global index busy; then each subject sends
single-row requests of fresh rows and every step is timed on the thread's
CPU clock (``time.thread_time_ns``):

* each detector of the policy, on its own: ``inspect`` before the model, and
  for the detectors that learn from answers ``observe`` after it (the work is
  the same whether the observation queue runs it now or in a batch);
* the full policy: ``Guard.decide`` and ``Guard.observe`` on the next row
  (every detector, the decision, its metrics).

Samples per history size: 100 (100 subjects measured once each up to 1 000
rows, 10 subjects measured 10 times at 10 000, one subject 100 times at
100 000; a subject measured again is first sent 32 fresh rows, untimed, so
that its own last rows are recent: at most 3 % more history). Every history
size is measured in every round, in a shuffled order, so that a machine that
slows down for a while slows them alike. The figure is the median CPU µs per
row. Results go to benchmarks/RESULTS.md (section
``history-cost``). About 2 minutes (``--quick``: 30 s).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
from prometheus_client import CollectorRegistry

from benchmarks import apps
from benchmarks._harness import machine, today, write_section
from inference_guard.detectors.base import Answer, Query
from inference_guard.guard.config import GuardConfig
from inference_guard.guard.pipeline import Guard
from inference_guard.middleware.demo import train_digits_model

HISTORY: tuple[int, ...] = (10, 100, 1_000, 10_000, 100_000)
#: rows per history-building request (the demo's ``limits.max_rows``)
CHUNK = 256
#: background clients whose rows fill the global structures (the fingerprint index)
BACKGROUND = 32
#: a cost that grows by less than this from the smallest to the largest history is flat
FLAT = 1.5
#: rows a subject measured again is sent first (untimed), so that its own recent rows are
#: recent (a client's new row is compared with its last 32)
RECENT = 32


class Clock:
    """The engine's clock: advanced by hand, so windows and rates follow the script."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


class Rows:
    """Fresh benign digits rows: a test row with 1 to 3 pixels moved by one grey level."""

    def __init__(self, seed: int = 0) -> None:
        model = train_digits_model()
        self.model = model
        self.base = model.X_test.astype(np.float64)
        self.rng = np.random.default_rng(seed)

    def take(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """``n`` rows and the model's probabilities for them."""
        rng = self.rng
        rows = self.base[rng.integers(self.base.shape[0], size=n)].copy()
        for _ in range(3):
            moved = rng.random(n) < 0.67
            cols = rng.integers(64, size=n)
            step = rng.choice((-1.0, 1.0), size=n)
            idx = np.flatnonzero(moved)
            rows[idx, cols[idx]] = np.clip(rows[idx, cols[idx]] + step[idx], 0.0, 16.0)
        return rows, self.model.predict_proba(rows)


def _ns() -> int:
    return time.thread_time_ns()


class Bench:
    def __init__(self, guard: Guard, clock: Clock, rows: Rows) -> None:
        self.guard = guard
        self.clock = clock
        self.rows = rows
        self.policy = guard.policies[0]
        self.detectors = [armed.detector for armed in self.policy.detectors]
        self.n = 0

    def query(self, client: str, rows: np.ndarray) -> Query:
        self.n += 1
        return Query(
            client=client,
            policy=self.policy.name,
            rows=rows,
            n_rows=int(rows.shape[0]),
            fmt="oip_v2",
            now=self.clock(),
            request_id=f"r{self.n}",
            ip=f"ip-{client}",
            subnet=f"net-{client}",
        )

    async def feed(self, client: str, n_rows: int) -> None:
        """Give ``client`` ``n_rows`` rows of history, through the whole policy."""
        guard, policy = self.guard, self.policy
        left = n_rows
        while left > 0:
            n = min(CHUNK, left)
            x, proba = self.rows.take(n)
            q = self.query(client, x)
            await guard.decide(policy, q)
            await guard.observe(
                policy, q, Answer(200, np.argmax(proba, axis=1), proba), client_source="bench"
            )
            self.clock.now += 0.02
            left -= n

    async def measure(self, client: str, out: dict[str, list[float]]) -> None:
        """Two single-row requests: each detector timed alone, then the full policy."""
        x, proba = self.rows.take(2)
        q = self.query(client, x[:1])
        answer = Answer(200, np.argmax(proba[:1], axis=1), proba[:1])
        for det in self.detectors:
            t0 = _ns()
            await det.inspect(q)
            spent = _ns() - t0
            if det.observes_answers:
                t0 = _ns()
                await det.observe(q, answer)
                spent += _ns() - t0
            out[det.name].append(spent / 1e3)
        self.clock.now += 0.02
        q = self.query(client, x[1:])
        answer = Answer(200, np.argmax(proba[1:], axis=1), proba[1:])
        t0 = _ns()
        await self.guard.decide(self.policy, q)
        await self.guard.observe(self.policy, q, answer, client_source="bench")
        out["full policy"].append((_ns() - t0) / 1e3)
        self.clock.now += 0.02


async def run(
    sizes: tuple[int, ...], samples: int
) -> tuple[list[str], dict[int, dict[str, float]]]:
    clock = Clock()
    config = apps.full_demo_shadow_config(tempfile.mkdtemp(prefix="bench-history-"))
    guard = Guard(
        GuardConfig.from_dict(config),
        registry=CollectorRegistry(),
        clock=clock,
        wall_clock=clock,
    )
    bench = Bench(guard, clock, Rows())
    names = [d.name for d in bench.detectors] + ["full policy"]
    for b in range(BACKGROUND):  # everyone else's rows, in the global structures
        await bench.feed(f"background-{b}", 512)
    # a subject per sample up to 1 000 rows, fewer and measured more often above: as many
    # history rows per size as 100 subjects of 1 000 (the largest has one subject)
    subjects = {size: max(1, min(samples, 100_000 // max(size, 1_000))) for size in sizes}
    per = {size: -(-samples // subjects[size]) for size in sizes}
    out: dict[int, dict[str, list[float]]] = {s: {n: [] for n in names} for s in sizes}
    order = random.Random(15)
    warm: dict[str, list[float]] = {n: [] for n in names}
    for r in range(samples):
        # every size is measured in every round, in a shuffled order: a machine that
        # slows down for a while slows every size alike
        for size in order.sample(list(sizes), len(sizes)):
            client = f"subject-{size}-{r // per[size]}"
            if r % per[size] == 0:
                await bench.feed(client, size)  # a new subject: its whole history
            else:
                # a subject measured again: its last rows are recent again (the rows
                # other clients sent meanwhile have pushed its own out of the index)
                await bench.feed(client, min(RECENT, size))
            # the same single-row work for another client first, untimed: every size is
            # measured with the code and the models warm, whatever came before it
            await bench.measure(f"background-{r % BACKGROUND}", warm)
            await bench.measure(client, out[size])
        await bench.feed(f"background-{r % BACKGROUND}", 8)
        if r % 10 == 9:
            print(f"round {r + 1}/{samples}", flush=True)
    result = {
        size: {name: statistics.median(v) for name, v in out[size].items()} for size in sizes
    }
    await guard.aclose()
    return names, result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="up to 10 000 rows, 40 samples")
    parser.add_argument("--no-write", action="store_true", help="print, leave RESULTS.md alone")
    args = parser.parse_args(argv)
    sizes = HISTORY[:-1] if args.quick else HISTORY
    samples = 40 if args.quick else 100
    started = time.time()
    names, result = asyncio.run(run(sizes, samples))
    lines = [
        "## Detector cost per row as a client's history grows (issue 15)",
        "",
        f"- command: `python benchmarks/history_cost.py{' --quick' if args.quick else ''}`",
        f"- machine: {machine()}",
        f"- date: {today()}; took {time.time() - started:.0f} s",
        "- policy: guard/demo.yaml as shipped (calibrated on the digits training split), "
        "shadow mode, memory store, a fake clock; history: fresh benign digits rows and the "
        "model's answers, in requests of 256 rows, beside 32 background clients; "
        f"{samples} single-row requests per history size, each step timed on the thread's "
        "CPU clock; a detector's figure is its `inspect` plus, for those that learn from "
        "answers, its `observe`; *full policy* is `Guard.decide` + `Guard.observe`",
        "",
        "| detector | "
        + " | ".join(f"{s:,} rows" for s in sizes)
        + f" | largest ÷ smallest | flat (< {FLAT}x) |",
        "|---|" + "---:|" * len(sizes) + "---:|---|",
    ]
    for name in names:
        values = [result[s][name] for s in sizes]
        growth = values[-1] / values[0] if values[0] > 0 else float("nan")
        lines.append(
            f"| {name} | "
            + " | ".join(f"{v:.1f}" for v in values)
            + f" | {growth:.2f} | {'yes' if growth < FLAT else '**no**'} |"
        )
    lines += [
        "",
        "Median CPU µs per row (single-row requests). Every structure a client's history "
        "feeds is bounded: the rate limits keep one counter state per key, the anomaly "
        "rate two windows of counts, the fingerprint index a fixed table (a client's "
        "newest `max_rows_per_client` rows; a new row is compared with its last 32), "
        "PRADA's class sets at most `max_set` rows each and its distance pool "
        "`max_distances`, the boundary detector one window of counts; so a row costs the "
        "same after 100 000 rows as after 100.",
    ]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        write_section("history-cost", text)


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
