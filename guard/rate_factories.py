"""Factories for the rate detectors (``FACTORIES``, in :mod:`guard.builtin_detectors`).

``type: rate`` builds a :class:`detectors.rate.RateLimitDetector`::

    - type: rate
      action: throttle
      params:
        key: client            # client | client_policy | policy | ip | subnet
        cost: rows             # rows | values (rows x features) | constant | tokens
        cost_constant: 1       # only with cost: constant
        limits:
          - {rate: 20, per: 1s, burst: 40}                       # GCRA
          - {limit: 10000, per: 1d, algorithm: sliding_window}
        fallback: none         # none | memory
        lease: 0.01            # shared stores: share of the smallest capacity leased at once
        lease_s: 1s            # longest a lease or a local refusal is held

``fallback: memory`` keeps limiting per process, in a bounded memory store,
while the shared store is unavailable (instead of applying the policy's failure
mode).

On a shared store (``redis://``, ``redis+cluster://``) the detector checks
through :class:`guard.stores.lease.LeasedRateStore`: a client with plenty of
room gets ``lease`` of the smallest capacity (rounded down) in one script and
this process spends it locally; a refused client is refused again locally
until its ``retry_after`` or ``lease_s``. ``lease: 0`` checks every admitted
request in the store; ``lease: 0`` with ``lease_s: 0`` checks every request
there.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from inference_guard.detectors.base import Detector
from inference_guard.detectors.rate import (
    COST_MODES,
    KEY_MODES,
    MAX_COST,
    LimitSpecError,
    NamedLimit,
    RateLimitDetector,
    parse_duration,
)
from inference_guard.detectors.rate import parse_limits as _parse_limits
from inference_guard.detectors.store import RateStore
from inference_guard.guard.config import DetectorSpec
from inference_guard.guard.errors import ConfigurationError
from inference_guard.guard.factory import BuildContext, DetectorFactory
from inference_guard.guard.stores.base import Store
from inference_guard.guard.stores.lease import DEFAULT_LEASE, DEFAULT_LEASE_S, LeasedRateStore
from inference_guard.guard.stores.rate import RateLimitStore
from inference_guard.guard.stores.resilient import CircuitBreaker, ResilientStore

__all__ = ["FACTORIES", "build_rate"]

_PARAMS = frozenset(
    {"key", "cost", "cost_constant", "limits", "fallback", "lease", "lease_s", "headers"}
)
#: largest ``lease`` share accepted (a lease is a small part of a budget)
_MAX_LEASE = 0.1
#: longest ``lease_s`` accepted
_MAX_LEASE_S = 60.0
_FALLBACKS = ("none", "memory")


def _choice(
    params: Mapping[str, Any],
    name: str,
    allowed: tuple[str, ...],
    base: str,
    problems: list[tuple[str, str]],
) -> str:
    value = params.get(name, allowed[0])
    if value not in allowed:
        problems.append((f"{base}.{name}", f"must be one of {', '.join(allowed)}, got {value!r}"))
        return allowed[0]
    return str(value)


def _rate_store(store: object, fallback: str, base: str) -> RateStore:
    if fallback == "memory":
        if isinstance(store, ResilientStore):
            store = store.with_memory_fallback()
        elif isinstance(store, Store) and store.backend != "memory":
            # no breaker was set up by the caller: give this detector its own
            store = ResilientStore(
                store, breaker=CircuitBreaker(backend=store.backend)
            ).with_memory_fallback()
    if not isinstance(store, RateStore):
        raise ConfigurationError(base, "the configured state store does not support rate limits")
    return store


def build_rate(spec: DetectorSpec, ctx: BuildContext) -> Detector:
    """Build a :class:`RateLimitDetector` from ``spec``, or raise ConfigurationError."""
    base = f"{spec.key}.params" if spec.key else "params"
    params = spec.params
    problems: list[tuple[str, str]] = []
    for name in params:
        if name not in _PARAMS:
            problems.append(
                (f"{base}.{name}", f"unknown key (allowed: {', '.join(sorted(_PARAMS))})")
            )
    key = _choice(params, "key", KEY_MODES, base, problems)
    cost = _choice(params, "cost", COST_MODES, base, problems)
    fallback = _choice(params, "fallback", _FALLBACKS, base, problems)
    cost_constant = 1
    if "cost_constant" in params:
        value = params["cost_constant"]
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_COST:
            problems.append(
                (f"{base}.cost_constant", f"must be an integer in [1, {MAX_COST}], got {value!r}")
            )
        elif cost != "constant":
            problems.append((f"{base}.cost_constant", "is only used with cost: constant"))
        else:
            cost_constant = value
    limits: tuple[NamedLimit, ...] = ()
    if "limits" not in params:
        problems.append((f"{base}.limits", "is required (a list of limits)"))
    else:
        try:
            limits = _parse_limits(params["limits"], default_name=spec.name)
        except LimitSpecError as exc:
            problems += [(f"{base}.{path}", problem) for path, problem in exc.problems]
    headers = params.get("headers", True)
    if not isinstance(headers, bool):
        problems.append((f"{base}.headers", f"must be true or false, got {headers!r}"))
        headers = True
    lease = params.get("lease", DEFAULT_LEASE)
    if (
        isinstance(lease, bool)
        or not isinstance(lease, int | float)
        or not 0 <= lease <= _MAX_LEASE
    ):
        problems.append((f"{base}.lease", f"must be a number in [0, {_MAX_LEASE}], got {lease!r}"))
        lease = 0.0
    lease_s = DEFAULT_LEASE_S
    if "lease_s" in params:
        raw = params["lease_s"]
        try:
            if isinstance(raw, bool):  # `false` is no duration (and would compare equal to 0)
                raise ValueError(f"must be a duration such as 1s or 0, got {raw!r}")
            lease_s = 0.0 if raw in (0, "0") else parse_duration(raw)
        except ValueError as exc:
            problems.append((f"{base}.lease_s", str(exc)))
        else:
            if lease_s > _MAX_LEASE_S:
                problems.append((f"{base}.lease_s", f"must be at most {_MAX_LEASE_S:g}s"))
    if problems:
        raise ConfigurationError(problems[0][0], problems[0][1], problems=problems)
    store = _rate_store(ctx.store, fallback, base)
    if (lease > 0 or lease_s > 0) and getattr(store, "backend", "memory") != "memory":
        if not isinstance(store, RateLimitStore):
            raise ConfigurationError(base, "the configured state store does not support leases")
        store = LeasedRateStore(store, lease=float(lease), lease_s=lease_s, clock=ctx.clock)
    return RateLimitDetector(
        spec.name,
        store=store,
        limits=limits,
        key=key,
        cost=cost,
        cost_constant=cost_constant,
        headers=headers,
    )


#: the detector types of this family
FACTORIES: dict[str, DetectorFactory] = {"rate": build_rate}
