"""Memory per tracked client: the rate store's keys and the extraction detectors' state.

Run: ``python benchmarks/memory.py``

An attacker chooses how many client ids we see, so every per-client structure is
capped; what a cap costs is (clients times bytes per client). This measures bytes per
tracked key/client with ``tracemalloc`` (Python and numpy allocations), after
driving real detectors built from config by the registry:

* ``rate`` on the ``memory://`` store: GCRA + sliding-window limits, distinct clients;
* a flood of distinct clients against a small ``max_keys`` cap: memory stays flat;
* the anomaly rate's counts per client and row detector: memory://'s one key for two
  windows against the per-window counters a shared store keeps;
* ``near_duplicate``, ``prada`` and ``boundary``: clients replaying natural digits rows.

Results go to benchmarks/RESULTS.md (section ``memory``).
"""

from __future__ import annotations

import asyncio
import gc
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._harness import machine, today, write_section
from inference_guard.detectors.anomaly_rate import AnomalyRateTracker
from inference_guard.detectors.base import Answer, Detector, Query
from inference_guard.guard.config import DetectorSpec
from inference_guard.guard.registry import BuildContext, build_detector
from inference_guard.guard.stores.memory import MemoryStore
from inference_guard.middleware.demo import train_digits_model

RATE_PARAMS = {
    "limits": [
        {"rate": 20, "per": "1s", "burst": 40},
        {"limit": 10000, "per": "1d", "algorithm": "sliding_window"},
    ]
}


def build(dtype: str, store: MemoryStore, **params: object) -> Detector:
    spec = DetectorSpec(type=dtype, name=dtype, params=params, key=f"bench.{dtype}")
    return build_detector(spec, BuildContext(store=store, seed=0))


def measure(fn: object) -> int:
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    asyncio.run(fn())  # type: ignore[operator]
    gc.collect()
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return after - before


def rate_bytes_per_key(n_clients: int) -> tuple[float, int]:
    store = MemoryStore(max_keys=10 * n_clients)
    det = build("rate", store, **RATE_PARAMS)

    async def drive() -> None:
        for i in range(n_clients):
            await det.inspect(Query(client=f"{i:032x}", policy="p", rows=None, n_rows=1))

    used = measure(drive)
    return used / len(store), len(store)


class CountersOnly:
    """A memory store seen as a plain key-value store, without its windowed counts: an
    anomaly tracker keeps per-window counters there, as on Redis (on the memory store
    itself it keeps a client's two windows under one key); here to weigh the two
    alike, and in the tests to hold one to the other."""

    backend = "counters"

    def __init__(self, store: MemoryStore) -> None:
        self.inner = store

    async def get(self, key: str) -> bytes | None:
        return await self.inner.get(key)

    async def set(self, key: str, value: bytes, ttl: float | None = None) -> None:
        await self.inner.set(key, value, ttl)

    async def delete(self, key: str) -> None:
        await self.inner.delete(key)

    async def incr(self, key: str, amount: int = 1, ttl: float | None = None) -> int:
        return await self.inner.incr(key, amount, ttl)


def anomaly_bytes_per_client(n_clients: int, *, windowed: bool) -> tuple[float, int]:
    """One row detector's anomaly counts, per client, after a request in each of two
    windows (some rows flagged): memory://'s one key per client (``windowed``), or the
    per-window ``all``/``bad`` counters (what Redis keeps), in the same memory store."""
    store = MemoryStore(max_keys=10 * n_clients)
    now = [1000.0]
    tracker = AnomalyRateTracker(
        store if windowed else CountersOnly(store),
        namespace="knn",
        window_s=60.0,
        clock=lambda: now[0],
    )

    async def drive() -> None:
        for step in (0.0, 60.0):  # the next window: the previous one's counts still count
            now[0] += step
            for i in range(n_clients):
                await tracker.record(f"{i:032x}", anomalous=1, total=4)

    used = measure(drive)
    return used / n_clients, len(store)


def flood(cap: int, n_clients: int) -> tuple[int, int, int]:
    store = MemoryStore(max_keys=cap)
    det = build("rate", store, **RATE_PARAMS)

    async def drive() -> None:
        for i in range(n_clients):
            await det.inspect(Query(client=f"{i:032x}", policy="p", rows=None, n_rows=1))

    used = measure(drive)
    return len(store), store.evictions, used


def detector_bytes_per_client(
    dtype: str, n_clients: int, rows_each: int, **params: object
) -> float:
    model = train_digits_model()
    X = np.asarray(model.X_test, dtype=np.float64)
    store = MemoryStore(max_keys=1_000_000)
    det = build(dtype, store, **params)
    rng = np.random.default_rng(0)

    async def drive() -> None:
        for c in range(n_clients):
            client = f"{c:032x}"
            for _ in range(rows_each // 8):
                rows = X[rng.integers(0, len(X), size=8)]
                q = Query(client=client, policy="p", rows=rows, n_rows=8)
                await det.inspect(q)
                if det.observes_answers:
                    probs = model.predict_proba(rows)
                    await det.observe(q, Answer(200, probs.argmax(axis=1), probs))

    return measure(drive) / n_clients


def main() -> None:
    started = time.time()
    per_key, keys = rate_bytes_per_key(20_000)
    cap_keys, evictions, flood_bytes = flood(1_000, 50_000)
    one_key, one_key_keys = anomaly_bytes_per_client(20_000, windowed=True)
    counters, counter_keys = anomaly_bytes_per_client(20_000, windowed=False)
    nd = detector_bytes_per_client("near_duplicate", 300, 64, feature_range=[0, 16])
    # explicit thresholds stand in for calibration: memory does not depend on them
    prada = detector_bytes_per_client("prada", 100, 200, delta=0.9)
    boundary = detector_bytes_per_client(
        "boundary", 300, 104, feature_range=[0, 16], n_classes=10, threshold=-6.0
    )
    lines = [
        "## Memory per tracked client (issues 3 and 5)",
        "",
        "- command: `python benchmarks/memory.py`",
        f"- machine: {machine()}",
        f"- date: {today()}; took {time.time() - started:.0f} s",
        "- method: tracemalloc (Python and numpy allocations) around real detectors built "
        "from config; figures include dict/OrderedDict overhead",
        "",
        "| what | bytes |",
        "|---|---:|",
        f"| memory store, per tracked rate key (GCRA + sliding window, {keys} keys) | "
        f"{per_key:.0f} |",
        f"| flood of 50 000 clients into `max_keys: 1000`: keys kept / evictions | "
        f"{cap_keys} / {evictions} |",
        f"| same flood: memory held at the end | {flood_bytes} |",
        "| anomaly counts, per client and row detector (two windows, some rows flagged): "
        f"memory://'s one key ({one_key_keys // 20_000} per client) | {one_key:.0f} |",
        "| the same counts as per-window counters, what Redis keeps "
        f"({counter_keys // 20_000} keys per client), in the memory store | {counters:.0f} |",
        f"| `near_duplicate`, per client after 64 rows (excl. the preallocated index) | {nd:.0f} |",
        f"| `prada`, per client after 200 rows | {prada:.0f} |",
        f"| `boundary`, per client after 104 rows | {boundary:.0f} |",
        "",
        "Caps: `state.max_keys` (default 100 000) bounds the memory store; each "
        "extraction detector bounds its clients with `max_clients` (LRU, evictions counted).",
    ]
    text = "\n".join(lines)
    print(text)
    write_section("memory", text)


if __name__ == "__main__":
    main()
