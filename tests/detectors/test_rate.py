"""The rate detector: costs, keys, headers, scores, its config, on every store backend."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from inference_guard.detectors.base import Query
from inference_guard.detectors.rate import (
    LimitSpecError,
    NamedLimit,
    RateLimitDetector,
    parse_duration,
    parse_limits,
    request_cost,
)
from inference_guard.detectors.store import GcraLimit, WindowLimit
from inference_guard.guard.config import DetectorSpec, GuardConfig, StateConfig
from inference_guard.guard.decisions import Action
from inference_guard.guard.errors import ConfigurationError, StateError
from inference_guard.guard.registry import BuildContext, build_detector
from inference_guard.guard.stores import MemoryStore, ResilientStore, store_from_uri
from inference_guard.guard.stores.lease import LeasedRateStore
from tests.stores_fixture import Backend, FakeClock

HOUR = 3600.0
DAY = 86400.0


def q(client: str = "c0ffee", policy: str = "api", n_rows: int = 1, **kw: Any) -> Query:
    return Query(client=client, policy=policy, rows=None, n_rows=n_rows, **kw)


def matrix(n_rows: int, n_features: int) -> Query:
    return Query(client="c0ffee", policy="api", rows=np.zeros((n_rows, n_features)), n_rows=n_rows)


# ---------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    ("raw", "seconds"),
    [
        ("1s", 1.0),
        ("500ms", 0.5),
        ("1m", 60.0),
        ("1h", HOUR),
        ("1d", DAY),
        ("2.5s", 2.5),
        (" 10 s ", 10.0),
        (3, 3.0),
        (0.25, 0.25),
    ],
)
def test_parse_duration(raw: object, seconds: float) -> None:
    assert parse_duration(raw) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "1",
        "1w",
        "-1s",
        "1e3s",
        "0s",
        0,
        -1,
        True,
        None,
        [1],
        float("inf"),
        float("nan"),
        "0.5ms",
    ],
)
def test_parse_duration_rejects(raw: object) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(raw)


def test_parse_limits_infers_the_algorithm_and_names() -> None:
    limits = parse_limits(
        [
            {"rate": 20, "per": "1s", "burst": 40},
            {"limit": 10000, "per": "1d", "algorithm": "sliding_window"},
            {"rate": 0.5, "per": 60, "algorithm": "token_bucket", "name": "slow"},
        ],
        default_name="quota",
    )
    assert limits == (
        NamedLimit("quota-0", GcraLimit(rate=20.0, period=1.0, burst=40)),
        NamedLimit("quota-1", WindowLimit(limit=10000, period=DAY)),
        NamedLimit("slow", GcraLimit(rate=0.5, period=60.0, burst=1)),
    )
    (only,) = parse_limits([{"rate": 2.5, "per": "1s"}], default_name="quota")
    assert only == NamedLimit("quota", GcraLimit(rate=2.5, period=1.0, burst=3))


def test_parse_limits_reports_every_problem_with_its_path() -> None:
    with pytest.raises(LimitSpecError) as info:
        parse_limits(
            [
                {"rate": 20, "per": "1 second", "burst": 0},
                {"limit": 10, "per": "1d", "algorithm": "fixed"},
                {"limit": 1.5, "per": "1d", "rate": 3, "algorithm": "sliding_window"},
                {"per": "1s"},
                {"rate": 1, "per": "1s", "extra": 1},
                "nope",
            ],
            default_name="q",
        )
    paths = [path for path, _ in info.value.problems]
    assert paths == [
        "limits[0].per",
        "limits[0].burst",
        "limits[1].algorithm",
        "limits[2].rate",
        "limits[2].limit",
        "limits[3]",
        "limits[4].extra",
        "limits[5]",
    ]


@pytest.mark.parametrize("raw", [[], None, {"rate": 1}, [{"rate": 1, "per": "1s"}] * 17])
def test_parse_limits_needs_a_short_nonempty_list(raw: object) -> None:
    with pytest.raises(LimitSpecError):
        parse_limits(raw, default_name="q")


def test_parse_limits_rejects_duplicate_names() -> None:
    with pytest.raises(LimitSpecError, match="duplicate"):
        parse_limits(
            [{"rate": 1, "per": "1s", "name": "a"}, {"limit": 1, "per": "1d", "name": "a"}],
            default_name="q",
        )


# ---------------------------------------------------------------- cost


def test_cost_by_rows_constant_and_tokens() -> None:
    assert request_cost(q(n_rows=100)) == 100
    assert request_cost(q(n_rows=0)) == 1
    assert request_cost(q(n_rows=100), "constant", 3) == 3
    text = q(texts=("a" * 9, "b" * 3), extra={"max_tokens": 16, "n": 2})
    assert request_cost(text, "tokens") == 3 + 32
    assert request_cost(q(texts=("hello",)), "tokens") == 2
    assert request_cost(q(), "tokens") == 1
    with pytest.raises(ValueError):
        request_cost(q(), "bytes")


def test_cost_by_values_charges_a_wide_row_for_its_width() -> None:
    wide = matrix(1, 65_000)
    assert request_cost(wide, "values") == 65_000
    assert request_cost(wide, "rows") == 1
    assert request_cost(matrix(3, 4), "values") == 12
    # no matrix (texts, an opaque payload): its rows
    assert request_cost(q(texts=("a", "b"), n_rows=2), "values") == 2
    assert request_cost(q(n_rows=0), "values") == 1


@pytest.mark.parametrize(
    ("extra", "cost"),
    [
        ({"max_tokens": "lots"}, 1),
        ({"max_tokens": -5}, 1),
        ({"max_tokens": True}, 1),
        ({"max_tokens": 2.2}, 4),
        ({"max_tokens": 10, "n": 0}, 11),
        ({"max_tokens": 10, "n": None}, 11),
        ({"max_tokens": 10**20}, 1 << 40),
        ({"max_tokens": float("inf")}, 1),
    ],
)
def test_token_cost_survives_hostile_extras(extra: dict[str, Any], cost: int) -> None:
    assert request_cost(q(texts=("abcd",), extra=extra), "tokens") == cost


# ---------------------------------------------------------------- the detector, on every backend


@pytest.mark.anyio
async def test_burst_headers_score_and_retry(backend: Backend) -> None:
    # 2 rows per second, 40 at once: slow enough for real time on Redis
    det = RateLimitDetector(
        "rate", store=backend.store, limits=[GcraLimit(rate=2, period=1.0, burst=40)]
    )
    first = await det.inspect(q(n_rows=30))
    assert not first.anomalous and first.threshold == 0.0
    assert first.score == pytest.approx(0.25)
    headers = dict(first.headers)
    assert headers["RateLimit-Policy"] == '"rate";q=40;w=20'
    assert headers["RateLimit"] == '"rate";r=10;t=15'
    second = await det.inspect(q(n_rows=30))
    assert second.anomalous and second.score < second.threshold
    assert second.score == pytest.approx((10 - 30) / 40)
    assert second.retry_after == pytest.approx(10.0, abs=0.2)
    assert second.rows_flagged == 30
    assert "c0ffee" not in second.reason  # never the client in audit text
    assert dict(second.headers)["RateLimit"] == '"rate";r=10;t=15'
    third = await det.inspect(q(n_rows=10))  # the refused batch took nothing
    assert not third.anomalous and third.score == 0.0


@pytest.mark.anyio
async def test_batch_rows_count_as_queries(backend: Backend) -> None:
    det = RateLimitDetector(
        "rate", store=backend.store, limits=[WindowLimit(limit=250, period=HOUR)]
    )
    assert not (await det.inspect(q(n_rows=100))).anomalous
    assert not (await det.inspect(q(n_rows=100))).anomalous
    refused = await det.inspect(q(n_rows=100))
    assert refused.anomalous and "cost 100, 50 left" in refused.reason
    assert not (await det.inspect(q(n_rows=50))).anomalous


@pytest.mark.anyio
async def test_daily_quota_refusal_does_not_eat_the_burst(backend: Backend) -> None:
    det = RateLimitDetector(
        "rate",
        store=backend.store,
        limits=[
            NamedLimit("burst", GcraLimit(rate=1, period=HOUR, burst=10)),
            NamedLimit("daily", WindowLimit(limit=5, period=DAY)),
        ],
    )
    assert not (await det.inspect(q(n_rows=5))).anomalous
    refused = await det.inspect(q(n_rows=4))
    assert refused.anomalous and "'daily'" in refused.reason
    assert refused.retry_after is not None and refused.retry_after > HOUR
    assert dict(refused.headers)["RateLimit"].startswith('"burst";r=5;')
    assert dict(refused.headers)["RateLimit-Policy"] == '"burst";q=10;w=36000, "daily";q=5;w=86400'


@pytest.mark.anyio
async def test_several_refusing_limits_name_the_tightest_and_the_longest_wait(
    backend: Backend,
) -> None:
    det = RateLimitDetector(
        "rate",
        store=backend.store,
        limits=[
            NamedLimit("hourly", WindowLimit(limit=12, period=HOUR)),
            NamedLimit("burst", GcraLimit(rate=1, period=60.0, burst=10)),
            NamedLimit("daily", WindowLimit(limit=13, period=DAY)),
        ],
    )
    assert not (await det.inspect(q(n_rows=8))).anomalous  # 4, 2 and 5 left
    refused = await det.inspect(q(n_rows=5))
    # 'hourly' and 'burst' refuse ('daily' has room); 'burst' is further over (2 - 5 of 10
    # against 4 - 5 of 12), though not the first
    assert refused.anomalous and refused.score == pytest.approx(-0.3)
    assert refused.reason == "limit 'burst' exceeded: cost 5, 2 left"
    # the longest wait is the hourly window's, not the tightest limit's (3 minutes)
    assert refused.retry_after is not None and refused.retry_after > 600
    # a cost no limit of them can ever hold names the first that cannot, not the tightest
    never = await det.inspect(q(n_rows=11))
    assert never.reason == "cost 11 exceeds the capacity 10 of limit 'burst'"
    huge = await det.inspect(q(n_rows=14))
    assert huge.reason == "cost 14 exceeds the capacity 12 of limit 'hourly'"
    assert huge.score == -1.0 and huge.retry_after is not None and huge.retry_after >= 1.0


@pytest.mark.anyio
async def test_budgets_per_client_per_client_policy_and_per_policy(backend: Backend) -> None:
    limits = [WindowLimit(limit=2, period=HOUR)]
    per_client = RateLimitDetector("c", store=backend.store, limits=limits, key="client")
    per_pair = RateLimitDetector("cp", store=backend.store, limits=limits, key="client_policy")
    per_policy = RateLimitDetector("p", store=backend.store, limits=limits, key="policy")

    async def admitted(det: RateLimitDetector, client: str, policy: str) -> bool:
        return not (await det.inspect(q(client=client, policy=policy))).anomalous

    # one budget per client, whatever the policy
    assert [await admitted(per_client, "a", pol) for pol in ("x", "y", "x")] == [True, True, False]
    assert await admitted(per_client, "b", "x")
    # one per client and policy
    assert [await admitted(per_pair, "a", pol) for pol in ("x", "x", "x", "y")] == [
        True,
        True,
        False,
        True,
    ]
    # one for everyone on the policy
    assert [await admitted(per_policy, c, "x") for c in ("a", "b", "c")] == [True, True, False]
    assert await admitted(per_policy, "a", "y")


@pytest.mark.anyio
async def test_constant_and_token_costs(backend: Backend) -> None:
    limits = [WindowLimit(limit=100, period=HOUR)]
    const = RateLimitDetector(
        "k", store=backend.store, limits=limits, cost="constant", cost_constant=40
    )
    assert not (await const.inspect(q(n_rows=1000))).anomalous
    assert not (await const.inspect(q(n_rows=1000))).anomalous
    assert (await const.inspect(q(n_rows=1))).anomalous
    tokens = RateLimitDetector("t", store=backend.store, limits=limits, cost="tokens")
    prompt = q(texts=("x" * 200,), extra={"max_tokens": 40})  # 50 + 40
    assert not (await tokens.inspect(prompt)).anomalous
    assert (await tokens.inspect(prompt)).anomalous


@pytest.mark.anyio
async def test_values_cost_drains_the_budget_by_width(backend: Backend) -> None:
    limits = [WindowLimit(limit=100_000, period=HOUR)]
    values = RateLimitDetector("v", store=backend.store, limits=limits, cost="values")
    rows = RateLimitDetector("r", store=backend.store, limits=limits, cost="rows")
    wide = matrix(1, 65_000)
    assert not (await values.inspect(wide)).anomalous
    assert (await values.inspect(wide)).anomalous  # 130 000 values asked of 100 000
    for _ in range(3):
        assert not (await rows.inspect(wide)).anomalous  # per row, each costs 1


@pytest.mark.anyio
async def test_a_batch_larger_than_any_budget_says_so(backend: Backend) -> None:
    det = RateLimitDetector("rate", store=backend.store, limits=[GcraLimit(10, 1.0, 10)])
    result = await det.inspect(q(n_rows=11))
    assert result.anomalous and result.score == -0.1
    assert "exceeds the capacity 10" in result.reason
    assert result.retry_after == 1.0  # never fits: no invitation to retry at once


@pytest.mark.anyio
async def test_state_keys_hold_only_the_client_hash(backend: Backend) -> None:
    det = RateLimitDetector(
        "rate",
        store=backend.store,
        key="client_policy",
        limits=[GcraLimit(1, 1.0, 5), WindowLimit(5, HOUR)],
    )
    await det.inspect(q(client="9f86d081884c7d65", policy="api"))
    assert sorted(await backend.keys()) == [
        "rate:{rate:cp:api:9f86d081884c7d65}:0g",
        "rate:{rate:cp:api:9f86d081884c7d65}:1w",
    ]


def test_detector_validates_its_parameters() -> None:
    store = MemoryStore()
    limits = [WindowLimit(1, 1.0)]
    with pytest.raises(ValueError, match="key"):
        RateLimitDetector("r", store=store, limits=limits, key="address")
    with pytest.raises(ValueError, match="cost"):
        RateLimitDetector("r", store=store, limits=limits, cost="bytes")
    with pytest.raises(ValueError, match="cost_constant"):
        RateLimitDetector("r", store=store, limits=limits, cost_constant=0)
    with pytest.raises(ValueError, match="limits"):
        RateLimitDetector("r", store=store, limits=[])
    with pytest.raises(ValueError, match="distinct"):
        RateLimitDetector(
            "r", store=store, limits=[NamedLimit("a", limits[0]), NamedLimit("a", limits[0])]
        )
    with pytest.raises(ValueError, match="name"):
        RateLimitDetector('r"', store=store, limits=limits)
    assert RateLimitDetector.technique == "AML.T0029"


# ---------------------------------------------------------------- the factory (type: rate)


def _spec(params: dict[str, Any], key: str = "policies[0].detectors[1]") -> DetectorSpec:
    return DetectorSpec(type="rate", name="rate", action=Action.THROTTLE, params=params, key=key)


EXAMPLE = {
    "key": "client",
    "cost": "rows",
    "limits": [
        {"rate": 20, "per": "1s", "burst": 40},
        {"limit": 10000, "per": "1d", "algorithm": "sliding_window"},
    ],
    "fallback": "none",
}


def test_factory_builds_the_documented_example() -> None:
    store = MemoryStore()
    det = build_detector(_spec(EXAMPLE), BuildContext(store=store))
    assert isinstance(det, RateLimitDetector)
    assert det.store is store
    assert [n.limit for n in det.limits] == [GcraLimit(20.0, 1.0, 40), WindowLimit(10000, DAY)]


def test_factory_accepts_the_example_from_a_config_file() -> None:
    config = GuardConfig.load(
        {
            "policies": [
                {
                    "name": "api",
                    "detectors": [{"type": "rate", "action": "throttle", "params": EXAMPLE}],
                }
            ]
        }
    )
    spec = config.policies[0].detectors[0]
    det = build_detector(spec, BuildContext(store=MemoryStore()))
    assert isinstance(det, RateLimitDetector)


@pytest.mark.parametrize(
    ("params", "path"),
    [
        (
            {**EXAMPLE, "limits": [EXAMPLE["limits"][0], {"limit": 5, "per": "soon"}]},
            "policies[0].detectors[1].params.limits[1].per",
        ),
        ({**EXAMPLE, "window": 3}, "policies[0].detectors[1].params.window"),
        ({**EXAMPLE, "key": "address"}, "policies[0].detectors[1].params.key"),
        ({**EXAMPLE, "cost": "bytes"}, "policies[0].detectors[1].params.cost"),
        ({**EXAMPLE, "fallback": "disk"}, "policies[0].detectors[1].params.fallback"),
        ({**EXAMPLE, "cost_constant": 5}, "policies[0].detectors[1].params.cost_constant"),
        (
            {**EXAMPLE, "cost": "constant", "cost_constant": 0},
            "policies[0].detectors[1].params.cost_constant",
        ),
        ({"key": "client"}, "policies[0].detectors[1].params.limits"),
        ({**EXAMPLE, "limits": []}, "policies[0].detectors[1].params.limits"),
    ],
)
def test_factory_names_the_bad_key(params: dict[str, Any], path: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        build_detector(_spec(params), BuildContext(store=MemoryStore()))
    assert info.value.key == path


def test_factory_collects_every_problem() -> None:
    params = {**EXAMPLE, "key": "address", "limits": [{"rate": -1, "per": "1s"}]}
    with pytest.raises(ConfigurationError) as info:
        build_detector(_spec(params), BuildContext(store=MemoryStore()))
    assert [k for k, _ in info.value.problems] == [
        "policies[0].detectors[1].params.key",
        "policies[0].detectors[1].params.limits[0].rate",
    ]


def test_factory_wires_the_memory_fallback() -> None:
    config = StateConfig(store="redis://127.0.0.1:1/0", timeout_s=0.2, max_keys=123)
    shared = ResilientStore.from_config(store_from_uri(config), config)
    det = build_detector(_spec({**EXAMPLE, "fallback": "memory"}), BuildContext(store=shared))
    assert isinstance(det, RateLimitDetector)
    # a shared store is checked through local leases, in front of the breaker
    assert isinstance(det.store, LeasedRateStore)
    view = det.store.inner
    assert isinstance(view, ResilientStore) and view.breaker is shared.breaker
    assert isinstance(view.fallback, MemoryStore) and view.fallback.max_keys == 123
    plain = build_detector(_spec(EXAMPLE), BuildContext(store=shared))
    assert isinstance(plain, RateLimitDetector) and isinstance(plain.store, LeasedRateStore)
    assert plain.store.inner is shared
    exact = build_detector(_spec({**EXAMPLE, "lease": 0, "lease_s": 0}), BuildContext(store=shared))
    assert isinstance(exact, RateLimitDetector) and exact.store is shared
    memory = MemoryStore()
    same = build_detector(_spec({**EXAMPLE, "fallback": "memory"}), BuildContext(store=memory))
    assert isinstance(same, RateLimitDetector) and same.store is memory


@pytest.mark.anyio
async def test_dead_redis_raises_or_falls_back_to_memory() -> None:
    config = StateConfig(store="redis://127.0.0.1:1/0", timeout_s=0.2, breaker_failures=2)
    clock = FakeClock()
    shared = ResilientStore.from_config(store_from_uri(config), config, clock=clock)
    try:
        strict = build_detector(_spec(EXAMPLE), BuildContext(store=shared, clock=clock))
        with pytest.raises(StateError):  # the policy's failure mode decides
            await strict.inspect(q())
        lenient = build_detector(
            _spec({**EXAMPLE, "fallback": "memory"}), BuildContext(store=shared, clock=clock)
        )
        results = [await lenient.inspect(q(n_rows=20)) for _ in range(3)]
        assert [r.anomalous for r in results] == [False, False, True]
        assert shared.fallbacks == 3
    finally:
        await shared.aclose()
