"""The observation queue decides exactly what observing each answer at once decides.

A scripted trace of benign clients and attacks (near-duplicate probing, small
synthetic steps for PRADA, uniform coverage for the boundary detector, a
probing run spread over several keys, an attacker that changes its key at the
same address, repeats) goes through two engines built from one config: one
observes every answer at once (``observation.batch: 1``, what the guard did
before the queue), the other queues answers and applies them in batches
(drained by batch size, and before the next verdict on the same client or
quarantined address; the timer is set far off so that nothing else drains).
Every verdict, every quarantine, every count and every audit line must be
the same.

Also: the queue's bounds and what it counts, and its lateness rules.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from inference_guard.detectors.base import Answer, Detector, DetectorResult, Query
from inference_guard.guard.config import GuardConfig, ObservationConfig
from inference_guard.guard.decisions import Action
from inference_guard.guard.engine import Pass, Refusal, Request, Seen, Verdict
from inference_guard.guard.errors import StateError
from inference_guard.guard.pipeline import Guard, Observation, Observations
from inference_guard.guard.registry import register_detector
from tests.conftest import sample

V2 = "/v2/models/m/infer"
SALT = "a salt of at least sixteen bytes"
WIDTH = 16
CLASSES = 5


class Body:
    def __init__(self, body: bytes) -> None:
        self.body = body

    async def read(self, declared: bytes | None) -> bytes:
        return self.body


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def config(tmp_path: Path, name: str, batch: int) -> dict[str, Any]:
    """Near-duplicate, PRADA and boundary, each escalating to a quarantine (no calibration)."""
    return {
        "audit": {"path": str(tmp_path / f"audit-{name}.jsonl")},
        "observation": {"batch": batch, "max_delay_s": 3600.0},
        "policies": [
            {
                "name": "inference",
                "routes": [V2],
                "quarantine_s": 600,
                "quarantine_address": "ip",
                "degrade": {"always": False},
                "detectors": [
                    {
                        "type": "near_duplicate",
                        "action": "degrade",
                        "params": {"feature_range": [0, 16], "threshold": 0.7},
                        "escalate": [{"margin_below": -0.4, "action": "block"}],
                    },
                    {
                        "type": "prada",
                        "action": "degrade",
                        "params": {"delta": 0.96, "min_distances": 40, "seed": 7},
                        "escalate": [{"margin_below": -0.05, "action": "block"}],
                    },
                    {
                        "type": "boundary",
                        "action": "degrade",
                        "params": {
                            "threshold": -6.0,
                            "window": 20,
                            "feature_range": [0, 16],
                            "seed": 7,
                        },
                        "escalate": [{"margin_below": -4.0, "action": "block"}],
                    },
                ],
            }
        ],
    }


def body_of(rows: np.ndarray) -> bytes:
    data = [float(v) for v in rows.ravel()]
    tensor = {"name": "x", "shape": list(rows.shape), "datatype": "FP32", "data": data}
    return json.dumps({"inputs": [tensor]}).encode()


def answer_of(probs: np.ndarray) -> bytes:
    outputs = [
        {
            "name": "label",
            "shape": [probs.shape[0]],
            "datatype": "INT64",
            "data": np.argmax(probs, axis=1).tolist(),
        },
        {
            "name": "probabilities",
            "shape": list(probs.shape),
            "datatype": "FP32",
            "data": probs.ravel().tolist(),
        },
    ]
    return json.dumps({"model_name": "m", "id": "1", "outputs": outputs}).encode()


Step = tuple[str, str, np.ndarray, np.ndarray]  # (api key, address, rows, probabilities)


def trace(seed: int = 0) -> list[Step]:
    """A few thousand requests: benign clients and attacks, interleaved."""
    rng = np.random.default_rng(seed)
    protos = rng.integers(0, 9, size=(40, WIDTH)).astype(float)

    def benign(n: int) -> np.ndarray:  # values in the lower half of the range, no two alike
        return rng.integers(0, 9, size=(n, WIDTH)).astype(float)

    def probs_for(n: int, sharp: float = 0.3) -> np.ndarray:
        return rng.dirichlet(np.full(CLASSES, sharp), size=n)

    x0 = protos[3].copy()
    steps = protos[5:6].copy()
    out: list[Step] = []
    for i in range(3000):
        r = rng.random()
        if r < 0.45:
            c = int(rng.integers(12))
            rows = benign(int(rng.choice([1, 1, 1, 2, 5])))
            out.append((f"benign-{c}", f"10.0.0.{c + 1}", rows, probs_for(rows.shape[0])))
        elif r < 0.55:  # HopSkipJump-like: tiny perturbations around one input
            rows = np.clip(x0 + rng.normal(0.0, 0.3, size=(1, WIDTH)), 0, 16)
            out.append(("hsj", "10.0.1.1", rows, probs_for(1)))
        elif r < 0.62:  # the same probing run under many keys, one address each
            k = int(rng.integers(8))
            rows = np.clip(x0 + rng.normal(0.0, 0.3, size=(1, WIDTH)), 0, 16)
            out.append((f"spread-{k}", f"10.0.2.{k + 1}", rows, probs_for(1)))
        elif r < 0.75:  # synthetic steps from the last point, one class (PRADA)
            steps = np.clip(steps + 3.0 * np.sign(rng.normal(size=(1, WIDTH))), 0, 16)
            probs = np.full((1, CLASSES), 0.02)
            probs[0, 0] = 0.92
            out.append(("steps", "10.0.3.1", steps.copy(), probs))
        elif r < 0.83:  # uniform coverage, answers near the boundary (boundary detector)
            rows = rng.uniform(0, 16, size=(3, WIDTH))
            # an attacker that rotates its key at one address: the address quarantine
            key = "uniform" if i < 1500 else f"uniform-{i % 7}"
            out.append((key, "10.0.4.1", rows, probs_for(3, sharp=5.0)))
        elif r < 0.88:  # a health probe: one row, over and over
            out.append(("probe", "10.0.5.1", protos[:1].copy(), probs_for(1)))
        else:  # a retrier: each row three times
            rows = benign(1)
            for _ in range(3):
                out.append(("retrier", "10.0.6.1", rows, probs_for(1)))
    return out


async def replay(guard: Guard, steps: list[Step], clock: Clock) -> list[tuple[Any, ...]]:
    """Each step through admit and after, as a front end would; the verdicts, in order."""
    policy = guard.match("POST", V2)
    assert policy is not None
    seen: list[tuple[Any, ...]] = []
    for i, (key, address, rows, probs) in enumerate(steps):
        clock.now += 0.05
        headers = [(b"content-type", b"application/json"), (b"x-api-key", key.encode())]
        body = Body(body_of(rows))
        request = Request(policy, "POST", V2, headers, (address, 4000), f"r{i}", body)
        verdict: Verdict = await guard.admit(request)
        if isinstance(verdict, Refusal):
            seen.append(("refused", verdict.status))
            continue
        assert isinstance(verdict, Pass)
        d = verdict.decision
        seen.append(("pass", str(d.action), str(d.intended), d.fired, d.quarantined))
        await guard.after(verdict, Seen(200, "application/json", answer_of(probs)))
    await guard.drain()
    return seen


def audit_lines(path: Path) -> list[dict[str, Any]]:
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    for line in lines:  # what differs by construction: when the line was written
        line.pop("ts", None)
    return lines


def recording(guard: Guard, sizes: list[int]) -> Any:
    """The guard's batch observer, noting each batch's size (``observation.batch`` > 1 only)."""
    real = guard.observe_batch

    async def apply(items: Any) -> Any:
        sizes.append(len(items))
        return await real(items)

    return apply


def canonical(line: dict[str, Any]) -> str:
    return json.dumps(line, sort_keys=True)


def test_the_queue_decides_exactly_what_observing_at_once_decides(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GUARD_FINGERPRINT_SALT", SALT)
    steps = trace()
    results: dict[str, list[tuple[Any, ...]]] = {}
    registries: dict[str, CollectorRegistry] = {}
    guards: dict[str, Guard] = {}
    batches: list[int] = []  # the sizes of the queued engine's drains
    for name, batch in (("at_once", 1), ("queued", 16)):
        clock = Clock()
        registries[name] = CollectorRegistry()
        guards[name] = Guard(
            GuardConfig.from_dict(config(tmp_path, name, batch)),
            registry=registries[name],
            clock=clock,
            wall_clock=clock,
            identity_secret=b"0123456789abcdef0123456789abcdef",
        )
        guards[name]._observations._apply = recording(guards[name], batches)  # type: ignore[method-assign]
        results[name] = asyncio.run(replay(guards[name], steps, clock))
        asyncio.run(guards[name].aclose())

    at_once, queued = results["at_once"], results["queued"]
    assert len(at_once) == len(queued) == len(steps)
    differ = [i for i, (a, b) in enumerate(zip(at_once, queued, strict=True)) if a != b]
    assert differ == [], (differ[0], at_once[differ[0]], queued[differ[0]])

    # the queued engine did batch (and observed as many answers)
    assert max(batches) >= 8 and len(batches) < sum(batches) / 2
    assert sum(batches) == sum(v[0] == "pass" for v in queued)
    # the trace exercises what it should: near-duplicates decided before the model, and
    # answers observed (in batches, for one engine) decided degradations and quarantines
    assert any(name == "near_duplicate" for v in at_once if v[0] == "pass" for name, _ in v[3])
    assert sum(v == ("refused", 403) for v in at_once) > 100
    assert sum(v[0] == "pass" and v[1] == "allow" for v in at_once) > 1000
    for name in ("at_once", "queued"):
        r = registries[name]
        assert sample(r, "guard_observations_dropped_total", policy="inference") == 0
    for metric, labels in (
        ("guard_quarantines_total", {"policy": "inference"}),
        ("guard_requests_total", {"policy": "inference", "decision": "block"}),
        ("guard_requests_total", {"policy": "inference", "decision": "degrade"}),
        ("guard_detections_total", {"policy": "inference", "detector": "prada", "action": "block"}),
        (
            "guard_detections_total",
            {"policy": "inference", "detector": "boundary", "action": "block"},
        ),
    ):
        a = sample(registries["at_once"], metric, **labels)
        b = sample(registries["queued"], metric, **labels)
        assert a == b, (metric, labels, a, b)
    assert sample(registries["at_once"], "guard_quarantines_total", policy="inference") >= 2
    lines = {name: audit_lines(tmp_path / f"audit-{name}.jsonl") for name in guards}
    after = [x for x in lines["at_once"] if x.get("reason") == "after_answer"]
    observed = {(x["fired"][0], x["quarantined"]) for x in after}
    assert {("prada", False), ("prada", True), ("boundary", True)} <= observed
    # the same lines; an observed answer's may come later, among the next requests' lines
    assert sorted(map(canonical, lines["at_once"])) == sorted(map(canonical, lines["queued"]))


def test_observations_wait_for_a_batch_then_drain_together(tmp_path: Path) -> None:
    """Answers of different clients wait for a batch; one more completes it and drains all."""
    applied: list[list[str]] = []

    async def apply(batch: Any) -> None:
        applied.append([item.query.client for item in batch])

    obs = Observations(apply, ObservationConfig(batch=3, max_pending=5, max_delay_s=3600.0))

    async def run() -> None:
        await obs.submit(item("a"))
        await obs.submit(item("b"))
        assert applied == [] and len(obs) == 2
        assert obs.pending("a") and obs.pending("b") and not obs.pending("c")
        await obs.submit(item("c"))  # the batch is complete: drained at once
        assert applied == [["a", "b", "c"]] and len(obs) == 0 and not obs.pending("a")

    asyncio.run(run())


def test_a_client_s_next_verdict_waits_for_its_own_answers_only(tmp_path: Path) -> None:
    """The front drains before a verdict on a client with an answer queued, not otherwise."""
    clock = Clock()
    cfg = config(tmp_path, "x", 8)
    guard = Guard(GuardConfig.from_dict(cfg), registry=CollectorRegistry(), clock=clock)
    policy = guard.policies[0]
    drained: list[int] = []
    real = guard.observe_batch

    async def counting(items: Any) -> Any:
        drained.append(len(items))
        return await real(items)

    guard._observations._apply = counting  # type: ignore[method-assign]
    front = guard._front
    rows = np.zeros((1, WIDTH))
    probs = np.full((1, CLASSES), 1.0 / CLASSES)

    def query(client: str, ip: str) -> Query:
        return Query(client=client, policy="inference", rows=rows, ip=ip, subnet=ip)

    async def run() -> None:
        for client in ("a", "b", "c"):
            await front.observe(
                policy, query(client, f"ip-{client}"), Answer(200, None, probs), client_source="t"
            )
        assert drained == [] and len(guard.observations) == 3
        await front.decide(policy, query("z", "ip-z"))  # nobody's answer is queued for z
        assert drained == []
        await front.decide(policy, query("b2", "ip-b"))  # b's address: b may quarantine it
        assert drained == [3]
        await front.observe(policy, query("d", "ip-d"), Answer(200, None, probs), client_source="t")
        await front.check_quarantine(policy, "d", ip="ip-d", subnet="ip-d")
        assert drained == [3, 1]

    asyncio.run(run())
    asyncio.run(guard.aclose())


def test_a_full_queue_drops_and_counts_the_newest(tmp_path: Path) -> None:
    """Only a drain that cannot finish (a stalled store) lets the queue fill: past
    ``max_pending`` an answer is dropped, counted per policy."""
    clock = Clock()
    cfg = config(tmp_path, "x", 4)
    cfg["observation"]["max_pending"] = 6
    registry = CollectorRegistry()
    guard = Guard(GuardConfig.from_dict(cfg), registry=registry, clock=clock)
    policy = guard.policies[0]
    stall = asyncio.Event()
    seen: list[int] = []

    async def stalled(items: Any) -> None:
        seen.append(len(items))
        await stall.wait()

    guard._observations._apply = stalled  # type: ignore[method-assign]
    rows = np.zeros((1, WIDTH))
    probs = np.full((1, CLASSES), 1.0 / CLASSES)

    async def run() -> None:
        front = guard._front
        for i in range(4):  # the fourth completes a batch: its drain stalls
            task = asyncio.create_task(
                front.observe(
                    policy,
                    Query(client=f"c{i}", policy="inference", rows=rows),
                    Answer(200, None, probs),
                    client_source="t",
                )
            )
            await asyncio.sleep(0)
        await asyncio.sleep(0)  # the batch's drain runs in a task of its own (shielded)
        assert seen == [4]
        for i in range(4, 14):  # 6 fit while the drain stalls, 4 are dropped
            guard._observations.put(
                Observation(
                    policy,
                    Query(client=f"c{i}", policy="inference", rows=rows),
                    Answer(200, None, probs),
                    "t",
                )
            )
        assert len(guard.observations) == 6 and guard.observations.dropped == 4
        stall.set()
        await task
        await guard.drain()
        assert seen == [4, 6] and len(guard.observations) == 0

    asyncio.run(run())
    assert sample(registry, "guard_observations_dropped_total", policy="inference") == 4


def test_a_quiet_queue_drains_by_its_timer() -> None:
    applied: list[int] = []

    async def apply(batch: Any) -> None:
        applied.append(len(batch))

    obs = Observations(apply, ObservationConfig(batch=100, max_pending=100, max_delay_s=0.01))

    async def run() -> None:
        await obs.submit(item("a"))
        await obs.submit(item("b"))
        assert applied == []
        await asyncio.sleep(0.05)
        assert applied == [2]

    asyncio.run(run())


def test_a_drain_waits_for_the_batch_another_drain_is_applying() -> None:
    """A verdict that drains must see its client's answer even while a concurrent
    drain (the timer's, another request's) holds it, waiting on a slow store."""
    store_answers = asyncio.Event()
    applied: list[str] = []

    async def slow_apply(batch: Any) -> None:
        await store_answers.wait()
        applied.extend(o.query.client for o in batch)

    obs = Observations(slow_apply, ObservationConfig(batch=8, max_pending=8, max_delay_s=9.0))

    async def run() -> None:
        obs.put(item("a"))
        timer_drain = asyncio.create_task(obs.drain())
        await asyncio.sleep(0)  # it took "a" and waits on the store
        assert len(obs) == 0 and obs.pending("a")
        verdict_drain = asyncio.create_task(obs.drain())
        for _ in range(3):
            await asyncio.sleep(0)
        assert not verdict_drain.done()  # not before "a" is applied
        store_answers.set()
        await verdict_drain
        assert applied == ["a"] and not obs.pending("a")
        await timer_drain

    asyncio.run(run())


def test_a_drain_started_by_the_batch_being_applied_returns_at_once() -> None:
    calls: list[int] = []

    async def apply(batch: Any) -> None:
        calls.append(len(batch))
        await obs.drain()  # e.g. a detector that ends up in the engine again

    obs = Observations(apply, ObservationConfig(batch=8, max_pending=8, max_delay_s=9.0))

    async def run() -> None:
        obs.put(item("a"))
        await asyncio.wait_for(obs.drain(), timeout=5.0)

    asyncio.run(run())
    assert calls == [1]


def test_abandoning_the_queue_counts_every_waiting_answer_as_dropped() -> None:
    """What a shutdown whose drain failed does: nothing waits, nobody's verdict waits
    for it, and every answer is counted (once) as dropped."""
    applied: list[Any] = []
    lost: list[str] = []

    async def apply(batch: Any) -> None:
        applied.append(batch)

    obs = Observations(
        apply,
        ObservationConfig(batch=8, max_pending=8, max_delay_s=9.0),
        on_drop=lambda item: lost.append(item.query.client),
    )

    async def run() -> None:
        await obs.submit(item("a"))
        await obs.submit(item("b"))
        await obs.submit(item("a"))
        assert obs.abandon() == 3
        assert len(obs) == 0 and not obs.pending("a") and not obs.pending("b")
        assert obs.dropped == 3 and sorted(lost) == ["a", "a", "b"]
        await obs.drain()  # nothing left to apply
        assert obs.abandon() == 0 and obs.dropped == 3

    asyncio.run(run())
    assert applied == []


def test_the_queue_is_bounded_in_bytes_too() -> None:
    """``max_pending_bytes``: large batches' rows fill it before ``max_pending`` does."""
    dropped: list[str] = []
    obs = Observations(
        lambda batch: asyncio.sleep(0),
        ObservationConfig(batch=100, max_pending=100, max_delay_s=9.0, max_pending_bytes=40_000),
        on_drop=lambda o: dropped.append(o.query.client),
    )
    rows = np.zeros((1024, 2))  # 16 KiB, held twice (the matrix and its memo's bytes)
    big = [item(f"big{i}")._replace(query=Query(f"big{i}", "inference", rows)) for i in range(3)]
    assert obs.put(big[0]) is True
    assert obs.put(big[1]) is False  # 2 x 32 KiB would pass 40 000 bytes
    assert obs.put(item("small")) is True
    assert dropped == ["big1"] and obs.dropped == 1 and len(obs) == 2
    lone = Observations(
        lambda batch: asyncio.sleep(0),
        ObservationConfig(batch=100, max_pending=100, max_delay_s=9.0, max_pending_bytes=1),
    )
    assert lone.put(big[2]) is True  # one alone is always queued: its request was admitted


