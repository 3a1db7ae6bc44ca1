"""Rate and quota limits: denial of ML service and cost harvesting (AML.T0029, AML.T0034).

Attack tools batch their queries, so a request costs what it asks of the model:
its rows by default (a batch of 100 rows is 100 queries), its values (rows x
features: one 65 000-wide row costs what 65 000 one-feature rows do), a constant, or for
text an approximate token count (prompt characters / 4, plus ``max_tokens``
times ``n`` completions). Every limit of a detector is checked at once and the
cost is taken from all of them only when all admit the request: a request
refused by a daily quota does not eat into the per-second budget, and a refused
request costs nothing.

Budgets are kept per client, per client and policy, per policy (a global
ceiling that protects the model itself), or per address or subnet: a ceiling
above the client that a new API key does not reset. State keys hold the client's keyed
hash, never its raw identity. The store (``memory://`` or ``redis://``) does
the arithmetic atomically; this module only builds keys, costs and headers.

Every result carries the IETF ``RateLimit-Policy`` and ``RateLimit`` header
fields (draft-ietf-httpapi-ratelimit-headers), whether the request was admitted
or not. The score is the fraction of the tightest limit that is left, so higher
is more normal; a refused request scores below the threshold 0.0.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from inference_guard.detectors.base import Detector, DetectorResult, Query
from inference_guard.detectors.store import (
    GcraLimit,
    RateLimit,
    RateState,
    RateStore,
    WindowLimit,
)

__all__ = [
    "COST_MODES",
    "KEY_MODES",
    "LimitSpecError",
    "NamedLimit",
    "RateLimitDetector",
    "parse_duration",
    "parse_limits",
    "request_cost",
]

#: whose budget a request draws on
KEY_MODES: tuple[str, ...] = ("client", "client_policy", "policy", "ip", "subnet")
#: what a request costs
COST_MODES: tuple[str, ...] = ("rows", "constant", "tokens", "values")
#: most limits one detector may check
MAX_LIMITS = 16
#: largest cost charged for one request (a store accepts up to 2**40)
MAX_COST = 1 << 40
#: retry hint for a request larger than a limit's capacity, which never fits
_NEVER_FITS_RETRY_S = 1.0

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h|d)\s*$")
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_ALGORITHMS = {"gcra": "gcra", "token_bucket": "gcra", "sliding_window": "sliding_window"}
_LIMIT_KEYS = frozenset({"algorithm", "rate", "per", "burst", "limit", "name"})


@dataclass(frozen=True, slots=True)
class NamedLimit:
    """A limit and the name it is advertised under in the ``RateLimit`` headers."""

    #: quota policy name (letters, digits, ``_ . -``; sent to clients)
    name: str
    #: the limit itself
    limit: RateLimit


class LimitSpecError(ValueError):
    """Bad limit parameters. ``problems`` holds ``(key path, problem)`` pairs.

    Paths are relative to the detector's ``params`` (``limits[1].per``), so the
    guard can prefix them with the detector's position in the config file.
    """

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = problems
        super().__init__("; ".join(f"{path}: {problem}" for path, problem in problems))


def parse_duration(value: object) -> float:
    """Seconds from ``1s``, ``500ms``, ``1m``, ``1h``, ``1d`` or a number of seconds.

    Raises ``ValueError`` naming what was wrong; durations must be at least 1 ms.

    >>> parse_duration("500ms"), parse_duration("1d"), parse_duration(2)
    (0.5, 86400.0, 2.0)
    """
    if isinstance(value, bool):
        raise ValueError("must be a duration such as 1s, 500ms, 1m, 1h, 1d, got a boolean")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        match = _DURATION.match(value)
        if match is None:
            raise ValueError(f"must be a duration such as 1s, 500ms, 1m, 1h, 1d, got {value!r}")
        seconds = float(match.group(1)) * _UNITS[match.group(2)]
    else:
        raise ValueError(f"must be a duration such as 1s or a number of seconds, got {value!r}")
    if not (math.isfinite(seconds) and seconds >= 0.001):
        raise ValueError(f"must be a finite duration of at least 1ms, got {value!r}")
    return seconds


def parse_limits(raw: object, *, default_name: str, path: str = "limits") -> tuple[NamedLimit, ...]:
    """Validate the ``limits`` list of a rate detector's params.

    Each item is ``{rate, per, burst}`` (GCRA, the default when ``rate`` is given)
    or ``{limit, per, algorithm: sliding_window}``; ``algorithm`` may be given
    explicitly (``gcra``, ``token_bucket``, ``sliding_window``), ``burst``
    defaults to the rate rounded up, and ``name`` to ``default_name`` (with
    ``-<index>`` appended when there are several limits). Every problem is
    collected and raised at once as :class:`LimitSpecError`.

    >>> [n.name for n in parse_limits([{"rate": 20, "per": "1s", "burst": 40}], default_name="api")]
    ['api']
    """
    problems: list[tuple[str, str]] = []
    if not isinstance(raw, list) or not raw:
        raise LimitSpecError([(path, f"must be a non-empty list of limits, got {raw!r}")])
    if len(raw) > MAX_LIMITS:
        raise LimitSpecError([(path, f"at most {MAX_LIMITS} limits, got {len(raw)}")])
    out: list[NamedLimit] = []
    for i, item in enumerate(raw):
        item_path = f"{path}[{i}]"
        default = default_name if len(raw) == 1 else f"{default_name}-{i}"
        named = _parse_limit(item, item_path, default, problems)
        if named is not None:
            out.append(named)
    seen: set[str] = set()
    for i, named in enumerate(out):
        if named.name in seen:
            problems.append((f"{path}[{i}].name", f"duplicate limit name {named.name!r}"))
        seen.add(named.name)
    if problems:
        raise LimitSpecError(problems)
    return tuple(out)


def _parse_limit(
    item: object, path: str, default_name: str, problems: list[tuple[str, str]]
) -> NamedLimit | None:
    if not isinstance(item, Mapping):
        problems.append((path, f"must be a mapping, got {item!r}"))
        return None
    before = len(problems)
    for key in item:
        if key not in _LIMIT_KEYS:
            problems.append(
                (f"{path}.{key}", f"unknown key (allowed: {', '.join(sorted(_LIMIT_KEYS))})")
            )
    algorithm = _algorithm(item, path, problems)
    if algorithm is None:
        return None
    name = item.get("name", default_name)
    if not isinstance(name, str) or not _NAME.match(name):
        problems.append((f"{path}.name", "must be 1-64 characters of letters, digits, '_.-'"))
    if "per" not in item:
        problems.append((f"{path}.per", "is required (a duration such as 1s, 1m, 1d)"))
        period = 1.0
    else:
        try:
            period = parse_duration(item["per"])
        except ValueError as exc:
            problems.append((f"{path}.per", str(exc)))
            period = 1.0
    limit: RateLimit
    if algorithm == "gcra":
        if "limit" in item:
            problems.append((f"{path}.limit", "is for sliding_window; GCRA takes rate and burst"))
        rate = _number(item, "rate", path, problems)
        default_burst = max(1, math.ceil(rate)) if rate > 0 else 1
        burst = _integer(item, "burst", path, problems, default=default_burst)
        if len(problems) > before:
            return None
        limit = GcraLimit(rate=rate, period=period, burst=burst)
    else:
        for key in ("rate", "burst"):
            if key in item:
                problems.append((f"{path}.{key}", "is for GCRA; sliding_window takes limit"))
        count = _integer(item, "limit", path, problems, default=None)
        if len(problems) > before:
            return None
        limit = WindowLimit(limit=count, period=period)
    return NamedLimit(str(name), limit)


def _algorithm(item: Mapping[Any, Any], path: str, problems: list[tuple[str, str]]) -> str | None:
    raw = item.get("algorithm")
    if raw is None:
        if "rate" in item:
            return "gcra"
        if "limit" in item:
            return "sliding_window"
        problems.append((path, "needs rate (GCRA) or limit (sliding_window)"))
        return None
    algorithm = _ALGORITHMS.get(raw) if isinstance(raw, str) else None
    if algorithm is None:
        problems.append(
            (f"{path}.algorithm", f"must be one of {', '.join(_ALGORITHMS)}, got {raw!r}")
        )
    return algorithm


def _number(item: Mapping[Any, Any], key: str, path: str, problems: list[tuple[str, str]]) -> float:
    value = item.get(key)
    if value is None:
        problems.append((f"{path}.{key}", "is required"))
        return 0.0
    if isinstance(value, bool) or not isinstance(value, int | float):
        problems.append((f"{path}.{key}", f"must be a number, got {value!r}"))
        return 0.0
    if not (math.isfinite(value) and value > 0):
        problems.append((f"{path}.{key}", f"must be a finite number > 0, got {value!r}"))
        return 0.0
    return float(value)


def _integer(
    item: Mapping[Any, Any],
    key: str,
    path: str,
    problems: list[tuple[str, str]],
    *,
    default: int | None,
) -> int:
    value = item.get(key, default)
    if value is None:
        problems.append((f"{path}.{key}", "is required"))
        return 1
    if isinstance(value, bool) or not isinstance(value, int):
        problems.append((f"{path}.{key}", f"must be an integer, got {value!r}"))
        return 1
    if not 1 <= value <= MAX_COST:
        problems.append((f"{path}.{key}", f"must be an integer in [1, {MAX_COST}], got {value}"))
        return 1
    return value


def _count(value: object, default: int) -> int:
    # adapter extras come from the client's payload: anything odd counts as the default
    if isinstance(value, bool):
        return default
    if isinstance(value, int):
        return max(0, value)
    if isinstance(value, float) and math.isfinite(value):
        return max(0, math.ceil(value))
    return default


def request_cost(query: Query, mode: str = "rows", constant: int = 1) -> int:
    """What ``query`` costs under ``mode`` (``rows``, ``constant``, ``tokens`` or ``values``).

    ``rows``: the request's row (or prompt) count, at least 1. ``values``: the
    numbers in its matrix (rows x features), or its row count when it carries
    no matrix (texts, opaque payloads), at least 1. ``constant``:
    ``constant``. ``tokens``: prompt characters / 4, rounded up, plus
    ``extra["max_tokens"]`` (0 if absent) times ``extra["n"]`` (1 if absent),
    at least 1. The result is capped at ``2**40``.

    >>> request_cost(Query("c", "p", None, n_rows=100))
    100
    >>> import numpy as np
    >>> request_cost(Query("c", "p", np.zeros((2, 500)), n_rows=2), "values")
    1000
    >>> request_cost(Query("c", "p", None, texts=("x" * 10,), extra={"max_tokens": 8, "n": 2}),
    ...              "tokens")
    19
    """
    if mode == "rows":
        cost = max(1, query.n_rows)
    elif mode == "constant":
        cost = constant
    elif mode == "tokens":
        chars = sum(len(text) for text in query.texts)
        max_tokens = _count(query.extra.get("max_tokens", 0), 0)
        n = max(1, _count(query.extra.get("n", 1), 1))
        cost = max(1, -(-chars // 4) + max_tokens * n)
    elif mode == "values":
        cost = max(1, query.n_rows if query.rows is None else int(query.rows.size))
    else:
        raise ValueError(f"cost must be one of {', '.join(COST_MODES)}, got {mode!r}")
    return min(cost, MAX_COST)


class RateLimitDetector(Detector):
    """Rate and quota limits on what clients ask of the model.

    Each request costs ``cost`` units (see :func:`request_cost`) and is admitted
    only when every limit has that many units left; then the units are taken
    from all of them in one atomic store operation. ``inspect`` is anomalous
    exactly when the request does not fit; the policy's action (normally
    ``throttle``) then answers 429 with ``retry_after``.

    Parameters
    ----------
    name : str
        Detector name (metrics, audit log, state keys, default limit names).
    store : RateStore
        Where the budgets live (the guard's memory or Redis store).
    limits : sequence of GcraLimit, WindowLimit or NamedLimit
        Checked together; unnamed limits are advertised as ``name`` (one limit)
        or ``name-<index>``.
    key : {"client", "client_policy", "policy", "ip", "subnet"}, default="client"
        Whose budget: one per client (shared by every policy whose rate
        detector has this ``name``), one per client within the policy, one
        for the whole policy (protecting the model from everyone together), or
        one per address or subnet (``Query.ip``, ``Query.subnet``; the client's
        when the query carries none): a ceiling that holds whatever credential
        each request presents.
    cost : {"rows", "constant", "tokens", "values"}, default="rows"
        What a request costs (:func:`request_cost`). ``values`` charges a wide
        row for its width; a second detector (another ``name``) can charge the
        same clients per row as well.
    cost_constant : int, default=1
        The cost of every request when ``cost="constant"``.
    headers : bool, default=True
        Whether results carry the ``RateLimit-Policy`` and ``RateLimit`` fields
        (IETF draft) for the answer. ``False`` tells clients nothing of their
        budget (a client pacing its queries just under a limit learns it only
        from refusals, whose ``Retry-After`` the guard still sends).

    Notes
    -----
    ``score`` is ``remaining / limit`` of the tightest limit after the request
    (in [0, 1]) when it is admitted, and ``(remaining - cost) / limit`` of the
    tightest refusing limit, clipped to -1, when it is not: below the threshold
    0.0 exactly when refused. It is a per-policy quota-pressure signal; never a
    per-client metric label.

    Examples
    --------
    >>> import asyncio
    >>> from inference_guard.detectors.base import Query
    >>> from inference_guard.detectors.store import GcraLimit
    >>> from inference_guard.guard.stores.memory import MemoryStore
    >>> det = RateLimitDetector("rate", store=MemoryStore(),
    ...                         limits=[GcraLimit(rate=20, period=1.0, burst=40)])
    >>> first = asyncio.run(det.inspect(Query("client-hash", "api", None, n_rows=30)))
    >>> first.anomalous, first.score, dict(first.headers)["RateLimit"]
    (False, 0.25, '"rate";r=10;t=2')
    >>> second = asyncio.run(det.inspect(Query("client-hash", "api", None, n_rows=30)))
    >>> second.anomalous, round(second.retry_after, 2)
    (True, 1.0)
    """

    technique: ClassVar[str] = "AML.T0029"

    def __init__(
        self,
        name: str,
        *,
        store: RateStore,
        limits: Sequence[RateLimit | NamedLimit],
        key: str = "client",
        cost: str = "rows",
        cost_constant: int = 1,
        headers: bool = True,
    ) -> None:
        super().__init__(name)
        if key not in KEY_MODES:
            raise ValueError(f"key must be one of {', '.join(KEY_MODES)}, got {key!r}")
        if cost not in COST_MODES:
            raise ValueError(f"cost must be one of {', '.join(COST_MODES)}, got {cost!r}")
        if isinstance(cost_constant, bool) or not isinstance(cost_constant, int):
            raise ValueError(f"cost_constant must be an integer, got {cost_constant!r}")
        if not 1 <= cost_constant <= MAX_COST:
            raise ValueError(f"cost_constant must be in [1, {MAX_COST}], got {cost_constant}")
        if not limits or len(limits) > MAX_LIMITS:
            raise ValueError(f"limits must hold 1 to {MAX_LIMITS} limits, got {len(limits)}")
        if not _NAME.match(name):
            raise ValueError(f"name must be 1-64 characters of letters, digits, '_.-': {name!r}")
        named = tuple(
            item
            if isinstance(item, NamedLimit)
            else NamedLimit(name if len(limits) == 1 else f"{name}-{i}", item)
            for i, item in enumerate(limits)
        )
        names = [n.name for n in named]
        for n in names:
            if not _NAME.match(n):
                raise ValueError(f"limit names must be 1-64 of letters, digits, '_.-': {n!r}")
        if len(set(names)) != len(names):
            raise ValueError(f"limit names must be distinct, got {names}")
        self.store = store
        self.limits = named
        self.key = key
        self.cost = cost
        self.cost_constant = cost_constant
        #: whether results carry the RateLimit fields
        self.headers = headers
        #: whether :meth:`inspect` reads the request's matrix (only to cost its
        #: values): otherwise the guard may count the rows without building it
        self.reads_rows = cost == "values"
        # one state key per limit; the algorithm letter keeps a reconfigured limit
        # from reading another algorithm's state
        self._suffixes = tuple(
            (f":{i}{'g' if isinstance(n.limit, GcraLimit) else 'w'}", n.limit)
            for i, n in enumerate(named)
        )
        self._policy_header = ", ".join(
            f'"{n.name}";q={n.limit.capacity};w={max(1, math.ceil(n.limit.window))}' for n in named
        )
        # per-request constants: the key's fixed prefix, and for the usual single
        # limit its state-key suffix and the quoted name of its RateLimit item
        if key == "client":
            self._key_prefix = f"rate:{{{name}:c:"
        elif key == "client_policy":
            self._key_prefix = f"rate:{{{name}:cp:"
        elif key == "policy":
            self._key_prefix = f"rate:{{{name}:p:"
        else:
            self._key_prefix = f"rate:{{{name}:{key[0]}:"
        self._single = len(named) == 1
        self._suffix0, self._limit0 = self._suffixes[0]
        self._item0 = f'"{named[0].name}";r='
        self._items = tuple(f'"{n.name}";r=' for n in named)
        self._quoted = tuple(repr(n.name) for n in named)
        self._policy_item = ("RateLimit-Policy", self._policy_header)
        # the same, as sent on the wire (admit_now)
        self._policy_wire = (b"ratelimit-policy", self._policy_header.encode("latin-1"))
        self._item0_wire = self._item0.encode("latin-1")

    def _base_key(self, query: Query) -> str:
        return self._key_of(query.client, query.policy, query.ip, query.subnet)

    def _key_of(self, client: str, policy: str, ip: str, subnet: str) -> str:
        # the {...} hash tag keeps a client's keys in one Redis Cluster slot
        if self.key == "client":
            return self._key_prefix + client + "}"
        if self.key == "client_policy":
            return self._key_prefix + policy + ":" + client + "}"
        if self.key == "policy":
            return self._key_prefix + policy + "}"
        layer = ip if self.key == "ip" else subnet
        return self._key_prefix + (layer or client) + "}"

    @property
    def answers_now(self) -> bool:
        """Whether :meth:`admit_now` may answer: a cost known from the row count, and a
        store that answers some checks at once (``memory://``, or leases on Redis)."""
        return self.cost in ("rows", "constant") and getattr(self.store, "answers_now", False)

    def admit_now(
        self, client: str, policy: str, ip: str, subnet: str, n_rows: int
    ) -> tuple[float, tuple[tuple[bytes, bytes], ...]] | None:
        """What :meth:`inspect` answers, at once, when the store answers at once and admits.

        The arguments are the :class:`Query` fields :meth:`inspect` reads (for
        a cost of ``rows`` or ``constant``). An admitted request's answer is the
        result's ``score`` and its ``headers`` as sent on the wire (lower-case
        names, latin-1 values), having consumed the cost exactly as
        :meth:`inspect` would; ``None`` has consumed nothing (a refusal, a check
        the store must make remotely, another cost mode): ask :meth:`inspect`. A
        front end's hot path, with no coroutine and no result object. Nothing
        after the store's check can raise (its states hold finite numbers and a
        limit of at least 1), so an answer is never lost once the cost is taken.
        """
        acquire_now = getattr(self.store, "acquire_now", None)
        if acquire_now is None:
            return None
        if self.cost == "rows":
            cost = n_rows if 1 <= n_rows <= MAX_COST else min(max(1, n_rows), MAX_COST)
        elif self.cost == "constant":
            cost = self.cost_constant
        else:
            return None
        base = self._key_of(client, policy, ip, subnet)
        if self._single:
            states = acquire_now(((base + self._suffix0, self._limit0),), cost=cost)
            if states is None:
                return None
            state = states[0]
            if not self.headers:
                return state.remaining / state.limit, ()
            value = b"%s%d;t=%d" % (self._item0_wire, state.remaining, math.ceil(state.reset_after))
            return state.remaining / state.limit, (self._policy_wire, (b"ratelimit", value))
        states = acquire_now(
            [(base + suffix, limit) for suffix, limit in self._suffixes], cost=cost
        )
        if states is None:
            return None
        result = self._admitted(states)
        if not self.headers:
            return result.score, ()
        return result.score, (
            self._policy_wire,
            (b"ratelimit", result.headers[1][1].encode("latin-1")),
        )

    def _admitted(self, states: Sequence[RateState]) -> DetectorResult:
        """The result of a check every limit admitted (their ``states``, in order)."""
        if self._single:
            state = states[0]
            return DetectorResult(
                self.name,
                state.remaining / state.limit,
                0.0,
                False,
                headers=(
                    self._policy_item,
                    (
                        "RateLimit",
                        f"{self._item0}{state.remaining};t={math.ceil(state.reset_after)}",
                    ),
                )
                if self.headers
                else (),
            )
        ceil = math.ceil
        score = 1.0
        items = []
        for item, s in zip(self._items, states, strict=True):
            items.append(f"{item}{s.remaining};t={ceil(s.reset_after)}")
            left = s.remaining / s.limit
            if left < score:
                score = left
        return DetectorResult(
            self.name,
            score,
            0.0,
            False,
            headers=(self._policy_item, ("RateLimit", ", ".join(items))) if self.headers else (),
        )

    async def inspect(self, query: Query) -> DetectorResult:
        """Check the request against every limit, consuming its cost only if all admit it."""
        if self.cost == "rows":
            n_rows = query.n_rows
            cost = n_rows if 1 <= n_rows <= MAX_COST else min(max(1, n_rows), MAX_COST)
        else:
            cost = request_cost(query, self.cost, self.cost_constant)
        base = (
            self._key_prefix + query.client + "}" if self.key == "client" else self._base_key(query)
        )
        # a store that answers at once (memory://) is asked without a coroutine
        sync = getattr(self.store, "acquire_sync", None)
        ceil = math.ceil
        if self._single:
            check = ((base + self._suffix0, self._limit0),)
            states = (
                sync(check, cost=cost)
                if sync is not None
                else await self.store.acquire(check, cost=cost)
            )
            state = states[0]
            if state.allowed:
                return self._admitted(states)
            headers: tuple[tuple[str, str], ...] = (
                self._policy_item,
                ("RateLimit", f"{self._item0}{state.remaining};t={ceil(state.reset_after)}"),
            )
        else:
            checks = [(base + suffix, limit) for suffix, limit in self._suffixes]
            states = (
                sync(checks, cost=cost)
                if sync is not None
                else await self.store.acquire(checks, cost=cost)
            )
            # one pass: the RateLimit items, and whether (and how tightly) every limit admits
            items = []
            admitted = True
            score = 1.0
            for item, s in zip(self._items, states, strict=True):
                items.append(f"{item}{s.remaining};t={ceil(s.reset_after)}")
                if s.allowed:
                    left = s.remaining / s.limit
                    if left < score:
                        score = left
                else:
                    admitted = False
            headers = (self._policy_item, ("RateLimit", ", ".join(items)))
            if admitted:
                return DetectorResult(
                    self.name, score, 0.0, False, "", 0, None, headers if self.headers else ()
                )
        # one pass over the refusing limits: the tightest (the first whose cost does not
        # fit at all, else the one furthest over), the longest wait, the lowest score
        tightest = -1
        tight = math.inf
        too_big = -1
        retry_after = 0.0
        for i, s in enumerate(states):
            if s.allowed:
                continue
            over = (s.remaining - cost) / s.limit
            if over < tight:
                tight, tightest = over, i
            if s.retry_after > retry_after:
                retry_after = s.retry_after
            if too_big < 0 and cost > s.limit:
                too_big = i
        score = max(-1.0, min(tight, -1e-9))
        if too_big >= 0:
            state = states[too_big]
            reason = (
                f"cost {cost} exceeds the capacity {state.limit} of limit {self._quoted[too_big]}"
            )
            # it never fits: don't invite an immediate retry of the same request
            retry_after = max(retry_after, _NEVER_FITS_RETRY_S)
        else:
            state = states[tightest]
            reason = f"limit {self._quoted[tightest]} exceeded: cost {cost}, {state.remaining} left"
        return DetectorResult(
            self.name,
            score,
            0.0,
            True,
            reason,
            query.n_rows,
            retry_after,
            headers if self.headers else (),
        )
