"""The rate-limit capability of a store (after ``limits.storage.MovingWindowSupport``).

A backend that can enforce rate limits atomically subclasses both
:class:`~guard.stores.base.Store` and :class:`RateLimitStore`, and implements
:meth:`RateLimitStore.acquire`; the single-limit helpers come for free. The rate
detector's factory checks the capability when the detector is built, not on the
first request.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

from inference_guard.detectors.store import GcraLimit, RateCheck, RateState, WindowLimit

__all__ = ["RateLimitStore"]


class RateLimitStore(ABC):
    """Atomic GCRA and sliding-window checks; implements :class:`detectors.store.RateStore`.

    :meth:`acquire` checks several limits in one atomic step and consumes the
    cost from all of them only when every one admits the request, so a request
    refused by a daily quota does not eat into the per-second budget. A refused
    request consumes nothing.
    """

    #: whether :meth:`acquire_now` may answer (a store whose every check is a round
    #: trip never does, and a front end need not ask it)
    answers_now: bool = False

    @abstractmethod
    async def acquire(self, checks: Sequence[RateCheck], *, cost: int) -> tuple[RateState, ...]:
        """One :class:`RateState` per check, in order; consume ``cost`` only if all admit."""

    def acquire_now(
        self, checks: Sequence[RateCheck], *, cost: int
    ) -> tuple[RateState, ...] | None:
        """:meth:`acquire`'s answer when it can be given at once and admits, else ``None``.

        An admitting answer has consumed ``cost`` exactly as :meth:`acquire` would;
        ``None`` has consumed nothing (a refusal, or an answer that needs a round
        trip): ask :meth:`acquire`. A hot path's shortcut, with no coroutine; this
        default never answers.
        """
        return None

    async def acquire_lease(
        self, checks: Sequence[RateCheck], *, cost: int, lease: int
    ) -> tuple[tuple[RateState, ...], int]:
        """:meth:`acquire`, and perhaps ``lease`` more units for the caller to spend locally.

        Returns the states (those of ``cost`` alone) and the units granted:
        ``lease`` or 0. A shared store grants a lease only with an admitted
        request and only while every limit keeps at least half its capacity
        after ``cost + lease`` are taken (:mod:`guard.stores.lease` spends it).
        This default, for per-process stores, never grants one: the check is
        local already.
        """
        return await self.acquire(checks, cost=cost), 0

    async def gcra(
        self, key: str, *, rate: float, period: float, burst: int, cost: int
    ) -> RateState:
        """GCRA (token bucket): ``rate`` units per ``period`` seconds, ``burst`` at once."""
        (state,) = await self.acquire(((key, GcraLimit(rate, period, burst)),), cost=cost)
        return state

    async def window(self, key: str, *, limit: int, period: float, cost: int) -> RateState:
        """Sliding window: at most ``limit`` units in any ``period`` seconds (approximated)."""
        (state,) = await self.acquire(((key, WindowLimit(limit, period)),), cost=cost)
        return state