def test_a_batch_cut_short_by_cancellation_is_counted_as_dropped() -> None:
    dropped: list[str] = []

    async def never(batch: Any) -> None:
        await asyncio.Event().wait()

    obs = Observations(
        never,
        ObservationConfig(batch=8, max_pending=8, max_delay_s=9.0),
        on_drop=lambda o: dropped.append(o.query.client),
    )

    async def run() -> None:
        obs.put(item("a"))
        obs.put(item("b"))
        drain = asyncio.create_task(obs.drain())
        await asyncio.sleep(0)
        drain.cancel()
        with pytest.raises(asyncio.CancelledError):
            await drain
        assert not obs.pending("a") and not obs.pending("b")

    asyncio.run(run())
    assert sorted(dropped) == ["a", "b"] and obs.dropped == 2


def test_the_observation_section_is_validated() -> None:
    assert GuardConfig.from_dict({}).observation == ObservationConfig()
    cfg = GuardConfig.from_dict({"observation": {"batch": 1}}).observation
    assert cfg.batch == 1 and not cfg.queued
    assert (
        GuardConfig.from_dict(
            {"observation": {"max_pending_bytes": 1024}}
        ).observation.max_pending_bytes
        == 1024
    )
    for bad in (
        {"batch": 0},
        {"max_pending": 2, "batch": 8},
        {"max_delay_s": -1},
        {"max_pending_bytes": 0},
        {"x": 1},
    ):
        with pytest.raises(Exception, match="observation"):
            GuardConfig.from_dict({"observation": bad})


