"""The rate lane: a policy whose one detector is a rate limit, plain requests admitted at once.

The lane may only *admit*, only what the full path would admit, consuming and
counting exactly what the full path would; a refusal, a check the store must
make remotely, and anything not plain go to the full path, having consumed and
counted nothing. These tests run the same traffic, on one manual clock,
through two guards, one with the lane and one without, and compare every
answer, every body the app saw, and every metric.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import json
import random
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

import inference_guard.middleware.fast_lane as fast_lane_module
from benchmarks.hostile_corpus import V1, V2, random_request
from inference_guard.detectors.rate import RateLimitDetector
from inference_guard.middleware.asgi import GuardMiddleware
from tests.conftest import sample
from tests.middleware.test_fuzz import JSON_CT, Echo, Result, drive, total
from tests.middleware.test_lean_lane import answer
from tests.stores_fixture import REDIS_SKIP, REDIS_URL, FakeClock

EXEMPT_KEY = b"monitor-key-0001"
#: API keys the traffic presents: two ordinary clients, an exempt monitor, a malformed one
KEYS = (b"client-key-aaaa", b"client-key-bbbb", EXEMPT_KEY, b"bad key\x01")
PEERS = (("203.0.113.9", 40000), ("203.0.113.10", 40001), ("198.51.100.7", 5555), None)


def rate_config(
    limits: list[dict[str, Any]] | None = None,
    *,
    validate: bool = True,
    cost: str = "rows",
    key: str = "client",
    store: str = "memory://",
    cost_constant: int = 1,
    headers: bool = True,
    **policy: Any,
) -> dict[str, Any]:
    params: dict[str, Any] = {
        "key": key,
        "cost": cost,
        **({"cost_constant": cost_constant} if cost == "constant" else {}),
        **({} if headers else {"headers": False}),
        "limits": limits or [{"rate": 30, "per": "1m", "burst": 12}],
    }
    return {
        "audit": {"enabled": False},
        "exempt": {"api_keys": ["sha256:" + hashlib.sha256(EXEMPT_KEY).hexdigest()]},
        "state": {"store": store, "key_prefix": f"test-rate-lane:{uuid.uuid4().hex}:"},
        "policies": [
            {
                "name": "inference",
                "validate": validate,
                "degrade": {"always": False},
                "detectors": [
                    {"type": "rate", "name": "rl", "action": "throttle", "params": params}
                ],
                **policy,
            }
        ],
    }


@pytest.fixture
def lanes_of() -> Iterator[Callable[[dict[str, Any]], Lanes]]:
    """``lanes_of(config)``: a :class:`Lanes`, closed after the test."""
    made: list[Lanes] = []

    def make(config: dict[str, Any]) -> Lanes:
        made.append(Lanes(config))
        return made[-1]

    yield make
    for lanes in made:
        lanes.close()


class Lanes:
    """One config, twice: with the rate lane and with it switched off, on one clock."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.clock = FakeClock()
        # one loop for every request: a Redis store's connections belong to it
        self.loop = asyncio.new_event_loop()
        self.echo = (Echo(), Echo())
        # a key prefix each: on Redis the two must not share budgets
        second = copy.deepcopy(config)
        second["state"]["key_prefix"] = f"test-rate-lane:{uuid.uuid4().hex}:"
        self.prefixes = (config["state"]["key_prefix"], second["state"]["key_prefix"])
        self.lane, self.full = (
            GuardMiddleware(echo, config=c, registry=CollectorRegistry(), clock=self.clock)
            for echo, c in zip(self.echo, (config, second), strict=True)
        )
        assert self.lane._front.rate_policies == {"inference"}
        self.full._front = self.full._front._replace(rate_policies=frozenset())
        # the requests each one's engine was asked to admit (the lane's others it admitted)
        self.admitted = [0, 0]
        for i, mw in enumerate((self.lane, self.full)):
            admission = mw.guard.loadout.admission
            admit = admission.admit

            async def counted(request: Any, i: int = i, admit: Any = admit) -> Any:
                self.admitted[i] += 1
                return await admit(request)

            admission.admit = counted  # type: ignore[method-assign]

    def send(
        self, path: str, body: bytes = b"", *, exact: bool = True, **kw: Any
    ) -> tuple[Result, Result]:
        """The same request to both; with ``exact``, the same answer asserted."""
        a = self.loop.run_until_complete(drive(self.lane, path, body, **kw))
        b = self.loop.run_until_complete(drive(self.full, path, body, **kw))
        if exact:
            assert answer(a) == answer(b), (path, kw, body[:200])
        assert a.receives == b.receives
        return a, b

    def close(self) -> None:
        for mw in (self.lane, self.full):
            self.loop.run_until_complete(mw.guard.aclose())
        self.loop.close()

    def same_metrics(self) -> None:
        assert metrics(self.lane.registry) == metrics(self.full.registry)
        assert self.echo[0].bodies == self.echo[1].bodies


