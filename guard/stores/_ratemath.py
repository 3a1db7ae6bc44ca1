"""The rate arithmetic, one step per limit, shared by the memory backend.

``guard/stores/lua/acquire.lua`` is the same arithmetic in Lua for Redis; keep
the two in step (the shared test suite runs every case against both). A step
reads the limit's stored state and returns what the limit answers plus the state
to store if the request is admitted; nothing is written on a rejection.

The script's lease (``ARGV[2]``: units taken with an admitted check for the
caller to spend locally, :mod:`guard.stores.lease`) has no twin here: a
per-process store never grants one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from inference_guard.detectors.store import GcraLimit, RateCheck, RateState, WindowLimit

__all__ = ["MAX_COST", "check_acquire", "gcra_step", "window_step"]

#: float slack, in units, so that rounding never turns an exact fit into a rejection
_EPS = 1e-9
#: largest cost accepted (doubles, in Lua too, hold integers exactly up to 2**53)
MAX_COST = 1 << 40
#: ``RateState(...)`` without the named tuple's Python-level ``__new__`` (every check
#: makes one or two: the rate limits' hot path)
_new = tuple.__new__


def check_acquire(checks: Sequence[RateCheck], cost: int) -> None:
    """Reject malformed acquire calls (programming errors, not backend failures)."""
    if (type(cost) is not int or not 0 <= cost <= MAX_COST) and (
        isinstance(cost, bool) or not isinstance(cost, int) or not 0 <= cost <= MAX_COST
    ):
        raise ValueError(f"cost must be an integer in [0, {MAX_COST}], got {cost!r}")
    n = len(checks)
    if not n:
        raise ValueError("acquire needs at least one limit")
    if n == 2:  # the usual pair (a rate and a daily cap): no set to build
        if checks[0][0] == checks[1][0]:
            raise ValueError("acquire keys must be distinct")
    elif n > 2:
        keys = [key for key, _ in checks]
        if len(set(keys)) != len(keys):
            raise ValueError("acquire keys must be distinct")
    for _, limit in checks:
        kind = type(limit)
        if (
            kind is not GcraLimit
            and kind is not WindowLimit
            and not isinstance(limit, GcraLimit | WindowLimit)
        ):
            raise TypeError(f"unsupported limit {limit!r}")


def gcra_step(
    tat: float | None, now: float, limit: GcraLimit, cost: int, *, probe: bool = False
) -> tuple[RateState, float]:
    """One GCRA check. ``tat`` is the stored theoretical arrival time (``None``: fresh).

    Returns the answer and the new arrival time, which is also the moment the
    bucket is full again (the state's expiry). With ``probe`` (a request another
    limit has refused, so nothing is consumed), a limit that would admit it
    answers its state untouched, as at no cost, and one that would not its refusal.
    """
    t = limit.period / limit.rate  # limit.interval, without the property's call
    cap = limit.burst
    base = now if tat is None or tat < now else tat
    # units in the bucket now: capacity less what is still owed
    avail = cap - (base - now) / t
    if cost <= avail + _EPS:
        if probe:
            return _new(
                RateState, (True, max(0, math.floor(avail + _EPS)), 0.0, base - now, cap)
            ), base
        new_tat = base + cost * t
        state = _new(
            RateState, (True, max(0, math.floor(avail - cost + _EPS)), 0.0, new_tat - now, cap)
        )
        return state, new_tat
    need = min(cost, cap)
    retry = max(0.0, (need - avail) * t)
    state = _new(RateState, (False, max(0, math.floor(avail + _EPS)), retry, base - now, cap))
    return state, base


def window_step(
    stored: tuple[int, int, int] | None,
    now: float,
    limit: WindowLimit,
    cost: int,
    *,
    probe: bool = False,
) -> tuple[RateState, tuple[int, int, int], float]:
    """One sliding-window check (weighted two-window approximation).

    ``stored`` is ``(window index, count in that window, count in the one before)``.
    Returns the answer, the state to store if admitted, and its expiry time.
    ``probe``: as for :func:`gcra_step` (an admitting limit answers its state at
    no cost, and nothing is to be stored).
    """
    period = limit.period
    cap = limit.limit
    index = math.floor(now / period)
    cur = prev = 0
    if stored is not None:
        w, c, p = stored
        if w == index:
            cur, prev = c, p
        elif w == index - 1:
            prev = c
    frac = now / period - index
    est = prev * (1.0 - frac) + cur
    expires = (index + 2) * period
    if est + cost <= cap + _EPS:
        if probe:
            state = _new(
                RateState,
                (
                    True,
                    max(0, math.floor(cap - est - 0 + _EPS)),
                    0.0,
                    _window_reset(cur, prev, frac, period),
                    cap,
                ),
            )
            return state, (index, cur, prev), expires
        cur += cost
        state = _new(
            RateState,
            (
                True,
                max(0, math.floor(cap - est - cost + _EPS)),
                0.0,
                _window_reset(cur, prev, frac, period),
                cap,
            ),
        )
        return state, (index, cur, prev), expires
    need = min(cost, cap)
    if est + need <= cap + _EPS:
        # only for a cost above capacity: the limit is already as free as it gets
        retry = 0.0
    elif cur + need <= cap:
        # the previous window's weight must fade: prev * (1 - f) <= cap - cur - need
        f = 1.0 - (cap - cur - need) / prev
        retry = (f - frac) * period
    else:
        # wait for the next window, then for this window's weight to fade there
        f = 1.0 - (cap - need) / cur
        retry = (1.0 - frac) * period + f * period
    state = _new(
        RateState,
        (
            False,
            max(0, math.floor(cap - est + _EPS)),
            max(0.0, retry),
            _window_reset(cur, prev, frac, period),
            cap,
        ),
    )
    return state, (index, cur, prev), expires


def _window_reset(cur: int, prev: int, frac: float, period: float) -> float:
    if cur > 0:
        return (2.0 - frac) * period
    if prev > 0:
        return (1.0 - frac) * period
    return 0.0