def item(client: str) -> Observation:
    from inference_guard.guard.policy import CompiledPolicy

    policy = Guard(GuardConfig.from_dict({}), registry=CollectorRegistry()).policies[0]
    assert isinstance(policy, CompiledPolicy)
    return Observation(
        policy, Query(client=client, policy=policy.name, rows=None), Answer(200), "t"
    )


class FailingObserver(Detector):
    """Observes answers and fails: a bug (``kind="bug"``) or a store failure (``"store"``)."""

    observes_answers = True

    def __init__(self, name: str, kind: str) -> None:
        super().__init__(name)
        self.kind = kind
        self.calls = 0

    async def inspect(self, query: Query) -> DetectorResult:
        return DetectorResult.ok(self.name)

    async def observe(self, query: Query, answer: Answer) -> DetectorResult | None:
        self.calls += 1
        if self.kind == "store":
            raise StateError("redis", "get", "connection refused")
        raise RuntimeError("observer bug")


class FiringObserver(Detector):
    """Observes every answer and fires on each (``degrade``)."""

    observes_answers = True

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.clients: list[str] = []

    async def inspect(self, query: Query) -> DetectorResult:
        return DetectorResult.ok(self.name)

    async def observe(self, query: Query, answer: Answer) -> DetectorResult | None:
        self.clients.append(query.client)
        return DetectorResult(self.name, -1.0, 0.0, True, reason="fired")