def metrics(registry: CollectorRegistry) -> dict[tuple[Any, ...], float]:
    """Every guard sample but timings: counters, the score histogram, overhead counts."""
    out: dict[tuple[Any, ...], float] = {}
    for family in registry.collect():
        if not family.name.startswith("guard_") or family.name == "guard_build_info":
            continue  # (build info names the config: the two differ in their key prefix)
        for s in family.samples:
            if s.name.endswith("_created"):
                continue
            if family.name == "guard_overhead_seconds" and not s.name.endswith("_count"):
                continue  # how long the guard took differs; how often it was timed may not
            out[(s.name, *sorted(s.labels.items()))] = s.value
    return out


def plain(r: random.Random) -> tuple[str, bytes]:
    """A plain request of 1 to 3 rows, OIP v2 or KServe v1."""
    n = r.randint(1, 3)
    rows = [[round(r.uniform(-5, 5), 3) for _ in range(3)] for _ in range(n)]
    if r.random() < 0.5:
        doc = {"instances": rows}
        return V1, json.dumps(doc).encode()
    flat = [v for row in rows for v in row]
    doc2 = {"inputs": [{"name": "x", "shape": [n, 3], "datatype": "FP64", "data": flat}]}
    return V2, json.dumps(doc2).encode()


def identity(r: random.Random) -> tuple[list[tuple[bytes, bytes]], tuple[str, int] | None]:
    headers = [JSON_CT]
    roll = r.random()
    if roll < 0.35:
        headers.append((b"x-api-key", r.choice(KEYS)))
    elif roll < 0.45:
        headers.append((b"x-forwarded-for", b"192.0.2.1"))  # refused: no trusted proxy
    elif roll < 0.5:
        headers.append((b"authorization", b"Bearer " + r.choice(KEYS[:3])))
    return headers, r.choice(PEERS)


CONFIGS = {
    "one_limit": rate_config(),
    "no_validation": rate_config(validate=False),
    "two_limits": rate_config(
        [
            {"name": "burst", "rate": 40, "per": "1m", "burst": 10},
            {"name": "hourly", "limit": 60, "per": "1h", "algorithm": "sliding_window"},
        ]
    ),
    "constant_cost": rate_config(cost="constant", cost_constant=4),
    "per_subnet": rate_config(key="subnet"),
    "per_ip": rate_config(key="ip"),
    "per_client_in_policy": rate_config(key="client_policy"),
    "whole_policy": rate_config([{"rate": 60, "per": "1m", "burst": 40}], key="policy"),
    "shadow": rate_config(shadow=True),
    "no_rate_fields": rate_config(headers=False),
}


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("seed", [5, 6])
def test_rate_lane_gives_the_full_paths_verdicts(
    name: str, seed: int, lanes_of: Callable[[dict[str, Any]], Lanes]
) -> None:
    lanes = lanes_of(CONFIGS[name])
    r = random.Random(seed)
    statuses: list[int] = []
    for _ in range(400):
        lanes.clock.advance(r.expovariate(4.0))  # about 4 requests a second
        headers, peer = identity(r)
        if r.random() < 0.75:
            path, body = plain(r)
            a, _ = lanes.send(path, body, headers=headers, client=peer)
        else:  # hostile, or merely not plain: the full path's, through the lane's handler
            method, path, raw_headers, chunks = random_request(r)
            if path == "/metrics":
                continue
            a, _ = lanes.send(path, chunks=chunks, headers=raw_headers, method=method, client=peer)
        statuses.append(a.status)
    lanes.same_metrics()
    # the comparison means something only if the lane admitted requests itself, and
    # the budgets were spent: refusals (the full path's, in both guards) happened too
    assert lanes.admitted[0] <= lanes.admitted[1] - 50, lanes.admitted
    if name != "shadow":
        assert statuses.count(429) > 10
    assert statuses.count(200) > 100


def test_lane_refusal_is_the_full_paths_and_spends_nothing(
    lanes_of: Callable[[dict[str, Any]], Lanes],
) -> None:
    lanes = lanes_of(rate_config([{"rate": 1, "per": "1h", "burst": 3}]))
    body = json.dumps({"instances": [[1.0, 2.0]] * 2}).encode()
    ok, _ = lanes.send(V1, body, headers=[JSON_CT])
    assert ok.status == 200 and ok.header(b"ratelimit") == [b'"rl";r=1;t=7200']
    assert ok.header(b"ratelimit-policy") == [b'"rl";q=3;w=10800']
    refused, _ = lanes.send(V1, body, headers=[JSON_CT])  # 2 rows, 1 left
    assert refused.status == 429 and refused.header(b"retry-after") == [b"3600"]
    one = json.dumps({"instances": [[1.0, 2.0]]}).encode()
    last, _ = lanes.send(V1, one, headers=[JSON_CT])  # the refusal spent nothing
    assert last.status == 200 and last.header(b"ratelimit") == [b'"rl";r=0;t=10800']
    lanes.same_metrics()
    assert lanes.admitted == [1, 3]  # the lane admitted two; the refusal was the engine's


@pytest.mark.parametrize("shadow", [False, True])
def test_no_rate_fields_where_nothing_is_enforced(
    shadow: bool, lanes_of: Callable[[dict[str, Any]], Lanes]
) -> None:
    """Shadow mode and exempt clients are never throttled: their answers carry no
    RateLimit fields (a budget no one enforces, read as "slow down" by a client that
    heeds them), admitted at once or over the limit; an enforced client's carry them."""
    lanes = lanes_of(rate_config([{"rate": 1, "per": "1h", "burst": 2}], shadow=shadow))
    body = json.dumps({"instances": [[1.0, 2.0]]}).encode()
    monitor = [JSON_CT, (b"x-api-key", EXEMPT_KEY)]
    client = [JSON_CT, (b"x-api-key", KEYS[0])]
    for i in range(4):  # the budget is 2: the last two are over it
        watched, _ = lanes.send(V1, body, headers=monitor)
        ordinary, _ = lanes.send(V1, body, headers=client)
        assert watched.status == 200
        assert watched.header(b"ratelimit") == watched.header(b"ratelimit-policy") == []
        if shadow:
            assert ordinary.status == 200
            assert ordinary.header(b"ratelimit") == ordinary.header(b"ratelimit-policy") == []
        else:
            assert ordinary.status == (200 if i < 2 else 429)
            assert ordinary.header(b"ratelimit-policy") == [b'"rl";q=2;w=7200']
    lanes.same_metrics()
    # the lane admitted the ordinary client's first two: the lane's path was under test
    assert lanes.admitted[0] <= lanes.admitted[1] - 2, lanes.admitted


def test_without_rate_fields_only_a_refusal_says_when_to_retry(
    lanes_of: Callable[[dict[str, Any]], Lanes],
) -> None:
    lanes = lanes_of(rate_config([{"rate": 1, "per": "1h", "burst": 2}], headers=False))
    body = json.dumps({"instances": [[1.0, 2.0]] * 2}).encode()
    ok, _ = lanes.send(V1, body, headers=[JSON_CT])
    refused, _ = lanes.send(V1, body, headers=[JSON_CT])
    assert (ok.status, refused.status) == (200, 429)
    for res in (ok, refused):
        assert res.header(b"ratelimit") == res.header(b"ratelimit-policy") == []
    assert refused.header(b"retry-after") == [b"7200"]  # 2 rows at one an hour
    lanes.same_metrics()
    assert lanes.admitted == [1, 2]


def test_a_failing_gate_hands_the_request_to_the_full_path(
    monkeypatch: pytest.MonkeyPatch, lanes_of: Callable[[dict[str, Any]], Lanes]
) -> None:
    def broken(self: RateLimitDetector, *args: Any) -> Any:
        raise RuntimeError("a lane bug")

    lanes = lanes_of(rate_config())
    monkeypatch.setattr(RateLimitDetector, "admit_now", broken)
    path, body = plain(random.Random(1))
    for _ in range(3):
        a, _ = lanes.send(path, body, headers=[JSON_CT])
        assert a.status == 200
    lanes.same_metrics()
    assert lanes.admitted == [3, 3]


def test_a_failing_plain_reader_is_counted_once(
    monkeypatch: pytest.MonkeyPatch, lanes_of: Callable[[dict[str, Any]], Lanes]
) -> None:
    """The lane hands the request over; the full path runs the reader again and counts it."""

    def broken(body: bytes, limits: Any) -> int | None:
        raise RuntimeError("a reader bug")

    monkeypatch.setitem(fast_lane_module.READERS, "oip_v2", broken)
    lanes = lanes_of(rate_config())
    path, body = (
        V2,
        json.dumps(
            {"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP64", "data": [1, 2]}]}
        ).encode(),
    )
    for _ in range(2):
        a, _ = lanes.send(path, body, headers=[JSON_CT])
        assert a.status == 200  # the full parser's verdict
    lanes.same_metrics()
    assert total(lanes.lane.registry, "guard_errors", component="parse") == 2
    assert lanes.admitted == [2, 2]