register_detector("test-failing-observer", lambda s, c: FailingObserver(s.name, s.params["kind"]))
register_detector("test-firing-observer", lambda s, c: FiringObserver(s.name))


@pytest.mark.parametrize("batch", [1, 3])
def test_a_failing_observer_is_counted_and_the_others_still_observe(batch: int) -> None:
    """Answers applied one at a time (a drain before a verdict) and as a batch of three
    alike: a bug and a store failure in ``observe`` are counted by component, and the
    next detector still observes each answer and fires."""
    registry = CollectorRegistry()
    guard = Guard(
        GuardConfig.from_dict(
            {
                "audit": {"enabled": False},
                "policies": [
                    {
                        "name": "inference",
                        "routes": [V2],
                        "degrade": {"always": False},
                        "detectors": [
                            {
                                "type": "test-failing-observer",
                                "name": "bug",
                                "params": {"kind": "bug"},
                            },
                            {
                                "type": "test-failing-observer",
                                "name": "store",
                                "params": {"kind": "store"},
                            },
                            {"type": "test-firing-observer", "name": "fires", "action": "degrade"},
                        ],
                    }
                ],
            }
        ),
        registry=registry,
    )
    policy = guard.policies[0]
    answer = Answer(labels=np.array([1]), probabilities=np.array([[0.2, 0.8]]))
    items = [
        Observation(
            policy,
            Query(f"c{i}", policy.name, np.zeros((1, 2)), n_rows=1),
            answer,
            "api_key",
            False,
        )
        for i in range(3)
    ]

    async def run() -> list[Any]:
        if batch == 1:
            return [(await guard.observe_batch([item]))[0] for item in items]
        return await guard.observe_batch(items)

    decisions = asyncio.run(run())
    detectors = {d.name: d for d in guard.loadout.detectors()}
    assert detectors["bug"].calls == detectors["store"].calls == 3
    assert detectors["fires"].clients == ["c0", "c1", "c2"]
    assert [d.fired for d in decisions] == [(("fires", Action.DEGRADE),)] * 3
    assert [d.policy for d in decisions] == ["inference"] * 3
    assert sample(registry, "guard_errors_total", component="detector") == 3
    assert sample(registry, "guard_errors_total", component="store") == 3
    assert (
        sample(
            registry,
            "guard_detections_total",
            policy="inference",
            detector="fires",
            action="degrade",
        )
        == 3
    )