@pytest.mark.parametrize(
    ("change", "gated"),
    [
        ({}, True),
        ({"degrade": {"always": True}}, False),  # answers rewritten
        ({"quarantine_s": 60, "detectors_action": "block"}, False),  # quarantine on
        ({"cost": "values"}, False),  # the matrix is read
        ({"second_detector": True}, False),
        ({"store": "redis-no-leases"}, False),  # every check a round trip
        ({"store": "redis-refusals-only"}, False),  # no lease: nothing answers at once
        ({"store": "redis"}, True),
    ],
)
def test_lane_only_where_the_gate_applies(
    change: dict[str, Any], gated: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if "store" in change:
        if REDIS_URL is None:
            pytest.skip("set GUARD_TEST_REDIS_URL (e.g. redis://127.0.0.1:6379/15) to run it")
        monkeypatch.setenv("GUARD_HASH_KEY", "test-rate-lane-hash-key")
    config = rate_config(cost=change.get("cost", "rows"))
    policy = config["policies"][0]
    if "degrade" in change:
        policy["degrade"] = change["degrade"]
    if "quarantine_s" in change:
        policy["quarantine_s"] = change["quarantine_s"]
        policy["detectors"][0]["action"] = change["detectors_action"]
    if change.get("second_detector"):
        second = json.loads(json.dumps(policy["detectors"][0]))
        second["name"] = "rl2"
        policy["detectors"].append(second)
    if "store" in change:
        config["state"]["store"] = REDIS_URL
    if change.get("store") == "redis-no-leases":
        policy["detectors"][0]["params"].update(lease=0, lease_s=0)
    if change.get("store") == "redis-refusals-only":
        policy["detectors"][0]["params"].update(lease=0)
    mw = GuardMiddleware(Echo(), config=config, registry=CollectorRegistry())
    try:
        assert mw._front.rate_policies == ({"inference"} if gated else frozenset())
    finally:
        asyncio.run(mw.guard.aclose())


@REDIS_SKIP
@pytest.mark.parametrize(
    "limits",
    [
        [{"rate": 60, "per": "1h", "burst": 1000}],
        [
            {"name": "burst", "rate": 60, "per": "1h", "burst": 1000},
            {"name": "daily", "limit": 5000, "per": "1d", "algorithm": "sliding_window"},
        ],
    ],
    ids=["one_limit", "two_limits"],
)
def test_lease_hits_are_admitted_in_the_lane_on_redis(
    limits: list[dict[str, Any]],
    monkeypatch: pytest.MonkeyPatch,
    lanes_of: Callable[[dict[str, Any]], Lanes],
) -> None:
    """On Redis the lane spends the process's lease; a lease miss goes to the engine."""
    assert REDIS_URL is not None
    monkeypatch.setenv("GUARD_HASH_KEY", "test-rate-lane-hash-key")
    config = rate_config(limits, store=REDIS_URL)
    config["policies"][0]["detectors"][0]["params"].update(lease=0.05)  # 50 units a lease
    lanes = lanes_of(config)
    lease_store = lanes.lane.guard.loadout.policies[0].detectors[0].detector.store
    assert type(lease_store).__name__ == "LeasedRateStore"
    body = json.dumps({"instances": [[1.0, 2.0]]}).encode()
    for _ in range(120):
        lanes.clock.advance(0.001)
        # Redis keeps its own clock: the reset times (t=) of the two may differ (a unit
        # refills in a minute, so the remaining units do not)
        a, b = lanes.send(V1, body, headers=[JSON_CT], exact=False)
        assert a.status == b.status == 200
        assert a.header(b"ratelimit-policy") == b.header(b"ratelimit-policy")
        assert [h.split(b";t=")[0] for h in a.header(b"ratelimit")] == [
            h.split(b";t=")[0] for h in b.header(b"ratelimit")
        ]
    lanes.same_metrics()
    # a round trip per lease of 50 units, each with a request: the engine was asked 3 times
    assert lanes.admitted == [3, 120]
    # and both guards export where the checks were answered (same_metrics: alike)
    registry = lanes.lane.registry
    assert sample(registry, "guard_rate_checks_total", detector="rl", answered="store") == 3
    assert sample(registry, "guard_rate_checks_total", detector="rl", answered="local") == 117
    for prefix in lanes.prefixes:
        assert _redis_keys(prefix), "each guard's budget lives in the shared store"


def _redis_keys(prefix: str) -> list[bytes]:
    import redis

    assert REDIS_URL is not None
    client = redis.Redis.from_url(REDIS_URL)
    try:
        found = list(client.scan_iter(match=prefix + "*"))
        if found:
            client.delete(*found)
        return found
    finally:
        client.close()
